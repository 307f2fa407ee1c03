"""Scaling: strong scaling 1 → 2 workers, per-task overhead against chunk count, national graph.

Three parts (``--parts``, default all three), one result file:

**strong** — the same ``pool`` and ``infer`` work on 1 and on 2 workers. A synthetic
city (``aether-scale synth``; ``--size`` px square, default 1024, ingested with
``--chunk`` px chunks, default 256 → 16 chunks, so ``pool`` and ``infer`` each run 16
tasks) is taken through ``aether-scale run --until train`` once (``train.epochs=1``:
the model's weights do not change the cost of ``infer``). Then ``aether-scale pool``
and ``aether-scale infer`` (``-w WS --force``) run as separate CLI processes on a
LocalCluster (``cluster.kind=local``, ``threads_per_worker=1``) with ``n_workers`` 1
and 2, ``--repeats`` times each, interleaved (1, 2, 1, 2 …) so that load from other
users of the machine hits both alike. For each run three times are kept:

- ``compute_s``: the stage function's own ``seconds`` (``stats.seconds`` in
  ``manifests/<stage>.json``; for infer ``stats["field.zarr"].seconds``): opening the
  inputs, every chunk task, finishing the store. Speedup and efficiency use this;
- ``stage_s``: the manifest's ``seconds`` (the stage as the workspace runs it: the
  worker-memory check, which imports torch on the workers, and publishing the output);
- ``wall_s``: the whole CLI command (Python start-up, config, LocalCluster start and
  stop included) — what a user waits for.

Speedup = t(1 worker) / t(2 workers) on the fastest repeat; parallel efficiency =
speedup / 2. Peak RSS of the command's process tree is sampled too. Every command
starts its own cluster, so ``compute_s`` includes what fresh workers pay on their
first task (model unpickling, first torch and zarr calls) — as a user's run does;
part **overhead** runs on warm workers instead.

**overhead** — the cost of a task against chunk count. The same city raster
(``--size`` px) is ingested with ``ingest.chunk_px`` = each of ``--chunks`` (default
512, 256, 128, 64 → 4 … 256 chunks for 1024 px) and the field inferred with
``infer.chunk_px`` equal to it (the default for AE chunks ≤ 512 px: one infer task per
AE chunk, so a task never reads more than its own chunk), through the stage functions
:func:`aether_scale.ingest.ingest_tiles` and :func:`aether_scale.infer.infer_field` on
one LocalCluster of 2 single-threaded workers opened by
:func:`aether_scale.cluster.connect`, warmed up first (torch imported on the workers and
one unrecorded ingest + infer, so first-call costs belong to no chunk size). The total work is the same at every chunk size, so what grows with the
chunk count is per-task cost. Two estimates, both reported:

1. ``wall_fit``: least squares ``t = a + b · tasks`` over the chunk sizes (fastest
   repeat of each). ``b`` is the wall seconds one more task costs on this cluster;
   ``b × slots`` (slots = worker threads) is that cost in worker-slot seconds, if the
   overhead runs on the workers in parallel (scheduler-side overhead is serial, so this
   is an upper bound for it); ``a`` is the chunk-independent part (the work itself on 2
   slots plus fixed stage set-up).
2. ``task_fit``: from the scheduler's task stream (``distributed.get_task_stream``),
   the compute time of every chunk task, fitted as ``duration = α + β · px`` over all
   tasks. ``α`` is the fixed cost *inside* a task (opening the stores, the ledger
   record, zarr/codec set-up), ``β`` the cost per pixel; ``b × slots − α`` is then what
   a task costs *outside* its body (scheduling, dispatch, result/serialisation
   round-trips). ``utilisation`` = Σ task compute / (wall × slots).

From these, ``overhead_share(c) = o / (o + β·c²)`` with ``o = b × slots`` is the share
of a task's slot time spent on per-task cost for chunk edge ``c`` (predicted for
256…2048 px).

**national** — the graph of a country without running it. A Great-Britain-sized grid
(``--national-px`` square, default 48,000² px ≈ 2.3 billion px at 10 m, EPSG:27700)
covered by sparse 64-band int8 GeoTIFF tiles of 8,000² px (headers and tile offsets
only: nothing to read) is ingested by the real :func:`~aether_scale.ingest.ingest_tiles`
with ``chunk_px`` 512, 1024 and 2048 — with :func:`aether_scale.cluster.run_tasks`
replaced, for the duration of the call, by a function that keeps the list of
``dask.delayed(chunk_job)`` tasks :func:`~aether_scale.stores.raster.write_chunks` hands
it and stops the stage there (so planning, the template write and the task
construction are exactly the stage's). The same is done for ``infer_field`` over a
finished national ``ae.zarr`` of that chunking (every chunk recorded as written: one
real zstd chunk of zeros, hard-linked at every chunk's path, so the per-task read
graph carries a stored-chunk entry as a real store's would), with the default
``infer.chunk_px`` (largest divisor ≤ 512 of the AE chunk) and with
``infer.chunk_px`` = the AE chunk. For each graph:

- ``tasks``: the chunk tasks; ``graph_keys``: keys in the optimised graph (chunk
  tasks + shared literals such as infer's model);
- ``build_s``: ``write_chunks`` entered → its task list complete (ledger listing, one
  ``job(i, j, window)`` and one ``dask.delayed`` per chunk); ``stage_to_graph_s``: the
  stage function called → task list complete (planning, template write included);
- ``graph_bytes``: the bytes ``Client.compute`` sends (the optimised expression
  serialised with ``distributed.protocol.serialize`` exactly as
  ``Client._graph_to_futures`` does), and ``pickle_bytes``: cloudpickle of the
  materialised low-level graph dict, as a cross-check; ``bytes_per_task`` =
  (``graph_bytes`` − literals every task shares: infer's model, ≈0.5 MB once per
  graph) / tasks;
- submission to a LocalCluster scheduler **with no workers** (nothing can run):
  ``compute_call_s`` = ``client.compute(tasks)`` return time (client side: optimise,
  serialise, enqueue — what ``run_tasks`` does first), ``scheduler_accept_s`` = from
  the call until the scheduler holds the graph's tasks (polled every 20 ms; the
  scheduler creates a graph's tasks in one step, so that is the whole graph:
  deserialisation and task-state creation included), ``cancel_s`` = ``client.cancel``
  until the scheduler holds none, and the RSS growth of this process (client and
  scheduler live in it). The scheduler shares this process's GIL with the client, so
  on a remote scheduler the accept time would overlap less with the client's work.

The script ends with a markdown table for the README and a chunk-size recommendation
computed from the numbers (rule printed with it).

    python benchmarks/bench_scaling.py            # all parts, ~15-20 min on 2 idle cores
    python benchmarks/bench_scaling.py --quick    # smoke test: 256 px city, 12,000² px grid, ~4 min
    python benchmarks/bench_scaling.py --parts national   # one part

Writes ``benchmarks/results/scaling.json`` (``"quick": true`` for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from _common import PeakRSS, machine_info, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TILE_PX = 8000  # national part: tile edge (80 km at 10 m)
EPSG_NATIONAL = 27700


def _log(msg: str) -> None:
    print(msg, flush=True)


def _min_by(runs: list[dict], key: str) -> float:
    return min(float(r[key]) for r in runs)


# =========================================================================== part 1: strong
def _city_config(root: Path, *, size: int, chunk: int, n_pois: int, n_workers: int,
                 memory_limit: str) -> Path:
    """The run config of the benchmark city (YAML next to the workspace)."""
    import yaml

    from aether_scale.demo import city_inputs
    from aether_scale.synthetic.io import city_paths

    city = city_paths(root / "city")
    cfg: dict[str, Any] = {
        "cluster": {"kind": "local", "n_workers": n_workers, "threads_per_worker": 1,
                    "memory_limit": memory_limit},
        "synth": {"size_px": size, "n_pois": n_pois,
                  "n_luc_points": 500, "n_regions": max(50, size * size // 4000), "seed": 0},
        "ingest": {"chunk_px": chunk},
        "train": {"epochs": 1},
    }
    for k, v in city_inputs(city).items():
        cfg.setdefault(k, {}).update(v)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _cli(args: list[str], *, log_to: Path) -> tuple[float, dict]:
    """Run ``aether-scale ARGS`` in a fresh process; (wall seconds, peak RSS of its tree)."""
    cmd = [sys.executable, "-m", "aether_scale", "-q", *args]
    env = {**os.environ, "AETHER_SCALE_NO_BAR": "1"}
    with open(log_to, "ab") as logf, PeakRSS() as rss:
        logf.write(f"\n$ {' '.join(cmd)}\n".encode())
        logf.flush()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        wall = time.perf_counter() - t0
    if proc.returncode:
        tail = log_to.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"`aether-scale {' '.join(args)}` failed (exit {proc.returncode}); "
                           f"end of {log_to} (kept with --keep):\n{tail}")
    return wall, rss.as_dict()


def prepare_city(root: Path, *, size: int, chunk: int, n_pois: int, memory_limit: str
                 ) -> tuple[Path, Path, dict]:
    """Write the city and run every stage up to ``train`` once; returns (workspace, config, times)."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = _city_config(root, size=size, chunk=chunk, n_pois=n_pois, n_workers=2,
                       memory_limit=memory_limit)
    ws = root / "ws"
    log = root / "commands.log"
    times = {}
    if not glob.glob(str(root / "city" / "ae" / "*.tif")):
        times["synth_s"] = round(_cli(["synth", "--out", str(root / "city"), "-c", str(cfg)],
                                      log_to=log)[0], 2)
    times["run_until_train_s"] = round(
        _cli(["run", "-w", str(ws), "-c", str(cfg), "--until", "train"], log_to=log)[0], 2)
    return ws, cfg, times


