"""Text query latency and throughput: aether_scale.query vs a hand-written xarray pass.

Two fields: the demo's (1024² px, from a demo workspace) and a large one (``--size``,
default 4096² = 16.8 M px: the bench_infer raster projected with the demo's model).
For 1 and for 10 phrases each:

- **ours**: :func:`aether_scale.query.query` (fresh output folder each time, no maps):
  phrase encoding, the one chunked pass writing ``similarity.zarr`` with per-chunk
  peaks, the exact top-10 locations, GeoParquet/GeoJSON; the similarity pass and the
  whole call are timed;
- **baseline** (what a user writes by hand with the libraries they would pick):
  ``xr.open_zarr(field)`` → float32 → ``xr.dot`` with the phrase vectors → divide by
  the pixel norms → ``to_zarr`` — a similarity raster only, no top locations, no
  integrity checks;
- **read floor**: one verified read of every field chunk (the I/O a query cannot avoid).

All on the threaded scheduler with every core. Then the command from outside: the
wall time of ``aether-scale query`` (a new process: imports, model load, text cache)
for one phrase over the large field. Writes ``benchmarks/results/query.json``.

    python benchmarks/bench_query.py --demo-ws demo-out          # ~3 min
    python benchmarks/bench_query.py --demo-ws demo-out --size 2048 --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import PeakRSS, machine_info, write_result  # noqa: E402

PHRASES = [
    "A place of cafes, a type of Eating and drinking.", "a place of parks",
    "A place of universities and colleges, a type of Education.", "a place of pubs",
    "A place of supermarkets, a type of Retail.", "a place of warehouses",
    "A place of hospitals, a type of Health.", "a place of railway stations",
    "A place of nightclubs, a type of Entertainment.", "a place of allotments",
]


def big_workspace(d: str, demo_ws: str, size: int) -> str:
    """A workspace with the bench_infer raster as ae.zarr, the demo's model, its field."""
    from bench_infer import make_pool, write_inputs

    from aether_scale.config import InferSection
    from aether_scale.infer import infer_field

    ws = os.path.join(d, "big")
    os.makedirs(ws)
    _, zpath = write_inputs(d, size, make_pool())
    os.replace(zpath, os.path.join(ws, "ae.zarr"))
    os.remove(os.path.join(d, "ae.tif"))
    shutil.copytree(os.path.join(demo_ws, "model"), os.path.join(ws, "model"))
    shutil.copy(os.path.join(demo_ws, "config.yaml"), os.path.join(ws, "config.yaml"))
    t0 = time.perf_counter()
    infer_field(os.path.join(ws, "ae.zarr"), os.path.join(ws, "model"),
                os.path.join(ws, "field.zarr"), InferSection(), progress=False)
    print(f"  big field: {size}² px inferred in {time.perf_counter() - t0:.0f} s", flush=True)
    return ws


def ours(ws: str, phrases: list[str], name: str) -> dict:
    from aether_scale.query import query

    shutil.rmtree(os.path.join(ws, "queries", name), ignore_errors=True)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        res = query(ws, phrases, name=name, maps=False, progress=False)
        total = time.perf_counter() - t0
    s = res.summary
    return {"seconds_total": round(total, 3), "seconds_similarity": s["seconds"]["similarity"],
            "seconds_top": s["seconds"]["top"], "pixels": s["pixels"],
            "pixels_per_s_total": round(s["pixels"] / total, 1),
            "pixels_per_s_similarity": s["pixels_per_s"], "peak_rss_mb": rss.peak_mb,
            "locations": s["locations"], "checks": s["checks"]}


