"""Run a sweep: one child workspace per point, the points as parallel dask tasks.

A point's workspace (``<ws>/sweeps/<name>/<point>/``) borrows every parent output its
setting does not change — ``ae.zarr``, ``pois.parquet``, ``text.zarr`` always, and
``triplets.zarr`` unless the point changes the pooling radii — as links with the
parent's manifests, so the pipeline finds them current and skips their stages (the
manifests prove it: the point's ``pool`` manifest is the parent's, byte for byte). Then
``pool`` (radii points only), ``train``, ``infer``, ``regions`` and ``evaluate`` run
inside it with the point's overrides. A point is one dask task on the configured
cluster (``sweep.parallel`` at once); its stages run on threads inside the task. A
killed sweep resumes: finished points are current and reused, a half-trained one
continues from its ``last.pt``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import RunConfig, config_yaml, load_config, saved_config
from ..logs import get_logger
from .points import POINT_FIXED, Point, plan_points

__all__ = ["SweepError", "run_point", "sweep", "sweep_config"]

log = get_logger("sweep")

#: parent outputs a point borrows, with the stage whose manifest proves them
BORROWED = (("ingest", "ae.zarr"), ("pois", "pois.parquet"), ("text", "text.zarr"))
POOLED = ("pool", "triplets.zarr")
POINT_STAGES = ("pool", "train", "infer", "regions", "evaluate")


class SweepError(RuntimeError):
    """A sweep that cannot start, or points that failed (the message names them)."""


#: seconds every worker may stay paused for memory with no point running before the sweep
#: gives up on them (dask's pause outlasts any task it was waiting for: nothing resumes it)
STALL_S = 30.0


def _next_finished(client: Any, futures: list[Any], memory_limit: Any) -> Any:
    """The first of ``futures`` (running points) to finish.

    A point runs whole stages inside its worker process, and the memory they leave there
    (garbage cycles, freed heap, imported libraries) counts against the worker: above
    ``distributed.worker.memory.pause`` of its limit dask pauses the worker, and a paused
    worker is never given the next point (a CI run of the sweep test waited ≈ 8 minutes
    so, at 950 of 1,024 MiB). When every worker is paused with no point running, each
    collects its garbage and trims its heap (:func:`~aether_scale.heap.release_freed_memory`,
    which resumes them when that was the cause); still paused :data:`STALL_S` s later,
    :class:`SweepError` says so and how to fix it."""
    from distributed import TimeoutError as DaskTimeout
    from distributed import wait

    since = None
    while True:
        try:
            done, _ = wait(futures, timeout=2.0, return_when="FIRST_COMPLETED")
        except (DaskTimeout, TimeoutError):
            done = set()
        if done:
            return next(iter(done))
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        paused = {a: w for a, w in workers.items() if w.get("status") == "paused"}
        if not workers or len(paused) < len(workers) or any(client.processing().values()):
            since = None
            continue
        if since is None:  # the finished points' garbage may be what holds the memory
            from ..heap import release_freed_memory

            client.run(release_freed_memory)
            since = time.monotonic()
        if time.monotonic() - since < STALL_S:
            continue
        used = ", ".join(f"{w.get('metrics', {}).get('memory', 0) / 2**20:,.0f} of "
                         f"{(w.get('memory_limit') or 0) / 2**20:,.0f} MiB"
                         for w in paused.values())
        raise SweepError(
            f"every dask worker is paused for memory ({used}) with {len(futures)} sweep "
            f"point(s) waiting: each point runs its stages inside a worker process, and what "
            f"they leave there keeps it above dask's pause threshold, so no point can start. "
            f"Fix: give the workers more memory (cluster.memory_limit, now {memory_limit}), "
            f"or run fewer points at once (sweep.parallel=1 runs them in this process); "
            f"the finished points are kept and a rerun resumes")


def sweep_config(workspace: str, config: str | None = None,
                 overrides: Sequence[str] | None = None) -> RunConfig:
    """The sweep's base config: the workspace's saved config, then the sweep file's
    sections (``sweep:`` whole; any other section's keys override every point), then
    ``overrides`` (``--set``)."""
    import yaml

    from ..config import resolve_config_path
    from ..pipeline.keys import flatten

    base = saved_config(workspace)
    if base is None:
        raise SweepError(f"{workspace} has no config.yaml: run the pipeline there first "
                         "(`aether-scale run -w WS -c CONFIG`), then sweep it")
    extra: dict[str, Any] = {}
    if config is not None:
        path = resolve_config_path(config)
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        if not isinstance(doc, dict):
            raise SweepError(f"{path}: expected a mapping with a 'sweep:' section")
        for sec, val in doc.items():
            if sec == "sweep":
                extra["sweep"] = val
            elif isinstance(val, dict):
                extra.update({f"{sec}.{k}": v for k, v in flatten(val).items()})
            else:
                raise SweepError(f"{path}: top-level key {sec!r} is not a config section")
    cfg = load_config(base, extra)
    return load_config(data=cfg.model_dump(mode="json"), overrides=list(overrides or []))


def _link(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        return
    os.symlink(os.path.relpath(src, os.path.dirname(dst)), dst)


def _prepare(ws: Any, root: str, pt: Point, cfg: RunConfig) -> None:
    """Create the point's workspace and borrow what its setting leaves unchanged."""
    from ..pipeline import status
    from ..workspace import Workspace

    os.makedirs(os.path.join(root, "manifests"), exist_ok=True)
    child = Workspace(root)
    for stage, entry in (*BORROWED, POOLED):
        _link(ws.path(entry), os.path.join(root, entry))
        dst = child.manifest_path(stage)
        if not os.path.exists(dst):
            shutil.copyfile(ws.manifest_path(stage), dst)
    child.save_config(config_yaml(cfg), ["sweep", pt.id])
    rows = {r.stage: r for r in status(child, cfg)}
    for stage, entry in BORROWED:
        if rows[stage].state != "current":
            raise SweepError(
                f"sweep point {pt.id}: {entry} of {ws.root} does not fit this point "
                f"({stage}: {rows[stage].state}; {'; '.join(rows[stage].why)}) — a sweep varies "
                "train and pool settings; run the pipeline with the other settings instead")
    if rows["pool"].state != "current" and os.path.islink(os.path.join(root, POOLED[1])):
        # a point with other radii pools its own views (in its own folder, not the parent's)
        os.unlink(os.path.join(root, POOLED[1]))
        os.remove(child.manifest_path("pool"))


def run_point(root: str, cfg_doc: Mapping[str, Any]) -> dict[str, Any]:
    """Run a point's stages in its workspace (a dask task, or in-process); its log goes
    to ``<root>/sweep.log``. Returns what ran and the point's metrics."""
    from ..pipeline import run_stages
    from ..workspace import Workspace

    cfg = load_config(data=dict(cfg_doc))
    handler = logging.FileHandler(os.path.join(root, "sweep.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    top = logging.getLogger("aether_scale")
    top.addHandler(handler)
    level = top.level
    top.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        res = run_stages(list(POINT_STAGES), Workspace(root), cfg)
    finally:
        top.removeHandler(handler)
        top.setLevel(level)
        handler.close()
    with open(os.path.join(root, "report", "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    return {"ran": [r.stage for r in res if not r.skipped],
            "seconds": round(time.perf_counter() - t0, 1), "metrics": metrics}


def _point_cfg(base: RunConfig, pt: Point, threads: int | None) -> RunConfig:
    over = {**POINT_FIXED, **base.sweep.overrides, **pt.overrides}
    if threads is not None:
        over |= {"train.threads": threads, "infer.threads": threads}
    try:
        return load_config(data=base.model_dump(mode="json"), overrides=over)
    except Exception as e:  # a point whose overrides do not validate: name it
        raise SweepError(f"sweep point {pt.id}: {e}") from None


def sweep(workspace: str, config: str | None = None, overrides: Sequence[str] | None = None,
          ) -> dict[str, Any]:
    """Run (or resume) the sweep the config describes on ``workspace`` (a local folder
    where the pipeline has run at least to ``pool``); write ``sweeps/<name>/``
    (``sweep.json``, ``sweep.md``, plots) and return the summary."""
    from ..cluster import connect
    from ..pipeline import is_current
    from ..workspace import Workspace
    from .report import write_sweep_report

    ws = Workspace(workspace)
    if not ws.is_local:
        raise SweepError(f"{workspace}: sweeps run on a local workspace (its points borrow "
                         "the parent's stores as links); copy the workspace to local disk")
    for stage, entry in (*BORROWED, POOLED):
        if ws.manifest(stage) is None or not ws.exists(entry):
            raise SweepError(f"{ws.path(entry)} is missing or unfinished (no {stage} manifest): "
                             f"run `aether-scale run -w {workspace} --until pool` first")
    cfg = sweep_config(workspace, config, overrides)
    points = plan_points(cfg.sweep)
    if not points:
        raise SweepError("nothing to sweep: set sweep.lam, sweep.radii, sweep.train_fraction "
                         "or sweep.points (e.g. -c paper-sweeps, or --set 'sweep.lam=[0, 0.5]')")
    name = cfg.sweep.name
    root = ws.path(f"sweeps/{name}")
    distributed = cfg.cluster.kind not in ("threads", "synchronous")
    parallel = cfg.sweep.parallel or (cfg.cluster.n_workers if distributed else 1)
    threads = (cfg.cluster.threads_per_worker or 1) if distributed else None
    cfgs = {p.id: _point_cfg(cfg, p, threads) for p in points}
    t0 = time.perf_counter()
    todo, results, failed = [], {}, {}
    for p in points:
        proot = f"{root}/{p.id}"
        _prepare(ws, proot, p, cfgs[p.id])
        child = Workspace(proot)
        if all(is_current(s, child, cfgs[p.id]) for s in POINT_STAGES):
            results[p.id] = {"ran": [], "seconds": 0.0, "metrics": json.load(
                open(f"{proot}/report/metrics.json", encoding="utf-8"))}
            log.info(f"[sweep] {p.id}: current — reused")
        else:
            todo.append(p)
    log.info(f"[sweep] {name}: {len(points)} point(s), {len(todo)} to run, "
             f"{min(parallel, max(len(todo), 1))} at once → {root}")

    def done(pid: str, out: dict[str, Any]) -> None:
        results[pid] = out
        m = out["metrics"]
        kl = m.get("sdm", {}).get("AETHER", {}).get("kl")
        f1 = m.get("luc", {}).get("AETHER", {}).get("f1")
        show = ", ".join(s for s in (f"LUC F1 {100 * sum(f1) / len(f1):.1f}" if f1 else "",
                                     f"SDM KL {1e3 * sum(kl) / len(kl):.1f}" if kl else "") if s)
        log.info(f"[sweep] {pid}: ran {', '.join(out['ran']) or 'nothing'} in "
                 f"{out['seconds']:.0f} s — AETHER {show}")

    if todo and distributed and parallel > 1:
        with connect(cfg.cluster) as client:
            queue = list(todo)
            running = {}
            while queue or running:
                while queue and len(running) < parallel:
                    p = queue.pop(0)
                    fut = client.submit(run_point, f"{root}/{p.id}",
                                        cfgs[p.id].model_dump(mode="json"), pure=False,
                                        key=f"sweep-{name}-{p.id}-{time.time_ns()}")
                    running[fut] = p.id
                fut = _next_finished(client, list(running), cfg.cluster.memory_limit)
                pid = running.pop(fut)
                try:
                    done(pid, fut.result())
                except Exception as e:  # noqa: BLE001 - a failed point must not stop the others
                    failed[pid] = f"{type(e).__name__}: {e}"
                    log.error(f"[sweep] {pid} failed: {failed[pid]} (log: {root}/{pid}/sweep.log)")
    else:
        for p in todo:
            try:
                done(p.id, run_point(f"{root}/{p.id}", cfgs[p.id].model_dump(mode="json")))
            except Exception as e:  # noqa: BLE001
                failed[p.id] = f"{type(e).__name__}: {e}"
                log.error(f"[sweep] {p.id} failed: {failed[p.id]} (log: {root}/{p.id}/sweep.log)")
    summary = write_sweep_report(root, cfg, points, results, failed,
                                 seconds=time.perf_counter() - t0,
                                 seeds=cfgs[points[0].id].evaluate.seeds)
    if failed:
        raise SweepError(f"{len(failed)} of {len(points)} sweep point(s) failed: "
                         f"{', '.join(sorted(failed))}; the others are in {root}/sweep.json. "
                         "Fix the cause (see each point's sweep.log) and run the same command "
                         "again: finished points are reused")
    return summary
