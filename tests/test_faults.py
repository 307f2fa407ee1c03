"""Faults on a real dask cluster: a worker process SIGKILLed in the middle of ``pool`` and
of ``infer`` (the stage still completes, with output identical to an undisturbed run),
and workers with far less memory than the rasters they process (every raster stage
completes; each worker's peak resident memory is measured and stays below its limit).
The client killed mid-stage is ``test_resume.py``'s subject."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from aether_scale.config import load_config
from aether_scale.pipeline import run_stages
from aether_scale.workspace import Workspace

N_CHUNKS = 64  # a 256 px city in 32 px chunks


def _cfg(city: dict[str, str], address: str | None, tmp: Path, **extra) -> object:
    from fixtures import city_run

    data = city_run(city, tmp)
    data["cluster"] = {"kind": "address", "address": address} if address else {"kind": "threads"}
    data["infer"] = {"threads": 1}
    for k, v in extra.items():
        data.setdefault(k, {}).update(v)
    return load_config(data=data)


@pytest.fixture(scope="module")
def city_run(tmp_path_factory) -> dict:
    """A 256 px city run through infer on the threaded scheduler: the reference."""
    from aether_scale.config import SynthSection
    from aether_scale.synthetic import write_city

    tmp = tmp_path_factory.mktemp("faults")
    city = write_city(tmp / "city", SynthSection(size_px=256, n_pois=3000, n_luc_points=200,
                                                 n_regions=60, seed=7))
    ref = Workspace(tmp / "ref")
    run_stages(["ingest", "pois", "text", "pool", "train", "infer"], ref, _cfg(city, None, tmp))
    return {"tmp": tmp, "city": city, "ref": ref}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _records(ws: Path, stage: str, output: str) -> int:
    return sum(len(list((w / "ledger" / output).glob("*.json")))
               for w in (ws / ".work").glob(f"{stage}-*"))


@pytest.mark.parametrize("stage,output,before", [
    ("pool", "triplets.zarr", ["ingest", "pois", "text"]),
    ("infer", "field.zarr", ["ingest", "pois", "text", "pool", "train"]),
])
def test_a_worker_killed_mid_stage_changes_nothing(city_run, tmp_path, stage, output, before):
    tmp, city, ref = city_run["tmp"], city_run["city"], city_run["ref"]
    ws = tmp_path / "ws"
    shutil.copytree(ref.root, ws, ignore=shutil.ignore_patterns(output, f"{stage}.json",
                                                                *(["infer.json"] if stage == "pool"
                                                                  else [])))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        cfg = _cfg(city, cluster.scheduler_address, tmp)
        assert all(r.skipped for r in run_stages(before, Workspace(ws), cfg))
        pids = client.run(os.getpid)
        out: dict = {}

        def go() -> None:
            try:
                out["res"] = run_stages([stage], Workspace(ws), cfg)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
                out["err"] = e

        t = threading.Thread(target=go)
        t.start()
        deadline = time.time() + 120
        while _records(ws, stage, output) < 8 and t.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        at_kill = _records(ws, stage, output)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        t.join(300)
        assert not t.is_alive()
        if "err" in out:
            raise out["err"]
        assert 8 <= at_kill < N_CHUNKS, at_kill  # the worker died in the middle of the stage
        assert victim not in client.run(os.getpid).values()  # it really died (and was replaced)
    assert not out["res"][0].skipped
    assert _files(ws / output) == _files(Path(ref.path(output))), f"{output} differs"
    m = json.loads((ws / "manifests" / f"{stage}.json").read_text())
    assert m["key"] == json.loads((Path(ref.root) / "manifests" / f"{stage}.json").read_text())["key"]


def _write_tiles(folder: Path, ny: int, nx: int, n_tiles: int, seed: int = 0) -> None:
    import rasterio
    from rasterio.transform import from_origin

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    w = nx // n_tiles
    for k in range(n_tiles):
        codes = rng.integers(-127, 128, size=(64, ny, w), dtype=np.int8)
        prof = {"driver": "GTiff", "width": w, "height": ny, "count": 64, "dtype": "int8",
                "crs": "EPSG:32630", "nodata": -128, "tiled": True, "blockxsize": 256,
                "blockysize": 256, "interleave": "pixel",
                "transform": from_origin(500_000 + k * w * 10.0, 5_700_000, 10.0, 10.0)}
        with rasterio.open(folder / f"tile_{k}.tif", "w", **prof) as dst:
            dst.write(codes)


@pytest.mark.parametrize("edge", [
    2560,  # AE 400 MiB, float16 field 1.6 GiB: 2 GiB of rasters for 1 GiB workers
    pytest.param(4096, marks=pytest.mark.slow),  # AE 1 GiB, field 4 GiB
])
def test_workers_with_far_less_memory_than_the_rasters(tmp_path, edge, caplog):
    """A raster through ingest, pool and infer on two workers of 1 GiB each (the stages'
    own memory check passes them): no worker is killed for its memory, and each one's
    peak resident memory, measured on the worker by the product (the manifests), stays
    below its limit in every stage that ran on the workers."""
    import geopandas as gpd
    from shapely.geometry import Point

    ny = nx = edge
    _write_tiles(tmp_path / "ae", ny, nx, 2)
    rng = np.random.default_rng(1)
    n = 1500
    xs = 500_000 + rng.uniform(200, nx * 10 - 200, n)
    ys = 5_700_000 - rng.uniform(200, ny * 10 - 200, n)
    kinds = np.array(["cafe", "school", "park", "bank", "pharmacy", "bakery", "gym", "library"])
    gdf = gpd.GeoDataFrame({"poi_id": np.arange(n), "name": [f"place {i % 40}" for i in range(n)],
                            "category": kinds[rng.integers(0, len(kinds), n)],
                            "subcategory": kinds[rng.integers(0, len(kinds), n)]},
                           geometry=[Point(x, y) for x, y in zip(xs, ys, strict=True)],
                           crs="EPSG:32630")
    gdf.to_parquet(tmp_path / "pois.parquet")
    city = {"ae_tiles": str(tmp_path / "ae" / "*.tif"), "pois": str(tmp_path / "pois.parquet")}
    limit = 1024 * 2**20
    caplog.set_level("INFO")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=limit,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        cfg = _cfg(city, cluster.scheduler_address, tmp_path, ingest={"chunk_px": 256},
                   pool={"chunk_rows": 1024})
        ws = Workspace(tmp_path / "ws")
        res = run_stages(["ingest", "pois", "text", "pool", "train", "infer"], ws, cfg)
        assert not any(r.skipped for r in res)
        # the nanny kills a worker past 95 % of its limit (and says so); the stages' own
        # memory check may restart workers on purpose, and logs it
        assert "memory budget" not in caplog.text
        if "restarting the workers before checking again" not in caplog.text:
            assert client.run(os.getpid) == pids  # no worker was killed and restarted
    ae_bytes = ny * nx * 64
    assert ae_bytes + ny * nx * 128 * 2 > 1.5 * limit  # the rasters dwarf a worker
    assert sum(p.stat().st_size for p in (tmp_path / "ws" / "field.zarr").rglob("*")) > limit / 2
    # the product's own measure: each worker's peak resident memory (Linux VmHWM, reset
    # when the stage starts) in every stage that ran on the workers
    for stage in ("ingest", "pois", "text", "pool", "infer"):
        mem = json.loads((tmp_path / "ws" / "manifests" / f"{stage}.json").read_text()
                         )["stats"]["dask_workers"]
        assert mem["workers"] == 2 and mem["memory_limit_mib"] == 1024, (stage, mem)
        assert all(0 < p < 1024 for p in mem["peak_rss_mib"].values()), (stage, mem)
