"""``aether-scale sweep``: points as train variants that borrow the unchanged stages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from aether_scale.config import SweepSection, load_config
from aether_scale.sweep import plan_points


def test_points_and_their_overrides():
    sw = SweepSection(lam=[0.0, 0.2], radii=[[25, 50], [50, 100]], train_fraction=[0.5],
                      points={"wide": {"train.out_dim": 64}})
    pts = plan_points(sw)
    assert [p.id for p in pts] == ["lam-0", "lam-0.2", "radii-25-50", "radii-50-100",
                                   "fraction-0.5", "point-wide"]
    assert pts[1].overrides == {"train.lam": 0.2}
    assert pts[3].overrides["pool.aug"] == {"shape": "circle", "radius_m": 100.0}
    with pytest.raises(ValueError, match="0 < r_b < r_a"):
        SweepSection(radii=[[100, 50]])
    with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
        SweepSection(lam=[1.5])
    with pytest.raises(ValueError, match="twice"):
        plan_points(SweepSection(lam=[0.2, 0.2]))


def test_the_demo_sweep_borrowed_what_it_did_not_change(tiny_demo):
    """The demo's λ points link the parent's AE store, POIs, texts and pooled triplets;
    the manifests of those stages are the parent's own, so the points ran only train,
    infer, regions and evaluate. The report holds every point."""
    ws = tiny_demo["workspace"]
    root = ws / "sweeps" / "lambda"
    doc = json.loads((root / "sweep.json").read_text())
    assert [p["id"] for p in doc["points"]] == ["lam-0", "lam-0.9"]
    for p in doc["points"]:
        assert p["state"] == "ran" and p["ran"] == ["train", "infer", "regions", "evaluate"]
        assert len(p["metrics"]["sdm"]["kl"]) == 2 and len(p["metrics"]["luc"]["f1"]) == 2
        d = root / p["id"]
        for stage, entry in (("ingest", "ae.zarr"), ("pois", "pois.parquet"),
                             ("text", "text.zarr"), ("pool", "triplets.zarr")):
            assert (d / entry).is_symlink() and (d / entry).resolve() == (ws / entry).resolve()
            assert (d / "manifests" / f"{stage}.json").read_bytes() == \
                (ws / "manifests" / f"{stage}.json").read_bytes()
        cfg = load_config(str(d / "config.yaml"))
        assert cfg.train.lam == p["value"] and cfg.train.epochs == 2 and cfg.train.variants == {}
        m = json.loads((d / "report" / "metrics.json").read_text())
        assert set(m["sdm"]) == {"AE", "AETHER"}
    md = (root / "sweep.md").read_text()
    assert "| 0.9 |" in md and (root / "lam.png").stat().st_size > 10_000
    assert doc["seeds"] == [0, 1] and "over seeds [0, 1];" in md
    log = tiny_demo["log"].read_text()
    assert "[sweep] lam-0.9: ran train, infer, regions, evaluate" in log


def _sweep_cmd(ws, *extra):
    return [sys.executable, "-m", "aether_scale", "sweep", "-w", str(ws), "--set",
            "sweep.name=resume", "--set", "sweep.lam=[0.1, 0.3, 0.6]", "--set",
            "sweep.radii=[[25, 75]]", *extra]


def test_a_killed_sweep_resumes_and_other_radii_pool_their_own(tiny_demo, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(tiny_demo["workspace"], ws, symlinks=True,
                    ignore=shutil.ignore_patterns("sweeps", "queries"))
    env = {**os.environ, "HOME": str(tiny_demo["home"]), "AETHER_SCALE_NO_BAR": "1"}
    over = ["--set", "sweep.overrides={train.epochs: 2}", "--set", "cluster.kind=local",
            "--set", "cluster.n_workers=2", "--set", "sweep.parallel=2"]
    root = ws / "sweeps" / "resume"
    p = subprocess.Popen(_sweep_cmd(ws, *over), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 300:
        done = [d for d in root.glob("*/report/metrics.json")]
        if done or p.poll() is not None:
            break
        time.sleep(0.2)
    assert p.poll() is None and done, "the sweep finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = {d.parent.parent.name: d.stat().st_mtime_ns for d in root.glob("*/report/metrics.json")}
    assert 0 < len(first) < 4  # killed after some, not all, points finished
    out = subprocess.run(_sweep_cmd(ws, *over), env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((root / "sweep.json").read_text())
    states = {q["id"]: q["state"] for q in doc["points"]}
    assert all(states[k] == "reused" for k in first), states
    assert all(v in ("ran", "reused") for v in states.values()) and len(states) == 4
    for k in first:  # finished points were not touched again
        assert (root / k / "report" / "metrics.json").stat().st_mtime_ns == first[k]
    # the radii point pooled its own views in its own folder; the λ points borrowed them
    r = root / "radii-25-75"
    assert not (r / "triplets.zarr").is_symlink() and (r / "triplets.zarr").is_dir()
    pool = json.loads((r / "manifests" / "pool.json").read_text())
    assert pool["key"] != json.loads((ws / "manifests" / "pool.json").read_text())["key"]
    assert pool["config"]["base"]["radius_m"] == 25.0
    assert (root / "lam-0.3" / "triplets.zarr").is_symlink()


def test_a_sweep_needs_points_and_a_run_workspace(tiny_demo, tmp_path):
    env = {**os.environ, "HOME": str(tiny_demo["home"])}
    out = subprocess.run([sys.executable, "-m", "aether_scale", "sweep", "-w",
                          str(tiny_demo["workspace"]), "--set", "sweep.lam=[]"],
                         env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "nothing to sweep" in out.stderr
    out = subprocess.run([sys.executable, "-m", "aether_scale", "sweep", "-w",
                          str(tmp_path / "empty"), "--set", "sweep.lam=[0.1]"],
                         env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "--until pool" in out.stderr


def _paused_cluster_client():
    """A one-worker LocalCluster that dask pauses above 80 % of 512 MiB (a fresh worker: ~62 MiB)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                           memory_limit="512MiB", dashboard_address=None)
    return cluster, Client(cluster)


