"""glibc's allocator thresholds: the one place that sets them.

Large NumPy and torch temporaries are ``malloc``'d and freed over and over (a projector
batch's activations, a pool task's per-batch run arrays, a training step's temporaries).
Whether a freed block is kept for the next one or handed back to the kernel — so that
the next one faults its pages in again, one by one — is glibc's choice, governed by two
thresholds (``mallopt(3)``: ``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``):

- :func:`keep_freed_memory` — for a dask worker's tasks (infer, pool), once per process.
  dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``
  (``distributed.nanny.pre-spawn-environ``, so that idle workers give memory back).
  Setting any threshold turns off glibc's adaptive mmap threshold: every block above
  128 KiB becomes its own ``mmap``, unmapped again on free. Measured here: infer's
  stage ran at half speed on workers (49.6 vs 26.1 s for 8.4 M px); a pool task's
  0.1–2 MB temporaries faulted in 1.1 GB per raster chunk (2.3 M faults and 5.9 s of
  system time per worker at 1 M POIs, against 19 k faults with these thresholds). Only
  where such a variable is set (elsewhere glibc adapts by itself).
- :func:`retained_heap` — for the length of a block, in any process (CPU training:
  ≈2,000 faults per step at batch 512 with glibc's defaults, ≈1 with it).

Both do nothing off glibc (musl has no ``mallopt``) and with ``AETHER_KEEP_MALLOC=1``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["keep_freed_memory", "release_freed_memory", "retained_heap"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_GLIBC_DEFAULT = 128 * 1024  # both thresholds' defaults

#: what :func:`keep_freed_memory` sets: blocks up to 8 MiB (a projector batch's
#: activations are ≤ 3 MiB, a pool batch's temporaries ≤ 2 MiB) come from the heap, and
#: up to 32 MiB of free heap is kept for the next ones instead of going back to the OS
WORKER_MMAP_THRESHOLD, WORKER_TRIM_THRESHOLD = 8 * 2**20, 32 * 2**20

_lock = threading.Lock()
_worker_tuned: list[tuple[int, int]] = []


@functools.cache
def _libc() -> Any:
    """glibc's ``mallopt``/``malloc_trim``, or None (another C library, or switched off)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.mallopt, lib.malloc_trim  # noqa: B018 - both must exist (glibc)
    except (OSError, AttributeError):
        return None
    return lib


def _usable() -> Any:
    return None if os.environ.get("AETHER_KEEP_MALLOC") == "1" else _libc()


def keep_freed_memory() -> tuple[int, int] | None:
    """In a process started with glibc's ``MALLOC_TRIM_THRESHOLD_`` (every dask worker),
    keep freed blocks for the next allocations (once per process; returns the two
    thresholds set, or None where nothing was set)."""
    if _worker_tuned:
        return _worker_tuned[0]
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return None
    lib = _usable()
    if lib is None:
        return None
    with _lock:
        if not _worker_tuned:
            if (lib.mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD) != 1
                    or lib.mallopt(_M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD) != 1):
                return None
            _worker_tuned.append((WORKER_MMAP_THRESHOLD, WORKER_TRIM_THRESHOLD))
    return _worker_tuned[0]


@contextlib.contextmanager
def retained_heap(enabled: bool = True) -> Iterator[bool]:
    """While active, keep freed blocks of up to 32 MiB in the heap instead of unmapping
    them; on exit glibc's default thresholds (128 KiB) are set back and the heap is
    trimmed, so the rest of the process is unaffected. Yields whether it took effect:
    False off glibc, when ``enabled`` is false, or with ``AETHER_KEEP_MALLOC=1``."""
    lib = _usable() if enabled else None
    if lib is not None and not (lib.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                                and lib.mallopt(_M_TRIM_THRESHOLD, 1 << 30)):
        lib = None
    try:
        yield lib is not None
    finally:
        if lib is not None:
            lib.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
            lib.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
            lib.malloc_trim(0)


def release_freed_memory() -> None:
    """Collect Python's garbage cycles and hand glibc's free heap back to the OS (run on a
    dask worker whose finished tasks left it above dask's memory pause threshold)."""
    import gc

    gc.collect()
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