def baseline(ws: str, vectors: np.ndarray, out: str) -> dict:
    import xarray as xr

    shutil.rmtree(out, ignore_errors=True)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        ds = xr.open_zarr(os.path.join(ws, "field.zarr"))
        f = ds["embedding"].astype("float32")
        q = xr.DataArray(vectors, dims=("query", "dim"))
        sim = xr.dot(f, q, dim="dim") / np.sqrt(xr.dot(f, f, dim="dim"))
        sim.to_dataset(name="similarity").to_zarr(out, mode="w")
        secs = time.perf_counter() - t0
    n = int(f.shape[0] * f.shape[1])
    return {"seconds": round(secs, 3), "pixels_per_s": round(n / secs, 1),
            "peak_rss_mb": rss.peak_mb,
            "what": "xr.open_zarr → astype(float32) → xr.dot / pixel norm → to_zarr "
                    "(similarity only: no top locations, no integrity checks)"}


def read_floor(ws: str) -> dict:
    from aether_scale.stores.field import open_field

    arr = open_field(os.path.join(ws, "field.zarr"))["embedding"].data
    t0 = time.perf_counter()
    arr.map_blocks(lambda b: np.zeros((1, 1, 1), np.float32), chunks=(1, 1, 1),
                   dtype=np.float32).compute()
    secs = time.perf_counter() - t0
    n = int(arr.shape[0] * arr.shape[1])
    return {"seconds": round(secs, 3), "pixels_per_s": round(n / secs, 1)}


def cli(ws: str) -> dict:
    env = {**os.environ, "AETHER_SCALE_NO_BAR": "1"}
    shutil.rmtree(os.path.join(ws, "queries", "cli"), ignore_errors=True)
    cmd = [sys.executable, "-m", "aether_scale", "-q", "query", "-w", ws, PHRASES[1],
           "--name", "cli"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(p.stderr)
    return {"command": "aether-scale -q query -w <big> 'a place of parks' --name cli (maps on)",
            "seconds_wall": round(secs, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-ws", required=True, help="a finished demo workspace")
    ap.add_argument("--size", type=int, default=4096, help="edge of the large field, px")
    ap.add_argument("--quick", action="store_true", help="skip the command-line timing")
    args = ap.parse_args()

    import dask
    import torch

    from aether_scale.config import workspace_config
    from aether_scale.model import load_text_projector
    from aether_scale.text import embed_texts

    demo = os.path.abspath(args.demo_ws)
    cores = os.cpu_count() or 1
    result: dict = {"machine": machine_info(), "threads": cores, "fields": {}}
    with tempfile.TemporaryDirectory(prefix="bench-query-") as d:
        fields = {"demo": demo, "large": big_workspace(d, demo, args.size)}
        head = load_text_projector(os.path.join(demo, "model"))
        with torch.no_grad():
            vecs = head(torch.from_numpy(embed_texts(PHRASES, workspace_config(demo).text))).numpy()
        with dask.config.set(scheduler="threads", num_workers=cores):
            for label, ws in fields.items():
                rows: dict = {"read_floor": read_floor(ws)}
                for k in (1, 10):
                    o = ours(ws, PHRASES[:k], f"bench-{k}")
                    b = baseline(ws, vecs[:k], os.path.join(d, f"base-{label}-{k}.zarr"))
                    rows[f"{k}_phrases"] = {
                        "ours": o, "baseline": b,
                        "speedup_similarity": round(b["seconds"] / o["seconds_similarity"], 2),
                        "speedup_total": round(b["seconds"] / o["seconds_total"], 2)}
                    print(f"  {label} {k:>2} phrase(s): ours {o['seconds_total']:.2f} s total "
                          f"({o['seconds_similarity']:.2f} s similarity, "
                          f"{o['pixels_per_s_similarity'] / 1e6:.2f} Mpx/s), baseline "
                          f"{b['seconds']:.2f} s ({b['pixels_per_s'] / 1e6:.2f} Mpx/s); read "
                          f"floor {rows['read_floor']['seconds']:.2f} s", flush=True)
                result["fields"][label] = rows
        if not args.quick:
            result["cli_large"] = cli(fields["large"])
            print(f"  CLI (large field, 1 phrase, maps): {result['cli_large']['seconds_wall']} s")
    result["size_large"] = args.size
    print(write_result("query", result))


if __name__ == "__main__":
    main()
