"""Decoded chunks shared by the threads of one pass over a store.

A raster stage's tasks are smaller than the chunks they read: four 512² field tasks
lie in each 1024² AE chunk, and reading one of them decompresses the whole 64 MiB
chunk. :class:`~.reads.CheckedWindow` with a ``reuse`` token reads through
:data:`CACHE`, so that the tasks of one chunk, whichever threads of the process run
them and even at the same moment, read and verify it once:

- a chunk being read by one thread is waited for by the others that want it (never
  read twice at once: with the threaded scheduler both threads usually start on the
  same chunk together);
- it holds at most one chunk per thread that has read through it in the pass (the
  memory a thread-local "last chunk" would hold), the least recently used going first;
- a new token (the next pass) drops what the previous one held, and
  :meth:`ChunkCache.release` drops a pass's chunks when it ends.

Measured on the 8.4 M px benchmark (``benchmarks/bench_infer.py``, 2 threads): a
thread-local last chunk read every AE chunk four times (the scheduler ran the two
threads on the same chunk at once, and each row of field chunks again: strace saw four
opens per chunk) and the command faulted in 1.08 M pages; shared, each chunk is opened
and decompressed once and the command faults in 354 k pages.

Chunks are handed out read-only; a failed read is not kept (the next reader tries
again and gets the same error, e.g. a :class:`~.chunks.CorruptStoreError`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

__all__ = ["CACHE", "ChunkCache"]


class _Slot:
    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: np.ndarray | None = None


class ChunkCache:
    """Chunks keyed by ``(token, key)``; one token (pass) at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._token: Hashable | None = None
        self._threads: set[int] = set()
        self._slots: OrderedDict[Hashable, _Slot] = OrderedDict()
        self.reads = 0  # chunks read through the cache (for tests and benchmarks)

    def get(self, token: Hashable, key: Hashable, read: Callable[[], np.ndarray]) -> np.ndarray:
        """The chunk ``key`` of pass ``token``: from the cache, from another thread's
        read of it in progress, or from ``read()`` (then kept, read-only)."""
        while True:
            with self._lock:
                if token != self._token:
                    self._token, self._threads, self._slots = token, set(), OrderedDict()
                self._threads.add(threading.get_ident())
                slot = self._slots.get(key)
                owner = slot is None
                if owner:
                    slot = self._slots[key] = _Slot()
                    self._evict()
                else:
                    self._slots.move_to_end(key)
            if owner:
                return self._fill(token, key, slot, read)
            slot.done.wait()
            if slot.value is not None:
                return slot.value
            # the owner's read failed (and removed the slot): read it ourselves

    def _fill(self, token: Hashable, key: Hashable, slot: _Slot,
              read: Callable[[], np.ndarray]) -> np.ndarray:
        try:
            block = read()
            block.flags.writeable = False  # shared by every window that reuses it
            slot.value = block
            with self._lock:
                self.reads += 1
            return block
        except BaseException:
            with self._lock:
                if token == self._token and self._slots.get(key) is slot:
                    del self._slots[key]
            raise
        finally:
            slot.done.set()

    def _evict(self) -> None:
        """Least recently used first, down to one chunk per thread of the pass."""
        while len(self._slots) > max(1, len(self._threads)):
            self._slots.popitem(last=False)

    def release(self, token: Hashable) -> None:
        """Drop pass ``token``'s chunks (another pass's are left alone)."""
        with self._lock:
            if token == self._token:
                self._token, self._threads, self._slots = None, set(), OrderedDict()

    def held(self) -> int:
        """Chunks held now."""
        with self._lock:
            return len(self._slots)


#: the process's cache (every pass reading with a ``reuse`` token)
CACHE = ChunkCache()
