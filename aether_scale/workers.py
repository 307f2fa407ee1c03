"""Dask workers' memory, split from :mod:`aether_scale.cluster`: the check before a
stage starts (:func:`check_worker_memory`: refuse workers too small for what the
stage's tasks import and hold, after one restart to give back heap kept from earlier
stages) and the measure while it runs (:class:`WorkerPeaks`: each worker's peak
resident memory over the stage, recorded in its manifest).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Sequence
from typing import Any

import dask

from .cluster import active_client
from .logs import get_logger

__all__ = ["WorkerPeaks", "check_worker_memory"]

log = get_logger("cluster")


def _worker_peak(reset: bool) -> int | None:
    """Worker side: this process's peak resident memory since the last reset (bytes,
    Linux ``VmHWM``), then reset the peak when ``reset``; None where /proc lacks it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        peak = int(line.split()[1]) * 1024
        if reset:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM to the current resident size
        return peak
    except (OSError, StopIteration, ValueError):
        return None


class WorkerPeaks:
    """The peak resident memory of each dask worker over a stretch of work (a stage):
    ``start()`` resets every worker's high-water mark, ``stop()`` reads it. Nothing
    (an empty summary) without a distributed cluster or where /proc has no ``VmHWM``."""

    def __init__(self) -> None:
        self.client = active_client()

    def start(self) -> WorkerPeaks:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.run(_worker_peak, True)
        return self

    def stop(self) -> dict[str, Any]:
        """``{"workers", "peak_rss_mib_max", "peak_rss_mib", "memory_limit_mib"}``."""
        if self.client is None:
            return {}
        try:
            peaks = {w: p for w, p in self.client.run(_worker_peak, False).items()
                     if p is not None}
            limits = {w: d.get("memory_limit")
                      for w, d in self.client.scheduler_info()["workers"].items()}
        except Exception:  # noqa: BLE001 - a worker lost at the end: no summary, no failure
            return {}
        if not peaks:
            return {}
        mib = 2**20
        lim = [v for v in limits.values() if v]
        return {"workers": len(peaks),
                "peak_rss_mib_max": round(max(peaks.values()) / mib, 1),
                "peak_rss_mib": {w: round(p / mib, 1) for w, p in sorted(peaks.items())},
                "memory_limit_mib": round(min(lim) / mib, 1) if lim else None}


#: a worker's heap grows beyond the blocks a task holds (temporaries, allocator slack)
_SLACK = 48 * 2**20
#: how long the memory check waits for a cluster that has no worker at the moment
_WAIT_FOR_WORKERS_S = 60.0


def _import_quietly(modules: Sequence[str]) -> None:
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception:  # noqa: BLE001 - only a head start: check_worker_memory reports it
            return


async def _import_in_background(modules: Sequence[str]) -> None:
    """Worker side: import ``modules`` in the worker's executor, off its event loop."""
    import asyncio

    await asyncio.get_running_loop().run_in_executor(None, _import_quietly, list(modules))


def warm_workers(modules: Sequence[str]) -> None:
    """Have every worker start importing ``modules`` now, without waiting for it.

    The client imports the same stage code (torch, xarray: seconds on a small machine)
    meanwhile, instead of the workers importing only once the client is done (the
    memory check, then the first tasks, waited for it). A failure here is ignored:
    :func:`check_worker_memory` imports the modules again and reports it.
    """
    client = active_client()
    if client is None or not modules:
        return
    try:
        client.run(_import_in_background, list(modules), wait=False)
    except Exception:  # noqa: BLE001 - a head start only
        log.debug("could not start the workers' imports early", exc_info=True)


def _rss_after_import(modules: Sequence[str]) -> int:
    """Worker side: import ``modules``, return this process's resident memory (bytes)."""
    import psutil

    for m in modules:
        importlib.import_module(m)
    return int(psutil.Process(os.getpid()).memory_info().rss)


