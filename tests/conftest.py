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
