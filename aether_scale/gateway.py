"""Dask Gateway clients (``cluster.kind: gateway``), split from :mod:`aether_scale.cluster`.

:func:`_gateway_client` opens a new cluster on the configured gateway and yields its
client: a reachability probe first (an unreachable gateway fails within seconds, naming
the setting), the server's offered options checked against ``cluster_options``, the idle
timeout sent as the server's ``idle_timeout`` option, fixed or adaptive scaling, and the
cluster shut down on exit. :class:`GatewayError` carries every failure with its fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dask

from .cluster import import_optional
from .config import ClusterSection
from .logs import get_logger

__all__ = ["GatewayError"]

log = get_logger("cluster")


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
