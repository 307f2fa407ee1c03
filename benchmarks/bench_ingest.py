"""Benchmark: out-of-core ingest of AlphaEarth tiles → ae.zarr on a memory-capped LocalCluster.

    python benchmarks/bench_ingest.py            # ≈3.4 GiB raster, 2 workers × 384 MiB
    python benchmarks/bench_ingest.py --quick    # ≈0.4 GiB raster (smoke run)

What it shows (all in one run, same tiles, same machine):

1. ``ingest``: :func:`aether_scale.ingest.ingest_tiles` on a
   ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
   memory_limit=384MiB)`` over a mosaic of int8 GeoTIFF tiles whose total size
   is ≥ 4× the workers' total memory limit. Peak RSS is sampled over the whole
   process tree (this process + nanny + worker processes) in a thread.
2. ``sequential_copy`` (baseline for throughput): a plain single-process loop
   over ONE tile — rasterio windowed reads of 1024 × 1024 px, written into the
   same Zarr layout with zarr directly. What the ingest costs or gains over the
   simplest streaming copy (one tile keeps the run short; MB/s is per byte).
3. ``naive_load_one_tile`` (baseline for memory): ``rioxarray.open_rasterio(tile)
   .load()`` then ``to_zarr`` for ONE tile only — the in-memory approach whose
   RSS grows with the input (a whole country would not fit).

Results → ``benchmarks/results/ingest.json``. Tiles are generated in
``benchmarks/scratch/`` (gitignored) from a pool of random bytes (worst case
for compression) and deleted afterwards. Note: the tiles were just written, so
reads come mostly from the OS page cache; MB/s measures the pipeline (decode,
merge, compress, write), not the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import PeakRSS, machine_info, write_result  # noqa: E402

SCRATCH = HERE / "scratch" / "ingest"
N_BANDS = 64


def make_tiles(folder: Path, n_rows: int, n_cols: int, tile_px: int, seed: int = 0) -> list[str]:
    """Write an n_rows × n_cols mosaic of int8 64-band GeoTIFF tiles, fast.

    Data: windows of one random byte pool (incompressible, like the worst real
    case), written block by block so generation never holds a whole tile.
    """
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    blk = 512
    pool = rng.integers(-127, 128, size=(4 * blk * blk * N_BANDS,), dtype=np.int8)
    paths = []
    k = 0
    for i in range(n_rows):
        for j in range(n_cols):
            path = folder / f"tile_{i}_{j}.tif"
            profile = dict(driver="GTiff", width=tile_px, height=tile_px, count=N_BANDS,
                           dtype="int8", nodata=-128, crs="EPSG:32630",
                           transform=from_origin(500000 + j * tile_px * 10,
                                                 5700000 - i * tile_px * 10, 10, 10),
                           tiled=True, blockxsize=blk, blockysize=blk, interleave="pixel",
                           BIGTIFF="YES")
            with rasterio.open(path, "w", **profile) as dst:
                for r in range(0, tile_px, blk):
                    for c in range(0, tile_px, blk):
                        h, w = min(blk, tile_px - r), min(blk, tile_px - c)
                        off = (k * 7919 % 3) * blk * blk * N_BANDS
                        k += 1
                        data = pool[off: off + h * w * N_BANDS].reshape(h, w, N_BANDS)
                        dst.write(data.transpose(2, 0, 1), window=Window(c, r, w, h))
            paths.append(str(path))
    return paths


def bench_ingest(paths: list[str], out: Path, *, n_workers: int, memory_limit: str,
                 chunk_px: int | None) -> dict:
    from distributed import Client, LocalCluster

    from aether_scale.ingest import ingest_tiles

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      memory_limit=memory_limit, dashboard_address=":0",
                      local_directory=str(SCRATCH / "dask")) as cluster, Client(cluster):
        with PeakRSS(interval=0.05) as rss:
            t0 = time.perf_counter()
            stats = ingest_tiles(paths, str(out), chunk_px=chunk_px)
            seconds = time.perf_counter() - t0
        per_worker = _worker_peaks(cluster)
    return {"seconds": round(seconds, 2), "mb_per_s": round(stats["bytes"] / 1e6 / seconds, 1),
            **rss.as_dict(), "worker_peak_rss_mb": per_worker,
            "stats": {k: v for k, v in stats.items() if k != "tile_files"}}


def _worker_peaks(cluster) -> list[float] | None:
    """Current RSS of each worker process (MiB), as a sanity check on the memory cap."""
    try:
        import psutil

        pids = [w.process.pid for w in cluster.workers.values()]
        return [round(psutil.Process(p).memory_info().rss / 2**20, 1) for p in pids]
    except Exception:
        return None


def bench_sequential_copy(path: str, out: Path, *, chunk: int = 1024) -> dict:
    """Baseline throughput: one process, one tile, rasterio windowed read → zarr chunk write.

    The simplest streaming copy (no dask, no merge/validity logic), on the same
    GDAL cache setting as the ingest tasks, so MB/s compare like for like.
    """
    import rasterio
    import zarr
    from rasterio.windows import Window

    with PeakRSS() as rss, rasterio.Env(GDAL_CACHEMAX=32), rasterio.open(path) as src:
        t0 = time.perf_counter()
        h_all, w_all = src.height, src.width
        z = zarr.create_array(str(out), shape=(h_all, w_all, N_BANDS),
                              chunks=(chunk, chunk, N_BANDS), dtype="int8", fill_value=-128,
                              overwrite=True)
        for r in range(0, h_all, chunk):
            for c in range(0, w_all, chunk):
                h, w = min(chunk, h_all - r), min(chunk, w_all - c)
                a = src.read(window=Window(c, r, w, h))
                z[r:r + h, c:c + w] = a.transpose(1, 2, 0)
        seconds = time.perf_counter() - t0
    nbytes = h_all * w_all * N_BANDS
    return {"seconds": round(seconds, 2), "mb_per_s": round(nbytes / 1e6 / seconds, 1),
            "bytes": nbytes, **rss.as_dict()}


def bench_naive_one_tile(path: str, out: Path) -> dict:
    """rioxarray.open_rasterio(...).load() + to_zarr for one tile (all in memory)."""
    import rioxarray

    with PeakRSS() as rss:
        t0 = time.perf_counter()
        da = rioxarray.open_rasterio(path).load()
        da.name = "embedding"
        da.to_dataset().to_zarr(str(out), mode="w", consolidated=False)
        seconds = time.perf_counter() - t0
    nbytes = int(da.nbytes)
    del da
    return {"seconds": round(seconds, 2), "mb_per_s": round(nbytes / 1e6 / seconds, 1),
            "bytes": nbytes, **rss.as_dict()}


def _with_load(fn, *args, **kwargs) -> dict:
    """Run a measurement and record the machine's 1-min load average around it."""
    before = os.getloadavg()[0]
    out = fn(*args, **kwargs)
    out["load_avg_1m_before_after"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    return out


def check_output(out: Path, paths: list[str], tile_px: int, n_cols: int, n: int = 50) -> int:
    """Exact codes at random pixels of the ingested store vs the source tiles."""
    import rasterio
    from rasterio.windows import Window

    from aether_scale.stores.ae import open_ae

    ds = open_ae(str(out))
    rng = np.random.default_rng(1)
    for _ in range(n):
        k = int(rng.integers(len(paths)))
        r, c = (int(v) for v in rng.integers(0, tile_px, 2))
        ty, tx = divmod(k, n_cols)
        with rasterio.open(paths[k]) as src:
            want = src.read(window=Window(c, r, 1, 1))[:, 0, 0]
        got = ds["embedding"][ty * tile_px + r, tx * tile_px + c].values
        if not np.array_equal(got, want):
            raise AssertionError(f"mismatch at tile {k} pixel ({r}, {c})")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small raster (≈0.4 GiB) smoke run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="384MiB", help="per worker")
    ap.add_argument("--chunk-px", type=int, default=None, help="default: ingest's 1024")
    ap.add_argument("--keep", action="store_true", help="keep the scratch tiles")
    args = ap.parse_args()

    import dask.utils

    if args.quick:
        n_rows, n_cols, tile_px = 2, 2, 1280
    else:
        n_rows, n_cols, tile_px = 2, 3, 3072
    grid_h, grid_w = n_rows * tile_px, n_cols * tile_px
    raster_bytes = grid_h * grid_w * N_BANDS
    worker_bytes = args.workers * dask.utils.parse_bytes(args.memory_limit)
    print(f"raster {grid_h} × {grid_w} × 64 int8 = {raster_bytes / 2**30:.2f} GiB "
          f"({raster_bytes / worker_bytes:.1f}× the workers' {worker_bytes / 2**20:.0f} MiB)")

    shutil.rmtree(SCRATCH, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        paths = make_tiles(SCRATCH / "tiles", n_rows, n_cols, tile_px)
        gen_s = time.perf_counter() - t0
        print(f"generated {len(paths)} tiles in {gen_s:.1f} s")

        # the throughput baseline brackets the ingest (before and after): on a shared
        # machine the load changes over minutes, and the mean of both is the fair yardstick
        seq_before = _with_load(bench_sequential_copy, paths[0], SCRATCH / "seq.zarr")
        shutil.rmtree(SCRATCH / "seq.zarr")
        print(f"sequential copy (before): {seq_before['mb_per_s']} MB/s")

        ing = _with_load(bench_ingest, paths, SCRATCH / "ae.zarr", n_workers=args.workers,
                         memory_limit=args.memory_limit, chunk_px=args.chunk_px)
        print(f"ingest: {ing['mb_per_s']} MB/s, peak RSS (tree) {ing['peak_rss_mb']} MiB")
        checked = check_output(SCRATCH / "ae.zarr", paths, tile_px, n_cols)
        shutil.rmtree(SCRATCH / "ae.zarr")

        seq_after = _with_load(bench_sequential_copy, paths[0], SCRATCH / "seq.zarr")
        shutil.rmtree(SCRATCH / "seq.zarr")
        print(f"sequential copy (after): {seq_after['mb_per_s']} MB/s, "
              f"peak RSS {seq_after['peak_rss_mb']} MiB")

        naive = _with_load(bench_naive_one_tile, paths[0], SCRATCH / "naive.zarr")
        print(f"naive load one tile ({naive['bytes'] / 2**20:.0f} MiB): "
              f"peak RSS {naive['peak_rss_mb']} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(SCRATCH, ignore_errors=True)

    result = {
        "benchmark": "ingest",
        "quick": args.quick,
        "machine": machine_info(),
        "setup": {
            "tiles": len(paths), "tile_px": tile_px, "grid": [grid_h, grid_w, N_BANDS],
            "raster_gib": round(raster_bytes / 2**30, 3),
            "workers": args.workers, "threads_per_worker": 1,
            "memory_limit_per_worker": args.memory_limit,
            "total_worker_memory_mib": round(worker_bytes / 2**20),
            "raster_over_worker_memory": round(raster_bytes / worker_bytes, 2),
            "chunk_px": args.chunk_px or 1024,
            "data": "random int8 codes (incompressible); tiles just written (page cache warm)",
            "note": "shared 2-core machine: other jobs' load shows in load_avg_1m_before_after; "
                    "compare MB/s only within this file",
            "generation_seconds": round(gen_s, 1),
        },
        "ingest": ing,
        "sequential_copy_before": seq_before,
        "sequential_copy_after": seq_after,
        "naive_load_one_tile": naive,
        "ratios": {
            "ingest_over_sequential_mb_per_s": round(
                ing["mb_per_s"] / ((seq_before["mb_per_s"] + seq_after["mb_per_s"]) / 2), 2),
            "raster_over_ingest_peak_rss": round(raster_bytes / 2**20 / ing["peak_rss_mb"], 2),
            "naive_one_tile_rss_over_tile_bytes": round(
                naive["peak_rss_mb"] / (naive["bytes"] / 2**20), 2),
            "naive_one_tile_rss_over_ingest_rss": round(
                naive["peak_rss_mb"] / ing["peak_rss_mb"], 2),
        },
        "correctness": {"random_pixels_checked_exact": checked},
    }
    path = write_result("ingest", result)
    print(f"results → {path}")


if __name__ == "__main__":
    main()
