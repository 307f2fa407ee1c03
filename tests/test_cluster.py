"""Cluster selection: each kind is started for real and runs a dask computation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

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


def _gateway_cfg(gw: dict, **extra):
    return load_config(data={"cluster": {"kind": "gateway", "gateway": {
        "address": gw["address"], "proxy_address": gw["proxy_address"], "auth": "basic",
        "username": "alice", "password": gw["password"], "workers": 1, **extra}}})


def _clusters(gw: dict, user: str = "alice") -> list:
    from dask_gateway import Gateway
    from dask_gateway.auth import BasicAuth

    with Gateway(gw["address"], gw["proxy_address"], auth=BasicAuth(user, gw["password"])) as g:
        return g.list_clusters()


@pytest.mark.gateway
def test_gateway_from_config_section_and_shut_down_on_exit(gateway):
    with connect(_gateway_cfg(gateway).cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        assert float(da.arange(100, chunks=10).sum().compute()) == 4950.0
        assert len(_clusters(gateway)) == 1
    assert _clusters(gateway) == []  # the client left: its cluster is gone


@pytest.mark.gateway
def test_gateway_from_standard_dask_gateway_env(gateway, monkeypatch):
    """DASK_GATEWAY__* environment variables (the standard configuration) are honoured."""
    env = {**gateway["env"], "DASK_GATEWAY__AUTH__KWARGS__USERNAME": "bob"}
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


@pytest.mark.gateway
def test_cluster_options_reach_the_workers(gateway):
    cfg = _gateway_cfg(gateway, cluster_options={"worker_cores": 2, "worker_memory": 0.75})
    with connect(cfg.cluster) as client:
        [w] = client.scheduler_info()["workers"].values()
        assert w["nthreads"] == 2 and w["memory_limit"] == int(0.75 * 2**30)


@pytest.mark.gateway
@pytest.mark.timeout(60)
def test_gateway_errors_are_clear_and_quick(gateway):
    from aether_scale.gateway import GatewayError

    with pytest.raises(GatewayError, match=r"refused the credentials of user 'alice' \(HTTP 40"
                                           r"[13]\).*cluster.gateway.username/password"):
        with connect(_gateway_cfg(gateway, password="wrong").cluster):
            pass
    nowhere = {"address": f"http://127.0.0.1:{_free_port()}",
               "proxy_address": f"gateway://127.0.0.1:{_free_port()}", "password": "x"}
    with pytest.raises(GatewayError, match=r"cannot reach the Dask Gateway at http://127.0.0.1"
                                           r".*DASK_GATEWAY__ADDRESS"):
        with connect(_gateway_cfg(nowhere).cluster):
            pass
    with pytest.raises(GatewayError, match=r"offers no cluster option\(s\) worker_gpus; it "
                                           r"offers: idle_timeout, worker_cores, worker_memory"):
        with connect(_gateway_cfg(gateway, cluster_options={"worker_gpus": 1}).cluster):
            pass
    assert _clusters(gateway) == []  # nothing was left running by the failures


_CRASHING_CLIENT = """
import os, sys, time
from aether_scale.cluster import connect
from aether_scale.config import load_config
cfg = load_config(data={"cluster": {"kind": "gateway", "gateway": {
    "address": sys.argv[1], "proxy_address": sys.argv[2], "username": "carol",
    "password": sys.argv[3], "workers": 1, "idle_timeout_s": 8}}})
with connect(cfg.cluster) as client:
    print("connected", flush=True)
    time.sleep(600)
"""


@pytest.mark.gateway
@pytest.mark.timeout(120)
def test_a_crashed_client_leaves_nothing_running(gateway, tmp_path):
    """A client killed with SIGKILL cannot shut its cluster down: the idle timeout the
    client asked for (cluster.gateway.idle_timeout_s) makes the server do it. (The
    gateway counts idleness from the last task, not from the client's last contact.)"""
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_CLIENT, gateway["address"],
                             gateway["proxy_address"], gateway["password"]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "connected"
        assert len(_clusters(gateway, "carol")) == 1
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 60
    while _clusters(gateway, "carol") and time.time() < deadline:
        time.sleep(1)
    assert _clusters(gateway, "carol") == []


@pytest.mark.gateway
def test_adaptive_scaling_when_asked(gateway):
    cfg = _gateway_cfg(gateway, adaptive_max=1)
    with connect(cfg.cluster) as client:
        assert float(da.arange(100, chunks=10).sum().compute()) == 4950.0
        assert len(client.scheduler_info()["workers"]) <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has(name: str) -> bool:
    return name in sys.modules


def test_warm_workers_starts_the_imports_without_waiting(tmp_path):
    """``warm_workers`` returns at once; the workers import the modules in the background
    (their event loop stays free), and a module that fails to import is left to the
    memory check to report instead of raising here."""
    from distributed import Client, LocalCluster

    from aether_scale.workers import warm_workers

    mod = "xml.dom.minidom"  # stdlib, imported by nothing the workers load themselves
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      local_directory=str(tmp_path)) as cluster, Client(cluster) as client:
        assert not any(client.run(_has, mod).values())
        warm_workers(["aether_scale_no_such_module", mod])  # the failure stops that list only
        assert not any(client.run(_has, "aether_scale_no_such_module").values())
        warm_workers([mod])
        deadline = time.time() + 60
        while not all(client.run(_has, mod).values()) and time.time() < deadline:
            time.sleep(0.1)
        assert all(client.run(_has, mod).values())
        assert client.submit(sum, [1, 2]).result() == 3  # the workers are unharmed
