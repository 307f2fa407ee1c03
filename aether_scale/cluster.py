"""Config → dask scheduler, in one place; and the one way stage code runs dask tasks.

``cluster.kind`` selects where every dask computation of a run goes:

- ``threads`` / ``synchronous``: dask's in-process schedulers (no workers).
- ``local``: a :class:`distributed.LocalCluster` with ``n_workers`` processes of
  ``threads_per_worker`` threads and ``memory_limit`` each (spilling to disk
  beyond it), the default, so a laptop run is out-of-core like a cluster run.
- ``address``: an existing scheduler (``tcp://host:8786``).
- ``gateway``: a new cluster from a Dask Gateway. Address, proxy and auth come
  from the standard dask-gateway configuration (``DASK_GATEWAY__ADDRESS``,
  ``DASK_GATEWAY__PROXY_ADDRESS``, ``DASK_GATEWAY__AUTH__TYPE`` …) unless the
  config's ``cluster.gateway`` section sets them.
- ``cuda``: one worker per GPU via dask-cuda's ``LocalCUDACluster`` (extra
  ``gpu``); falls back to ``local`` with a warning when no GPU is visible.

Stage code never builds clients: it calls :func:`run_tasks` (or dask's own
``compute``), and the work goes to whatever :func:`connect` made current;
:func:`active_client` is the one place that asks which client that is.
:class:`ClusterSession` opens the cluster lazily for the stages that need one and
closes a local one before a stage that does not (idle worker processes on the same
cores slow torch down: measured 14.4 vs 9.8 s/epoch for ``train`` on 2 cores).

Two parts live beside it: :mod:`aether_scale.gateway` (the Dask Gateway client:
probes, options, idle timeout, shutdown) and :mod:`aether_scale.workers` (the workers'
memory: the check before a stage, the peaks measured during it).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import dask
from dask.callbacks import Callback
from distributed.diagnostics.plugin import WorkerPlugin

from .config import ClusterSection
from .logs import Progress, get_logger, verbosity

log = get_logger("cluster")

_LOCAL_SCHEDULERS = ("threads", "threading", "sync", "synchronous", "single-threaded",
                     "processes")
#: kinds whose workers run on this machine's cores (closed between stages that need none)
LOCAL_KINDS = ("local", "cuda", "threads", "synchronous")


def import_optional(module: str, extra: str) -> ModuleType:
    """Import an optional dependency or raise ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed for this feature: pip install 'aether-scale[{extra}]' ({e})"
        ) from None


def active_client() -> Any | None:
    """The ``distributed.Client`` dask work goes to now, or None for the in-process
    schedulers (``cluster.kind`` threads/synchronous, or no cluster at all)."""
    if dask.config.get("scheduler", None) in _LOCAL_SCHEDULERS:
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def n_task_slots() -> int:
    """Worker threads of the active cluster, else this machine's cores."""
    client = active_client()
    if client is not None:
        try:
            return max(1, sum(client.nthreads().values()))
        except Exception:  # noqa: BLE001 - a cluster that cannot answer counts as one slot
            return 1
    return max(1, int(dask.config.get("num_workers", None) or os.cpu_count() or 1))


class InTask:
    """A dask collection handed to a task *as is* and computed inside it (synchronously).

    dask does not traverse it, so the scheduler never materialises the collection on the
    task's behalf: a task that reads its own raster chunk this way holds that chunk and
    nothing more, wherever it runs.
    """

    __slots__ = ("arr",)

    def __init__(self, arr: Any) -> None:
        self.arr = arr

    def read(self) -> Any:
        import numpy as np

        a = self.arr
        if hasattr(a, "__dask_graph__"):
            (a,) = dask.compute(a, scheduler="synchronous")
        return np.asarray(a)


class _CountTasks(Callback):
    """Local-scheduler callback: advance ``progress`` when one of ``keys`` finishes."""

    def __init__(self, keys: set, progress: Progress) -> None:
        super().__init__()
        self.keys, self.progress = keys, progress

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:  # noqa: A002
        if key in self.keys:
            self.progress.advance()


#: give up when every worker has been paused (memory above its pause threshold) this long
PAUSED_GIVE_UP_S = float(os.environ.get("AETHER_SCALE_PAUSED_GIVE_UP_S", "120"))
_POLL_S = 2.0


class WorkersPaused(MemoryError):
    """Every worker of the cluster stayed paused for lack of memory: the run cannot go on."""


