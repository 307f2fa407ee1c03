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
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import dask
from dask.callbacks import Callback

from .config import ClusterSection
from .logs import Progress, get_logger

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
    import os

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


def run_tasks(tasks: Sequence[Any], *, progress: Progress | None = None,
              retries: int = 0) -> list[Any]:
    """Compute dask Delayed ``tasks`` on the current scheduler; results in task order.

    ``progress`` advances once per finished task. On a distributed cluster the tasks
    are submitted together (``retries`` re-runs a task whose worker died); the first
    failure cancels the rest and is raised.
    """
    if not tasks:
        return []
    client = active_client()
    if client is None:
        if progress is None:
            return list(dask.compute(*tasks))
        with _CountTasks({t.key for t in tasks}, progress):
            return list(dask.compute(*tasks))
    from distributed import as_completed

    futures = client.compute(list(tasks), retries=retries)
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                fut.result()  # raises the task's exception
            if progress is not None:
                progress.advance()
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
        if kind == "local":
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=cfg.n_workers,
                    threads_per_worker=cfg.threads_per_worker,
                    memory_limit=cfg.memory_limit,
                    dashboard_address=cfg.dashboard_address,
                    processes=True,
                    local_directory=cfg.local_directory,
                )
            )
            client = stack.enter_context(Client(cluster))
        elif kind == "cuda":
            dask_cuda = import_optional("dask_cuda", "gpu")
            cluster = stack.enter_context(
                dask_cuda.LocalCUDACluster(
                    threads_per_worker=cfg.threads_per_worker,
                    memory_limit=cfg.memory_limit,
                    dashboard_address=cfg.dashboard_address,
                    local_directory=cfg.local_directory,
                )
            )
            client = stack.enter_context(Client(cluster))
        elif kind == "address":
            client = stack.enter_context(Client(cfg.address))
        elif kind == "gateway":
            client = stack.enter_context(_gateway_client(cfg))
        else:  # pragma: no cover - guarded by the config's Literal
            raise ValueError(f"unknown cluster.kind {kind!r}")
        link = getattr(client, "dashboard_link", None)
        log.info(f"dask: {kind} cluster, {len(client.scheduler_info().get('workers', {}))} workers"
                 + (f"; dashboard: {link}" if link else ""))
        yield client


@contextlib.contextmanager
def _gateway_client(cfg: ClusterSection) -> Iterator[object]:
    gw_mod = import_optional("dask_gateway", "gateway")
    g = cfg.gateway
    kwargs: dict[str, object] = {}
    if g.address:
        kwargs["address"] = g.address
    if g.proxy_address:
        kwargs["proxy_address"] = g.proxy_address
    if g.auth == "basic" or (g.username and g.password):
        from dask_gateway.auth import BasicAuth

        kwargs["auth"] = BasicAuth(g.username, g.password)
    elif g.auth:
        kwargs["auth"] = g.auth
    gateway = gw_mod.Gateway(**kwargs)
    try:
        cluster = gateway.new_cluster(**g.cluster_options)
        try:
            if g.workers:
                cluster.scale(g.workers)
            client = cluster.get_client(set_as_default=True)
            if g.workers:
                client.wait_for_workers(g.workers, timeout=300)
            try:
                yield client
            finally:
                client.close()
        finally:
            if g.shutdown_on_close:
                cluster.shutdown()
    finally:
        gateway.close()


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
        if needed and self._stack is None:
            stack = contextlib.ExitStack()
            stack.enter_context(connect(self.cfg))
            self._stack = stack
        elif not needed and self._stack is not None and self.cfg.kind in LOCAL_KINDS:
            self.close()

    def close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __enter__(self) -> ClusterSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
