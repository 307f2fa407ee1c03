"""Per-stage estimates: chunks, tasks, bytes, memory, worker-hours, wall time on N workers.

The cost model, per stage (every figure from :mod:`.calibration`, per worker thread):

- **parallel work** (ingest, pois, pool, infer, regions; text in dask mode): thread-seconds
  of task work plus ``task_overhead_s`` per task. Worker-hours = that / threads per worker
  (it does not depend on N). On N workers the tasks run in waves of N × threads slots
  (GPU stages: N slots, one GPU each): ``ceil(tasks / slots) × seconds per task``, plus
  the scheduler's ``scheduler_s`` per task and each worker's start-up (loading a model) —
  so more workers never lengthen a stage, and a stage never gets shorter than its
  longest task.
- **serial work** (train, baselines, evaluate; text when it encodes in the client): runs
  in the client whatever N is (train on one GPU with ``--gpu``) — the floor under the
  wall time.
- **fixed** start-up per stage (opening sources, loading the text model, the report).

Bytes read and written are raw sizes; written sizes are scaled by the store's zstd ratio
where the calibration measured one (on a synthetic city: real AE codes may compress
less), the raw size being the bound. Memory per worker comes from each stage's own
``worker_memory`` helper (what the run checks before it starts) on a metadata-only
``ae.zarr`` of the planned chunk shape.

The module is longer than the project's ~400-line guide: one function per stage in
data-flow order over the same cost model (above) and shared inputs; split by stage,
each file would repeat the model's plumbing. The seam, should it grow, is "parallel
stages" vs "serial stages".
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import aef
from ..config import RunConfig
from .calibration import Calibration
from .inputs import PlanInputs

__all__ = ["Plan", "StageEstimate", "cluster_shape", "estimate"]

TEXT_DIM = 384


@dataclass
class StageEstimate:
    stage: str
    chunks: int  # chunks of the output store (0: not a chunked store)
    tasks: int  # dask tasks (0: runs in the client)
    bytes_read: int
    bytes_written: int  # expected (zstd ratio applied)
    bytes_written_raw: int  # the bound
    memory_per_worker: int | None  # bytes; None: runs in the client
    memory_note: str
    work_s: float = 0.0  # thread-seconds of task work (parallel)
    serial_s: float = 0.0  # seconds in the client / on one GPU
    fixed_s: float = 0.0  # per-stage start-up
    per_worker_s: float = 0.0  # start-up on every worker (in parallel)
    gpu: bool = False  # slots are GPUs (one per worker)
    max_slots: int | None = None  # workers sharing this machine's cores (LocalCluster)
    efficiency: float = 1.0  # of those shared cores (measured speedup / cores)
    outputs: dict[str, int] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)  # calibration figures used
    notes: list[str] = field(default_factory=list)

    def task_seconds(self, cal: Calibration) -> float:
        return self.work_s + self.tasks * cal["task_overhead_s"]

    def worker_hours(self, cal: Calibration, tpw: int) -> float:
        """Worker-hours of the parallel part (independent of the worker count)."""
        if not self.tasks:
            return 0.0
        return self.task_seconds(cal) / (1 if self.gpu else tpw) / 3600

    def wall(self, cal: Calibration, n_workers: int, tpw: int) -> float:
        """Seconds on ``n_workers`` workers of ``tpw`` threads (non-increasing in N)."""
        t = self.fixed_s + self.serial_s
        if self.tasks:
            slots = n_workers * (1 if self.gpu else tpw)
            speedup = float(min(slots, self.tasks))
            if self.max_slots and not self.gpu:  # processes sharing this machine's cores
                slots = min(slots, self.max_slots)
                speedup = max(1.0, min(slots, self.tasks) * self.efficiency)
            per_task = self.task_seconds(cal) / self.tasks
            t += (max(math.ceil(self.tasks / slots) * per_task,
                      self.task_seconds(cal) / speedup)
                  + self.per_worker_s + self.tasks * cal["scheduler_s"])
        return t

    def floor(self, cal: Calibration) -> float:
        """What no number of workers removes: start-up, serial part, the longest task."""
        t = self.fixed_s + self.serial_s
        if self.tasks:
            t += (self.task_seconds(cal) / self.tasks + self.per_worker_s
                  + self.tasks * cal["scheduler_s"])
        return t


@dataclass
class Plan:
    inputs: PlanInputs
    stages: list[StageEstimate]
    cal: Calibration
    workers: list[int]
    tpw: int
    gpu: bool
    cluster_kind: str
    cluster_start_s: float
    client_cores: int
    memory_limit: int | None
    notes: list[str]

    def wall(self, n: int) -> float:
        return self.cluster_start_s + sum(s.wall(self.cal, n, self.tpw) for s in self.stages)

    def worker_hours(self) -> float:
        return sum(s.worker_hours(self.cal, self.tpw) for s in self.stages)

    def serial_floor(self) -> float:
        return self.cluster_start_s + sum(s.floor(self.cal) for s in self.stages)

    def to_json(self) -> dict[str, Any]:
        stages = []
        for s in self.stages:
            d = asdict(s)
            d["worker_hours"] = s.worker_hours(self.cal, self.tpw)
            d["wall_s"] = {str(n): s.wall(self.cal, n, self.tpw) for n in self.workers}
            d["floor_s"] = s.floor(self.cal)
            stages.append(d)
        return {
            "inputs": self.inputs.to_json(),
            "cluster": {"kind": self.cluster_kind, "threads_per_worker": self.tpw,
                        "gpu": self.gpu, "workers": self.workers,
                        "memory_limit": self.memory_limit, "client_cores": self.client_cores,
                        "cluster_start_s": self.cluster_start_s},
            "stages": stages,
            "total": {"worker_hours": self.worker_hours(), "serial_floor_s": self.serial_floor(),
                      "wall_s": {str(n): self.wall(n) for n in self.workers}},
            "outputs": {k: v for s in self.stages for k, v in s.outputs.items()},
            "calibration": self.cal.to_json(),
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- helpers
def _parse_bytes(v: Any) -> int | None:
    if v is None or v == "auto":
        return None
    if isinstance(v, (int, float)):
        return int(v)
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(str(v)))
    except (ValueError, TypeError):
        return None


def cluster_shape(cfg: RunConfig) -> tuple[int, int, int | None]:
    """``(workers, threads per worker, memory limit per worker)`` the config asks for."""
    c = cfg.cluster
    if c.kind == "gateway":
        opts = c.gateway.cluster_options
        tpw = int(opts.get("worker_cores", c.threads_per_worker))
        mem = opts.get("worker_memory")
        mem_b = int(float(mem) * 2**30) if isinstance(mem, (int, float)) else _parse_bytes(mem)
        return max(1, c.gateway.workers), max(1, tpw), mem_b
    if c.kind in ("threads", "synchronous"):
        from ..devices import local_cores

        return 1, (1 if c.kind == "synchronous" else local_cores()), None
    return c.n_workers, c.threads_per_worker, _parse_bytes(c.memory_limit)


class _Ctx:
    """What a stage's ``worker_memory(ctx)`` reads: the config and the store paths."""

    def __init__(self, cfg: RunConfig, reads: dict[str, str]) -> None:
        self.cfg = cfg
        self.reads = reads
        self.storage_options = None