def _stage_times(ws: Path, stage: str) -> dict[str, Any]:
    m = json.loads((ws / "manifests" / f"{stage}.json").read_text())
    st = m["stats"]
    if stage == "infer":
        st = st["field.zarr"]
        tasks = st["n_chunks"]
    else:
        tasks = st["n_raster_chunks_used"]
    return {"compute_s": float(st["seconds"]), "stage_s": float(m["seconds"]), "tasks": tasks}


def strong_scaling(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    _log(f"[strong] city {args.size}² px, ingest chunk {args.chunk} px, {args.n_pois:,} POIs → "
         f"{root}")
    t0 = time.perf_counter()
    ws, cfg, setup = prepare_city(root, size=args.size, chunk=args.chunk, n_pois=args.n_pois,
                                  memory_limit=args.memory_limit)
    setup["seconds"] = round(time.perf_counter() - t0, 1)
    _log(f"[strong] set-up (synth + run --until train) {setup['seconds']:.0f} s")
    log = root / "commands.log"
    runs: dict[str, dict[int, list[dict]]] = {s: {1: [], 2: []} for s in ("pool", "infer")}
    for rep in range(args.repeats):
        for stage in ("pool", "infer"):
            for n in (1, 2):
                wall, rss = _cli([stage, "-w", str(ws), "--force",
                                  "--set", f"cluster.n_workers={n}",
                                  "--set", "cluster.threads_per_worker=1"], log_to=log)
                rec = {**_stage_times(ws, stage), "wall_s": round(wall, 2),
                       "load_avg_1m": round(os.getloadavg()[0], 2), **rss}
                runs[stage][n].append(rec)
                _log(f"[strong] {stage} × {n} worker(s), repeat {rep + 1}: compute "
                     f"{rec['compute_s']:.2f} s, stage {rec['stage_s']:.2f} s, wall "
                     f"{wall:.1f} s ({rec['tasks']} tasks; load {rec['load_avg_1m']})")
    out: dict[str, Any] = {"city": {"size_px": args.size, "ingest_chunk_px": args.chunk,
                                    "n_pois": args.n_pois, "memory_limit": args.memory_limit},
                           "setup": setup, "stages": {}}
    for stage, by_n in runs.items():
        res: dict[str, Any] = {"tasks": by_n[1][0]["tasks"], "runs": {str(n): r for n, r in
                                                                     by_n.items()}}
        for key in ("compute_s", "stage_s", "wall_s"):
            t1, t2 = _min_by(by_n[1], key), _min_by(by_n[2], key)
            sp = t1 / t2 if t2 > 0 else float("nan")
            res[key] = {"1_worker": t1, "2_workers": t2, "speedup": round(sp, 3),
                        "efficiency": round(sp / 2, 3)}
        out["stages"][stage] = res
    return out


# =========================================================================== part 2: overhead
def _task_durations(ts_data: list[dict], prefix: str) -> list[float]:
    """Compute seconds of each task whose key starts with ``prefix`` (task-stream records)."""
    out = []
    for rec in ts_data:
        key = rec.get("key")
        name = key if isinstance(key, str) else str(key[0] if isinstance(key, tuple) else key)
        if not name.startswith(prefix):
            continue
        out.append(sum(s["stop"] - s["start"] for s in rec.get("startstops", ())
                       if s.get("action") == "compute"))
    return out


def _linfit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y = a + b·x."""
    if len(set(x)) < 2:
        return float(np.mean(y)), float("nan")
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a), float(b)


def _fit(points: list[dict], tasks_px: list[tuple[float, float]], slots: int) -> dict[str, Any]:
    """Per-task overhead from the wall fit and the task-duration fit (see the module doc)."""
    a, b = _linfit([p["tasks"] for p in points], [p["seconds"] for p in points])
    alpha, beta = _linfit([px for px, _ in tasks_px], [d for _, d in tasks_px])
    o = b * slots
    share = {str(c): round(o / (o + beta * c * c), 4) if o > 0 and beta > 0 else None
             for c in (256, 512, 1024, 2048)}
    return {
        "wall_fit": {"a_s": round(a, 3), "b_s_per_task": round(b, 5),
                     "per_task_slot_s": round(o, 5)},
        "task_fit": {"alpha_s_in_task": round(alpha, 5), "beta_s_per_px": beta,
                     "px_per_slot_s": round(1 / beta, 1) if beta > 0 else None,
                     "outside_task_s": round(o - alpha, 5)},
        "overhead_share_predicted": share,
    }


def overhead(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from distributed import get_task_stream

    from aether_scale.cluster import connect
    from aether_scale.config import ClusterSection, InferSection
    from aether_scale.infer import infer_field
    from aether_scale.ingest import ingest_tiles
    from aether_scale.model import AEProj

    tiles = glob.glob(str(root / "city" / "ae" / "*.tif"))
    if not tiles:
        _log("[overhead] writing the synthetic city")
        cfg = _city_config(root, size=args.size, chunk=args.chunk, n_pois=args.n_pois,
                           n_workers=2, memory_limit=args.memory_limit)
        _cli(["synth", "--out", str(root / "city"), "-c", str(cfg)],
             log_to=root / "commands.log")
        tiles = glob.glob(str(root / "city" / "ae" / "*.tif"))
    uneven = [c for c in args.chunks if args.size % c]
    if uneven:
        _log(f"[overhead] warning: {args.size} px is not a multiple of {uneven}: edge tasks "
             "are smaller than c² px (the per-pixel fit counts them as c²)")
    work = root / "overhead"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AEProj().eval()
    n_workers = 2
    cl = ClusterSection(kind="local", n_workers=n_workers, threads_per_worker=1,
                        memory_limit=args.memory_limit)
    per_c: dict[int, dict[str, list]] = {c: {"ingest": [], "infer": []} for c in args.chunks}
    t_start = time.perf_counter()
    with connect(cl) as client:
        slots = sum(client.nthreads().values())
        client.run(lambda: (__import__("torch"), __import__("aether_scale.infer.stage"),
                            __import__("rasterio")) and None)
        _log(f"[overhead] {args.size}² px, chunks {args.chunks} px on {n_workers} workers × 1 "
             f"thread ({slots} slots)")
        # warm-up, not recorded: the first ingest/infer on fresh workers pays one-off costs
        # (model unpickling, torch/zarr/GDAL first calls) that belong to no chunk size
        c = args.chunks[0]
        t_w = time.perf_counter()
        ingest_tiles(tiles, str(work / "warm_ae.zarr"), chunk_px=c, progress=False)
        infer_field(str(work / "warm_ae.zarr"), model, str(work / "warm_field.zarr"),
                    InferSection(chunk_px=c), progress=False)
        for p in ("warm_ae.zarr", "warm_field.zarr"):
            shutil.rmtree(work / p, ignore_errors=True)
        _log(f"[overhead] warm-up (ingest + infer at {c} px, not recorded) "
             f"{time.perf_counter() - t_w:.1f} s")
        for rep in range(args.repeats):
            for c in args.chunks:
                ae = work / f"ae_{c}.zarr"
                field = work / f"field_{c}.zarr"
                for p in (ae, field):
                    shutil.rmtree(p, ignore_errors=True)
                with get_task_stream(client) as ts:
                    st = ingest_tiles(tiles, str(ae), chunk_px=c, progress=False)
                d_ing = _task_durations(ts.data, "ingest-")
                with get_task_stream(client) as ts:
                    sf = infer_field(str(ae), model, str(field), InferSection(chunk_px=c),
                                     progress=False)
                d_inf = _task_durations(ts.data, "infer-")
                px_task = c * c  # interior chunks; edge chunks of a size not divisible are smaller
                for stage, s, d, n in (("ingest", st["seconds"], d_ing, st["chunks"]),
                                       ("infer", sf["seconds"], d_inf, sf["n_chunks"])):
                    per_c[c][stage].append({
                        "seconds": float(s), "tasks": int(n), "task_durations": d,
                        "mean_task_s": float(np.mean(d)) if d else None,
                        "utilisation": round(sum(d) / (float(s) * slots), 3) if d else None,
                        "px_per_task": px_task})
                _log(f"[overhead] chunk {c:4d} px: ingest {st['chunks']:4d} tasks "
                     f"{st['seconds']:6.2f} s | infer {sf['n_chunks']:4d} tasks "
                     f"{sf['seconds']:6.2f} s ({sf['pixels_per_s']:,.0f} px/s), mean task "
                     f"{1e3 * np.mean(d_inf):.1f} ms (repeat {rep + 1})")
                for p in (ae, field):
                    shutil.rmtree(p, ignore_errors=True)
    out: dict[str, Any] = {"size_px": args.size, "chunks_px": args.chunks, "slots": slots,
                           "n_workers": n_workers, "threads_per_worker": 1,
                           "memory_limit": args.memory_limit,
                           "seconds_total": round(time.perf_counter() - t_start, 1),
                           "stages": {}}
    for stage in ("ingest", "infer"):
        rows, tasks_px = [], []
        for c in args.chunks:
            runs = per_c[c][stage]
            best = min(runs, key=lambda r: r["seconds"])
            rows.append({"chunk_px": c, "tasks": best["tasks"], "seconds": best["seconds"],
                         "seconds_all": [r["seconds"] for r in runs],
                         "s_per_task": round(best["seconds"] / best["tasks"], 5),
                         "mean_task_s": (round(best["mean_task_s"], 5)
                                         if best["mean_task_s"] is not None else None),
                         "utilisation": best["utilisation"],
                         "pixels_per_s": round(args.size * args.size / best["seconds"], 1)})
            for r in runs:
                tasks_px += [(r["px_per_task"], d) for d in r["task_durations"]]
        out["stages"][stage] = {"by_chunk": rows, **_fit(rows, tasks_px, slots)}
    return out


# =========================================================================== part 3: national
class _Captured(Exception):
    """Raised by the stand-in for ``run_tasks``: the stage's task list is complete."""


@contextlib.contextmanager
def capture_tasks():
    """While active, ``write_chunks`` hands its tasks here instead of running them.

    ``write_chunks`` imports ``aether_scale.cluster.run_tasks`` when called, so replacing
    that attribute is enough; the stage modules' own ``write_chunks`` names are wrapped to
    time the graph construction (entry → task list)."""
    import aether_scale.cluster as cluster_mod
    import aether_scale.infer.stage as infer_mod
    import aether_scale.ingest.stage as ingest_mod

    box: dict[str, Any] = {}

    def fake_run_tasks(tasks, *, progress=None, retries=0):  # noqa: ANN001, ARG001
        box["tasks"] = list(tasks)
        box["t_tasks"] = time.perf_counter()
        raise _Captured

    def timed(fn):  # noqa: ANN001, ANN202
        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            box["t_write_chunks"] = time.perf_counter()
            return fn(*a, **kw)
        return wrapper

    import aether_scale.stores.raster as raster_mod

    saved = (cluster_mod.run_tasks, ingest_mod.write_chunks, infer_mod.write_chunks)
    # should raster.py ever import run_tasks at module level, replace that name too: the
    # real one would wait forever on a scheduler without workers
    raster_had = "run_tasks" in vars(raster_mod)
    raster_saved = vars(raster_mod).get("run_tasks")
    cluster_mod.run_tasks = fake_run_tasks
    if raster_had:
        raster_mod.run_tasks = fake_run_tasks
    ingest_mod.write_chunks = timed(saved[1])
    infer_mod.write_chunks = timed(saved[2])
    try:
        yield box
    finally:
        cluster_mod.run_tasks, ingest_mod.write_chunks, infer_mod.write_chunks = saved
        if raster_had:
            raster_mod.run_tasks = raster_saved


def write_sparse_tiles(folder: Path, size: int, tile: int) -> list[str]:
    """``ceil(size / tile)²`` 64-band int8 GeoTIFF tiles (EPSG:27700) covering ``size`` px,
    written sparse: headers and empty tile offsets only."""
    import rasterio
    from rasterio.transform import from_origin

    folder.mkdir(parents=True, exist_ok=True)
    n = -(-size // tile)
    paths = []
    for r in range(n):
        for c in range(n):
            h, w = min(tile, size - r * tile), min(tile, size - c * tile)
            p = folder / f"tile_{r:02d}_{c:02d}.tif"
            with rasterio.open(p, "w", driver="GTiff", width=w, height=h, count=64, dtype="int8",
                               crs=f"EPSG:{EPSG_NATIONAL}", nodata=-128,
                               transform=from_origin(c * tile * 10.0, 1_300_000 - r * tile * 10.0,
                                                     10, 10),
                               tiled=True, blockxsize=512, blockysize=512, BIGTIFF="YES",
                               SPARSE_OK="TRUE"):
                pass
            paths.append(str(p))
    return paths


def write_national_ae(path: Path, size: int, chunk: int) -> float:
    """A finished ``ae.zarr`` of ``size``² px in ``chunk`` px chunks whose every chunk is
    recorded as written (one real chunk of zeros, hard-linked at every chunk's path), built
    with the stage's own pieces (template, ``RasterBuild``, ledger, ``finish``)."""
    from rasterio.crs import CRS

    from aether_scale import aef
    from aether_scale.stores import ae as ae_store
    from aether_scale.stores.chunks import _chunk_path, _encode_key, chunk_key
    from aether_scale.stores.raster import RasterBuild

    t0 = time.perf_counter()
    grid = ae_store.TargetGrid(CRS.from_epsg(EPSG_NATIONAL).to_wkt(), 10.0, 0.0, 1_300_000.0,
                               size, size)
    build = RasterBuild.at(str(path), str(path) + ".ledger").create(
        ae_store.template(grid, chunk), fill_value=aef.NODATA, token="bench-national")
    cells = build.grid()
    build.commit(0, 0, np.zeros((chunk, chunk, aef.N_BANDS), np.int8), {"valid": chunk * chunk})
    arr = build.store.array("embedding")
    src = _chunk_path(build.store, "embedding", _encode_key(arr, (0, 0, 0)))
    for i, j in cells[1:]:
        dst = _chunk_path(build.store, "embedding", _encode_key(arr, (i, j, 0)))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.link(src, dst)
        r0, r1, c0, c1 = build.window(i, j)
        build.ledger.record(chunk_key((i, j, 0)), {"empty": False, "valid": (r1 - r0) * (c1 - c0)})
    build.finish()
    return time.perf_counter() - t0


def graph_sizes(tasks: list) -> dict[str, Any]:
    """What ``Client.compute(tasks)`` would send, and the plain pickled graph dict.

    Follows ``distributed.Client.compute``: ``collections_to_expr`` (optimised),
    ``FinalizeCompute``, ``.optimize()``, then ``serialize(to_serialize(expr))`` as
    ``Client._graph_to_futures`` does (those are dask/distributed internals: on another
    version the client-side size may be missing, the pickled dict stays)."""
    import cloudpickle
    from dask.base import collections_to_expr

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    expr = collections_to_expr(tasks, True)
    try:
        from dask._expr import FinalizeCompute

        expr = FinalizeCompute(expr)
    except ImportError:  # pragma: no cover - another dask version
        pass
    expr = expr.optimize()
    dsk = dict(expr.__dask_graph__())
    out["optimize_s"] = round(time.perf_counter() - t0, 3)
    out["graph_keys"] = len(dsk)
    t0 = time.perf_counter()
    out["pickle_bytes"] = len(cloudpickle.dumps(dsk, protocol=5))
    out["pickle_s"] = round(time.perf_counter() - t0, 3)
    try:
        from distributed.protocol.serialize import Serialized, serialize, to_serialize
        from distributed.utils import nbytes

        t0 = time.perf_counter()
        ser = Serialized(*serialize(to_serialize(expr), on_error="raise"))
        out["graph_bytes"] = int(sum(map(nbytes, [ser.header] + ser.frames)))
        out["serialize_s"] = round(time.perf_counter() - t0, 3)
    except Exception as e:  # noqa: BLE001 - private API of another distributed version
        out["graph_bytes"] = None
        out["graph_bytes_error"] = f"{type(e).__name__}: {e}"
    return out


def submit_without_running(client: Any, tasks: list) -> dict[str, Any]:
    """Submit ``tasks`` to a scheduler that has no workers; time the call, the scheduler's
    acceptance of every key and the cancellation."""
    import psutil

    def n_tasks(dask_scheduler) -> int:  # noqa: ANN001
        return len(dask_scheduler.tasks)

    def states(dask_scheduler) -> dict[str, int]:  # noqa: ANN001
        out: dict[str, int] = {}
        for ts in dask_scheduler.tasks.values():
            out[ts.state] = out.get(ts.state, 0) + 1
        return out

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sending large graph": measured, not needed
        futures = client.compute(tasks)
    t_call = time.perf_counter() - t0
    # update_graph creates every task of a graph in one step: once the scheduler holds as
    # many tasks as there are futures, it holds the whole graph (no other graph is there)
    deadline = t0 + 600
    while client.run_on_scheduler(n_tasks) < len(futures):
        if time.perf_counter() > deadline:
            raise TimeoutError("the scheduler did not accept the graph within 600 s")
        time.sleep(0.02)
    t_accept = time.perf_counter() - t0
    st = client.run_on_scheduler(states)
    held = sum(st.values())
    rss1 = proc.memory_info().rss
    t1 = time.perf_counter()
    client.cancel(futures)
    del futures
    while client.run_on_scheduler(n_tasks) > 0:
        if time.perf_counter() > t1 + 300:
            break
        time.sleep(0.02)
    t_cancel = time.perf_counter() - t1
    return {"compute_call_s": round(t_call, 3), "scheduler_accept_s": round(t_accept, 3),
            "cancel_s": round(t_cancel, 3), "scheduler_tasks": held, "scheduler_states": st,
            "rss_growth_mb": round((rss1 - rss0) / 2**20, 1)}


def national(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from distributed import Client, LocalCluster

    from aether_scale.config import InferSection
    from aether_scale.infer import infer_field
    from aether_scale.infer.models import _model_payload
    from aether_scale.infer.stage import field_chunk
    from aether_scale.ingest import ingest_tiles
    from aether_scale.model import AEProj

    size = args.national_px
    work = root / "national"
    shutil.rmtree(work, ignore_errors=True)
    tiles = write_sparse_tiles(work / "tiles", size, min(TILE_PX, size))
    _log(f"[national] {size:,}² px ({size * size / 1e9:.2f} billion px, "
         f"{size * size * 64 / 2**40:.2f} TiB int8) in {len(tiles)} sparse tiles")
    torch.manual_seed(0)
    model = AEProj().eval()
    payload_bytes = len(_model_payload(model)[0])
    rows: list[dict[str, Any]] = []

    def measure(stage: str, ae_chunk: int, task_chunk: int, run) -> None:  # noqa: ANN001
        with capture_tasks() as box:
            t0 = time.perf_counter()
            try:
                run()
            except _Captured:
                pass
            else:
                raise RuntimeError(f"{stage}: write_chunks never reached run_tasks")
        tasks = box["tasks"]
        row: dict[str, Any] = {
            "stage": stage, "ae_chunk_px": ae_chunk, "task_chunk_px": task_chunk,
            "tasks": len(tasks), "build_s": round(box["t_tasks"] - box["t_write_chunks"], 3),
            "stage_to_graph_s": round(box["t_tasks"] - t0, 3)}
        row.update(graph_sizes(tasks))
        shared = payload_bytes if stage == "infer" else 0  # infer: the model, once per graph
        if row.get("graph_bytes"):
            row["shared_literal_bytes"] = shared
            row["bytes_per_task"] = round((row["graph_bytes"] - shared) / len(tasks), 1)
        row.update(submit_without_running(client, tasks))
        rows.append(row)
        gb = row.get("graph_bytes") or row["pickle_bytes"]
        per = row.get("bytes_per_task", gb / len(tasks))
        _log(f"[national] {stage:6s} AE chunk {ae_chunk:4d} / task chunk {task_chunk:4d}: "
             f"{len(tasks):6,} tasks, graph {gb / 2**20:7.2f} MiB "
             f"({per:,.0f} B/task besides shared literals), build {row['build_s']:.2f} s, compute() "
             f"{row['compute_call_s']:.2f} s, scheduler holds all after "
             f"{row['scheduler_accept_s']:.2f} s, cancel {row['cancel_s']:.2f} s")

    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0",
                      scheduler_kwargs={"dashboard": False}) as cluster, Client(cluster) as client:
        for c in args.national_chunks:
            ae = work / f"ae_{c}.zarr"
            measure("ingest", c, c, lambda c=c, ae=ae: ingest_tiles(
                tiles, str(ae), chunk_px=c, ledger=str(work / f"ingest_{c}.ledger"),
                progress=False))
            shutil.rmtree(ae, ignore_errors=True)
            shutil.rmtree(work / f"ingest_{c}.ledger", ignore_errors=True)
            secs = write_national_ae(ae, size, c)
            _log(f"[national] finished ae.zarr in {c} px chunks (hard-linked) in {secs:.1f} s")
            for ic in dict.fromkeys([field_chunk(c), c]):
                out = work / f"field_{c}_{ic}.zarr"
                measure("infer", c, ic, lambda ic=ic, ae=ae, out=out: infer_field(
                    str(ae), model, str(out), InferSection(chunk_px=ic),
                    ledger=str(out) + ".ledger", progress=False))
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(str(out) + ".ledger", ignore_errors=True)
            shutil.rmtree(ae, ignore_errors=True)
            shutil.rmtree(str(ae) + ".ledger", ignore_errors=True)
    return {"size_px": size, "pixels": size * size, "tile_px": min(TILE_PX, size),
            "tiles": len(tiles), "crs": f"EPSG:{EPSG_NATIONAL}", "graphs": rows}


# =========================================================================== report
def _fmt_s(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def markdown(res: dict[str, Any]) -> str:
    lines: list[str] = []
    s = res.get("strong")
    if s:
        lines += [f"Strong scaling ({s['city']['size_px']}² px city, "
                  f"{s['city']['ingest_chunk_px']} px AE chunks, {s['city']['n_pois']:,} POIs; "
                  "LocalCluster × 1 thread per worker; fastest of "
                  f"{res['repeats']}):", "",
                  "| stage | tasks | 1 worker (s) | 2 workers (s) | speedup | efficiency | "
                  "CLI wall 1 → 2 workers (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for stage, r in s["stages"].items():
            c, w = r["compute_s"], r["wall_s"]
            lines.append(f"| {stage} | {r['tasks']} | {c['1_worker']:.2f} | {c['2_workers']:.2f} "
                         f"| {c['speedup']:.2f}× | {c['efficiency']:.0%} | "
                         f"{w['1_worker']:.1f} → {w['2_workers']:.1f} |")
        lines.append("")
    o = res.get("overhead")
    if o:
        lines += [f"Per-task overhead ({o['size_px']}² px, {o['slots']} worker slots):", "",
                  "| chunk (px) | tasks | ingest (s) | infer (s) | infer px/s | infer mean task "
                  "(ms) | infer utilisation |", "|---:|---:|---:|---:|---:|---:|---:|"]
        ing = {r["chunk_px"]: r for r in o["stages"]["ingest"]["by_chunk"]}
        for r in o["stages"]["infer"]["by_chunk"]:
            i = ing[r["chunk_px"]]
            mt = "–" if r["mean_task_s"] is None else f"{1e3 * r['mean_task_s']:.1f}"
            ut = "–" if r["utilisation"] is None else f"{r['utilisation']:.0%}"
            lines.append(f"| {r['chunk_px']} | {r['tasks']} | {i['seconds']:.2f} | "
                         f"{r['seconds']:.2f} | {r['pixels_per_s']:,.0f} | {mt} | {ut} |")
        for stage in ("ingest", "infer"):
            f = o["stages"][stage]
            share = ", ".join(f"{k} px {v:.1%}" for k, v in
                              f["overhead_share_predicted"].items() if v is not None)
            lines.append("")
            lines.append(f"{stage}: +{1e3 * f['wall_fit']['b_s_per_task']:.1f} ms wall per extra "
                         f"task ({1e3 * f['wall_fit']['per_task_slot_s']:.1f} ms of a worker "
                         f"slot; {1e3 * f['task_fit']['alpha_s_in_task']:.1f} ms of it inside "
                         f"the task body); predicted per-task share of slot time: {share}")
        lines.append("")
    n = res.get("national")
    if n:
        lines += [f"National graph ({n['size_px']:,}² px = {n['pixels'] / 1e9:.2f} billion px, "
                  "built and submitted to a scheduler with no workers, never run):", "",
                  "| stage | AE chunk (px) | task chunk (px) | tasks | graph (MiB) | B/task | "
                  "build (s) | compute() (s) | scheduler has it (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for g in n["graphs"]:
            gb = g.get("graph_bytes") or g["pickle_bytes"]
            per = g.get("bytes_per_task", gb / g["tasks"])
            lines.append(f"| {g['stage']} | {g['ae_chunk_px']} | {g['task_chunk_px']} | "
                         f"{g['tasks']:,} | {gb / 2**20:.2f} | {per:,.0f} | {g['build_s']:.2f} | "
                         f"{g['compute_call_s']:.2f} | {g['scheduler_accept_s']:.2f} |")
        lines += ["", "B/task: graph bytes per task besides literals shared by all tasks (infer: "
                  "the model, once per graph); build: write_chunks entered → task list; "
                  "compute(): Client.compute return; scheduler has it: from the call until "
                  "the scheduler holds every task.", ""]
    return "\n".join(lines)


#: recommendation rule: per-task cost below this share of a task's slot time …
MAX_OVERHEAD_SHARE = 0.05
#: … a national graph the scheduler takes in within this many seconds …
MAX_SUBMIT_S = 30.0
#: … and one ingest task (chunk + 2 read buffers) within this share of a 2 GiB worker
MAX_TASK_MEMORY = 0.25 * 2 * 2**30


def recommend(res: dict[str, Any]) -> dict[str, Any]:
    """The smallest AE chunk edge meeting every rule the measured parts can check."""
    cands = [512, 1024, 2048]
    why: dict[str, list[str]] = {str(c): [] for c in cands}
    ok = dict.fromkeys(cands, True)
    o = res.get("overhead")
    for c in cands:
        mem = 3 * c * c * 64
        if mem > MAX_TASK_MEMORY:
            ok[c] = False
            why[str(c)].append(f"an ingest task holds {mem / 2**20:.0f} MiB > "
                               f"{MAX_TASK_MEMORY / 2**20:.0f} MiB")
        if o:
            sh = o["stages"]["ingest"]["overhead_share_predicted"].get(str(c))
            if sh is not None:
                why[str(c)].append(f"ingest per-task share {sh:.1%}")
                if sh > MAX_OVERHEAD_SHARE:
                    ok[c] = False
    n = res.get("national")
    if n:
        for g in n["graphs"]:
            if g["stage"] != "ingest" or g["ae_chunk_px"] not in ok:
                continue
            c = g["ae_chunk_px"]
            why[str(c)].append(f"national ingest {g['tasks']:,} tasks accepted in "
                               f"{g['scheduler_accept_s']:.1f} s")
            if g["scheduler_accept_s"] > MAX_SUBMIT_S:
                ok[c] = False
    chosen = next((c for c in cands if ok[c]), None)
    rule = (f"smallest of {cands} px with: predicted ingest per-task share ≤ "
            f"{MAX_OVERHEAD_SHARE:.0%} (part overhead), national graph accepted by the "
            f"scheduler within {MAX_SUBMIT_S:.0f} s (part national), one ingest task ≤ "
            f"{MAX_TASK_MEMORY / 2**20:.0f} MiB (a quarter of a 2 GiB worker); smaller chunks "
            "give finer resume, load balance and less memory per task, larger ones fewer tasks. "
            "Not measured here: object-storage latency per chunk request (favours larger "
            "chunks on s3/gcs)")
    if o:
        f = o["stages"]["infer"]
        sh = f["overhead_share_predicted"].get("512")
        infer_note = (f"infer keeps ≤ 512 px tasks whatever the AE chunk (predicted per-task "
                      f"share at 512 px: {sh:.1%})" if sh is not None else "")
    else:
        infer_note = ""
    return {"ingest_chunk_px": chosen, "rule": rule, "evidence": why, "infer": infer_note}


# =========================================================================== main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 256 px city in 64 px chunks, chunks 128/64/32, a 12,000² "
                    "px 'national' grid, 1 repeat")
    ap.add_argument("--parts", nargs="+", default=["strong", "overhead", "national"],
                    choices=["strong", "overhead", "national"])
    ap.add_argument("--size", type=int, default=None, help="city edge, px (default 1024)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="strong: ingest.chunk_px (default 256 → 16 chunks)")
    ap.add_argument("--n-pois", type=int, default=None, help="strong: POIs (default 20000)")
    ap.add_argument("--chunks", type=int, nargs="+", default=None,
                    help="overhead: chunk edges, px (default 512 256 128 64)")
    ap.add_argument("--national-px", type=int, default=None,
                    help="national: grid edge, px (default 48000)")
    ap.add_argument("--national-chunks", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=None, help="default 2 (quick: 1)")
    ap.add_argument("--memory-limit", default="2GiB", help="per worker")
    ap.add_argument("--workdir", default=None,
                    help="scratch folder (default: a temporary one under $BENCH_TMP)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()
    q = args.quick
    args.size = args.size or (256 if q else 1024)
    args.chunk = args.chunk or (64 if q else 256)
    args.n_pois = args.n_pois or (2000 if q else 20000)
    args.chunks = args.chunks or ([128, 64, 32] if q else [512, 256, 128, 64])
    args.national_px = args.national_px or (12000 if q else 48000)
    args.repeats = args.repeats or (1 if q else 2)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scaling_",
                                                 dir=os.environ.get("BENCH_TMP")))
    root.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"benchmark": "scaling: strong scaling, per-task overhead, national graph",
                           "quick": q, "repeats": args.repeats, "parts": args.parts,
                           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                           "machine": machine_info()}
    t0 = time.perf_counter()
    try:
        if "strong" in args.parts:
            res["strong"] = strong_scaling(root, args)
        if "overhead" in args.parts:
            res["overhead"] = overhead(root, args)
        if "national" in args.parts:
            res["national"] = national(root, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    res["seconds_total"] = round(time.perf_counter() - t0, 1)
    res["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    res["recommendation"] = recommend(res)
    md = markdown(res)
    res["markdown"] = md
    path = write_result("scaling", res)
    print()
    print(md)
    r = res["recommendation"]
    print(f"Recommendation: ingest.chunk_px = {r['ingest_chunk_px']} — rule: {r['rule']}.")
    for c, ev in r["evidence"].items():
        print(f"  {c} px: {'; '.join(ev) or 'no measurement'}")
    if r["infer"]:
        print(f"  {r['infer']}")
    if q:
        print("(--quick: a smoke test on tiny inputs; the numbers say nothing about scaling)")
    print(f"→ {path}  ({res['seconds_total']:.0f} s)")


if __name__ == "__main__":
    main()
