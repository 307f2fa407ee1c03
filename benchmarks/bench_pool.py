"""Benchmark: buffer pooling engine vs the AETHER reference per-POI loop, and a 1M-POI run.

    python benchmarks/bench_pool.py            # full (~5 min on 2 shared cores)
    python benchmarks/bench_pool.py --quick    # smaller rasters / fewer POIs

Part 1 — throughput, same raster, same POIs, one run:
  * raster: int8 AE codes (random codes, ~3 % nodata pixels in patches) written
    chunk-wise to ``benchmarks/scratch/cmp_ae.zarr`` (1024² px chunks, the ingest
    default of ≈64 MB);
  * POIs: uniform over the raster at London density (the paper's ~340k OS POIs
    over ~15.7M px of Greater London ≈ 0.022 POI/px);
  * reference algorithm (what the AETHER reference code does): a Python loop
    over POIs; per POI ``rioxarray.open_rasterio(tif, masked=True).isel`` of the
    (2r+1)² window (the same codes as a tiled 512², uncompressed GeoTIFF, read
    lazily like the AE COGs), de-quantise, ``nanmean``, L2-normalise — square
    windows r = 4 and 9 px. Timed on a 1000-POI subset (it is slow) → POIs/s.
    Two stronger baselines of the same loop are reported too: ``isel`` on the
    decoded raster held in memory as an xarray DataArray, and plain numpy
    slicing of that array (both get the raster load for free).
  * engine: :func:`aether_scale.pool.pool_buffers` on the Zarr-backed array
    (reading from disk included), all POIs, same square windows (and, for
    information, the paper's 50 m / 100 m circles), threaded scheduler.
  * the engine's vectors are checked against the reference's on the subset.

Part 2 — scale: 1M POIs over a raster larger than the total worker memory
  (LocalCluster 2 workers × 512 MiB; ~3.3 GB int8 ae.zarr generated chunk-wise
  into benchmarks/scratch/, deleted afterwards), streamed through
  ``plan_pool(...).blocks()`` (what the pool stage uses); peak RSS of the whole
  process tree (client + nanny + worker processes) sampled in a thread.

Writes ``benchmarks/results/pool.json``.
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
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

try:
    from _common import PeakRSS, machine_info, write_result
except ImportError:  # pragma: no cover - minimal stand-ins
    import json
    import platform
    import threading

    import psutil

    class PeakRSS:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self.peak_mb = 0.0
            self._stop = threading.Event()

        def _tree(self) -> float:
            p = psutil.Process()
            tot = 0
            for q in [p, *p.children(recursive=True)]:
                try:
                    tot += q.memory_info().rss
                except psutil.Error:
                    pass
            return tot / 2**20

        def _loop(self) -> None:
            while not self._stop.wait(0.05):
                self.peak_mb = max(self.peak_mb, self._tree())

        def __enter__(self) -> PeakRSS:
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
            return self

        def __exit__(self, *a: object) -> None:
            self._stop.set()
            self._t.join()
            self.peak_mb = max(self.peak_mb, self._tree())

        def as_dict(self) -> dict:
            return {"peak_rss_mb": round(self.peak_mb, 1)}

    def machine_info() -> dict:  # type: ignore[no-redef]
        return {"platform": platform.platform(), "cpus": os.cpu_count()}

    def write_result(name: str, data: dict) -> Path:  # type: ignore[no-redef]
        out = HERE / "results" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2, default=str) + "\n")
        return out


import dask  # noqa: E402
import dask.array as dsa  # noqa: E402
import xarray as xr  # noqa: E402

from aether_scale.aef import decode  # noqa: E402
from aether_scale.config import BufferSpec  # noqa: E402
from aether_scale.pool import plan_pool, pool_buffers  # noqa: E402

SCRATCH = HERE / "scratch"
PIX = 10.0
LONDON_DENSITY = 0.022  # POIs per 10 m pixel


def write_raster(path: Path, size: int, *, chunk: int = 1024, seed: int = 0) -> float:
    """Random int8 codes with nodata patches, written chunk-wise with dask; returns seconds."""

    def block(bi: np.ndarray, block_info=None) -> np.ndarray:  # noqa: ANN001
        loc = block_info[None]["array-location"]
        (y0, y1), (x0, x1) = loc[0], loc[1]
        rng = np.random.default_rng([seed, y0, x0])
        out = rng.integers(-127, 128, size=(y1 - y0, x1 - x0, 64), dtype=np.int8)
        mask = rng.random(((y1 - y0) // 32 + 1, (x1 - x0) // 32 + 1)) < 0.03
        mask = np.repeat(np.repeat(mask, 32, 0), 32, 1)[: y1 - y0, : x1 - x0]
        out[mask] = -128
        return out

    shape = (size, size, 64)
    tmpl = dsa.zeros(shape, chunks=(chunk, chunk, 64), dtype=np.int8)
    data = tmpl.map_blocks(block, dtype=np.int8)
    ds = xr.Dataset(
        {"embedding": (("y", "x", "band"), data)},
        coords={
            "y": 5_700_000.0 - PIX / 2 - PIX * np.arange(size),
            "x": 500_000.0 + PIX / 2 + PIX * np.arange(size),
            "band": [f"A{i:02d}" for i in range(64)],
        },
    )
    t = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        ds.to_zarr(path, mode="w", consolidated=False)
    return time.perf_counter() - t


def random_points(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = 500_000.0 + rng.uniform(0, size * PIX, n)
    y = 5_700_000.0 - rng.uniform(0, size * PIX, n)
    return x, y


def _window_mean(win: np.ndarray) -> np.ndarray:
    """nanmean over a window's pixels (..., 64) then L2-normalise; zeros when empty."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v = np.nanmean(win.reshape(-1, 64), axis=0)
    nrm = np.linalg.norm(v)
    return v / nrm if np.isfinite(nrm) and nrm > 0 else np.zeros(64)