def check_worker_memory(stage: str, modules: Sequence[str], per_task: Sequence[tuple[str, int]],
                        fix: str) -> None:
    """Refuse to start ``stage`` on workers too small for it, before any task is lost.

    Each worker imports ``modules`` (what the stage's tasks import) and reports its
    memory; a worker needs that plus ``per_task`` (``(what, bytes)``: the blocks one task
    holds) for each of its threads, within its pause threshold (dask pauses a worker at
    ``distributed.worker.memory.pause`` of its limit, default 80 %). Raises
    :class:`MemoryError` with the numbers and ``fix``; does nothing without a cluster or
    without a memory limit.
    """
    client = active_client()
    if client is None:
        return
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        # none right now: e.g. the one worker died importing the stage's code early
        # (warm_workers) and its nanny is starting it again — wait for it, then check
        # (returning here would let the tasks find out, one lost worker at a time)
        try:
            client.wait_for_workers(1, timeout=_WAIT_FOR_WORKERS_S)
        except TimeoutError:
            log.info(f"[{stage}] no dask worker after {_WAIT_FOR_WORKERS_S:.0f} s: their "
                     "memory is not checked before the stage")
            return
        workers = client.scheduler_info().get("workers", {})
    limited = {w: d for w, d in workers.items() if d.get("memory_limit")}
    if not limited:
        return
    pause = dask.config.get("distributed.worker.memory.pause", 0.8) or 1.0
    mib = 2**20
    smallest = min(d["memory_limit"] for d in limited.values())
    task = sum(b for _, b in per_task) + _SLACK

    def shortfalls() -> list[tuple]:
        try:
            rss = client.run(_rss_after_import, list(modules), workers=list(limited))
        except Exception as e:  # noqa: BLE001 - a worker killed while importing, a closed comm
            raise MemoryError(
                f"{stage}: the dask workers died while loading what {stage} runs "
                f"({', '.join(modules)}; {type(e).__name__}): {smallest / mib:,.0f} MiB per "
                "worker is not enough. Fix: set cluster.memory_limit to 1GiB or more") from None
        out = []
        for w, d in limited.items():
            need = rss.get(w, 0) + int(d.get("nthreads", 1)) * task
            if need > float(pause) * d["memory_limit"]:
                out.append((w, need, d["memory_limit"], rss.get(w, 0), int(d.get("nthreads", 1))))
        return out

    short = shortfalls()
    if short:
        # A worker's resident size includes heap that earlier stages freed but the allocator
        # kept (and their imports): restarting the workers (nothing is held between stages)
        # gives it back; only a worker still too small after that is a real shortfall.
        log.info(f"[{stage}] {len(short)} dask worker(s) hold memory from earlier stages: "
                 "restarting the workers before checking again")
        try:
            client.restart(wait_for_workers=True)
            workers = client.scheduler_info().get("workers", {})
            limited = {w: d for w, d in workers.items() if d.get("memory_limit")}
            short = shortfalls() if limited else []
        except Exception as e:  # noqa: BLE001 - a cluster that cannot restart: report as is
            log.info(f"[{stage}] the workers could not be restarted ({type(e).__name__}: {e})")
    if not short:
        return
    w, need, limit, base, threads = short[0]
    parts = ", ".join(f"{what} {b / mib:,.0f} MiB" for what, b in per_task)
    raise MemoryError(
        f"{stage}: the dask workers are too small — {len(short)} of {len(limited)} would run "
        f"out of memory. A worker needs about {need / mib:,.0f} MiB: {base / mib:,.0f} MiB once "
        f"it has imported what {stage} runs, plus per task ({parts}, temporaries "
        f"{_SLACK / mib:.0f} MiB) × {threads} thread(s); "
        f"{w} has {limit / mib:,.0f} MiB and pauses at {float(pause):.0%}. Fix: set "
        f"cluster.memory_limit to at least {need / float(pause) / mib * 1.1:,.0f}MiB, or {fix}")
