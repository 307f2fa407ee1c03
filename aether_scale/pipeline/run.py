"""Running stages: the context a build function gets, one stage, a sequence on one cluster."""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from ..logs import get_logger
from ..workspace import StageResult, Work, Workspace
from .keys import StagePlan, available, plan
from .registry import ARTIFACTS, Stage, is_complete, producer, stage

__all__ = ["StageContext", "check_ready", "is_current", "run_stage", "run_stages"]

@dataclass
class StageContext:
    """What a stage's build function gets: the workspace, the config, where to read
    (``reads``: entry name → path) and write (``outputs``: entry name → path in the
    work folder), the work folder itself (ledgers), and its logger."""

    ws: Workspace
    cfg: RunConfig
    plan: StagePlan
    work: Work
    log: logging.Logger
    force: bool = False

    @property
    def reads(self) -> dict[str, str]:
        return self.plan.reads

    @property
    def outputs(self) -> dict[str, str]:
        return self.work.outputs

    @property
    def storage_options(self) -> dict[str, Any] | None:
        return self.ws.storage_options or None

    def ledger_path(self, name: str) -> str:
        """The ledger folder of output ``name`` (inside the work folder)."""
        return self.work.path(f"ledger/{name}")


def _missing_error(ws: Workspace, st: Stage, missing: Sequence[str]) -> FileNotFoundError:
    kind = missing[0]
    prod = producer(kind)
    how = (f"run `aether-scale {prod.name} -w {ws.root}` first (or `aether-scale run -w "
           f"{ws.root} -c CONFIG` for every stage)") if prod else "put it there"
    art = ARTIFACTS[kind]
    what = ("does not exist" if not ws.exists(kind) else
            f"is incomplete (no {art.marker} inside: an interrupted copy?)")
    return FileNotFoundError(f"{ws.path(kind)} {what} (stage {st.name} reads it); {how}")


def check_ready(name: str, ws: Workspace, cfg: RunConfig) -> StagePlan:
    """The plan of stage ``name`` on the workspace as it is, or an error naming the
    missing input and the command that makes it (raised before any cluster starts)."""
    st = stage(name)
    p = plan(st, ws, cfg, available(ws))
    if p.missing:
        raise _missing_error(ws, st, p.missing)
    return p


def run_stage(name: str, ws: Workspace, cfg: RunConfig, *, force: bool = False,
              wait: bool = True) -> StageResult:
    """Run one stage on the workspace as it is (skipped when its manifest matches)."""
    st = stage(name)
    p = check_ready(name, ws, cfg)
    slog = get_logger(name)
    ranks = importlib.import_module(st.ranks) if st.ranks else None
    if ranks is not None:
        r = ranks.ranks(cfg)
        if r.distributed and r.rank != 0:
            return StageResult(name, ranks.follow(ws, cfg, p), {})

    def fn(work: Work) -> Mapping[str, Any] | None:
        _warn_inputs_gone(ws, p, slog)
        ctx = StageContext(ws, cfg, p, work, slog, force)
        from ..workers import WorkerPeaks, check_worker_memory, warm_workers

        if st.memory:
            mod, name_ = st.memory.split(":")
            warm_workers([mod])  # the workers import the stage's code while this process does
            modules, per_task, fix = getattr(importlib.import_module(mod), name_)(ctx)
            check_worker_memory(st.name, modules, per_task, fix)
        peaks = WorkerPeaks().start()
        stats = dict(st.function()(ctx) or {})
        mem = peaks.stop()
        if mem:  # each worker's peak resident memory over the stage, beside its limit
            stats["dask_workers"] = mem
            slog.info(f"[{name}] dask workers' peak memory {mem['peak_rss_mib_max']:,.0f} MiB"
                      + (f" (limit {mem['memory_limit_mib']:,.0f} MiB)"
                         if mem["memory_limit_mib"] else ""))
        return stats

    t0 = time.perf_counter()
    res = ws.run_stage(name, key=p.key, outputs=p.outputs, fn=fn, record=p.record(),
                       force=force, complete=lambda n: is_complete(ws, n), wait=wait)
    if ranks is not None and res.skipped:
        ranks.tell("skip")
    if res.skipped and st.on_skip:
        mod, fn = st.on_skip.split(":")
        getattr(importlib.import_module(mod), fn)(ws, slog)
    if not res.skipped:
        slog.info(f"[{name}] done in {time.perf_counter() - t0:.1f} s → "
                  + ", ".join(p.outputs))
    return res


def _warn_inputs_gone(ws: Workspace, p: StagePlan, log: logging.Logger) -> None:
    """Say out loud when a rerun happens because inputs the last run read are gone (a
    deleted tile, a source dropped from the config): the new output will lack them."""
    old = ws.manifest(p.stage.name)
    if old is None:
        return
    for label, rec in old.get("inputs", {}).items():
        before = rec.get("ref")
        before = before if isinstance(before, list) else [before]
        if label not in p.inputs:
            log.warning(f"[{p.stage.name}] input {label} of the last run is gone "
                        f"({', '.join(map(str, before))}); this run goes without it")
            continue
        if p.inputs[label].fingerprint == rec.get("fingerprint"):
            continue  # the same content (a moved or copied workspace): nothing is gone
        now = {os.path.basename(str(r).rstrip("/")) for r in p.inputs[label].refs}
        gone = [r for r in before if os.path.basename(str(r).rstrip("/")) not in now]
        if gone:
            log.warning(f"[{p.stage.name}] {len(gone)} of the {len(before)} files of input "
                        f"{label} the last run read are gone or no longer match: "
                        f"{', '.join(map(str, gone[:5]))}" + (" …" if len(gone) > 5 else "")
                        + "; this run goes without them")


def run_stages(names: Sequence[str], ws: Workspace | str, cfg: RunConfig, *,
               force: bool = False, wait: bool = True) -> list[StageResult]:
    """Run stages in order on one cluster session (opened only for stages that need it).

    The first stage's inputs must be in the workspace (checked before any cluster
    starts); later stages get theirs from the earlier ones.
    """
    from ..cluster import ClusterSession

    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    if names:
        check_ready(names[0], ws, cfg)
    results = []
    # the cluster closes first, then the replaced outputs' background deletions are waited for
    with ws.deferred_removals(), ClusterSession(cfg.cluster) as session:
        for name in names:
            st = stage(name)
            # a stage that is current is skipped without starting a cluster for it
            session.require(st.needs_cluster(cfg) and (force or not _current(st, ws, cfg)))
            results.append(run_stage(name, ws, cfg, force=force, wait=wait))
    return results


def is_current(name: str, ws: Workspace, cfg: RunConfig) -> bool:
    """Whether stage ``name`` would be skipped if it ran now on ``ws`` with ``cfg``."""
    return _current(stage(name), ws, cfg)


def _current(st: Stage, ws: Workspace, cfg: RunConfig) -> bool:
    """Whether ``st`` is current now (checked again, under its lock, when it runs)."""
    p = plan(st, ws, cfg, available(ws))
    m = ws.manifest(st.name)
    return (not p.missing and m is not None and m.get("key") == p.key
            and all(is_complete(ws, n) for n in p.outputs))
