"""Config → dask scheduler, in one place.

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

Stage code never builds clients itself: it calls ``.compute()`` / ``persist``
and dask sends the work to whatever :func:`connect` made current.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from types import ModuleType

import dask

from .config import ClusterSection


def import_optional(module: str, extra: str) -> ModuleType:
    """Import an optional dependency or raise ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed for this feature: pip install 'aether-scale[{extra}]' ({e})"
        ) from None


def _say(msg: str) -> None:
    try:
        from rich.console import Console

        Console(stderr=True).print(msg, highlight=False)
    except Exception:  # pragma: no cover - rich missing or broken terminal
        print(msg)


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


@contextlib.contextmanager
def connect(cfg: ClusterSection, *, quiet: bool = False) -> Iterator[object | None]:
    """Open the configured scheduler for the duration of the block.

    Yields the ``distributed.Client`` (or None for the in-process schedulers);
    prints the dashboard link. Everything is closed on exit.
    """
    say = (lambda _m: None) if quiet else _say
    kind = cfg.kind
    if kind in ("threads", "synchronous"):
        with dask.config.set(scheduler=kind):
            say(f"dask: in-process '{kind}' scheduler")
            yield None
        return

    from distributed import Client, LocalCluster

    stack = contextlib.ExitStack()
    with stack:
        if kind == "cuda" and _cuda_count() == 0:
            warnings.warn("cluster.kind 'cuda' but no CUDA device is visible: using a LocalCluster",
                          stacklevel=2)
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
        say(f"dask: {kind} cluster, {len(client.scheduler_info().get('workers', {}))} workers"
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