def _wait_paused(client, timeout=30.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if all(w["status"] == "paused" for w in client.scheduler_info()["workers"].values()):
            return
        time.sleep(0.1)
    raise AssertionError("the worker was never paused")


def test_a_sweep_resumes_workers_its_finished_points_left_paused():
    """Garbage a finished point left (here 370 MiB in a reference cycle) pauses the worker
    for its memory; the sweep's wait collects it on the workers and the next point runs."""
    from aether_scale.sweep.run import _next_finished

    def leave_garbage():
        import numpy as np

        box = {"x": np.ones(370 * 2**20 // 8)}
        box["self"] = box  # a cycle: only the garbage collector frees it
        return "left"

    cluster, client = _paused_cluster_client()
    with cluster, client:
        client.run(lambda: __import__("gc").disable())  # as if no collection came soon
        assert client.submit(leave_garbage, pure=False).result() == "left"
        _wait_paused(client)
        nxt = client.submit(lambda: "next point", pure=False)
        assert _next_finished(client, [nxt], "512MiB").result() == "next point"


def test_a_sweep_whose_workers_stay_paused_says_so(monkeypatch):
    """Memory a point keeps (here a module global) cannot be collected: instead of waiting
    forever the sweep stops with the workers' memory and the fix."""
    from aether_scale.sweep import run as sweep_run

    def hold():
        import builtins

        import numpy as np

        builtins._aether_test_hold = np.ones(370 * 2**20 // 8)
        return "held"

    monkeypatch.setattr(sweep_run, "STALL_S", 3.0)
    cluster, client = _paused_cluster_client()
    with cluster, client:
        assert client.submit(hold, pure=False).result() == "held"
        _wait_paused(client)
        nxt = client.submit(lambda: "never", pure=False)
        with pytest.raises(sweep_run.SweepError, match=r"paused for memory \(\d+ of 512 MiB\)"
                           r".*cluster.memory_limit, now 512MiB.*sweep.parallel=1"):
            sweep_run._next_finished(client, [nxt], "512MiB")
