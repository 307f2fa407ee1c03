"""Inputs outside the workspace (tiles, POI files, label files), local or remote.

One rule for every input: a path with a protocol (``s3://``, ``gs://``, ``az://``,
``https://``, ``memory://`` …) is opened through fsspec — the same filesystem layer and
the same configuration as the workspace — and a ``/vsi…`` path is left to GDAL. So a
single S3 setting serves the tiles, the POIs, the labels and the workspace:

- the standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_ENDPOINT_URL`` for an S3-compatible server, ``AWS_PROFILE``), which s3fs reads
  through botocore; or
- fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL=…``, ``~/.config/fsspec/s3.json``).

GDAL needs no settings of its own: rasterio reads a remote tile through the fsspec file
(``rasterio.open(..., opener=fs)``). Reading ``s3://`` through GDAL's ``/vsis3/`` instead
would need the same endpoint repeated in GDAL's variables, and GDAL's size probe fails
on servers that answer a ranged GET with 200 (``rclone serve s3``: "TIFFReadDirectory:
Failed to read directory at offset …").

Transient failures (a reset connection, a timeout, a throttled request) are retried by
:func:`with_retries`; callers count the retries into their stage's manifest.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["RETRY_ATTEMPTS", "expand", "gdal_read_failure", "is_url", "open_raster_file",
           "read_vector", "retry_count", "transient", "with_retries"]

T = TypeVar("T")

#: tries of one remote operation (the first and up to this many − 1 retries)
RETRY_ATTEMPTS = int(os.environ.get("AETHER_SCALE_RETRY_ATTEMPTS", "4"))
#: seconds before the first retry; doubled for each further one (0.5, 1, 2 s)
RETRY_DELAY_S = float(os.environ.get("AETHER_SCALE_RETRY_DELAY_S", "0.5"))

_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                    errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN}
_TRANSIENT_WORDS = ("timed out", "timeout", "connection", "temporarily", "throttl", "slow down",
                    "slowdown", "service unavailable", "internal error", "503", "500", "curl")
_local = threading.local()


def is_url(path: str | os.PathLike) -> bool:
    """A path with a protocol other than ``file://`` (GDAL ``/vsi…`` paths are not URLs)."""
    p = str(path)
    return "://" in p and not p.startswith("file://")


def _fs(path: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(path)


def _with_protocol(fs: Any, path: str) -> str:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if "://" in path else f"{proto}://{path}"


def expand(pattern: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files a URL names: itself, a glob's matches or a folder's files ending in
    ``suffixes`` (sorted). Empty when nothing matches; URLs keep their protocol."""
    fs, p = _fs(pattern)
    if any(ch in p for ch in "*?["):
        found = [f for f in with_retries(lambda: fs.glob(p), what=pattern)
                 if with_retries(lambda f=f: fs.isfile(f), what=pattern)]
    elif with_retries(lambda: fs.isdir(p), what=pattern):
        found = [f for f in with_retries(lambda: fs.find(p, maxdepth=1), what=pattern)
                 if f.lower().endswith(suffixes)]
    elif with_retries(lambda: fs.exists(p), what=pattern):
        found = [p]
    else:
        found = []
    return [_with_protocol(fs, f) for f in sorted(found)]


@contextlib.contextmanager
def open_raster_file(path: str, **gdal_env: Any) -> Iterator[Any]:
    """``rasterio.open(path)`` for reading, a URL through its fsspec filesystem."""
    import rasterio

    with rasterio.Env(**gdal_env):
        if is_url(path) and not str(path).startswith("/vsi"):
            fs, p = _fs(path)
            with rasterio.open(p, opener=fs) as src:
                yield src
        else:
            with rasterio.open(path) as src:
                yield src


def read_vector(path: str, **kwargs: Any) -> Any:
    """A GeoDataFrame from a vector file (GeoParquet, GeoJSON, GeoPackage, …); a URL is
    read through fsspec."""
    import geopandas as gpd

    parquet = str(path).lower().endswith((".parquet", ".geoparquet"))
    if not is_url(path):
        return gpd.read_parquet(path, **kwargs) if parquet else gpd.read_file(path, **kwargs)
    fs, p = _fs(path)
    if parquet:
        return with_retries(lambda: gpd.read_parquet(p, filesystem=fs, **kwargs), what=path)

    def read() -> Any:
        with fs.open(p, "rb") as f:
            return gpd.read_file(f, **kwargs)

    return with_retries(read, what=path)


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a passing failure of a remote store (worth a retry):
    a reset or refused connection, a timeout, a throttled or 5xx request — or an
    exception that says so itself (``exc.transient = True``). A missing file, a denied
    request or bad data are not."""
    if getattr(exc, "transient", False):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    name = type(exc).__name__
    if any(w in name for w in ("Connection", "Timeout", "ServerDisconnected", "ClientPayload",
                               "ClientOSError", "EndpointConnection", "ReadTimeout")):
        return True
    if isinstance(exc, OSError) or name.endswith(("ClientError", "RasterioIOError")):
        msg = str(exc).lower()
        return any(w in msg for w in _TRANSIENT_WORDS)
    return False


def gdal_read_failure(exc: BaseException) -> bool:
    """Whether a failed GDAL read of a remote file is worth a retry: GDAL reports the
    opener's network errors as its own I/O errors (a reset connection becomes "No such
    file or directory"), so any of them is, except Python's own FileNotFoundError."""
    from rasterio.errors import RasterioError

    return isinstance(exc, (RasterioError, OSError)) and not isinstance(exc, FileNotFoundError)


def retry_count() -> int:
    """Retries made so far by :func:`with_retries` in this thread (callers take the
    difference around a task to count its retries)."""
    return int(getattr(_local, "retries", 0))


def with_retries(fn: Callable[[], T], *, what: str, attempts: int | None = None,
                 is_transient: Callable[[BaseException], bool] = transient) -> T:
    """``fn()``, tried again after a transient failure (see :func:`transient`) with
    exponential back-off, up to ``attempts`` tries; every retry is counted
    (:func:`retry_count`). The last failure, or any other, is raised unchanged."""
    from .logs import get_logger

    attempts = RETRY_ATTEMPTS if attempts is None else max(1, attempts)
    for k in range(attempts):
        try:
            return fn()
        except Exception as e:
            if k + 1 >= attempts or not is_transient(e):
                raise
            _local.retries = retry_count() + 1
            delay = RETRY_DELAY_S * 2**k
            get_logger("storage").warning(
                f"{what}: {type(e).__name__}: {e} — retry {k + 1} of {attempts - 1} "
                f"in {delay:.1f} s")
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
