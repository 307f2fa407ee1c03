"""Pooling engine vs an independent brute-force computation, the pool stage end to end.

The brute force below is written from the DESIGN.md membership rule alone:
for each point it builds a boolean mask over the whole (small) raster and
averages the de-quantised valid pixels with numpy. It shares no code with
the engine (no prefix sums, no chunking, no per-chunk partial sums).
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from fixtures import BUFFERS, PIX, make_raster, points_for

from aether_scale.config import BufferSpec
from aether_scale.pool import pool_buffers

# --------------------------------------------------------------------------- fixtures

def brute_force(dec: np.ndarray, xs: np.ndarray, ys: np.ndarray, px: float, py: float,
                spec: dict) -> tuple[np.ndarray, int]:
    """Mean of valid pixels of ``dec`` (h, w, C; NaN = nodata) in one buffer, L2-normalised."""
    h, w, _ = dec.shape
    X, Y = np.meshgrid(xs, ys)  # pixel centres, (h, w)
    if spec["shape"] == "circle":
        r = spec["radius_m"]
        member = (X - px) ** 2 + (Y - py) ** 2 <= r * r
    else:
        k = spec["radius_px"]
        col = int(np.argmin(np.abs(xs - px)))
        row = int(np.argmin(np.abs(ys - py)))
        member = np.zeros((h, w), bool)
        member[max(row - k, 0) : row + k + 1, max(col - k, 0) : col + k + 1] = True
    valid = member & ~np.isnan(dec).any(axis=-1)
    n = int(valid.sum())
    if n == 0:
        return np.full(dec.shape[-1], np.nan), 0
    m = dec[valid].mean(axis=0)
    return m / np.linalg.norm(m), n






def check_against_brute_force(da, dec, px, py, buffers, res, *, atol=1e-5) -> None:
    xs, ys = da.x.values, da.y.values
    for b, spec in enumerate(buffers):
        for i in range(px.size):
            if res.outside[i]:
                assert np.isnan(res.vectors[b][i]).all()
                continue
            want, n = brute_force(dec, xs, ys, px[i], py[i], spec)
            assert res.counts[b][i] == n, (spec, i, px[i], py[i])
            if n == 0:
                assert np.isnan(res.vectors[b][i]).all()
            else:
                np.testing.assert_allclose(res.vectors[b][i], want, atol=atol, rtol=0)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("y_decreasing", [True, False])
def test_codes_match_brute_force(y_decreasing: bool) -> None:
    da, dec = make_raster(y_decreasing=y_decreasing)
    px, py = points_for(da)
    specs = [BufferSpec(**b) for b in BUFFERS]
    res = pool_buffers(da, px, py, specs)
    assert res.n_outside == 2
    assert res.outside[-2:].all()
    assert all(v.dtype == np.float32 and v.shape == (px.size, 8) for v in res.vectors)
    check_against_brute_force(da, dec, px, py, BUFFERS, res)
    # strips of 1 row (many prefix strips per chunk) give bit-identical results
    tiny = pool_buffers(da, px, py, specs, block_bytes=1)
    for b in range(len(specs)):
        np.testing.assert_array_equal(tiny.vectors[b], res.vectors[b])
        np.testing.assert_array_equal(tiny.counts[b], res.counts[b])
    # nodata areas really produce empty buffers for small windows
    assert res.n_empty[3] >= 0 and res.n_empty[3] == int(np.sum(~res.outside & (res.counts[3] == 0)))


def test_huge_radius_uses_wide_sums() -> None:
    """A 1.9 km circle covers the whole raster: int64 prefix path, many chunks per point."""
    da, dec = make_raster(seed=9)
    px, py = points_for(da, n=10, seed=10)
    spec = {"shape": "circle", "radius_m": 1900.0}
    res = pool_buffers(da, px, py, [BufferSpec(**spec)])
    check_against_brute_force(da, dec, px, py, [spec], res)


def test_point_in_nodata_block_is_empty() -> None:
    da, dec = make_raster()
    invalid = np.isnan(dec).any(axis=-1)
    # a pixel whose whole 9x9 window is nodata (inside the 9x13 nodata block)
    rows, cols = np.nonzero(
        np.lib.stride_tricks.sliding_window_view(invalid, (9, 9)).all(axis=(-1, -2))
    )
    assert rows.size
    r, c = rows[0] + 4, cols[0] + 4
    px, py = np.array([da.x.values[c] + 1.0]), np.array([da.y.values[r] - 2.0])
    res = pool_buffers(da, px, py, [BufferSpec(shape="square", radius_px=4),
                                    BufferSpec(shape="circle", radius_m=300.0)])
    assert res.counts[0][0] == 0 and res.n_empty == [1, 0]
    assert np.isnan(res.vectors[0][0]).all()
    assert res.counts[1][0] > 0 and np.isfinite(res.vectors[1][0]).all()


def test_float_field_with_nans_and_transposed_dims() -> None:
    da, dec = make_raster(kind="float", y_decreasing=False, seed=3)
    da = da.transpose("dim", "x", "y")  # engine must reorder to (y, x, C)
    px, py = points_for(da, n=60, seed=4)
    buffers = [BUFFERS[0], BUFFERS[2], BUFFERS[4]]
    res = pool_buffers(da, px, py, [BufferSpec(**b) for b in buffers])
    # reference on the float32 values the field actually holds
    dec32 = dec.astype(np.float32).astype(np.float64)
    check_against_brute_force(da, dec32, px, py, buffers, res, atol=1e-5)


def test_unnormalised_means_are_dequantised_codes() -> None:
    da, dec = make_raster(seed=5)
    px, py = points_for(da, n=30, seed=6)
    res = pool_buffers(da, px, py, [BufferSpec(shape="circle", radius_m=70.0)], normalize=False)
    xs, ys = da.x.values, da.y.values
    X, Y = np.meshgrid(xs, ys)
    for i in np.flatnonzero(~res.outside):
        m = ((X - px[i]) ** 2 + (Y - py[i]) ** 2 <= 70.0**2) & ~np.isnan(dec).any(-1)
        if m.any():
            np.testing.assert_allclose(res.vectors[0][i], dec[m].mean(0), rtol=1e-6, atol=1e-7)


def test_bad_inputs_are_refused() -> None:
    da, _ = make_raster()
    with pytest.raises(ValueError, match="same length"):
        pool_buffers(da, np.zeros(3), np.zeros(2), [BufferSpec(radius_m=50.0)])
    with pytest.raises(ValueError, match="dims"):
        pool_buffers(da.isel(band=0), np.zeros(1), np.zeros(1), [BufferSpec(radius_m=50.0)])
    irregular = da.assign_coords(x=np.r_[da.x.values[:-1], da.x.values[-1] + 3.0])
    with pytest.raises(ValueError, match="regular grid"):
        pool_buffers(irregular, np.zeros(1), np.zeros(1), [BufferSpec(radius_m=50.0)])


# --------------------------------------------------------------------------- polygons
def test_polygons_match_brute_force() -> None:
    import shapely

    from aether_scale.pool import pool_polygons

    for y_decreasing in (True, False):
        da, dec = make_raster(y_decreasing=y_decreasing, seed=7)
        xs, ys = da.x.values, da.y.values
        x0, y0 = xs.min(), ys.min()
        polys = [
            shapely.box(x0 + 3, y0 + 7, x0 + 333, y0 + 251),  # spans several chunks
            shapely.box(x0 + 101, y0 + 102, x0 + 181, y0 + 173),  # overlaps the first
            shapely.Point(x0 + 600, y0 + 400).buffer(123.0),  # a disc
            shapely.box(x0 + 333, y0 + 7, x0 + 497, y0 + 251),  # touches the first
            shapely.box(x0 - 500, y0 - 500, x0 - 100, y0 - 100),  # outside
            shapely.Polygon([(x0 + 200, y0 + 500), (x0 + 880, y0 + 690), (x0 + 420, y0 + 300)]),
            None,
        ]
        res = pool_polygons(da, np.array(polys, dtype=object))
        X, Y = np.meshgrid(xs, ys)
        valid = ~np.isnan(dec).any(-1)
        for i, g in enumerate(polys):
            if g is None:
                assert res.counts[i] == 0
                continue
            m = shapely.contains_xy(g, X, Y) & valid
            assert res.counts[i] == m.sum(), (i, y_decreasing)
            if m.any():
                want = dec[m].mean(0)
                np.testing.assert_allclose(res.vectors[i], want / np.linalg.norm(want), atol=1e-5)
            else:
                assert np.isnan(res.vectors[i]).all()
        assert res.n_empty == 2
        np.testing.assert_array_equal(np.asarray(res, dtype=np.float32), res.vectors)


# --------------------------------------------------------------------------- distributed
def write_ae_zarr(path, da: xr.DataArray, crs: str = "EPSG:32630") -> None:
    """A finished ae.zarr of ``da``'s codes (a y-decreasing ``make_raster(c=64)``), written
    by the real writer (``stores.ae.write_ae``: chunk checksums and index, spatial_ref)."""
    from fixtures import grid

    from aether_scale.stores.ae import write_ae

    xs, ys = da.x.values, da.y.values
    assert da.sizes["band"] == 64 and ys[0] > ys[-1]
    h, w = da.sizes["y"], da.sizes["x"]
    g = grid(h, w, crs=crs, left=float(xs[0] - PIX / 2), top=float(ys[0] + PIX / 2), res=PIX)
    write_ae(path, da.values, g, chunk_px=int(da.chunks[0][0]))


def write_text_zarr(path, poi_id: np.ndarray, emb: np.ndarray, chunk_rows: int = 64) -> None:
    """text.zarr through the real writer (``stores.text.write_text_store``)."""
    from aether_scale.stores.text import write_text_store

    blocks = (emb[a : a + chunk_rows] for a in range(0, len(emb), chunk_rows))
    write_text_store(str(path), poi_id, blocks, dim=emb.shape[1], chunk_rows=chunk_rows,
                     attrs={"model": "test", "dim": int(emb.shape[1])})


def test_threads_and_local_cluster_identical(tmp_path) -> None:
    import dask
    from distributed import Client, LocalCluster

    from aether_scale.stores.ae import open_ae

    da, dec = make_raster(h=64, w=80, c=64, chunk=24, seed=11)
    write_ae_zarr(tmp_path / "ae.zarr", da)
    ae = open_ae(tmp_path / "ae.zarr")["embedding"]
    assert ae.dtype == np.int8 and ae.chunks is not None and ae.chunks[0][0] == 24
    px, py = points_for(ae, n=80, seed=12)
    specs = [BufferSpec(**b) for b in (BUFFERS[0], BUFFERS[2], BUFFERS[3])]
    with dask.config.set(scheduler="threads"):
        local = pool_buffers(ae, px, py, specs)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="512MiB",
                      dashboard_address=None) as cluster, Client(cluster):
        dist = pool_buffers(ae, px, py, specs)
    for b in range(len(specs)):
        np.testing.assert_array_equal(local.vectors[b], dist.vectors[b])
        np.testing.assert_array_equal(local.counts[b], dist.counts[b])
    check_against_brute_force(ae, dec, px, py, [BUFFERS[0], BUFFERS[2], BUFFERS[3]], dist)


# --------------------------------------------------------------------------- stage
@pytest.mark.parametrize("pois_layout", ["parts", "file", "folder"])
def test_run_pool_writes_triplets(tmp_path, pois_layout: str) -> None:
    import os

    import geopandas as gpd
    import shapely
    import zarr

    from aether_scale.config import load_config
    from aether_scale.pipeline import run_stage
    from aether_scale.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    da, dec = make_raster(h=60, w=72, c=64, chunk=20, seed=21)
    write_ae_zarr(ws.path("ae.zarr"), da)
    xs, ys = da.x.values, da.y.values
    rng = np.random.default_rng(22)
    n = 300
    px = rng.uniform(xs.min(), xs.max(), n)
    py = rng.uniform(ys.min(), ys.max(), n)
    invalid = np.isnan(dec).any(-1)
    r, c = np.argwhere(np.lib.stride_tricks.sliding_window_view(invalid, (9, 13)).all((-1, -2)))[0]
    px[0], py[0] = xs[c + 6] + 1, ys[r + 4] - 1  # inside the nodata block: no valid AE
    px[1], py[1] = xs.min() - 100, ys.max() + 100  # outside the raster
    geoms = list(shapely.points(px, py))
    geoms[2] = None  # no geometry
    poi_id = np.arange(1000, 1000 + n, dtype=np.int64)[::-1].copy()
    gdf = gpd.GeoDataFrame({"poi_id": poi_id, "description": ["x"] * n}, geometry=geoms,
                           crs="EPSG:32630")
    if pois_layout == "file":
        gdf.to_parquet(ws.path("pois.parquet"))
    elif pois_layout == "parts":  # the part files the pois stage writes
        os.makedirs(ws.path("pois.parquet"))
        gdf.iloc[:120].to_parquet(ws.path("pois.parquet") + "/part.00000.parquet")
        gdf.iloc[120:].to_parquet(ws.path("pois.parquet") + "/part.00001.parquet")
    else:  # a partitioned folder, as dask-geopandas writes it
        os.makedirs(ws.path("pois.parquet"))
        gdf.iloc[:120].to_parquet(ws.path("pois.parquet") + "/part.0.parquet")
        gdf.iloc[120:].to_parquet(ws.path("pois.parquet") + "/part.1.parquet")
    # text for every POI except poi #3; rows in a different order than pois.parquet
    tid = np.delete(poi_id, 3)[::-1].copy()
    temb = rng.standard_normal((tid.size, 16)).astype(np.float32)
    write_text_zarr(ws.path("text.zarr"), tid, temb)

    cfg = load_config(data={"pool": {"chunk_rows": 256,
                                     "base": {"shape": "circle", "radius_m": 40.0},
                                     "aug": {"shape": "square", "radius_px": 9}}})
    res = run_stage("pool", ws, cfg)
    assert not res.skipped
    st = res.stats
    out = zarr.open_group(ws.path("triplets.zarr"), mode="r")
    pid = out["poi_id"][:]
    base, aug, text = out["base"][:], out["aug"][:], out["text"][:]
    assert base.shape == (pid.size, 64) and aug.dtype == np.float32 and text.shape == (pid.size, 16)
    assert out["base"].chunks == (256, 64)
    assert st["n_pois"] == n and st["n_no_geometry"] == 1 and st["n_outside_raster"] == 1
    assert st["n_dropped_no_ae"] >= 1 and st["n_dropped_no_text"] == 1
    assert st["n_triplets"] == pid.size == n - 2 - st["n_dropped_no_ae"] - 1
    assert not np.isin([poi_id[0], poi_id[1], poi_id[2], poi_id[3]], pid).any()
    assert np.unique(pid).size == pid.size
    # every row checked against the brute force and against text.zarr by poi_id
    pos = {int(p): i for i, p in enumerate(poi_id)}
    tpos = {int(p): i for i, p in enumerate(tid)}
    for k, p in enumerate(pid):
        i = pos[int(p)]
        want_b, nb = brute_force(dec, xs, ys, px[i], py[i], {"shape": "circle", "radius_m": 40.0})
        want_a, na = brute_force(dec, xs, ys, px[i], py[i], {"shape": "square", "radius_px": 9})
        assert nb > 0 and na > 0
        np.testing.assert_allclose(base[k], want_b, atol=1e-5)
        np.testing.assert_allclose(aug[k], want_a, atol=1e-5)
        np.testing.assert_array_equal(text[k], temb[tpos[int(p)]])
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, atol=1e-5)
    # xarray reads it too, and a rerun is skipped
    ds = xr.open_zarr(ws.path("triplets.zarr"), consolidated=False)
    assert ds["base"].dims == ("poi", "band")
    assert run_stage("pool", ws, cfg).skipped


def test_run_pool_missing_input_names_stage(tmp_path) -> None:
    from aether_scale.config import load_config
    from aether_scale.pipeline import run_stage
    from aether_scale.workspace import Workspace

    with pytest.raises(FileNotFoundError, match="aether-scale ingest"):
        run_stage("pool", Workspace(tmp_path / "empty"), load_config())


def test_plan_blocks_stream_every_point_once() -> None:
    from aether_scale.pool import plan_pool

    da, _ = make_raster(seed=13)
    px, py = points_for(da, n=120, seed=14)
    specs = [BufferSpec(radius_m=215.0), BufferSpec(shape="square", radius_px=2)]
    plan = plan_pool(da, px, py, specs)
    assert plan.n_tasks > 1 and int(plan.need.max()) > 1  # buffers span several chunks
    seen = np.concatenate([b.index for b in plan.blocks(window=1)])
    assert np.sort(seen).tolist() == np.flatnonzero(~plan.outside).tolist()
    whole = pool_buffers(da, px, py, specs)
    again = {}
    for blk in plan_pool(da, px, py, specs).blocks(window=3):
        for j, i in enumerate(blk.index):
            again[int(i)] = blk.vectors[j, 0]
    for i, v in again.items():
        np.testing.assert_array_equal(v, whole.vectors[0][i])


def test_run_pool_refuses_crs_mismatch(tmp_path) -> None:
    import os

    import geopandas as gpd
    import shapely

    from aether_scale.config import load_config
    from aether_scale.pipeline import run_stage
    from aether_scale.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    da, _ = make_raster(h=20, w=20, c=64, chunk=10)
    write_ae_zarr(ws.path("ae.zarr"), da)
    os.makedirs(ws.path("pois.parquet"))
    gpd.GeoDataFrame({"poi_id": [1, 2]}, geometry=list(shapely.points([0.1, 0.2], [51.0, 51.1])),
                     crs="EPSG:4326").to_parquet(ws.path("pois.parquet") + "/part.00000.parquet")
    write_text_zarr(ws.path("text.zarr"), np.array([1, 2]), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="pois.parquet.*EPSG:4326.*differs"):
        run_stage("pool", ws, load_config())
    assert ws.manifest("pool") is None and not ws.exists("triplets.zarr")


def test_store_windows_read_the_same_as_the_dask_graph(tmp_path) -> None:
    """The pool stage's tasks read their chunk as a CheckedWindow of ae.zarr (no slice of
    the whole array's graph); the vectors are the same as through the dask array."""
    from aether_scale.pool import plan_pool
    from aether_scale.pool.stage import _store_windows
    from aether_scale.stores.ae import open_ae

    da, dec = make_raster(h=50, w=70, c=64, chunk=16, seed=31)
    write_ae_zarr(tmp_path / "ae.zarr", da)
    ae = open_ae(tmp_path / "ae.zarr")["embedding"]
    px, py = points_for(ae, n=90, seed=32)
    specs = [BufferSpec(**b) for b in (BUFFERS[0], BUFFERS[2])]
    windows = _store_windows(str(tmp_path / "ae.zarr"), None)
    assert windows is not None
    got = {}
    for plan in (plan_pool(ae, px, py, specs), plan_pool(ae, px, py, specs, windows=windows)):
        out = {}
        for blk in plan.blocks():
            for j, i in enumerate(blk.index):
                out[int(i)] = (blk.vectors[j], blk.counts[j])
        got[plan.windows is None] = out
        assert set(plan.task_seconds) >= {"read_ae", "kernel", "combine"}
    assert got[True].keys() == got[False].keys()
    for i, (v, c) in got[True].items():
        np.testing.assert_array_equal(v, got[False][i][0])
        np.testing.assert_array_equal(c, got[False][i][1])