def _memory(stage: str, ctx: _Ctx, cal: Calibration, tpw: int, torch: bool
            ) -> tuple[int | None, str]:
    """Per-worker memory from the stage's own helper: imports + threads × per task."""
    import importlib

    from ..workers import _SLACK
    try:
        fn = importlib.import_module(f"aether_scale.{stage}.stage").worker_memory
        _mods, per_task, _fix = fn(ctx)
    except Exception as e:  # noqa: BLE001 - a helper that cannot run here: say so
        return None, f"worker_memory unavailable ({type(e).__name__}: {e})"
    task = sum(b for _, b in per_task) + _SLACK
    base = (cal["worker_torch_mb"] if torch else cal["worker_base_mb"]) * 2**20
    parts = ", ".join(f"{w} {b / 2**20:,.0f} MiB" for w, b in per_task)
    return int(base + tpw * task), (f"{base / 2**20:,.0f} MiB imports + {tpw} thread(s) × "
                                    f"({parts}, temporaries {_SLACK / 2**20:.0f} MiB)")


def _meta_store(root: str, h: int, w: int, c: int) -> str:
    """A metadata-only ae.zarr with the planned shape and chunks (no chunk is written)."""
    import zarr

    path = os.path.join(root, "ae.zarr")
    g = zarr.open_group(path, mode="w")
    g.create_array("embedding", shape=(h, w, aef.N_BANDS), chunks=(c, c, aef.N_BANDS),
                   dtype="int8", fill_value=aef.NODATA)
    return path