class _PauseWatch:
    """Notices a cluster whose workers are all paused (each above its memory pause
    threshold, so none runs a task) and ends the wait with an explanation instead of
    hanging."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.since: float | None = None

    def check(self) -> None:
        try:
            workers = self.client.scheduler_info()["workers"]
        except Exception:  # noqa: BLE001 - a scheduler that cannot answer is not paused
            return
        paused = [w for w, d in workers.items() if str(d.get("status", "")).endswith("paused")]
        if not workers or len(paused) < len(workers):
            self.since = None
            return
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since < PAUSED_GIVE_UP_S:
            return
        w, d = next(iter(workers.items()))
        limit = d.get("memory_limit") or 0
        used = (d.get("metrics") or {}).get("memory") or 0
        raise WorkersPaused(
            f"all {len(workers)} dask workers have been paused for {now - self.since:.0f} s: each "
            f"holds more memory than its pause threshold (e.g. {w}: {used / 2**20:,.0f} MiB of "
            f"{limit / 2**20:,.0f} MiB), so no task can run. Give the workers more memory "
            "(cluster.memory_limit), fewer threads each (cluster.threads_per_worker), or "
            "smaller chunks; the work finished so far is kept — rerun to resume")


def result(fut: Any, watch: _PauseWatch | None = None) -> Any:
    """``fut.result()`` that gives up with :class:`WorkersPaused` instead of waiting forever
    on a cluster whose workers are all paused."""
    from distributed import TimeoutError as DaskTimeout

    watch = watch or _PauseWatch(fut.client)
    while True:
        try:
            return fut.result(timeout=_POLL_S)
        except (TimeoutError, DaskTimeout):
            watch.check()


def run_tasks(tasks: Sequence[Any], *, progress: Progress | None = None,
              retries: int = 0) -> list[Any]:
    """Compute dask Delayed ``tasks`` on the current scheduler; results in task order.

    ``progress`` advances once per finished task. On a distributed cluster the tasks
    are submitted together (``retries`` re-runs a task whose worker died); the first
    failure cancels the rest and is raised; a cluster whose workers all stay paused for
    lack of memory ends the wait with :class:`WorkersPaused`.
    """
    if not tasks:
        return []
    client = active_client()
    if client is None:
        if progress is None:
            return list(dask.compute(*tasks))
        with _CountTasks({t.key for t in tasks}, progress):
            return list(dask.compute(*tasks))
    from distributed import TimeoutError as DaskTimeout
    from distributed import wait

    futures = client.compute(list(tasks), retries=retries)
    watch = _PauseWatch(client)
    pending = set(futures)
    try:
        while pending:
            try:
                res = wait(pending, timeout=_POLL_S, return_when="FIRST_COMPLETED")
                done, pending = set(res.done), set(res.not_done)
            except (TimeoutError, DaskTimeout):
                done = set()
            for fut in done:
                if fut.status == "error":
                    fut.result()  # raises the task's exception
                if progress is not None:
                    progress.advance()
            if not done:
                watch.check()
        return client.gather(futures)
    finally:
        client.cancel([f for f in futures if not f.done()])


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


@contextlib.contextmanager
def connect(cfg: ClusterSection) -> Iterator[Any | None]:
    """Open the configured scheduler for the duration of the block.

    Yields the ``distributed.Client`` (or None for the in-process schedulers) and logs
    the dashboard link. Everything is closed on exit.
    """
    kind = cfg.kind
    if kind in ("threads", "synchronous"):
        with dask.config.set(scheduler=kind):
            log.info(f"dask: in-process '{kind}' scheduler")
            yield None
        return

    from distributed import Client, LocalCluster

    stack = contextlib.ExitStack()
    with stack:
        if kind == "cuda" and _cuda_count() == 0:
            log.warning("cluster.kind 'cuda' but no CUDA device is visible: using a LocalCluster")
            kind = "local"
        # dashboard_address null: no dashboard. (distributed still starts its small HTTP
        # server — health checks, metrics — and would put it on :8787; a random port keeps
        # 8787 free for whoever wants it.)
        dash = ({"dashboard_address": cfg.dashboard_address} if cfg.dashboard_address
                else {"dashboard_address": ":0", "scheduler_kwargs": {"dashboard": False}})
        if kind == "local":
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=cfg.n_workers,
                    threads_per_worker=cfg.threads_per_worker,
                    memory_limit=cfg.memory_limit,
                    processes=True,
                    local_directory=cfg.local_directory,
                    **dash,
                )
            )
            client = stack.enter_context(Client(cluster))
        elif kind == "cuda":
            dask_cuda = import_optional("dask_cuda", "gpu")
            cluster = stack.enter_context(
                dask_cuda.LocalCUDACluster(
                    threads_per_worker=cfg.threads_per_worker,
                    memory_limit=cfg.memory_limit,
                    local_directory=cfg.local_directory,
                    **dash,
                )
            )
            client = stack.enter_context(Client(cluster))
        elif kind == "address":
            client = stack.enter_context(Client(cfg.address))
        elif kind == "gateway":
            from .gateway import _gateway_client

            client = stack.enter_context(_gateway_client(cfg))
        else:  # pragma: no cover - guarded by the config's Literal
            raise ValueError(f"unknown cluster.kind {kind!r}")
        if kind in ("local", "cuda") and verbosity() < 2:
            # worker processes write to this terminal / log file too: only their errors
            client.register_plugin(_QuietWorkerLogs(), name="aether-quiet-logs")
        info = client.scheduler_info()
        link = (getattr(client, "dashboard_link", None)
                if cfg.dashboard_address or kind in ("address", "gateway") else None)
        log.info(f"dask: {kind} cluster, {len(info.get('workers', {}))} workers"
                 + (f"; dashboard: {link}" if link else "; no dashboard"))
        yield client


class _QuietWorkerLogs(WorkerPlugin):
    """Worker plugin: local worker processes, which write to this terminal or log file
    too, log only critical failures. Their memory warnings are long single lines, and at
    shutdown a heartbeat racing the closing scheduler logs a traceback; what matters
    reaches the client anyway (a task's error, :class:`_PauseWatch`, the memory check)."""

    idempotent = True

    def setup(self, worker: Any) -> None:
        import logging

        for name in ("distributed", "distributed.worker", "distributed.worker.memory",
                     "distributed.nanny", "distributed.core", "distributed.comm",
                     "distributed.utils_perf", "distributed.utils"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


class ClusterSession:
    """The cluster of a multi-stage run: opened when a stage needs it, kept while the
    next ones do, closed before a stage that does not when its workers would share
    this machine's cores (``cluster.kind`` local/cuda); remote clusters stay up."""

    def __init__(self, cfg: ClusterSection) -> None:
        self.cfg = cfg
        self._stack: contextlib.ExitStack | None = None

    @property
    def is_open(self) -> bool:
        return self._stack is not None

    def require(self, needed: bool) -> None:
        """Make the cluster state fit the next stage (``needed``: it runs dask work)."""
        if needed and self._stack is not None and not self._alive():
            # a remote cluster can end between stages: a gateway's idle timeout counts
            # tasks, not clients, so a long train stage in this process outlives it
            log.warning("dask: the cluster of the previous stages is gone (idle timeout or a "
                        "lost scheduler): starting a new one")
            self.close()
        if needed and self._stack is None:
            stack = contextlib.ExitStack()
            self._client = stack.enter_context(connect(self.cfg))
            self._stack = stack
        elif not needed and self._stack is not None and self.cfg.kind in LOCAL_KINDS:
            self.close()

    def _alive(self) -> bool:
        client = getattr(self, "_client", None)
        if client is None:
            return True  # the in-process schedulers
        try:
            client.scheduler_info()  # a round trip to the scheduler
            return client.status == "running"
        except Exception:  # noqa: BLE001 - any failure to answer: the cluster is gone
            return False

    def close(self) -> None:
        self._client = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __enter__(self) -> ClusterSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def persist(objs: Sequence[Any]) -> list[Any]:
    """``dask.persist`` that, on a distributed cluster, waits for the results with the same
    paused-workers watch as :func:`run_tasks` (a cluster out of memory ends the wait with
    :class:`WorkersPaused` instead of hanging)."""
    objs = list(objs)
    client = active_client()
    if client is None or not objs:
        return list(dask.persist(*objs))
    from distributed import TimeoutError as DaskTimeout
    from distributed import futures_of, wait

    out = list(dask.persist(*objs))
    pending = set(futures_of(out))
    watch = _PauseWatch(client)
    while pending:
        try:
            res = wait(pending, timeout=_POLL_S)
            pending = set(res.not_done)
        except (TimeoutError, DaskTimeout):
            watch.check()
    for f in futures_of(out):
        if f.status == "error":
            f.result()
    return out