def test_task_sums_dtype_holds_code_sums_exactly() -> None:
    """Tasks send code sums in float32 / int32 only while every sum is an exact integer
    there; float fields keep float64."""
    from aether_scale.pool.kernels import Buffer
    from aether_scale.pool.tasks import sums_dtype

    assert sums_dtype("codes", [Buffer.circle(100.0, 10.0, -10.0)]) == np.float32
    assert sums_dtype("codes", [Buffer.circle(1000.0, 10.0, -10.0)]) == np.int32
    assert sums_dtype("codes", [Buffer.circle(1e5, 10.0, -10.0)]) == np.float64
    assert sums_dtype("float", [Buffer.square(2)]) == np.float64
    big = Buffer.circle(100.0, 10.0, -10.0)
    area = (2 * big.pad_rows + 1) * (2 * big.pad_cols + 1)
    assert area * 127 * 127 < 2**24  # the bound the float32 choice rests on


def test_pool_tasks_keep_freed_memory_under_dasks_malloc_setting():
    """dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, under which glibc
    hands every block above 128 KiB back to the kernel on free (a pool task's per-batch
    temporaries then faulted 1.1 GB in per raster chunk). A pool task in such a process
    sets the heap's thresholds (``aether_scale.heap.keep_freed_memory``), after which 1 MiB
    temporaries are reused instead of faulted in; without the variable it sets nothing."""
    import json
    import os
    import subprocess
    import sys

    code = """
import json, resource, numpy as np
from fixtures import make_raster, points_for, BUFFERS
from aether_scale.config import BufferSpec
from aether_scale.pool import pool_buffers
from aether_scale import heap
def faults(n=200):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = np.ones(131072)  # 1 MiB, freed at the next iteration
        a += 1
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
before = faults()
da, _ = make_raster()
px, py = points_for(da)
pool_buffers(da, px, py, [BufferSpec(**b) for b in BUFFERS])
print(json.dumps({"before": before, "after": faults(), "tuned": heap._worker_tuned}))
"""
    def run(env):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        return json.loads(out.stdout.strip().splitlines()[-1])

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    got = run({**env, "MALLOC_TRIM_THRESHOLD_": "65536"})
    every_time = 200 * 256  # 256 pages per 1 MiB array
    assert got["before"] > 0.6 * every_time
    assert got["tuned"] == [[8 * 2**20, 32 * 2**20]] and got["after"] < 0.1 * every_time
    got = run(env)
    assert got["tuned"] == [] and got["before"] < 0.1 * every_time  # glibc adapts itself