def _text_mode(cfg: RunConfig, new: int) -> str:
    if cfg.text.mode == "local":
        return "local"
    remote = cfg.cluster.kind in ("gateway", "address")
    if cfg.text.mode == "dask":
        return "dask" if cfg.cluster.kind not in ("threads", "synchronous") else "local"
    return "dask" if remote and new >= cfg.text.dask_min_texts else "local"


def _names(artifact: str, variants: list[str]) -> str:
    from ..pipeline import ARTIFACTS

    a = ARTIFACTS[artifact]
    slash = "" if "." in a.name else "/"
    return " + ".join(a.variant(v) + slash for v in variants)


def _reach(b: Any) -> float:
    return float(b.reach_m(10.0))


# --------------------------------------------------------------------------- estimate
def estimate(cfg: RunConfig, inp: PlanInputs, cal: Calibration, *, workers: list[int],
             gpu: bool = False, tpw: int | None = None, client_cores: int | None = None
             ) -> Plan:
    """The plan of every stage of ``cfg`` on ``inp`` with figures ``cal``."""
    from ..devices import local_cores
    from ..infer.stage import field_chunk
    from ..pipeline import train_variants

    n_cfg, tpw_cfg, mem_limit = cluster_shape(cfg)
    tpw = int(tpw or tpw_cfg)
    cores = int(client_cores or local_cores())
    g = inp.grid
    p = inp.pois
    lab = inp.labels
    variants = train_variants(cfg)
    n_models = len(variants)
    cpx = g.chunk_px
    chunk_raw = cpx * cpx * aef.N_BANDS
    px = g.data_pixels
    ae_raw = px * aef.N_BANDS
    stages: list[StageEstimate] = []
    notes = list(inp.notes)
    tmp = tempfile.mkdtemp(prefix="aether-plan-")
    try:
        ae_meta = _meta_store(tmp, g.height, g.width, cpx)
        ctx = _Ctx(cfg, {"ae.zarr": ae_meta})

        # ---- ingest
        rep = g.tiles_reprojected / max(g.tiles, 1)
        factor = 1 + rep * (cal["ingest_reproject_factor"] - 1)
        mem, mnote = _memory("ingest", ctx, cal, tpw, torch=False)
        ae_out = int(ae_raw * cal["ratio_ae"])
        st = StageEstimate(
            "ingest", chunks=g.n_chunks, tasks=g.n_chunks,
            bytes_read=int(g.tile_bytes if g.tile_bytes is not None else ae_raw),
            bytes_written=ae_out, bytes_written_raw=ae_raw, memory_per_worker=mem,
            memory_note=mnote, work_s=ae_raw / (cal["ingest_mb_s"] * 1e6) * factor,
            outputs={"ae.zarr": ae_out},
            figures=["ingest_mb_s", "ratio_ae"] + (["ingest_reproject_factor"] if rep else []))
        if g.tile_bytes is None:
            st.notes.append("bytes read: raw int8 size (no tile files to measure)")
        if rep:
            st.notes.append(f"{g.tiles_reprojected} of {g.tiles} tiles reprojected to {g.crs}")
        if g.n_chunks > g.data_chunks:
            st.notes.append(f"{g.n_chunks - g.data_chunks:,} chunks hold no tile data")
        stages.append(st)

        # ---- pois
        parts = sum(max(1, math.ceil(s["rows"] / cfg.pois.partition_rows))
                    for s in p.per_source)
        pois_raw = int(p.rows * cal["pois_bytes_per_row"])
        mem, mnote = _memory("pois", ctx, cal, tpw, torch=False)
        if p.source_bytes is None and mem is not None:  # no files: the helper's row bound
            part = cfg.pois.partition_rows * 2048
            mem += tpw * part
            mnote += f" + {tpw} × {part / 2**20:,.0f} MiB (no POI files: 2 kB per row bound)"
        stages.append(StageEstimate(
            "pois", chunks=max(1, math.ceil(p.rows / cfg.pois.partition_rows)),
            tasks=4 * parts, bytes_read=int(p.source_bytes or pois_raw),
            bytes_written=pois_raw, bytes_written_raw=pois_raw, memory_per_worker=mem,
            memory_note=mnote, work_s=p.rows / cal["pois_rows_s"], fixed_s=cal["pois_fixed_s"],
            outputs={"pois.parquet": pois_raw},
            figures=["pois_rows_s", "pois_fixed_s", "pois_bytes_per_row"]))

        # ---- text
        new = max(0, p.distinct - p.cached)
        mode = _text_mode(cfg, new)
        text_raw = p.rows * (TEXT_DIM * 4 + 8)
        text_out = int(text_raw * cal["ratio_text"])
        st = StageEstimate("text", chunks=max(1, math.ceil(p.rows / cfg.text.chunk_rows)),
                           tasks=0, bytes_read=pois_raw, bytes_written=text_out,
                           bytes_written_raw=text_raw, memory_per_worker=None,
                           memory_note="", outputs={"text.zarr": text_out},
                           figures=["ratio_text"])
        st.notes.append(f"{p.distinct:,} distinct descriptions ({p.distinct_source}); "
                        f"{p.cached:,} cached ({p.cached_source}); {new:,} to encode")
        rate_cpu = cal["text_texts_s"]
        load = cal["text_fixed_s"] if new else 0.0
        if mode == "dask" and new:
            st.tasks = max(1, math.ceil(new / cfg.text.flush_texts))
            st.gpu = gpu
            st.work_s = new / (cal["gpu_text_texts_s"] if gpu else rate_cpu)
            st.per_worker_s = load
            st.memory_per_worker = int(cal["worker_torch_mb"] * 2**20 + 2**28)
            st.memory_note = "torch + the text model (≈ 256 MiB)"
            st.notes.append("encoded on the dask workers (text.mode)")
            st.figures += ["gpu_text_texts_s" if gpu else "text_texts_s", "text_fixed_s"]
        else:
            threads = cfg.text.threads or cores
            speedup = max(1.0, threads * cal["parallel_efficiency"])
            rate = cal["gpu_text_texts_s"] if gpu else rate_cpu * speedup
            st.serial_s = new / rate
            st.fixed_s = load
            st.notes.append(f"encoded in the client ({'its GPU' if gpu else f'{threads} threads'}"
                            f"; text.mode={cfg.text.mode})")
            st.figures += ["gpu_text_texts_s" if gpu else "text_texts_s", "text_fixed_s"]
        stages.append(st)

        # ---- pool
        used = min(g.data_chunks, max(p.rows, 1))
        reach = (_reach(cfg.pool.base) + _reach(cfg.pool.aug)) / 150.0
        n_trip = int(p.rows * cal["pool_keep_fraction"])
        trip_raw = n_trip * (8 + 4 * (2 * aef.N_BANDS + TEXT_DIM))
        trip_out = int(trip_raw * cal["ratio_triplets"])
        mem, mnote = _memory("pool", ctx, cal, tpw, torch=False)
        stages.append(StageEstimate(
            "pool", chunks=max(1, math.ceil(n_trip / cfg.pool.chunk_rows)), tasks=used,
            bytes_read=used * chunk_raw + text_raw + pois_raw, bytes_written=trip_out,
            bytes_written_raw=trip_raw, memory_per_worker=mem, memory_note=mnote,
            work_s=used * chunk_raw / cal["pool_values_s"] + p.rows * reach / cal["pool_pois_s"],
            fixed_s=cal["pool_fixed_s"],
            outputs={"triplets.zarr": trip_out},
            figures=["pool_values_s", "pool_pois_s", "pool_fixed_s", "pool_keep_fraction",
                     "ratio_triplets"],
            notes=[f"{n_trip:,} triplets; POI cost scaled by buffer reach "
                   f"({_reach(cfg.pool.base):g} + {_reach(cfg.pool.aug):g} m vs 50 + 100 m)"]))

        # ---- train
        tc = cfg.train
        serial = 0.0
        for v in variants:
            sec = tc.variant(v)
            n_fit = n_trip * sec.train_fraction * (1 - sec.val_fraction)
            if gpu:
                per = cal["gpu_train_s_per_triplet"]
            else:
                per = cal["train_s_per_triplet"]
                streaming = sec.in_memory == "never" or (
                    sec.in_memory == "auto" and trip_raw > 2**30 * 8)
                per *= cal["train_stream_factor"] if streaming else 1.0
            if not sec.use_aug:
                per *= cal["train_noaug_ratio"]
            serial += sec.epochs * n_fit * per + cal["train_fixed_s"]
        model_b = int(n_models * cal["model_bytes"])
        in_mem = n_trip * 4 * (2 * aef.N_BANDS + TEXT_DIM)
        stages.append(StageEstimate(
            "train", chunks=0, tasks=0, bytes_read=trip_out * (1 if tc.in_memory != "never"
                                                              else tc.epochs) * n_models,
            bytes_written=model_b, bytes_written_raw=model_b, memory_per_worker=None,
            memory_note=(f"client: {in_mem / 2**30:,.1f} GiB of triplets in memory"
                         if tc.in_memory != "never" else "client: streamed from triplets.zarr"),
            serial_s=serial, gpu=gpu, outputs={_names("model", variants): model_b},
            figures=(["gpu_train_s_per_triplet"] if gpu else
                     ["train_s_per_triplet", "train_stream_factor"])
            + ["train_noaug_ratio", "train_fixed_s", "model_bytes"],
            notes=[f"{n_models} model(s) × {tc.epochs} epochs, one after another in the client"
                   + (" on one GPU" if gpu else f" ({cores} cores)")]))

        # ---- infer
        fc = field_chunk(cpx, cfg.infer.chunk_px)
        fchunks = math.ceil(g.height / fc) * math.ceil(g.width / fc)
        per_px = 2 if cfg.infer.dtype == "float16" else 1
        field_raw = px * 128 * per_px
        field_out = int(field_raw * cal["ratio_field"])
        mem, mnote = _memory("infer", ctx, cal, tpw, torch=True)
        data_fchunks = max(1, min(fchunks, math.ceil(fchunks * g.data_pixels / max(g.pixels, 1))))
        stages.append(StageEstimate(
            "infer", chunks=fchunks * n_models, tasks=data_fchunks * n_models,
            bytes_read=ae_out * n_models, bytes_written=field_out * n_models,
            bytes_written_raw=field_raw * n_models, memory_per_worker=mem, memory_note=mnote,
            work_s=n_models * px / (cal["gpu_infer_px_s"] if gpu else cal["infer_px_s"]),
            per_worker_s=cal["infer_fixed_s"] * n_models, gpu=gpu,
            outputs={_names("field.zarr", variants): field_out * n_models},
            figures=(["gpu_infer_px_s"] if gpu else ["infer_px_s"]) + ["infer_fixed_s",
                                                                        "ratio_field"],
            notes=[f"{n_models} field(s) of {px:,} px, {cfg.infer.dtype}, {fc}-px chunks"]))

        # ---- regions
        units = {"luc": lab.luc, "sdm": lab.sdm}
        bufs = {"luc": cfg.regions.luc_buffer_m, "sdm": cfg.regions.sdm_buffer_m}
        rasters = 1 + n_models
        values_per_px = aef.N_BANDS + n_models * 128
        tasks = work = rd = 0
        kept = 0
        for t, n in units.items():
            if not n:
                continue
            touched = min(g.data_chunks, n)
            tasks += touched * rasters
            work += (touched * cpx * cpx * values_per_px / cal["pool_values_s"]
                     + n * rasters * bufs[t] / 100.0 * cal["regions_unit_s"])
            rd += touched * cpx * cpx * (aef.N_BANDS + n_models * 128 * per_px)
            kept += n
        reg_b = int(kept * values_per_px * cal["regions_bytes_per_value"])
        mem, mnote = _memory("regions", ctx, cal, tpw, torch=False)
        stages.append(StageEstimate(
            "regions", chunks=0, tasks=tasks, bytes_read=rd, bytes_written=reg_b,
            bytes_written_raw=reg_b, memory_per_worker=mem, memory_note=mnote, work_s=work,
            fixed_s=cal["regions_fixed_s"], outputs={"regions/": reg_b},
            figures=["pool_values_s", "regions_unit_s", "regions_fixed_s",
                     "regions_bytes_per_value"],
            notes=[f"{lab.luc:,} LUC points, {lab.sdm:,} SDM units ({lab.source}); chunks "
                   "touched ≤ min(chunks, units)"]))

        # ---- baselines
        b = cfg.baselines
        density = p.rows / max(g.area_km2, 1e-9)  # POIs per km²
        tokens = sum(n * density * math.pi * (bufs[t] / 1000.0) ** 2 for t, n in units.items())
        cost = {"calliper": p.rows * b.epochs * cal["calliper_s"],
                "space2vec": p.rows * b.epochs * cal["space2vec_s"],
                "place2vec": p.rows * b.neighbours * b.word_epochs * cal["place2vec_s"],
                "doc2vec": tokens * b.doc_epochs * cal["doc2vec_s"]}
        serial = 0.0
        for meth in b.methods:
            c = cost[meth]
            if gpu and meth in ("calliper", "space2vec"):
                c /= cal["gpu_baselines_factor"]
            serial += c
        bl_b = int(kept * len(b.methods) * b.dim * 4)
        stages.append(StageEstimate(
            "baselines", chunks=0, tasks=0, bytes_read=pois_raw + text_raw + reg_b,
            bytes_written=bl_b, bytes_written_raw=bl_b, memory_per_worker=None,
            memory_note="client", serial_s=serial, outputs={"baselines/": bl_b},
            figures=[f"{m}_s" for m in b.methods] + (["gpu_baselines_factor"] if gpu else []),
            notes=[f"{', '.join(b.methods) or 'none'} in the client; ≈{tokens:,.0f} POI tokens "
                   f"in unit buffers ({density:,.1f} POIs/km²)"]))

        # ---- evaluate
        ec = cfg.evaluate
        n_methods = 2 + len(cfg.train.variants) + len(b.methods) + len(ec.baselines)
        heads = len(ec.seeds) * n_methods
        workers_ev = ec.workers or cores
        serial = 0.0
        spawn = 0.0
        grows = []
        for t in ec.tasks:
            n = units.get(t, 0)
            if not n:
                continue
            grow = max(1.0, n / cal["evaluate_ref_units"]) ** (cal["evaluate_exponent"] - 1)
            grows.append(f"{t} ×{grow:.2f}")
            w = cal["evaluate_s_per_unit_head"] * heads * n * grow
            if workers_ev > 1 and heads > 1 and n * heads >= 50_000:
                procs = min(workers_ev, heads)
                used = min(procs, cores)
                w = max(math.ceil(heads / procs) * w / heads,
                        w / max(1.0, used * cal["parallel_efficiency"]))
                spawn = max(spawn, cal["evaluate_spawn_s"] * procs / used)
            serial += w
        stages.append(StageEstimate(
            "evaluate", chunks=0, tasks=0, bytes_read=reg_b + bl_b, bytes_written=2**20,
            bytes_written_raw=2**20, memory_per_worker=None, memory_note="client",
            serial_s=serial + spawn, fixed_s=cal["evaluate_fixed_s"],
            outputs={"report/": 2**20},
            figures=["evaluate_s_per_unit_head", "evaluate_ref_units", "evaluate_exponent",
                     "evaluate_fixed_s", "evaluate_spawn_s", "parallel_efficiency"],
            notes=[f"{heads} heads per task ({len(ec.seeds)} seeds × {n_methods} methods) on "
                   f"up to {workers_ev} processes in the client; cost per unit·head scaled "
                   f"from the calibration's {cal['evaluate_ref_units']:,.0f} units per task "
                   f"({', '.join(grows) or 'no task'}, evaluate_exponent)"]))
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    remote = cfg.cluster.kind in ("gateway", "address")
    processes = remote or cfg.cluster.kind in ("local", "cuda")
    if processes:  # fresh worker processes import each stack once, at its first stage
        first = {"ingest": cal["worker_import_s"], "pois": cal["worker_geo_import_s"],
                 "infer": cal["worker_torch_import_s"]}
        from ..pipeline.registry import infer_in_process

        if infer_in_process(cfg) is not None:  # infer's tasks run in the client
            del first["infer"]
        for s in stages:
            if s.tasks and s.stage in first:
                s.per_worker_s += first[s.stage]
                s.figures.append({"ingest": "worker_import_s", "pois": "worker_geo_import_s",
                                  "infer": "worker_torch_import_s"}[s.stage])
    if cfg.cluster.kind in ("local", "cuda", "threads"):
        for s in stages:
            s.max_slots = cores
            s.efficiency = cal["parallel_efficiency"]
            if s.tasks:
                s.figures.append("parallel_efficiency")
        notes.append(f"a {cfg.cluster.kind} cluster shares this machine's {cores} core(s): "
                     "wall times count at most that many task slots, whatever N")
    start = (cal["remote_cluster_start_s"] if remote else
             cal["cluster_start_s"] if cfg.cluster.kind in ("local", "cuda") else 0.0)
    if workers is None or not workers:
        workers = [n_cfg]
    for s in stages:
        if mem_limit and s.memory_per_worker and s.memory_per_worker > 0.8 * mem_limit:
            s.notes.append(f"needs more than 80 % of cluster memory_limit "
                           f"{mem_limit / 2**30:.1f} GiB: the stage would refuse to start")
    return Plan(inputs=inp, stages=stages, cal=cal, workers=sorted(set(workers)), tpw=tpw,
                gpu=gpu, cluster_kind=cfg.cluster.kind, cluster_start_s=start,
                client_cores=cores, memory_limit=mem_limit, notes=notes)
