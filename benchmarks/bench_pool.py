"""Benchmark: the ``pool`` command at 1M POIs against the reference's own ``AEExtractor``
and against exactextract, on one raster of city size, in one run.

    python benchmarks/bench_pool.py --reference /path/to/AETHER   # full (~15 min, 2 cores)
    python benchmarks/bench_pool.py --quick                       # 2048² px, 250k POIs

Inputs (written once into ``benchmarks/scratch/pool/``, deleted afterwards unless
``--keep``):

* ``ws/ae.zarr``: ``--size``² px (default 4096², ≈ a city: 41 km × 41 km at 10 m) of
  random int8 AE codes with ~3 % nodata in 32 px patches, written by
  :func:`aether_scale.stores.ae.write_ae` (the ingest stage's template, chunk commits and
  index; 1024² px chunks, the ingest default);
* ``ws/pois.parquet``: ``--n-pois`` (default 1,000,000) points uniform over the raster,
  written by :func:`aether_scale.stores.pois.write_part` (the pois stage's parts of
  250,000 rows, sorted by chunk);
* ``ws/text.zarr``: a 384-d float32 vector per POI (random: the pool stage only copies
  them), written by :func:`aether_scale.stores.text.write_text_store`;
* ``ae_float32.tif``: the same raster de-quantised to float32 (nodata NaN), a tiled
  (256² px), pixel-interleaved, uncompressed GeoTIFF — what the reference reads (it
  reads float GeoTIFFs) and what exactextract is given.

Measured (all on the same raster, POI subsets are the first N of the same POIs):

1. **baseline** — with ``--reference PATH`` (a checkout of github inwind0212/AETHER),
   its own ``dataio.AEExtractor`` runs unmodified in a subprocess
   (``sys.path.insert(0, checkout)``; ``AEExtractor(tif, crs).batch_extract(gdf,
   pix_radius=r)`` for r = 4 and r = 9, the reference's square windows) on
   ``--n-ref`` POIs; its cost is per POI, so POIs/s = n / (t(r=4) + t(r=9)), both
   views. Without a checkout, :func:`reference_loop` (a re-implementation of the same
   loop: rioxarray ``isel`` + ``nanmean`` per POI on the same float GeoTIFF) is timed
   instead and labelled ``fallback`` in ``baseline_origin``. The same baseline also runs
   on a 1024² px float32 tile cut from the same raster (``baseline_small_tile``): its
   best case, where the whole tile fits GDAL's block cache (its cost per POI is mostly
   reading 256² × 64-band blocks, so it grows with the raster).
2. **exactextract** 0.3.0 — ``exact_extract(tif, circles, "mean")`` on the product's
   default buffers (50 m and 100 m circles, shapely ``buffer`` polygons) for
   ``--n-exact`` POIs with ``strategy="raster-sequential"`` (here ~20× faster than its
   default ``feature-sequential``, which is timed on ``--n-exact-fs`` POIs and gives the
   same numbers); POIs/s for both circles. Its definition differs from the
   product's: it weights each pixel by the fraction of its area inside the polygon
   (partial pixels count partially, and the polygon is a 32-gon), while the product
   counts a pixel fully when its centre is within the radius (DESIGN.md). The
   agreement of the L2-normalised vectors is reported.
3. **engine** — :func:`aether_scale.pool.pool_buffers` in this process on the
   threaded scheduler (2 threads), all POIs, circles 50/100 m and squares 4/9 px, from
   ``ae.zarr`` (reads included). Its square-window vectors are compared with the
   baseline's on the subset, its circle vectors with exactextract's.
4. **whole command** — ``aether-scale pool -w ws --force`` as a subprocess with default
   settings (LocalCluster of 2 workers): wall time from outside, peak RSS of its process
   tree, and the stage's own per-part seconds (``stats.parts_s`` in
   ``manifests/pool.json``: read POIs, text rows, assign to chunks, read+decode AE,
   kernel, combine, write triplets).

Every timing also records CPU seconds (the command: its whole process tree, through
``RUSAGE_CHILDREN``), and ``summary`` has POIs-per-CPU-second rows beside the wall-time
ratios: on a machine shared with other work they move less than wall times.

Writes ``benchmarks/results/pool.json``: ``machine``, ``baseline_origin`` and a
``summary`` of :func:`_common.ratio_row` rows (whole command vs AEExtractor: required
100×, goal 300×; whole command and engine vs exactextract: required 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    PeakRSS,
    add_reference_argument,
    cli_argv,
    fallback_origin,
    machine_info,
    ratio_row,
    reference_origin,
    write_result,
)

SCRATCH = HERE / "scratch" / "pool"
PIX = 10.0
LEFT, TOP = 500_000.0, 5_700_000.0
EPSG = "EPSG:32630"
TEXT_DIM = 384
SMALL_TILE = 1024  # px: the baseline's best case, a tile that fits GDAL's block cache


def _log(msg: str) -> None:
    print(msg, flush=True)


# =========================================================================== inputs
def make_codes(size: int, seed: int = 0) -> np.ndarray:
    """(size, size, 64) random int8 codes; ~3 % of pixels nodata in 32 px patches."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-127, 128, size=(size, size, 64), dtype=np.int8)
    mask = rng.random((size // 32 + 1, size // 32 + 1)) < 0.03
    mask = np.repeat(np.repeat(mask, 32, 0), 32, 1)[:size, :size]
    codes[mask] = -128
    return codes


def random_points(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return LEFT + rng.uniform(0, size * PIX, n), TOP - rng.uniform(0, size * PIX, n)


def write_float_tif(path: Path, codes: np.ndarray) -> None:
    """The codes de-quantised to float32 (nodata NaN): tiled 256², pixel-interleaved."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from aether_scale.aef import decode

    size = codes.shape[0]
    prof = dict(driver="GTiff", width=size, height=size, count=64, dtype="float32",
                nodata=float("nan"), crs=EPSG, transform=from_origin(LEFT, TOP, PIX, PIX),
                tiled=True, blockxsize=256, blockysize=256, interleave="pixel",
                BIGTIFF="IF_SAFER")
    with rasterio.open(path, "w", **prof) as dst:
        for r0 in range(0, size, 256):
            r1 = min(r0 + 256, size)
            block = np.moveaxis(decode(codes[r0:r1]), -1, 0)
            dst.write(block, window=Window(0, r0, size, r1 - r0))


def build_inputs(root: Path, size: int, n: int) -> dict[str, Any]:
    """Write the workspace inputs and the float GeoTIFF; returns timings and paths."""
    from aether_scale.stores.ae import TargetGrid, write_ae
    from aether_scale.stores.pois import write_part
    from aether_scale.stores.text import write_text_store
    from aether_scale.workspace import Workspace

    t0 = time.perf_counter()
    ws = Workspace(root / "ws")
    codes = make_codes(size, seed=1)
    from pyproj import CRS

    grid = TargetGrid(CRS.from_user_input(EPSG).to_wkt(), PIX, LEFT, TOP, size, size)
    write_ae(ws.path("ae.zarr"), codes, grid, chunk_px=1024)
    t_ae = time.perf_counter()
    tif = root / "ae_float32.tif"
    write_float_tif(tif, codes)
    small = min(SMALL_TILE, size)
    write_float_tif(root / "tile_float32.tif", codes[:small, :small])
    del codes
    t_tif = time.perf_counter()

    import pandas as pd

    x, y = random_points(n, size, seed=2)
    poi_id = np.arange(n, dtype=np.int64)
    df = pd.DataFrame({"poi_id": poi_id, "description": "x", "name": None, "category": None,
                       "subcategory": None, "source": "bench", "x": x, "y": y,
                       "chunk_y": ((TOP - y) // (1024 * PIX)).astype(np.int64),
                       "chunk_x": ((x - LEFT) // (1024 * PIX)).astype(np.int64)})
    cols = ["poi_id", "description", "name", "category", "subcategory", "source", "x", "y",
            "chunk_y", "chunk_x"]
    os.makedirs(ws.path("pois.parquet"), exist_ok=True)
    part = 250_000
    for k, a in enumerate(range(0, n, part)):
        write_part(df.iloc[a:a + part], f"{ws.path('pois.parquet')}/part.{k:05d}.parquet",
                   grid.crs_wkt, cols)
    t_pois = time.perf_counter()
    rng = np.random.default_rng(3)
    rows = 65536
    ids = pd.concat([pd.read_parquet(p, columns=["poi_id"]) for p in
                     sorted(Path(ws.path("pois.parquet")).glob("*.parquet"))])["poi_id"].to_numpy()

    def blocks():
        for a in range(0, n, rows):
            v = rng.standard_normal((min(rows, n - a), TEXT_DIM)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            yield v

    write_text_store(ws.path("text.zarr"), ids, blocks(), dim=TEXT_DIM, chunk_rows=rows,
                     attrs={"model": "bench-random", "model_key": "bench-random",
                            "dim": TEXT_DIM, "normalize": True})
    t_text = time.perf_counter()
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", y)

    def du(p: str | Path) -> int:
        p = Path(p)
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*")
                                                         if f.is_file())

    return {"ws": str(ws.root), "tif": str(tif), "small_tif": str(root / "tile_float32.tif"),
            "small_tile_px": small,
            "raster_px": [size, size, 64], "n_pois": n, "pois_per_px": round(n / size**2, 4),
            "ae_zarr_chunk_px": 1024, "text_dim": TEXT_DIM,
            "bytes": {"ae.zarr": du(ws.path("ae.zarr")), "ae_float32.tif": du(tif),
                      "pois.parquet": du(ws.path("pois.parquet")),
                      "text.zarr": du(ws.path("text.zarr"))},
            "tif_layout": "float32, NaN nodata, tiled 256x256, pixel-interleaved, uncompressed",
            "write_s": {"ae.zarr": round(t_ae - t0, 1), "tif": round(t_tif - t_ae, 1),
                        "pois.parquet": round(t_pois - t_tif, 1),
                        "text.zarr": round(t_text - t_pois, 1)}}


# =========================================================================== baseline
REF_CHILD = r"""
import json, sys, time
import numpy as np
checkout, tif, xs, ys, out, crs = sys.argv[1:7]
sys.path.insert(0, checkout)
t0 = time.perf_counter()
from dataio import AEExtractor  # the reference's own code, unmodified
import geopandas as gpd
t_imp = time.perf_counter() - t0
x, y = np.load(xs), np.load(ys)
gdf = gpd.GeoDataFrame(geometry=gpd.points_from_xy(x, y), crs=crs)
t = time.perf_counter()
ex = AEExtractor(tif, crs)
t_init = time.perf_counter() - t
res = {"import_s": t_imp, "init_s": t_init, "n": int(x.size)}
for r in (4, 9):
    t, c = time.perf_counter(), time.process_time()
    v = ex.batch_extract(gdf, feat_mode="pixel", pix_radius=r)
    res[f"r{r}_s"] = time.perf_counter() - t
    res[f"r{r}_cpu_s"] = time.process_time() - c
    np.save(f"{out}.r{r}.npy", v)
json.dump(res, open(out, "w"))
"""


def run_reference(checkout: str, tif: str, x: np.ndarray, y: np.ndarray, root: Path) -> dict:
    """The reference's AEExtractor on the first POIs, in a fresh interpreter."""
    np.save(root / "ref_x.npy", x)
    np.save(root / "ref_y.npy", y)
    out = root / "ref.json"
    cmd = [sys.executable, "-c", REF_CHILD, checkout, tif, str(root / "ref_x.npy"),
           str(root / "ref_y.npy"), str(out), EPSG]
    with open(root / "reference.log", "wb") as logf, PeakRSS() as rss:
        subprocess.run(cmd, check=True, stdout=logf, stderr=subprocess.STDOUT, cwd=checkout)
    res = json.loads(out.read_text())
    wall = res["r4_s"] + res["r9_s"]
    cpu = res["r4_cpu_s"] + res["r9_cpu_s"]
    vecs = [np.load(f"{out}.r{r}.npy") for r in (4, 9)]
    return {"what": "dataio.AEExtractor(tif, crs).batch_extract(gdf, pix_radius=r), "
                    "r = 4 and 9 px, run unmodified from the checkout",
            "n_pois": res["n"], "seconds_r4": round(res["r4_s"], 3),
            "seconds_r9": round(res["r9_s"], 3), "seconds": round(wall, 3),
            "pois_per_s": round(res["n"] / wall, 1), "cpu_seconds": round(cpu, 3),
            "pois_per_cpu_s": round(res["n"] / cpu, 1), "init_s": round(res["init_s"], 3),
            "import_s": round(res["import_s"], 2), **rss.as_dict()}, vecs


def reference_loop(tif: str, x: np.ndarray, y: np.ndarray, radius: int) -> np.ndarray:
    """Fallback re-implementation of ``AEExtractor._pixel_window_mean``'s loop: per POI,
    ``rioxarray.open_rasterio(tif, masked=True).isel`` of the (2r+1)² window (clipped at
    the edge), ``nanmean`` per band (NaN → 0), then L2-normalise all rows."""
    import warnings

    import rasterio
    import rioxarray

    src = rioxarray.open_rasterio(tif, masked=True)
    with rasterio.open(tif) as ds:
        h, w = ds.height, ds.width
        out = np.zeros((x.size, 64), dtype=np.float32)
        for i in range(x.size):
            row, col = ds.index(x[i], y[i])
            if not (0 <= row < h and 0 <= col < w):
                continue
            r0, r1 = max(0, row - radius), min(h - 1, row + radius)
            c0, c1 = max(0, col - radius), min(w - 1, col + radius)
            q = src.isel(y=slice(r0, r1 + 1), x=slice(c0, c1 + 1)).values
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[i] = np.nan_to_num(np.nanmean(q, axis=(1, 2)), nan=0.0)
    src.close()
    return out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-6, None)


def run_fallback(tif: str, x: np.ndarray, y: np.ndarray) -> tuple[dict, list[np.ndarray]]:
    t = {}
    vecs = []
    c0 = time.process_time()
    for r in (4, 9):
        t0 = time.perf_counter()
        vecs.append(reference_loop(tif, x, y, r))
        t[r] = time.perf_counter() - t0
    wall = t[4] + t[9]
    cpu = time.process_time() - c0
    return {"what": "benchmarks/bench_pool.py reference_loop (re-implementation of "
                    "AEExtractor's per-POI loop), r = 4 and 9 px",
            "n_pois": int(x.size), "seconds_r4": round(t[4], 3), "seconds_r9": round(t[9], 3),
            "seconds": round(wall, 3), "pois_per_s": round(x.size / wall, 1),
            "cpu_seconds": round(cpu, 3), "pois_per_cpu_s": round(x.size / cpu, 1)}, vecs


# =========================================================================== exactextract
def run_exactextract(tif: str, x: np.ndarray, y: np.ndarray, radii: list[float],
                     strategy: str) -> tuple[dict, list[np.ndarray]]:
    """exactextract's coverage-weighted mean in shapely circles (both radii), timed."""
    import exactextract
    import geopandas as gpd
    import shapely

    pts = shapely.points(x, y)
    res: dict[str, Any] = {"version": getattr(exactextract, "__version__", "?"),
                           "n_pois": int(x.size), "op": "mean", "strategy": strategy,
                           "polygons": "shapely.buffer(point, r) (quad_segs=8: a 32-gon)"}
    vecs = []
    total = cpu = 0.0
    for r in radii:
        gdf = gpd.GeoDataFrame(geometry=shapely.buffer(pts, r), crs=EPSG)
        t0, c0 = time.perf_counter(), time.process_time()
        df = exactextract.exact_extract(tif, gdf, "mean", output="pandas", strategy=strategy)
        dt = time.perf_counter() - t0
        cpu += time.process_time() - c0
        total += dt
        res[f"seconds_{int(r)}m"] = round(dt, 3)
        cols = [c for c in df.columns if c.endswith("_mean")]
        v = df[cols].to_numpy(dtype=np.float64)
        assert v.shape[1] == 64, cols[:5]
        nrm = np.linalg.norm(v, axis=1, keepdims=True)
        vecs.append(np.where(nrm > 0, v / np.where(nrm > 0, nrm, 1), np.nan))
    res["seconds"] = round(total, 3)
    res["pois_per_s"] = round(x.size / total, 1)
    res["cpu_seconds"] = round(cpu, 3)
    res["pois_per_cpu_s"] = round(x.size / cpu, 1)
    return res, vecs


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Max |a − b| and cosine between two sets of unit vectors (rows finite in both)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1) & (np.abs(a).sum(1) > 0) & \
        (np.abs(b).sum(1) > 0)
    if not ok.any():
        return {"n_compared": 0}
    cos = np.sum(a[ok] * b[ok], axis=1)
    return {"n_compared": int(ok.sum()), "max_abs_diff": float(np.abs(a[ok] - b[ok]).max()),
            "cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6)}


# =========================================================================== product
def run_engine(ae_path: str, x: np.ndarray, y: np.ndarray) -> tuple[dict, dict]:
    import dask

    from aether_scale.config import BufferSpec
    from aether_scale.pool import pool_buffers
    from aether_scale.stores.ae import open_ae

    ae = open_ae(ae_path)["embedding"]
    sets = {"circle_50_100m": [BufferSpec(shape="circle", radius_m=50.0),
                               BufferSpec(shape="circle", radius_m=100.0)],
            "square_4_9px": [BufferSpec(shape="square", radius_px=4),
                             BufferSpec(shape="square", radius_px=9)]}
    out: dict[str, Any] = {"what": "aether_scale.pool.pool_buffers on open_ae(ae.zarr), "
                                   "threaded scheduler, reads included"}
    vecs = {}
    with dask.config.set(scheduler="threads", num_workers=2):
        pool_buffers(ae, x[:1000], y[:1000], sets["square_4_9px"])  # warm-up
        for name, bufs in sets.items():
            t, c = time.perf_counter(), time.process_time()
            res = pool_buffers(ae, x, y, bufs)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            out[name] = {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                         "pois_per_s": round(x.size / wall, 1), "n_empty": res.n_empty}
            vecs[name] = res.vectors
            _log(f"[engine] {name}: {out[name]}")
    return out, vecs


def run_command(ws: str, root: Path) -> dict[str, Any]:
    """``aether-scale pool -w ws --force`` in a fresh process, default settings."""
    cmd = [*cli_argv(), "pool", "-w", ws, "--force"]
    import resource

    env = {**os.environ, "AETHER_SCALE_NO_BAR": "1"}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(root / "command.log", "ab") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with PeakRSS(proc.pid) as rss:  # the command's process tree only
            proc.wait()
        wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU of the command and every process it waited for (its dask workers included)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                           + (root / "command.log").read_text()[-3000:])
    man = json.loads((Path(ws) / "manifests" / "pool.json").read_text())
    st = man["stats"]
    n = st["n_pois"]
    return {"command": "aether-scale pool -w WS --force (default config: LocalCluster, "
                       "2 workers × 1 thread; circles 50 m / 100 m)",
            "wall_s": round(wall, 2), "pois_per_s": round(n / wall, 1),
            "cpu_seconds": round(cpu, 2), "pois_per_cpu_s": round(n / cpu, 1),
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "stage_s": man.get("seconds"), "stage_compute_s": st.get("seconds"),
            "outside_stage_s": round(wall - float(man.get("seconds") or 0), 2),
            "parts_s": st.get("parts_s"), "n_pois": n, "n_triplets": st["n_triplets"],
            "n_raster_chunks_used": st["n_raster_chunks_used"], **rss.as_dict()}


def triplet_vectors(ws: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(poi_id, base, aug) of triplets.zarr for poi_id < n."""
    from aether_scale.stores.triplets import TripletStore

    ts = TripletStore(str(Path(ws) / "triplets.zarr"))
    pid = ts.ids()
    sel = np.flatnonzero(pid < n)
    base, aug, _ = ts.read(0, pid.size)
    return pid[sel], base[sel], aug[sel]


# =========================================================================== main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_reference_argument(ap)
    ap.add_argument("--quick", action="store_true", help="2048² px, 250k POIs, smaller subsets")
    ap.add_argument("--size", type=int, help="raster edge in px (default 4096; quick 2048)")
    ap.add_argument("--n-pois", type=int, help="POIs (default 1,000,000; quick 250,000)")
    ap.add_argument("--n-ref", type=int, help="POIs timed with the baseline (default 2000)")
    ap.add_argument("--n-exact", type=int, help="POIs timed with exactextract's "
                    "raster-sequential strategy (default 20000)")
    ap.add_argument("--n-exact-fs", type=int, help="POIs timed with its default "
                    "feature-sequential strategy (default 200: ~10 POIs/s here)")
    ap.add_argument("--parts", default="baseline,tile,exact,engine,command",
                    help="comma-separated subset of baseline,tile,exact,engine,command")
    ap.add_argument("--keep", action="store_true", help="keep benchmarks/scratch/pool")
    args = ap.parse_args()
    size = args.size or (2048 if args.quick else 4096)
    n = args.n_pois or (250_000 if args.quick else 1_000_000)
    n_ref = args.n_ref or (500 if args.quick else 2000)
    n_exact = args.n_exact or (5000 if args.quick else 20000)
    n_exact_fs = args.n_exact_fs or (100 if args.quick else 200)
    parts = set(args.parts.split(","))
    origin = (reference_origin(args.reference) if args.reference else
              fallback_origin("benchmarks/bench_pool.py reference_loop", "AEExtractor"))
    t_start = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "pool", "quick": args.quick,
                              "machine": machine_info(), "baseline_origin": origin}
    root = SCRATCH
    if root.exists() and not (root / "inputs.json").exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        if (root / "inputs.json").exists() and json.loads((root / "inputs.json").read_text())[
                "raster_px"][:2] == [size, size] and json.loads(
                (root / "inputs.json").read_text())["n_pois"] == n:
            inputs = json.loads((root / "inputs.json").read_text())  # --keep from before
            _log(f"[inputs] reusing {root}")
        else:
            shutil.rmtree(root)
            root.mkdir(parents=True)
            _log(f"[inputs] {size}² px, {n:,} POIs → {root}")
            inputs = build_inputs(root, size, n)
            (root / "inputs.json").write_text(json.dumps(inputs))
        result["inputs"] = {k: v for k, v in inputs.items() if k not in ("ws", "tif")}
        _log(f"[inputs] {result['inputs']}")
        x, y = np.load(root / "x.npy"), np.load(root / "y.npy")
        ws, tif = inputs["ws"], inputs["tif"]
        ref_vecs = ex_vecs = eng_vecs = None
        if "baseline" in parts:
            if args.reference:
                base, ref_vecs = run_reference(args.reference, tif, x[:n_ref], y[:n_ref], root)
            else:
                base, ref_vecs = run_fallback(tif, x[:n_ref], y[:n_ref])
            result["baseline"] = base
            _log(f"[baseline] {base}")
        if "tile" in parts:  # the baseline's best case: a small tile, all in GDAL's cache
            t = inputs["small_tile_px"]
            inside = np.flatnonzero((x < LEFT + t * PIX) & (y > TOP - t * PIX))[:n_ref]
            fn = ((lambda a, b: run_reference(args.reference, inputs["small_tif"], a, b, root))
                  if args.reference else (lambda a, b: run_fallback(inputs["small_tif"], a, b)))
            tile, _ = fn(x[inside], y[inside])
            tile["tile_px"] = [t, t]
            result["baseline_small_tile"] = tile
            _log(f"[baseline, {t}² tile] {tile}")
        if "exact" in parts:
            ex, ex_vecs = run_exactextract(tif, x[:n_exact], y[:n_exact], [50.0, 100.0],
                                           "raster-sequential")
            fs, fs_vecs = run_exactextract(tif, x[:n_exact_fs], y[:n_exact_fs], [50.0, 100.0],
                                           "feature-sequential")
            fs["max_abs_diff_vs_raster_sequential"] = max(
                float(np.nanmax(np.abs(fs_vecs[b] - ex_vecs[b][:n_exact_fs]))) for b in range(2))
            ex["feature_sequential"] = fs
            ex["definition"] = ("coverage-weighted mean: each pixel weighted by the fraction of "
                                "its area inside the 32-gon polygon; the product counts a pixel "
                                "fully when its centre is within the radius (DESIGN.md), else "
                                "not at all")
            result["exactextract"] = ex
            _log(f"[exactextract] {ex}")
        if "engine" in parts:
            eng, eng_vecs = run_engine(str(Path(ws) / "ae.zarr"), x, y)
            result["engine"] = eng
            if ref_vecs is not None:
                eng["agreement_square_vs_baseline"] = [
                    agreement(eng_vecs["square_4_9px"][b][:n_ref], ref_vecs[b]) for b in range(2)]
            if ex_vecs is not None:
                eng["agreement_circle_vs_exactextract"] = [
                    agreement(eng_vecs["circle_50_100m"][b][:n_exact], ex_vecs[b])
                    for b in range(2)]
            del eng_vecs
        if "command" in parts:
            cmd = run_command(ws, root)
            result["command"] = cmd
            _log(f"[command] {cmd}")
            pid, tb, ta = triplet_vectors(ws, max(n_ref, n_exact))
            if ex_vecs is not None:
                sel = pid < n_exact
                cmd["agreement_vs_exactextract"] = [
                    agreement(v[sel], ex_vecs[b][pid[sel]]) for b, v in enumerate((tb, ta))]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result["summary"] = summary(result, origin)
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    path = write_result("pool", result)
    for row in result["summary"]:
        _log(f"  {row['metric']}: ours {row['ours']} vs {row['baseline_name']} {row['baseline']}"
             f" → {row['ratio']}× (required {row['required']})")
    _log(f"wrote {path}")


def summary(res: dict[str, Any], origin: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    base = res.get("baseline", {}).get("pois_per_s")
    tile = res.get("baseline_small_tile", {}).get("pois_per_s")
    ex = res.get("exactextract", {}).get("pois_per_s")
    bname = "AEExtractor (both views, r=4 and r=9 px)" if origin["kind"] == "reference" else \
        "reference_loop re-implementation (both views)"
    cmd = res.get("command")
    eng = res.get("engine", {})
    ex_origin = {"kind": "library", "commit": f"exactextract {res.get('exactextract', {}).get('version')}"}
    if cmd:
        what = f"whole `aether-scale pool` command, {cmd['n_pois']:,} POIs, circles 50/100 m"
        rows.append(ratio_row(stage="pool", metric="POIs/s, whole command vs AEExtractor",
                              ours=cmd["pois_per_s"], baseline=base, unit="POIs/s",
                              baseline_name=bname, origin=origin, required=100, goal=300,
                              ours_what=what, command="python benchmarks/bench_pool.py "
                                                      "--reference PATH"))
        if tile:
            rows.append(ratio_row(
                stage="pool", metric="POIs/s, whole command vs AEExtractor on a "
                f"{res['baseline_small_tile']['tile_px'][0]}² px tile (its best case)",
                ours=cmd["pois_per_s"], baseline=tile, unit="POIs/s",
                baseline_name=bname + ", small tile in GDAL's cache", origin=origin,
                required=100, goal=300, ours_what=what))
        rows.append(ratio_row(stage="pool", metric="POIs/s, whole command vs exactextract "
                                                   "(50/100 m circles)",
                              ours=cmd["pois_per_s"], baseline=ex, unit="POIs/s",
                              baseline_name="exactextract.exact_extract mean, both circles "
                                            "(raster-sequential, its faster strategy here)",
                              origin=ex_origin, required=1.0, ours_what=what))
    if cmd:  # per CPU-second: less sensitive to other load on the machine (information)
        for key, ref, bn, o in (("baseline", res.get("baseline"), bname, origin),
                                ("exactextract", res.get("exactextract"),
                                 "exactextract (raster-sequential)", ex_origin)):
            if ref and ref.get("pois_per_cpu_s"):
                rows.append(ratio_row(stage="pool", metric=f"POIs per CPU-second, whole command "
                                      f"vs {'AEExtractor' if key == 'baseline' else key}",
                                      ours=cmd["pois_per_cpu_s"], baseline=ref["pois_per_cpu_s"],
                                      unit="POIs/CPU-s", baseline_name=bn, origin=o,
                                      ours_what="CPU of the command's whole process tree"))
    for name, label in (("square_4_9px", "square 4/9 px"), ("circle_50_100m", "circles 50/100 m")):
        if name in eng:
            b, bn, o, req = ((base, bname, origin, 100) if name.startswith("square") else
                             (ex, "exactextract.exact_extract mean, both circles", ex_origin,
                              1.0))
            rows.append(ratio_row(stage="pool", metric=f"POIs/s, engine only ({label}) vs "
                                  + ("AEExtractor" if name.startswith("square") else
                                     "exactextract"),
                                  ours=eng[name]["pois_per_s"], baseline=b, unit="POIs/s",
                                  baseline_name=bn, origin=o, required=req,
                                  ours_what="aether_scale.pool.pool_buffers, threads, "
                                            f"{res['inputs']['n_pois']:,} POIs"))
    return rows


if __name__ == "__main__":
    main()
