"""Field inference throughput: aether_scale.infer vs the reference approach, same raster, same run.

Reference approach (AETHER's inference script, re-implemented here from its
description): ONE process reads the AE GeoTIFF in 512 × 512 px windows with
rasterio, de-quantises and L2-normalises each pixel, runs the projector in
batches of 262,144 pixels (torch with all cores) and writes float32 LZW
GeoTIFF windows (128 bands, BigTIFF).

Ours: :func:`aether_scale.infer.infer_field` over ``ae.zarr`` holding the same
codes, on a LocalCluster of 2 single-threaded workers with a memory limit
whose total is smaller than the field it writes (float16 → ``field.zarr``),
so the run also shows out-of-core completion. It runs once per
``infer.precision`` (``float32``, the default, and ``bfloat16`` GEMMs).

Both use the same projector (the published AETHER London checkpoint when
``../shared/data`` is present, else a seeded random ``AEProj``) and the same
int8 raster (``--size`` px square, 64 bands; default 4096 → 16.8 M px).
Because the reference needs several minutes for 16.8 M px on 2 cores, it is
run over the raster's windows in row-major order for at most
``--reference-seconds`` (default 120 s) and its steady-state px/s is measured
on the windows done (every window costs the same; ``--full-reference`` runs
it to the end). A window of both outputs is compared for agreement.

    python benchmarks/bench_infer.py            # 4096² (16.8 M px), ~5 min
    python benchmarks/bench_infer.py --quick    # 2048² (4.2 M px), ~2 min

Writes ``benchmarks/results/infer.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import PeakRSS, machine_info, write_result  # noqa: E402

WIN = 512
REF_BATCH = 262_144
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- data
def make_pool(seed: int = 0, n: int = 4096) -> np.ndarray:
    """n distinct AE-like unit vectors as int8 codes (the raster draws its pixels from these)."""
    from aether_scale import aef

    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(32, 64))
    v = protos[rng.integers(0, 32, n)] + 0.9 * rng.normal(size=(n, 64))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return aef.encode(v)


def block_codes(pool: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Deterministic codes of pixels [r0:r1, c0:c1]: 32-px patches + per-pixel variation + holes."""
    yy, xx = np.meshgrid(np.arange(r0, r1, dtype=np.int64), np.arange(c0, c1, dtype=np.int64),
                         indexing="ij")
    patch = ((yy // 32) * 7919 + (xx // 32) * 104729) % 4093
    jitter = ((yy * 4099 + xx * 31) * 2654435761 >> 9) % 8
    codes = pool[(patch * 8 + jitter) % len(pool)]
    hole = ((yy // 256) * 13 + (xx // 256) * 7) % 23 == 0  # ~4 % nodata in 256-px squares
    codes[hole] = -128
    return codes


def write_inputs(d: str, size: int, pool: np.ndarray) -> tuple[str, str]:
    """The same raster as a tiled int8 GeoTIFF (reference) and as ae.zarr (ours).

    ae.zarr is written by :func:`aether_scale.stores.ae.write_ae` (the ingest stage's
    layout: 1024-px chunks, checksums, chunk index) from the codes held in memory."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from aether_scale.stores.ae import TargetGrid, write_ae

    tif = os.path.join(d, "ae.tif")
    transform = from_origin(500_000, 5_700_000, 10, 10)
    with rasterio.open(tif, "w", driver="GTiff", width=size, height=size, count=64, dtype="int8",
                       crs="EPSG:32630", transform=transform, nodata=-128, tiled=True,
                       blockxsize=WIN, blockysize=WIN, BIGTIFF="YES") as dst:
        for r in range(0, size, WIN):
            for c in range(0, size, WIN):
                blk = block_codes(pool, r, min(r + WIN, size), c, min(c + WIN, size))
                dst.write(np.moveaxis(blk, -1, 0), window=Window(c, r, blk.shape[1], blk.shape[0]))
    chunk = 1024
    codes = np.empty((size, size, 64), dtype=np.int8)
    for r in range(0, size, chunk):
        for c in range(0, size, chunk):
            r1, c1 = min(r + chunk, size), min(c + chunk, size)
            codes[r:r1, c:c1] = block_codes(pool, r, r1, c, c1)
    # same grid as the GeoTIFF: pixel centres x = 500000 + 10 i + 5, y = 5700000 - 10 j - 5
    grid = TargetGrid(CRS.from_epsg(32630).to_wkt(), 10.0, 500_000.0, 5_700_000.0, size, size)
    zpath = os.path.join(d, "ae.zarr")
    write_ae(zpath, codes, grid, chunk_px=chunk)
    del codes
    return tif, zpath


def load_model():
    import torch

    from aether_scale.model import AEProj, load_projector

    ck = SHARED / "aether_reference" / "london_last.pth"
    if ck.exists():
        return load_projector(ck), str(ck)
    torch.manual_seed(0)
    return AEProj().eval(), "random AEProj (seed 0)"


# --------------------------------------------------------------------------- reference
def reference_infer(tif: str, out_tif: str, model, *, max_seconds: float | None) -> dict:
    """The reference approach: rasterio 512-px windows → normalise → projector(262,144) → LZW float32."""
    import rasterio
    import torch
    from rasterio.windows import Window

    from aether_scale import aef

    torch.set_num_threads(os.cpu_count() or 1)
    done_px = 0
    n_win = 0
    t0 = time.perf_counter()
    with rasterio.open(tif) as src:
        profile = dict(driver="GTiff", width=src.width, height=src.height, count=128,
                       dtype="float32", crs=src.crs, transform=src.transform, compress="LZW",
                       tiled=True, blockxsize=WIN, blockysize=WIN, BIGTIFF="YES", nodata=np.nan)
        total_win = ((src.height + WIN - 1) // WIN) * ((src.width + WIN - 1) // WIN)
        with rasterio.open(out_tif, "w", **profile) as dst:
            for r in range(0, src.height, WIN):
                for c in range(0, src.width, WIN):
                    w = Window(c, r, min(WIN, src.width - c), min(WIN, src.height - r))
                    q = src.read(window=w)  # (64, h, w) int8
                    h, wd = q.shape[1:]
                    flat = np.moveaxis(q, 0, -1).reshape(-1, 64)
                    valid = ~np.any(flat == -128, axis=1)
                    v = aef.decode(flat[valid])
                    v = v / np.linalg.norm(v, axis=1, keepdims=True)
                    out = np.full((flat.shape[0], 128), np.nan, dtype=np.float32)
                    res = []
                    with torch.no_grad():
                        for s in range(0, len(v), REF_BATCH):
                            res.append(model(torch.from_numpy(v[s:s + REF_BATCH])).numpy())
                    if res:
                        out[valid] = np.concatenate(res)
                    dst.write(np.moveaxis(out.reshape(h, wd, 128), -1, 0), window=w)
                    done_px += h * wd
                    n_win += 1
                    if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                        break
                else:
                    continue
                break
    secs = time.perf_counter() - t0
    return {"pixels": done_px, "windows": n_win, "windows_total": total_win,
            "seconds": round(secs, 2), "pixels_per_s": round(done_px / secs, 1),
            "complete": n_win == total_win,
            "extrapolated_full_seconds": round(secs * total_win / max(n_win, 1), 1)}


# --------------------------------------------------------------------------- ours
def ours_infer(zpath: str, outs: dict[str, str], model, *, n_workers: int,
               memory_limit: str) -> dict[str, dict]:
    """infer_field once per precision ({precision: out path}) on one LocalCluster, with peak RSS."""
    from distributed import Client, LocalCluster

    from aether_scale.config import InferSection
    from aether_scale.infer import infer_field

    t0 = time.perf_counter()
    res = {}
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, memory_limit=memory_limit,
                      processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.run(lambda: __import__("torch"))  # worker start-up is not inference
        t_start = time.perf_counter() - t0
        print(f"LocalCluster: {n_workers} workers × {memory_limit}; dashboard {client.dashboard_link}")
        for precision, out in outs.items():
            with PeakRSS() as rss:
                st = infer_field(zpath, model, out, InferSection(precision=precision),
                                 progress=False)
            st.update(rss.as_dict())
            st["cluster_start_seconds"] = round(t_start, 2)
            res[precision] = st
            print(f"ours ({precision}): {st['pixels_per_s']:,.0f} px/s ({st['seconds']} s), "
                  f"peak RSS (tree) {rss.peak_mb:.0f} MiB")
    return res


def agreement(ref_tif: str, field_zarr: str) -> dict:
    """Max |ours − reference| over the first window (ours is float16)."""
    import rasterio
    from rasterio.windows import Window

    from aether_scale.stores.raster import open_embedding

    with rasterio.open(ref_tif) as src:
        ref = np.moveaxis(src.read(window=Window(0, 0, WIN, WIN)), 0, -1)
    ours = open_embedding(field_zarr)[:WIN, :WIN].values.astype(np.float32)
    both = np.isfinite(ref).all(-1)
    return {"same_nodata_mask": bool(np.array_equal(both, np.isfinite(ours).all(-1))),
            "max_abs_diff": float(np.abs(ref[both] - ours[both]).max()),
            "pixels_compared": int(both.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2048² raster, reference ≤ 45 s")
    ap.add_argument("--size", type=int, default=None, help="raster edge in px (multiple of 1024)")
    ap.add_argument("--reference-seconds", type=float, default=None)
    ap.add_argument("--full-reference", action="store_true", help="run the reference to the end")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="1.5GiB", help="per worker")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--precision", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16"], help="infer.precision values to run")
    args = ap.parse_args()
    size = args.size or (2048 if args.quick else 4096)
    ref_budget = None if args.full_reference else (
        args.reference_seconds or (45.0 if args.quick else 120.0))

    import dask

    tmp = tempfile.mkdtemp(prefix="bench_infer_", dir=os.environ.get("BENCH_TMP"))
    try:
        model, model_src = load_model()
        t = time.perf_counter()
        tif, zpath = write_inputs(tmp, size, make_pool())
        print(f"inputs: {size}² px × 64 int8 ({size * size * 64 / 2**30:.2f} GiB) "
              f"in {time.perf_counter() - t:.0f} s → {tmp}")

        with PeakRSS() as rss_ref:
            ref = reference_infer(tif, os.path.join(tmp, "ref_field.tif"), model,
                                  max_seconds=ref_budget)
        ref.update(rss_ref.as_dict())
        print(f"reference: {ref['pixels_per_s']:,.0f} px/s over {ref['windows']}/"
              f"{ref['windows_total']} windows ({ref['seconds']} s), peak RSS {rss_ref.peak_mb:.0f} MiB")

        outs = {p: os.path.join(tmp, f"field_{p}.zarr") for p in args.precision}
        runs = ours_infer(zpath, outs, model, n_workers=args.workers,
                          memory_limit=args.memory_limit)
        ours = runs[args.precision[0]]
        mem_limit_bytes = dask.utils.parse_bytes(args.memory_limit) * args.workers
        field_bytes = size * size * ours["dim"] * 2
        agree = {p: agreement(os.path.join(tmp, "ref_field.tif"), o) for p, o in outs.items()}
        result = {
            "benchmark": "field inference (projector over every AE pixel)",
            "raster": {"size_px": [size, size], "pixels": size * size, "bands": 64,
                       "dtype": "int8", "nodata_fraction": round(1 - ours["valid_pixels"] / (size * size), 4)},
            "model": model_src,
            "reference": {"approach": "1 process, rasterio 512-px windows, L2-normalise, projector "
                          "batches of 262,144 (torch, all cores), float32 LZW GeoTIFF windows",
                          **ref},
            "ours": {p: {"approach": f"aether_scale.infer.infer_field, LocalCluster {args.workers}"
                         f" × 1 thread, memory_limit {args.memory_limit}/worker, float16 "
                         f"field.zarr, projector GEMMs in {p}", **st} for p, st in runs.items()},
            "speedup": {p: round(st["pixels_per_s"] / ref["pixels_per_s"], 2)
                        for p, st in runs.items()},
            "out_of_core": {"total_worker_memory_bytes": int(mem_limit_bytes),
                            "field_bytes_uncompressed": int(field_bytes),
                            "field_over_worker_memory": round(field_bytes / mem_limit_bytes, 2),
                            "completed": True},
            "agreement_first_window": agree,
            "machine": machine_info(),
        }
        path = write_result("infer", result)
        print(f"speedup {result['speedup']} (target ≥ 5×); field {field_bytes / 2**30:.1f} GiB vs "
              f"{mem_limit_bytes / 2**30:.1f} GiB worker memory; agreement {agree}")
        print(f"→ {path}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