def reference_loop(src: object, x: np.ndarray, y: np.ndarray, radius: int, mode: str) -> np.ndarray:
    """The AETHER reference algorithm: per POI, cut the (2r+1)² window, nanmean, L2-normalise.

    ``mode``: ``"rioxarray"`` — ``src`` is ``rioxarray.open_rasterio(tif, masked=True)``
    (band, y, x), lazily backed by the GeoTIFF, codes de-quantised per window (what
    the reference code does); ``"xarray"`` — ``src`` is the decoded raster in memory
    as an (y, x, band) DataArray; ``"numpy"`` — the same as a plain numpy array.
    """
    x0, y0 = 500_000.0 + PIX / 2, 5_700_000.0 - PIX / 2
    if mode == "rioxarray":
        h, w = src.sizes["y"], src.sizes["x"]
    elif mode == "xarray":
        h, w = src.sizes["y"], src.sizes["x"]
    else:
        h, w = src.shape[:2]
    out = np.zeros((x.size, 64), dtype=np.float32)
    for i in range(x.size):
        col = int(np.floor((x[i] - x0) / PIX + 0.5))
        row = int(np.floor((y[i] - y0) / -PIX + 0.5))
        if not (0 <= row < h and 0 <= col < w):
            continue
        r0, r1 = max(row - radius, 0), min(row + radius + 1, h)
        c0, c1 = max(col - radius, 0), min(col + radius + 1, w)
        if mode == "rioxarray":
            q = src.isel(y=slice(r0, r1), x=slice(c0, c1)).values  # (64, wy, wx), NaN = nodata
            win = (np.sign(q) * (q / 127.5) ** 2).transpose(1, 2, 0)
        elif mode == "xarray":
            win = src.isel(y=slice(r0, r1), x=slice(c0, c1)).values
        else:
            win = src[r0:r1, c0:c1]
        out[i] = _window_mean(win)
    return out


