"""Cluster selection: each kind is started for real and runs a dask computation."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

from aether_scale.cluster import connect, import_optional
from aether_scale.config import load_config

LOGGER = "aether_scale.cluster"


def _total(cfg_overrides: list[str]) -> float:
    cfg = load_config(overrides=cfg_overrides)
    x = da.arange(10_000, chunks=1000, dtype="f8")
    with connect(cfg.cluster):
        return float(x.sum().compute())


def test_threads_and_synchronous_schedulers(caplog):
    caplog.set_level("INFO", logger=LOGGER)
    assert _total(["cluster.kind=threads"]) == 49995000.0
    assert _total(["cluster.kind=synchronous"]) == 49995000.0
    assert "dask: in-process 'threads' scheduler" in caplog.text
    assert "dask: in-process 'synchronous' scheduler" in caplog.text


def test_local_cluster_has_configured_workers_and_memory_limit(caplog):
    caplog.set_level("INFO", logger=LOGGER)
    cfg = load_config(overrides=["cluster.kind=local", "cluster.n_workers=2",
                                 "cluster.memory_limit=512MiB"])
    with connect(cfg.cluster) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        assert len(info) == 2
        assert all(w["memory_limit"] == 512 * 2**20 for w in info.values())
        assert float(da.ones(1000, chunks=100).sum().compute()) == 1000.0
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any(m.startswith("dask: local cluster, 2 workers") and "dashboard" in m for m in msgs), msgs


def test_existing_scheduler_address():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as lc:
        cfg = load_config(overrides=["cluster.kind=address", f"cluster.address={lc.scheduler_address}"])
        with connect(cfg.cluster) as client:
            assert client.scheduler.address == lc.scheduler_address
            assert float(da.ones(100, chunks=10).sum().compute()) == 100.0


def test_cuda_kind_falls_back_without_gpu(caplog):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the fallback path does not apply")
    caplog.set_level("INFO", logger=LOGGER)
    cfg = load_config(overrides=["cluster.kind=cuda", "cluster.n_workers=1"])
    with connect(cfg.cluster) as c:
        assert c is not None and float(da.ones(10, chunks=5).sum().compute()) == 10.0
    warned = [r for r in caplog.records if r.name == LOGGER and r.levelname == "WARNING"]
    assert any("no CUDA device" in r.getMessage() for r in warned), caplog.text
    assert "dask: local cluster, 1 workers" in caplog.text  # fell back to a LocalCluster


def test_import_optional_names_the_extra():
    with pytest.raises(ImportError, match=r"aether-scale\[gpu\]"):
        import_optional("surely_not_a_module_xyz", "gpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gateway_server(tmp_path):
    """A real dask-gateway-server on loopback (UnsafeLocalBackend, simple password auth)."""
    pytest.importorskip("dask_gateway_server", reason="install the 'dev' extra")
    bindir = Path(sys.executable).parent
    http, tcp = _free_port(), _free_port()
    conf = tmp_path / "gateway_config.py"
    conf.write_text(
        f"""
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = "s3cret"
c.Proxy.address = "127.0.0.1:{http}"
c.Proxy.tcp_address = "127.0.0.1:{tcp}"
c.DaskGateway.address = "127.0.0.1:{_free_port()}"
c.ClusterConfig.scheduler_cmd = ["{bindir / 'dask'}", "scheduler"]
c.ClusterConfig.worker_cmd = ["{bindir / 'dask'}", "worker"]
c.ClusterConfig.worker_memory = "1 G"
c.ClusterConfig.worker_cores = 1
c.LocalBackend.clusters_directory = "{tmp_path / 'clusters'}"
"""
    )
    exe = shutil.which("dask-gateway-server", path=str(bindir)) or "dask-gateway-server"
    log = open(tmp_path / "gateway.log", "w")
    proc = subprocess.Popen([exe, "-f", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path)
    deadline = time.time() + 60
    while time.time() < deadline:
        # the proxy accepts connections before the API routes exist: wait for a healthy API
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/api/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "gateway.log").read_text()) from None
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("dask-gateway-server did not start: " + (tmp_path / "gateway.log").read_text())
    yield {"address": f"http://127.0.0.1:{http}", "proxy_address": f"gateway://127.0.0.1:{tcp}"}
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.mark.gateway
def test_gateway_from_config_section(gateway_server):
    cfg = load_config(data={"cluster": {"kind": "gateway", "gateway": {
        **gateway_server, "auth": "basic", "username": "alice", "password": "s3cret", "workers": 1}}})
    with connect(cfg.cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        assert float(da.arange(100, chunks=10).sum().compute()) == 4950.0


@pytest.mark.gateway
def test_gateway_from_standard_dask_gateway_env(gateway_server, monkeypatch):
    """DASK_GATEWAY__* environment variables (the standard configuration) are honoured."""
    env = {
        "DASK_GATEWAY__ADDRESS": gateway_server["address"],
        "DASK_GATEWAY__PROXY_ADDRESS": gateway_server["proxy_address"],
        "DASK_GATEWAY__AUTH__TYPE": "basic",
        "DASK_GATEWAY__AUTH__KWARGS__USERNAME": "bob",
        "DASK_GATEWAY__AUTH__KWARGS__PASSWORD": "s3cret",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dask.config.refresh()
    try:
        cfg = load_config(data={"cluster": {"kind": "gateway", "gateway": {"workers": 1}}})
        with connect(cfg.cluster) as client:
            x = np.asarray(da.ones((20, 20), chunks=10).sum(axis=0).compute())
            assert x.tolist() == [20.0] * 20
            assert client.scheduler_info()["workers"]
    finally:
        for k in env:
            os.environ.pop(k, None)
        dask.config.refresh()
