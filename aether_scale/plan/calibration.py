"""Throughput figures a plan is made of, and where each comes from.

Every figure is per worker thread (or per GPU) and carries its source, one of:

- ``measured``: by :func:`calibrate` (``aether-scale plan --calibrate``) on this machine —
  the real stages run on a small synthetic city in one thread (dask's synchronous
  scheduler), plus two-point timings that split fixed from per-item costs (the pooling
  engine with few and many points, the pois stage on 1× and 8× its rows) and an ingest
  that reprojects. Stored as JSON (default ``~/.cache/aether_scale/calibration.json``).
- ``benchmark``: read from ``benchmarks/results/*.json`` (a source checkout) when no
  calibration file is found.
- ``default``: documented constants (from the project's benchmarks on a 2-core VM).
- ``assumption``: GPU figures and scheduler costs, never measured here; each says what
  it is based on.

:func:`load_calibration` overlays them in that order (a calibration file wins).

The module is longer than the project's ~400-line guide: it is the table of every
figure a plan uses (name, unit, default, source) and the one calibration run that
measures them, kept side by side so that a figure and the measurement that replaces it
cannot drift apart. The seam, should it grow, is "figures and loading" vs "the
calibration run".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_PATH", "Calibration", "Figure", "calibrate", "load_calibration"]

DEFAULT_PATH = "~/.cache/aether_scale/calibration.json"
FORMAT = 1
_BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
_VM = "the project's benchmarks on a 2-core AMD EPYC VM"


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    kind: str  # measured | benchmark | default | assumption
    source: str

    def label(self) -> str:
        return f"{self.kind}: {self.source}"


#: name → (value, unit, what it is / where the default comes from)
DEFAULTS: dict[str, tuple[float, str, str]] = {
    "ingest_mb_s": (13.5, "MB/s per thread", f"ingest of aligned int8 tiles ({_VM})"),
    "ingest_reproject_factor": (2.0, "× time", "reprojected tiles vs aligned ones"),
    "pois_rows_s": (60_000.0, "rows/s per thread", "pois stage, per row"),
    "pois_fixed_s": (1.5, "s", "pois stage start-up (opening sources, dask rounds)"),
    "pois_bytes_per_row": (80.0, "B/row", "pois.parquet size per POI"),
    "text_texts_s": (135.0, "texts/s per thread", f"all-MiniLM-L6-v2 on CPU ({_VM})"),
    "text_fixed_s": (4.0, "s", "loading the text model"),
    "pool_values_s": (2.0e7, "raster values/s per thread",
                      "reading, verifying and prefix-summing ae.zarr chunks"),
    "pool_pois_s": (36_000.0, "POIs/s per thread", "pooling two circle buffers (50/100 m)"),
    "pool_keep_fraction": (0.99, "triplets/POI", "POIs with valid AE in both buffers"),
    "train_s_per_triplet": (2.6e-5, "s per triplet-epoch",
                            f"AETHER projector, in-memory, 2 threads ({_VM})"),
    "train_noaug_ratio": (0.5, "× time", "w/o aug model vs the full one, per epoch"),
    "train_stream_factor": (1.35, "× time", "streaming loader vs in-memory"),
    "train_fixed_s": (2.0, "s per model", "loading triplets, building the model"),
    "infer_px_s": (86_000.0, "px/s per thread", f"projector over AE pixels, float16 ({_VM})"),
    "infer_fixed_s": (1.0, "s per model per worker", "shipping and loading the model"),
    "regions_unit_s": (2.0e-4, "s per unit·raster per 100 m reach",
                       "pooling a label unit's buffer and its POI bag"),
    "regions_fixed_s": (2.0, "s", "regions start-up: label files, raster reads, writing"),
    "pool_fixed_s": (1.0, "s", "pool stage outside the pooling: POIs, text rows, writing"),
    "calliper_s": (2.8e-5, "s per POI-epoch", "CaLLiPer+ location encoder"),
    "space2vec_s": (3.0e-5, "s per POI-epoch", "Space2Vec-style encoder"),
    "place2vec_s": (5.6e-6, "s per POI·neighbour·epoch", "Place2Vec skip-gram"),
    "doc2vec_s": (1.0e-6, "s per token-epoch", "Doc2Vec PV-DBOW"),
    "evaluate_s_per_unit_head": (4.0e-3, "s per unit·head", "one MLP head fit (early stop)"),
    "evaluate_fixed_s": (5.0, "s", "report and plots"),
    "evaluate_ref_units": (350.0, "units", "task size the per unit·head figure is for"),
    "evaluate_spawn_s": (2.5, "s per process", "a head process importing torch"),
    "ratio_ae": (1.0, "stored/raw", "zstd on ae.zarr (upper bound)"),
    "ratio_field": (1.0, "stored/raw", "zstd on field.zarr (upper bound)"),
    "ratio_text": (1.0, "stored/raw", "zstd on text.zarr (upper bound)"),
    "ratio_triplets": (1.0, "stored/raw", "triplets.zarr: vectors stored raw (crc32c only)"),
    "model_bytes": (1.5e6, "B per model", "checkpoint.pt and metrics"),
    "regions_bytes_per_value": (4.4, "B per unit·feature", "regions parquet (float32)"),
    "worker_import_s": (1.0, "s", "a fresh dask worker importing ingest/pool"),
    "worker_geo_import_s": (2.0, "s", "a fresh dask worker importing geopandas/pois"),
    "worker_torch_import_s": (3.0, "s", "a fresh dask worker importing torch/infer"),
    "worker_base_mb": (350.0, "MiB", "a dask worker after importing a CPU stage"),
    "worker_torch_mb": (650.0, "MiB", "a dask worker after importing torch"),
    "cluster_start_s": (5.0, "s", "starting a LocalCluster"),
    "parallel_efficiency": (1.0, "speedup / cores", "processes sharing this machine's cores "
                            "(1 = every core free)"),
}

#: never measured here; each says what it rests on
ASSUMPTIONS: dict[str, tuple[float, str, str]] = {
    "task_overhead_s": (0.005, "s per task", "dask worker-side cost of a task (a few ms)"),
    "scheduler_s": (0.001, "s per task", "dask scheduler time per task (serial)"),
    "remote_cluster_start_s": (120.0, "s", "a Dask Gateway / remote cluster starting workers"),
    "gpu_train_s_per_triplet": (1.476e-5, "s per triplet-epoch",
                                "the reference's GPU figure, 5.02 s/epoch for 340,000 "
                                "triplets (benchmarks/results/train.json targets)"),
    "gpu_infer_px_s": (2.0e6, "px/s per GPU worker",
                       "host-side bound: reading AE and writing float16 chunks (≈ the "
                       "2–5 M px/s field read floor in benchmarks/results/query.json); "
                       "projector GEMMs on the GPU far faster"),
    "gpu_text_texts_s": (5000.0, "texts/s per GPU", "a MiniLM-L6 encoder on one datacenter "
                         "GPU at batch 256–512"),
    "gpu_baselines_factor": (5.0, "× faster", "CaLLiPer+/Space2Vec encoders on a GPU"),
    "evaluate_exponent": (1.25, "power of units", "a head's cost per unit grows as "
                          "(units / evaluate_ref_units)^(this − 1): heads on more units stop "
                          "later; ≈1.6× per unit·head from 350 to 2,250 units per task in "
                          "protocol runs on this project's synthetic cities (the demo's "
                          "among them); 1 = linear"),
}


class Calibration:
    """Named figures with their sources (see the module docstring)."""

    def __init__(self, figures: dict[str, Figure], *, path: str | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.figures = figures
        self.path = path
        self.info = info or {}

    def __getitem__(self, name: str) -> float:
        return self.figures[name].value

    def label(self, name: str) -> str:
        return self.figures[name].label()

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.figures.values():
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "info": self.info,
                "figures": {k: {"value": f.value, "unit": f.unit, "kind": f.kind,
                                "source": f.source} for k, f in self.figures.items()}}


# --------------------------------------------------------------------------- sources
def _defaults() -> dict[str, Figure]:
    out = {k: Figure(v, u, "default", s) for k, (v, u, s) in DEFAULTS.items()}
    out.update({k: Figure(v, u, "assumption", s) for k, (v, u, s) in ASSUMPTIONS.items()})
    return out


def _read(name: str, bench_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((bench_dir / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def benchmark_figures(bench_dir: Path = _BENCH_DIR) -> dict[str, Figure]:
    """Figures derived from ``benchmarks/results/*.json`` (those it holds)."""
    out: dict[str, Figure] = {}

    def put(k: str, v: float, how: str) -> None:
        if v and math.isfinite(v) and v > 0:
            out[k] = Figure(float(v), DEFAULTS[k][1], "benchmark", how)

    d = _read("ingest", bench_dir)
    if d:
        w = d["setup"]["workers"] * d["setup"].get("threads_per_worker", 1)
        put("ingest_mb_s", d["ingest"]["mb_per_s"] / w,
            f"benchmarks/results/ingest.json: {d['ingest']['mb_per_s']} MB/s on {w} threads")
    d = _read("text", bench_dir)
    if d:
        th = d.get("torch_threads", 1)
        put("text_texts_s", d["stage_cold"]["encode_texts_per_s"] / th,
            f"benchmarks/results/text.json: {d['stage_cold']['encode_texts_per_s']} texts/s "
            f"on {th} threads")
        put("text_fixed_s", d.get("model_load_s", 0), "benchmarks/results/text.json model load")
    d = _read("pool", bench_dir)
    if d:
        eng = d["compare"]["engine_threads"]["circle_50_100m"]
        put("pool_pois_s", eng["pois_per_cpu_s"], "benchmarks/results/pool.json: circle "
            "50/100 m, POIs per CPU-second")
        sc = d["scale"]
        th = sc["cluster"]["n_workers"] * sc["cluster"]["threads_per_worker"]
        values = math.prod(sc["raster_px"])
        left = sc["seconds"] * th - sc["n_pois"] / eng["pois_per_cpu_s"]
        if left > 0:
            put("pool_values_s", values / left, f"benchmarks/results/pool.json scale run: "
                f"{sc['raster_gb']} GB raster, {sc['n_pois']:,} POIs in {sc['seconds']} s on "
                f"{th} threads, less the POI part")
    d = _read("train", bench_dir)
    if d:
        r = d["results"]
        n = d["n_triplets"]
        mem = r["ours_in_memory"]
        put("train_s_per_triplet", min(mem["s_per_epoch"]) / n,
            f"benchmarks/results/train.json: {min(mem['s_per_epoch'])} s/epoch for {n:,} "
            f"triplets, {mem.get('threads')} threads")
        if "ours_streaming" in r:
            put("train_stream_factor", min(r["ours_streaming"]["s_per_epoch"])
                / min(mem["s_per_epoch"]), "benchmarks/results/train.json streaming/in-memory")
    d = _read("infer", bench_dir)
    if d:
        f32 = d["ours"]["float32"]
        th = 2  # the benchmark's LocalCluster: 2 workers × 1 thread (its 'approach')
        put("infer_px_s", f32["pixels_per_s"] / th,
            f"benchmarks/results/infer.json: {f32['pixels_per_s']:,.0f} px/s on 2 threads")
        put("cluster_start_s", f32.get("cluster_start_seconds", 0),
            "benchmarks/results/infer.json cluster start")
    return out


def load_calibration(path: str | None = None, *, benchmarks: bool = True,
                     default_file: bool = True) -> Calibration:
    """Defaults, then benchmark figures (if ``benchmarks`` and no calibration file), then
    the calibration file at ``path`` (default :data:`DEFAULT_PATH`, when ``default_file``)
    when it exists."""
    figs = _defaults()
    p = os.path.expanduser(path or DEFAULT_PATH)
    info: dict[str, Any] = {}
    doc = None
    if path is None and not default_file:
        pass
    elif os.path.exists(p):
        doc = json.loads(Path(p).read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{p}: calibration format {doc.get('format')!r}, expected "
                             f"{FORMAT}; rerun `aether-scale plan --calibrate`")
    elif path:
        raise FileNotFoundError(f"calibration file {p} does not exist; write it with "
                                f"`aether-scale plan --calibrate --calibration {path}`")
    if doc is None and benchmarks:
        figs.update(benchmark_figures())
    if doc is not None:
        for k, v in doc["figures"].items():
            if k in figs:
                figs[k] = Figure(float(v["value"]), v.get("unit", figs[k].unit),
                                 v.get("kind", "measured"), v.get("source", ""))
        info = {k: doc.get(k) for k in ("created", "machine", "seconds")}
    return Calibration(figs, path=p if doc is not None else None, info=info)


# --------------------------------------------------------------------------- calibrate
def _du(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def _import_cost(modules: list[str]) -> tuple[float, float] | None:
    """``(RSS MiB, seconds)`` of a fresh Python that has imported ``distributed`` (as a
    dask worker has) and then ``modules`` (the seconds are those of ``modules`` only)."""
    code = ("import importlib, psutil, sys, time\n"
            "import distributed\n"
            "t = time.perf_counter()\n"
            "for m in sys.argv[1:]: importlib.import_module(m)\n"
            "print(psutil.Process().memory_info().rss / 2**20, time.perf_counter() - t)")
    try:
        out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True,
                             text=True, timeout=300, check=True)
        rss, secs = out.stdout.strip().splitlines()[-1].split()
        return float(rss), float(secs)
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


#: the calibration city: small enough for about a minute, big enough that the work
#: outweighs fixed costs
CITY = {"size_px": 512, "n_pois": 2500, "n_luc_points": 400, "n_regions": 300, "seed": 0}


def calibrate(path: str | None = None, *, log: Callable[[str], None] | None = None,
              keep: str | None = None, city: dict[str, Any] | None = None,
              extras: bool = True) -> dict[str, Any]:
    """Run the stages' real kernels on a small synthetic city on this machine and write
    the figures to ``path`` (default :data:`DEFAULT_PATH`); returns the document.

    Everything runs in one thread (dask's synchronous scheduler, ``text.threads=1``), so
    rates are per worker thread; train and evaluate run as they would in the client.
    ``keep``: a folder to keep the calibration workspace in (default: a temporary one,
    removed). ``city``: synth keys of the calibration city (default :data:`CITY`).
    ``extras``: also measure a worker's import memory and a LocalCluster's start.
    """
    from ..config import deep_merge, load_config
    from ..demo import city_inputs
    from ..pipeline import run_stages, stage_names
    from ..synthetic import write_city
    from ..workspace import Workspace

    say = log or (lambda s: None)
    t_all = time.perf_counter()
    tmp = keep or tempfile.mkdtemp(prefix="aether-calibrate-")
    figs: dict[str, dict[str, Any]] = {}

    def put(k: str, v: float, how: str) -> None:
        if v is None or not math.isfinite(v) or v <= 0:
            say(f"calibrate: {k} not measured ({how}: {v}); the default stays")
            return
        unit = DEFAULTS[k][1] if k in DEFAULTS else ASSUMPTIONS[k][1]
        figs[k] = {"value": float(v), "unit": unit, "kind": "measured", "source": how}

    try:
        city_cfg = {**CITY, **(city or {})}
        base = load_config(None, [], data={"synth": city_cfg})
        say("calibrate: writing the calibration city")
        city = write_city(os.path.join(tmp, "city"), base.synth)
        data = deep_merge({
            "synth": city_cfg,
            "cluster": {"kind": "synchronous"},
            "text": {"cache_dir": os.path.join(tmp, "text-cache"), "threads": 1,
                     "mode": "local"},
            "train": {"epochs": 5},
            "evaluate": {"seeds": [0], "workers": 1},
        }, city_inputs(city))
        cfg = load_config(None, [], data=data)
        ws = Workspace(os.path.join(tmp, "ws"))
        from ..text.model import load_text_model

        t_load, _ = _timed(lambda: load_text_model(cfg.text.model, cfg.text.device))
        put("text_fixed_s", t_load, f"loading {cfg.text.model} in this process (cached for "
            "the stage, whose encode rate is then the model alone)")
        say("calibrate: running every stage on it (one thread)")
        with _quiet():
            run_stages(stage_names(), ws, cfg)
            m = {s: ws.manifest(s) for s in stage_names()}
            say("calibrate: two-point timings (pooling engine, pois, a reprojecting ingest)")
            _two_point(ws, cfg, city, put, say)
        _derive(ws, cfg, m, put, figs)
        if extras:
            base = _import_cost(["rasterio", "aether_scale.ingest.stage",
                                 "aether_scale.pool.stage"])
            geo = _import_cost(["geopandas", "pyogrio", "dask_geopandas",
                                "aether_scale.pois.stage"])
            tor = _import_cost(["torch", "aether_scale.infer.stage"])
            if base:
                put("worker_base_mb", base[0], "RSS of a fresh worker-like Python after "
                    "importing distributed, rasterio, ingest and pool")
                put("worker_import_s", base[1], "the same: seconds to import ingest/pool")
            if geo:
                put("worker_geo_import_s", geo[1], "seconds a fresh worker-like Python takes "
                    "to import geopandas, pyogrio, dask_geopandas and pois")
            if tor:
                put("worker_torch_mb", tor[0], "RSS of a fresh worker-like Python after "
                    "importing distributed, torch and infer")
                put("worker_torch_import_s", tor[1], "the same: seconds to import torch/infer")
            eff = _parallel_efficiency(_cores())
            if eff is not None:
                put("parallel_efficiency", eff[0], eff[1])
            t_cs, _ = _timed(_start_local_cluster)
            put("cluster_start_s", t_cs, "starting and closing a 1-worker LocalCluster")
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    import psutil

    doc = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "seconds": round(time.perf_counter() - t_all, 1),
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cores": _cores(), "memory_gb": round(psutil.virtual_memory().total
                                                             / 1e9, 1),
                       "python": platform.python_version()},
           "city": city_cfg, "figures": figs}
    out = os.path.expanduser(path or DEFAULT_PATH)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp_out = out + ".tmp"
    Path(tmp_out).write_text(json.dumps(doc, indent=2))
    os.replace(tmp_out, out)
    doc["path"] = out
    return doc


@contextlib.contextmanager
def _quiet() -> Any:
    """The stages' own log lines (info) held back while the calibration runs them."""
    import logging

    lg = logging.getLogger("aether_scale")
    level = lg.level
    if lg.getEffectiveLevel() <= logging.INFO:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)


_BURN = ("import time, numpy as np\n"
         "a = np.random.default_rng(0).standard_normal((192, 192)); t = time.perf_counter()\n"
         "for _ in range(600): a = np.tanh(a @ a * 1e-2)\n"
         "print(time.perf_counter() - t)")


def _parallel_efficiency(cores: int) -> tuple[float, str] | None:
    """Speedup of ``cores`` single-threaded processes over one, per core, now."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}

    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _BURN], stdout=subprocess.PIPE,
                                  text=True, env=env) for _ in range(n)]
        outs = [float(p.communicate(timeout=300)[0].strip()) for p in procs]
        return max(outs)

    try:
        one = run(1)
        if cores < 2:
            return 1.0, "one core"
        many = run(cores)
    except (subprocess.SubprocessError, ValueError, OSError):
        return None
    eff = min(1.0, one / many)
    return eff, (f"{cores} single-threaded processes at once vs one: {many:.2f} s vs "
                 f"{one:.2f} s each (speedup {cores * eff:.2f} on {cores} cores)")


def _cores() -> int:
    from ..devices import local_cores

    return local_cores()


def _start_local_cluster() -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as c, Client(c):
        pass


def _derive(ws: Any, cfg: Any, m: dict[str, Any], put: Callable[..., None],
            figs: dict[str, dict[str, Any]]) -> None:
    """Figures from the stage manifests of the calibration run."""
    st = m["ingest"]["stats"]
    put("ratio_ae", _du(ws.path("ae.zarr")) / st["bytes"], "ae.zarr of the synthetic city "
        "on disk / raw (real AE codes may compress less)")
    raw_ae = st["bytes"]
    pst = m["pois"]["stats"]
    put("pois_bytes_per_row", _du(ws.path("pois.parquet")) / max(pst["kept"], 1),
        f"pois.parquet of {pst['kept']:,} synthetic POIs")

    t = m["text"]["stats"]
    if t.get("encoded"):
        put("text_texts_s", t["texts_per_s"], f"{t['encoded']:,} distinct texts encoded on "
            f"1 thread ({cfg.text.model})")
    n_rows = t["rows"]
    put("ratio_text", _du(ws.path("text.zarr")) / (n_rows * (t["dim"] * 4 + 8)),
        "text.zarr on disk / raw float32")

    pl = m["pool"]["stats"]
    put("pool_keep_fraction", pl["n_triplets"] / max(pl["n_pois"], 1),
        "triplets per POI on the synthetic city")
    put("ratio_triplets", _du(ws.path("triplets.zarr")) / (pl["n_triplets"] * (8 + 4 * (
        128 + t["dim"]))), "triplets.zarr on disk / raw float32")

    tr = m["train"]["stats"]
    main, noaug = tr.get("model", {}), tr.get("model_noaug")
    n = main.get("n_triplets") or 1
    s_aug = main["mean_epoch_seconds"] / n
    put("train_s_per_triplet", s_aug, f"{main['mean_epoch_seconds']:.3f} s/epoch for {n:,} "
        f"triplets ({main.get('loader')}, batch {cfg.train.batch_size}, default threads)")
    if noaug:
        put("train_noaug_ratio", noaug["mean_epoch_seconds"] / main["mean_epoch_seconds"],
            "w/o aug model's s/epoch / the full model's")
    models = [v for k, v in tr.items() if k.startswith("model") and isinstance(v, dict)]
    epochs_s = sum(v["mean_epoch_seconds"] * v["epochs_run"] for v in models)
    put("train_fixed_s", (m["train"]["seconds"] - epochs_s) / max(len(models), 1),
        "train stage time less its epochs, per model")
    size = sum(_du(ws.path(f"model{'' if not v else '_' + v}")) for v in ["", *cfg.train.variants]
               if ws.exists(f"model{'' if not v else '_' + v}"))
    put("model_bytes", size / max(len(models), 1), "model/ folder on disk")

    inf = m["infer"]["stats"]
    fields = [v for v in inf.values() if isinstance(v, dict) and "pixels" in v]
    px = sum(v["pixels"] for v in fields)
    secs = sum(v["seconds"] for v in fields)
    put("infer_px_s", px / secs, f"{len(fields)} field(s) of {fields[0]['pixels']:,} px on 1 "
        f"thread ({fields[0]['dtype']}, {fields[0]['precision']})")
    put("infer_fixed_s", (m["infer"]["seconds"] - secs) / max(len(fields), 1),
        "infer stage time less the fields' own, per field")
    raw_field = px * 128 * (2 if fields[0]["dtype"] == "float16" else 1)
    put("ratio_field", sum(_du(ws.path(n)) for n in inf if ws.exists(n)) / raw_field,
        "field.zarr on disk / raw")

    rg = m["regions"]["stats"]
    pv = figs.get("pool_values_s", {}).get("value", DEFAULTS["pool_values_s"][0])
    pp = figs.get("pool_pois_s", {}).get("value", DEFAULTS["pool_pois_s"][0])
    engine = raw_ae / pv + pl["n_pois"] / pp
    put("pool_fixed_s", m["pool"]["seconds"] - engine, "pool stage time less its pooling "
        "(reading POIs and text rows, writing triplets)")
    kept = sum(rg[k]["kept"] for k in rg if "kept" in rg[k])
    fields_n = len(fields)
    put("regions_bytes_per_value", _du(ws.path("regions")) / max(kept * (64 + 128 * fields_n),
                                                                 1),
        "regions/ parquet per unit·feature")

    bl = {}
    for meth in cfg.baselines.methods:
        p = ws.path(f"baselines/{meth}/meta.json")
        if ws.exists(f"baselines/{meth}/meta.json"):
            bl[meth] = json.loads(ws.fs.cat_file(p))
    b = cfg.baselines
    tokens = sum(rg[k]["kept"] * rg[k]["mean_pois_per_unit"] for k in rg if "kept" in rg[k])
    if "calliper" in bl:
        put("calliper_s", bl["calliper"]["seconds"] / (bl["calliper"]["pois"] * b.epochs),
            f"CaLLiPer+ {b.epochs} epochs over {bl['calliper']['pois']:,} POIs")
    if "space2vec" in bl:
        put("space2vec_s", bl["space2vec"]["seconds"] / (bl["space2vec"]["pois"] * b.epochs),
            f"Space2Vec {b.epochs} epochs over {bl['space2vec']['pois']:,} POIs")
    if "place2vec" in bl:
        put("place2vec_s", bl["place2vec"]["seconds"] / (bl["place2vec"]["pois"]
                                                         * b.neighbours * b.word_epochs),
            f"Place2Vec {b.word_epochs} epoch(s), {b.neighbours} neighbours")
    if "doc2vec" in bl:
        put("doc2vec_s", bl["doc2vec"]["seconds"] / max(tokens * b.doc_epochs, 1),
            f"Doc2Vec {b.doc_epochs} epochs over {tokens:,.0f} unit POI tokens")

    ev = m["evaluate"]
    es = ev["stats"]
    heads_units = 0
    for info in es["tasks"].values():
        heads_units += len(cfg.evaluate.seeds) * len(info["methods"]) * info["units"]
    put("evaluate_ref_units", sum(i["units"] for i in es["tasks"].values())
        / max(len(es["tasks"]), 1), "units per task of the calibration's evaluate")
    again = _evaluate_again(ws, cfg)
    secs = (es["seconds"] + again) / 2 if again else es["seconds"]
    put("evaluate_s_per_unit_head", secs / heads_units,
        f"{heads_units:,} unit·heads (MLP, early stopping, max_epochs "
        f"{cfg.evaluate.max_epochs}) on 1 process: the stage's {es['seconds']} s and a warm "
        f"rerun's {again:.1f} s, averaged")
    put("evaluate_fixed_s", ev["seconds"] - es["seconds"], "report and plots")



def _evaluate_again(ws: Any, cfg: Any) -> float:
    """The evaluate protocol once more on the calibration's regions (warm): seconds."""
    from ..evaluate.protocol import evaluate_task
    from ..evaluate.stage import task_inputs
    from ..stores.regions import RegionTable

    reg = RegionTable(ws.path("regions"))
    trained = (ws.path("baselines"), ws.fs) if ws.exists("baselines") else None
    total = 0.0
    for task in cfg.evaluate.tasks:
        if task not in reg.tasks():
            continue
        feats, y, _info = task_inputs(reg, task, cfg.evaluate, trained)
        t0 = time.perf_counter()
        evaluate_task(task, feats, y, cfg.evaluate, workers=1)
        total += time.perf_counter() - t0
    return total


def _regions_two_point(ws: Any, cfg: Any, put: Callable[..., None]) -> None:
    """regions on every label unit vs a tenth of them (the same rasters): the per-unit
    cost (per unit·raster·100 m of buffer) and the fixed one."""
    import geopandas as gpd

    from ..regions.stage import build_regions, method_of

    rasters = {method_of(n): ws.path(n) for n in sorted(os.listdir(ws.root))
               if n.endswith(".zarr") and method_of(n)}
    rc = cfg.regions
    tmp = ws.path(".plan-regions")
    os.makedirs(tmp, exist_ok=True)
    small = {}
    for key in ("luc_points", "sdm_units"):
        src = getattr(rc, key)
        gdf = gpd.read_file(src)
        part = os.path.join(tmp, f"{key}.geojson")
        gdf.iloc[: max(10, len(gdf) // 10)].to_file(part, driver="GeoJSON")
        small[key] = (part, len(gdf), max(10, len(gdf) // 10))
    pois = ws.path("pois.parquet")
    cfg_small = cfg.model_copy(update={"regions": rc.model_copy(update={
        k: v[0] for k, v in small.items()})})
    build_regions(rasters, pois, cfg_small, os.path.join(tmp, "w"))  # warm: imports, caches
    t_small = _timed(lambda: build_regions(rasters, pois, cfg_small, os.path.join(tmp, "s")))[0]
    t_full = _timed(lambda: build_regions(rasters, pois, cfg, os.path.join(tmp, "f")))[0]
    reach = {"luc_points": rc.luc_buffer_m / 100.0, "sdm_units": rc.sdm_buffer_m / 100.0}
    work = sum((n - k) * reach[key] for key, (_p, n, k) in small.items()) * len(rasters)
    per = max((t_full - t_small) / max(work, 1e-9), 1e-9)
    put("regions_unit_s", per, f"regions on all vs a tenth of the label units, {len(rasters)} "
        f"rasters ({t_full:.2f} s vs {t_small:.2f} s), per unit·raster·100 m of buffer")
    small_work = sum(k * reach[key] for key, (_p, _n, k) in small.items()) * len(rasters)
    put("regions_fixed_s", t_small - small_work * per, "the same: the small run less its units "
        "(label files, raster reads, writing)")


def _two_point(ws: Any, cfg: Any, city: dict[str, str], put: Callable[..., None],
               say: Callable[[str], None]) -> None:
    """Fixed vs per-item costs: pooling engine (few vs many points), pois (1× vs 8× rows),
    and an ingest that reprojects (EPSG:27700)."""
    import dask
    import numpy as np
    import pandas as pd

    from ..ingest.stage import ingest_tiles
    from ..pois.grid import raster_grid
    from ..pois.stage import process_pois
    from ..pool.engine import pool_buffers
    from ..stores.ae import open_ae

    with dask.config.set(scheduler="synchronous"):
        da = open_ae(ws.path("ae.zarr"))["embedding"]
        h, w, c = da.shape
        rng = np.random.default_rng(0)
        xs = da["x"].values
        ys = da["y"].values

        def pts(n: int) -> tuple[np.ndarray, np.ndarray]:
            return (rng.uniform(xs.min(), xs.max(), n), rng.uniform(ys.min(), ys.max(), n))

        bufs = [cfg.pool.base, cfg.pool.aug]
        few, many = 20, 40_000
        pool_buffers(da, *pts(few), bufs)  # warm caches
        t_few = min(_timed(lambda: pool_buffers(da, *pts(few), bufs))[0] for _ in range(2))
        t_many = _timed(lambda: pool_buffers(da, *pts(many), bufs))[0]
        per_poi = max((t_many - t_few) / (many - few), 1e-9)
        put("pool_pois_s", 1.0 / per_poi, f"pooling engine: {many:,} vs {few} points on one "
            f"{h}×{w}×{c} raster ({t_many:.2f} s vs {t_few:.2f} s)")
        chunk_s = max(t_few - few * per_poi, 1e-6)
        put("pool_values_s", h * w * c / chunk_s, "the same: the few-point run's time "
            "(reading, verifying, prefix sums of the raster)")

        grid = raster_grid(ws.path("ae.zarr"))
        src = cfg.pois.sources[0]
        import geopandas as gpd

        df = gpd.read_parquet(src.path)
        big = gpd.GeoDataFrame(pd.concat([df.assign(poi_id=df["poi_id"] + k * 10**9)
                                          for k in range(8)], ignore_index=True),
                               geometry="geometry", crs=df.crs)
        tmp = os.path.dirname(city["pois"])
        big_path = os.path.join(tmp, "pois8.parquet")
        big.to_parquet(big_path, index=False)
        p1 = cfg.pois.model_copy(deep=True)
        p8 = cfg.pois.model_copy(update={"sources": [src.model_copy(update={"path": big_path})]})
        t1 = _timed(lambda: process_pois(p1, grid, os.path.join(tmp, "p1")))[0]
        t8 = _timed(lambda: process_pois(p8, grid, os.path.join(tmp, "p8")))[0]
        per_row = max((t8 - t1) / (7 * len(df)), 1e-9)
        put("pois_rows_s", 1.0 / per_row, f"pois on {len(df):,} vs {len(big):,} rows "
            f"({t1:.2f} s vs {t8:.2f} s)")
        put("pois_fixed_s", t1 - len(df) * per_row, "the same: the 1× run less its rows")

        tiles = cfg.ingest.tiles
        t_al, s_al = _timed(lambda: ingest_tiles(tiles, os.path.join(tmp, "al.zarr"),
                                                 progress=False))
        t_rp, s_rp = _timed(lambda: ingest_tiles(tiles, os.path.join(tmp, "rp.zarr"),
                                                 crs="EPSG:27700", progress=False))
        _regions_two_point(ws, cfg, put)
        put("ingest_mb_s", s_al["bytes"] / 1e6 / t_al, f"ingest of {s_al['bytes'] / 1e6:.1f} "
            f"MB ({s_al['tiles']} aligned tiles, modules loaded) in {t_al:.2f} s")
        put("ingest_reproject_factor", (t_rp / s_rp["bytes"]) / (t_al / s_al["bytes"]),
            f"ingest reprojecting to EPSG:27700 vs aligned, per output byte "
            f"({t_rp:.2f} s vs {t_al:.2f} s)")