def write_geotiff(path: Path, codes: np.ndarray, size: int) -> None:
    """The same codes as a tiled (512²), pixel-interleaved, uncompressed int8 GeoTIFF."""
    import rasterio
    from rasterio.transform import from_origin

    prof = dict(driver="GTiff", width=size, height=size, count=64, dtype="int8", nodata=-128,
                crs="EPSG:32630", transform=from_origin(500_000.0, 5_700_000.0, PIX, PIX),
                tiled=True, blockxsize=512, blockysize=512, interleave="pixel", BIGTIFF="IF_SAFER")
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(np.moveaxis(codes, -1, 0))


def part_compare(quick: bool) -> dict:
    import rioxarray

    size = 1024 if quick else 2048
    n = max(20_000, int(LONDON_DENSITY * size * size))
    n_ref = 300 if quick else 1000
    path = SCRATCH / "cmp_ae.zarr"
    tif = SCRATCH / "cmp_ae.tif"
    gen_s = write_raster(path, size, seed=1)
    ae = xr.open_zarr(path, mask_and_scale=False, consolidated=False)["embedding"]
    x, y = random_points(n, size, seed=2)
    squares = [BufferSpec(shape="square", radius_px=4), BufferSpec(shape="square", radius_px=9)]
    circles = [BufferSpec(shape="circle", radius_m=50.0), BufferSpec(shape="circle", radius_m=100.0)]

    res: dict = {"raster_px": [size, size, 64], "raster_mb": size * size * 64 / 2**20,
                 "n_pois": n, "n_pois_reference": n_ref, "poi_density_per_px": n / size**2,
                 "raster_write_s": round(gen_s, 2), "windows": "square r=4 and r=9 px per POI"}
    codes = ae.values
    write_geotiff(tif, codes, size)
    dec_np = decode(codes)
    dec_xr = xr.DataArray(dec_np, dims=("y", "x", "band"),
                          coords={"y": ae["y"].values, "x": ae["x"].values})
    del codes
    rio = rioxarray.open_rasterio(tif, masked=True)
    ref = {}
    ref_vecs: dict = {}
    for name, src in (("rioxarray_geotiff", rio), ("xarray_in_memory", dec_xr),
                      ("numpy_in_memory", dec_np)):
        mode = name.split("_")[0]
        t, c = time.perf_counter(), time.process_time()
        ref_vecs[name] = [reference_loop(src, x[:n_ref], y[:n_ref], r, mode) for r in (4, 9)]
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        ref[name] = {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                     "pois_per_s": round(n_ref / wall, 1), "pois_per_cpu_s": round(n_ref / cpu, 1)}
        print(f"reference {name}: {ref[name]}", flush=True)
    res["reference"] = ref
    rio.close()
    del dec_xr, dec_np, rio

    eng = {}
    with dask.config.set(scheduler="threads"):
        pool_buffers(ae, x[:100], y[:100], squares)  # warm-up (imports, thread pool)
        for label, bufs in (("square_4_9px", squares), ("circle_50_100m", circles)):
            t, c = time.perf_counter(), time.process_time()
            out = pool_buffers(ae, x, y, bufs)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            eng[label] = {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                          "pois_per_s": round(n / wall, 1), "pois_per_cpu_s": round(n / cpu, 1),
                          "n_empty": out.n_empty}
            if label == "square_4_9px":
                eng[label]["max_abs_diff_vs_reference"] = {
                    name: max(float(np.abs(np.nan_to_num(out.vectors[b][:n_ref]) - vecs[b]).max())
                              for b in range(2))
                    for name, vecs in ref_vecs.items()
                }
            print(f"engine {label}: {eng[label]}", flush=True)
    res["engine_threads"] = eng
    for name, r in ref.items():
        res[f"speedup_vs_{name}"] = {k: round(v["pois_per_s"] / r["pois_per_s"], 1)
                                     for k, v in eng.items()}
        res[f"speedup_per_cpu_s_vs_{name}"] = {
            k: round(v["pois_per_cpu_s"] / r["pois_per_cpu_s"], 1) for k, v in eng.items()}
    shutil.rmtree(path, ignore_errors=True)
    tif.unlink(missing_ok=True)
    return res


