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


class GatewayError(RuntimeError):
    """A Dask Gateway that cannot be reached, refuses the credentials or the options."""


def _gateway_health(address: str, timeout: float = 10.0) -> None:
    """Fail within ``timeout`` seconds, naming the fix, when nothing answers at the
    gateway's address (the client library would wait on a dropped connection)."""
    import urllib.error
    import urllib.request

    url = address.rstrip("/") + "/api/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # something answers HTTP there; the API calls below say what is wrong
    except (OSError, ValueError) as e:
        raise GatewayError(
            f"cannot reach the Dask Gateway at {address} ({getattr(e, 'reason', e)}). Fix: "
            "check cluster.gateway.address or DASK_GATEWAY__ADDRESS, and that the gateway "
            "is up and reachable from here") from None


def _gateway_failure(e: Exception, address: str, user: str | None) -> GatewayError:
    status = getattr(e, "status", None) or getattr(e, "code", None)
    if status in (401, 403):
        return GatewayError(
            f"the Dask Gateway at {address} refused the credentials"
            + (f" of user {user!r}" if user else "") + f" (HTTP {status}). Fix: "
            "cluster.gateway.username/password or DASK_GATEWAY__AUTH__KWARGS__*, or the auth "
            "type (cluster.gateway.auth, DASK_GATEWAY__AUTH__TYPE)")
    return GatewayError(f"the Dask Gateway at {address} failed: {type(e).__name__}: {e}")


@contextlib.contextmanager
def _gateway_client(cfg: ClusterSection) -> Iterator[object]:
    """A new cluster from the gateway, its client, and the cluster shut down on exit
    (``shutdown_on_close``); the server's idle timeout covers a client that crashes."""
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
    address = gateway.address
    user = g.username or dask.config.get("gateway.auth.kwargs.username", None)
    try:
        _gateway_health(address)
        try:
            offered = gateway.cluster_options(use_local_defaults=False)
        except Exception as e:  # noqa: BLE001 - aiohttp's errors: reported with the fix
            raise _gateway_failure(e, address, user) from None
        opts = dict(g.cluster_options)
        unknown = sorted(set(opts) - set(offered))
        if unknown:
            raise GatewayError(
                f"the Dask Gateway at {address} offers no cluster option(s) "
                f"{', '.join(unknown)}; it offers: {', '.join(sorted(offered)) or 'none'}. "
                "Fix: cluster.gateway.cluster_options")
        if g.idle_timeout_s is not None and "idle_timeout" in offered:
            opts.setdefault("idle_timeout", g.idle_timeout_s)
        elif g.idle_timeout_s is not None:
            log.info(f"dask: the gateway offers no 'idle_timeout' option; its own timeout "
                     f"applies (cluster.gateway.idle_timeout_s={g.idle_timeout_s:g} not sent)")
        try:
            cluster = gateway.new_cluster(**opts)
        except Exception as e:  # noqa: BLE001
            raise _gateway_failure(e, address, user) from None
        try:
            if g.adaptive_max:
                cluster.adapt(minimum=g.adaptive_min, maximum=g.adaptive_max)
            elif g.workers:
                cluster.scale(g.workers)
            client = cluster.get_client(set_as_default=True)
            if g.workers and not g.adaptive_max:
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