def part_scale(quick: bool) -> dict:
    from distributed import Client, LocalCluster

    size = 3072 if quick else 7168
    n = 200_000 if quick else 1_000_000
    path = SCRATCH / "big_ae.zarr"
    gen_s = write_raster(path, size, seed=3)
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    x, y = random_points(n, size, seed=4)
    bufs = [BufferSpec(shape="circle", radius_m=50.0), BufferSpec(shape="circle", radius_m=100.0)]
    limit = "512MiB"
    out: dict = {"raster_px": [size, size, 64], "raster_gb": round(size * size * 64 / 2**30, 2),
                 "zarr_on_disk_gb": round(disk / 2**30, 2), "raster_write_s": round(gen_s, 2),
                 "n_pois": n, "buffers": [b.model_dump(exclude_none=True) for b in bufs],
                 "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": limit}}
    with PeakRSS() as rss:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=limit,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            ae = xr.open_zarr(path, mask_and_scale=False, consolidated=False)["embedding"]
            t = time.perf_counter()
            plan = plan_pool(ae, x, y, bufs)
            n_done = n_valid = 0
            checksum = 0.0
            for blk in plan.blocks():
                n_done += blk.index.size
                ok = blk.counts[:, 1] > 0
                n_valid += int(ok.sum())
                checksum += float(np.nansum(blk.vectors[:, 0, 0]))
            wall = time.perf_counter() - t
            worker_mem = client.run(lambda: __import__("psutil").Process().memory_info().rss)
    out.update({
        "seconds": round(wall, 2), "pois_per_s": round(n / wall, 1), "n_tasks": plan.n_tasks,
        "n_pooled": n_done, "n_outside": plan.n_outside, "n_with_aug_vector": n_valid,
        "worker_rss_mb_at_end": {k: round(v / 2**20, 1) for k, v in worker_mem.items()},
        "raster_over_total_worker_memory": round(size * size * 64 / (2 * 512 * 2**20), 2),
        **rss.as_dict(),
    })
    assert n_done + plan.n_outside == n
    shutil.rmtree(path, ignore_errors=True)
    return out


def _scale_in_subprocess(quick: bool) -> dict:
    """Run part 2 in a fresh interpreter so its peak RSS excludes part 1's leftovers."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "scale.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--scale-only", str(out)]
        subprocess.run(cmd + (["--quick"] if quick else []), check=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller rasters and POI sets")
    ap.add_argument("--skip-scale", action="store_true", help="only the throughput comparison")
    ap.add_argument("--scale-only", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scale_only:  # child process of _scale_in_subprocess
        import json

        SCRATCH.mkdir(parents=True, exist_ok=True)
        try:
            Path(args.scale_only).write_text(json.dumps(part_scale(args.quick), default=str))
        finally:
            shutil.rmtree(SCRATCH / "big_ae.zarr", ignore_errors=True)
        return
    SCRATCH.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"benchmark": "pool", "quick": args.quick, "machine": machine_info()}
    try:
        result["compare"] = part_compare(args.quick)
        print("compare:", result["compare"]["speedup_vs_rioxarray_geotiff"], flush=True)
        if not args.skip_scale:
            result["scale"] = _scale_in_subprocess(args.quick)
            print("scale:", {k: result["scale"][k] for k in ("seconds", "pois_per_s", "peak_rss_mb")},
                  flush=True)
    finally:
        for p in ("cmp_ae.zarr", "big_ae.zarr"):
            shutil.rmtree(SCRATCH / p, ignore_errors=True)
        (SCRATCH / "cmp_ae.tif").unlink(missing_ok=True)
        if SCRATCH.exists() and not any(SCRATCH.iterdir()):
            SCRATCH.rmdir()
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    path = write_result("pool", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
