"""Compaction of the text cache: merging small shards, safely under concurrency.

Every run that encodes something appends shards (one per ``text.flush_texts`` texts), so
incremental runs would pile up small shards; a run that appended and left more than
``TextCache.max_shards`` (default :data:`DEFAULT_MAX_SHARDS`) merges the smallest ones
into one shard (:meth:`CacheCompaction.compact`, also :func:`compact_cache`). The merged
shard is complete before any source is deleted, so every text stays reachable at every
moment, whatever crashes; a reader whose shard disappeared finds the rows again in the
merged shard. :class:`CacheCompaction` holds these methods of
:class:`~aether_scale.text.cache.TextCache`; :func:`~aether_scale.text.cache.compact_cache`
compacts a cache folder on demand.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MAX_SHARDS", "CacheCompaction"]

#: Default ``max_shards`` of a cache: compaction starts once a model's cache holds more
#: shards than this. Every shard costs one key-file read per cold ``refresh()`` and one
#: open file handle + memory map once a ``gather()`` touches it; 64 keeps a cold refresh
#: at 64 small reads (well under a second even at ~10 ms per request on NFS or
#: FUSE-mounted object stores) and the handles far below the usual limit of 1024 per
#: process. A run appends one shard per ``text.flush_texts`` new texts (usually one or
#: a few per region) and compaction merges down to 32, so a region-by-region rebuild
#: rewrites shards after about every 33 appended, not on every run.
DEFAULT_MAX_SHARDS = 64

#: Age (seconds) after which compaction deletes leftovers of crashed writers: temporary
#: files and vectors / source lists without a key file. A writer in flight renames its
#: files within seconds to minutes, so a day cannot race one.
STALE_S = 24 * 3600

#: Age (seconds) after which a compaction lock is taken to be a crashed holder's.
LOCK_STALE_S = 15 * 60


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to stable storage (best effort where
    the platform cannot): a merged shard must survive a power cut before the shards it
    replaces are deleted."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)



def _new_shard_name() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


class CacheCompaction:
    """The compaction half of :class:`~aether_scale.text.cache.TextCache` (a mixin: it
    uses the cache's index, shard list and writers)."""

    def compact(self, max_shards: int | None = None, *, stale_s: float = STALE_S) -> dict[str, Any]:
        """Merge the smallest shards into one when more than ``max_shards`` are complete.

        Safe while other processes append, read or compact: the merged shard (each text
        once) is written like any shard — vectors, then the list of shards it replaces
        (``<name>.sources.json``), then keys, each by atomic rename after an fsync — and
        only then are the sources deleted, keys first. A crash before that leaves
        duplicates (which lookups tolerate); the next compaction deletes the sources a
        complete merged shard lists, and leftovers of crashed writers older than
        ``stale_s`` seconds. Merging down to half of ``max_shards`` (not to the limit)
        lets several later runs append before the next merge, and merging the smallest
        shards first rewrites the big, already merged ones rarely.

        Returns stats: ``shards_before``, ``shards_after``, ``merged`` (shards merged),
        ``rows_in``, ``rows_out``, ``finished`` (sources of earlier, interrupted
        compactions removed), ``kept`` (sources that could not be deleted, e.g. open on
        Windows: harmless duplicates, retried next time), ``swept``, ``busy`` (True when
        another compaction held the lock and this one did nothing), ``seconds``.
        """
        max_shards = self.max_shards if max_shards is None else int(max_shards)
        if max_shards < 1:
            raise ValueError(f"max_shards must be >= 1 (got {max_shards}); "
                             "use 1 to merge every shard of the cache into one")
        t0 = time.perf_counter()
        self.refresh()
        stats: dict[str, Any] = {"shards_before": self.n_shards, "merged": 0, "rows_in": 0,
                                 "rows_out": 0, "finished": 0, "kept": 0, "swept": 0,
                                 "busy": False}
        with self._compaction_lock() as held:
            if held:
                self._compact_locked(max_shards, stale_s, stats)
            else:
                stats["busy"] = True
        self.refresh()
        stats["shards_after"] = self.n_shards
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        return stats

    @contextlib.contextmanager
    def _compaction_lock(self) -> Iterator[bool]:
        """Advisory lock (``.compact.lock``, created exclusively): compactions running
        at once would each write a merged copy of the same shards — correct, but
        wasted work and duplicated data — so a second one skips (yields False). A lock
        older than :data:`LOCK_STALE_S` (its holder crashed; a live holder touches it
        between shards) is taken over."""
        lock = self.dir / ".compact.lock"
        fd = None
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if age < LOCK_STALE_S:
                    break
                lock.unlink(missing_ok=True)
        if fd is None:
            yield False
            return
        try:
            os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
            os.close(fd)
            yield True
        finally:
            lock.unlink(missing_ok=True)

    def _touch_lock(self) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.dir / ".compact.lock")

    def _compact_locked(self, max_shards: int, stale_s: float, stats: dict[str, Any]) -> None:
        removed, kept = self._finish_interrupted()
        stats["finished"], stats["kept"] = removed, kept
        self.refresh()
        sources = self._plan_compaction(max_shards)
        if sources:
            merged = self._write_merged(sources)
            if merged is not None:
                name, used, rows_in, rows_out = merged
                stats.update(merged=len(used), rows_in=rows_in, rows_out=rows_out)
                _, kept = self._remove_shards(used)
                stats["kept"] += kept
                if not kept:  # nothing left to finish: the list has done its job
                    (self.dir / f"{name}.sources.json").unlink(missing_ok=True)
        stats["swept"] = self._sweep_stale(stale_s)

    def _plan_compaction(self, max_shards: int) -> list[str]:
        """Names of the shards to merge: none while at most ``max_shards`` are live, else
        the smallest ones, enough to leave ``max_shards // 2`` (at least one) shards."""
        live = self._live_shards()
        if len(live) <= max_shards:
            return []
        target = max(1, max_shards // 2)
        k = min(len(live), len(live) - target + 1)
        if k < 2:
            return []
        live.sort(key=lambda s: (self._shard_rows(s), self._shards[s]))
        return [self._shards[s] for s in live[:k]]

    def _write_merged(self, sources: list[str]) -> tuple[str, list[str], int, int] | None:
        """Write one shard holding every distinct key of ``sources``; returns ``(name,
        sources used, rows read, rows written)`` or None when fewer than two sources are
        still there. A source already gone was merged by a concurrent compaction (whose
        shard holds its texts) and is left out. Sources are not deleted here."""
        parts: list[tuple[str, np.ndarray, np.ndarray]] = []
        dim: int | None = None
        for name in sources:
            try:
                k = np.load(self.dir / f"{name}.key.npy")
                v = np.load(self.dir / f"{name}.vec.npy", mmap_mode="r")
            except FileNotFoundError:
                continue
            vec_path = self.dir / f"{name}.vec.npy"
            if v.ndim != 2 or len(v) != len(k):
                raise ValueError(f"{vec_path}: shape {v.shape} does not match its {len(k)} "
                                 f"keys; the shard is damaged: delete {name}.key.npy and "
                                 f"{name}.vec.npy (its texts are encoded again when needed)")
            if dim is None:
                dim = int(v.shape[1])
            elif v.shape[1] != dim:
                raise ValueError(f"{vec_path}: {v.shape[1]}-d vectors in a cache of {dim}-d "
                                 f"ones ({self.dir}); delete that shard (both files)")
            parts.append((name, k.astype("S16", copy=False), v))
        if len(parts) < 2 or dim is None:
            return None
        sizes = np.array([len(k) for _, k, _ in parts], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        all_keys = np.concatenate([k for _, k, _ in parts])
        owner = np.repeat(np.arange(len(parts)), sizes)
        uniq, first = np.unique(all_keys, return_index=True)  # first copy of each text
        name = _new_shard_name()
        vec_tmp = self.dir / f".{name}.vec.npy.tmp"
        out = np.lib.format.open_memmap(vec_tmp, mode="w+", dtype=np.float32,
                                        shape=(len(uniq), dim))
        first_owner = owner[first]
        for i, (_, _, v) in enumerate(parts):
            dest = np.flatnonzero(first_owner == i)
            if len(dest):
                out[dest] = v[first[dest] - starts[i]]
            self._touch_lock()
        out.flush()
        del out
        _fsync(vec_tmp)
        os.replace(vec_tmp, self.dir / f"{name}.vec.npy")
        used = [n for n, _, _ in parts]
        del parts  # release the source maps (Windows cannot delete a mapped file)
        src_tmp = self.dir / f".{name}.sources.json.tmp"
        with open(src_tmp, "w") as f:
            json.dump({"sources": used}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(src_tmp, self.dir / f"{name}.sources.json")
        self._save(uniq, self.dir / f"{name}.key.npy", durable=True)
        _fsync(self.dir)  # the renames themselves
        return name, used, int(len(all_keys)), int(len(uniq))

    def _remove_shards(self, names: list[str]) -> tuple[int, int]:
        """Delete shards (keys first, so no reader sees a key file without vectors);
        ``(removed, kept)``: a file that cannot be deleted leaves the shard in place."""
        removed = kept = 0
        for name in names:
            s = self._index.get(name)
            if s is not None:
                self._mmaps.pop(s, None)
            try:
                (self.dir / f"{name}.key.npy").unlink(missing_ok=True)
            except OSError:
                kept += 1
                continue
            for suffix in (".vec.npy", ".sources.json"):
                try:
                    (self.dir / f"{name}{suffix}").unlink(missing_ok=True)
                except OSError:
                    pass  # without its key file it is a leftover, swept when stale
            removed += 1
        return removed, kept

    def _finish_interrupted(self) -> tuple[int, int]:
        """Delete the sources that complete merged shards list and that are still there
        (a compaction stopped before deleting them); drop lists with nothing left to do.
        Sound under concurrency: a merged shard holds every text of its sources and
        cannot itself be deleted before a newer shard holds them."""
        removed = kept = 0
        for src_path in self.dir.glob("*.sources.json"):
            if src_path.name.startswith("."):
                continue
            merged = src_path.name[: -len(".sources.json")]
            if not (self.dir / f"{merged}.key.npy").exists():
                continue  # merged shard incomplete: its sources are still needed
            try:
                sources = json.loads(src_path.read_text())["sources"]
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{src_path}: unreadable list of merged shards ({e}); "
                                 "delete the file (the cache stays correct without it)") from None
            left = [n for n in sources if (self.dir / f"{n}.key.npy").exists()]
            r, k = self._remove_shards(left)
            removed += r
            kept += k
            if not k:
                src_path.unlink(missing_ok=True)
        return removed, kept

    def _sweep_stale(self, stale_s: float) -> int:
        """Delete crashed writers' leftovers older than ``stale_s`` seconds: hidden
        ``*.tmp`` files, and vectors or source lists whose key file never appeared (or
        was deleted by a compaction that stopped before deleting the rest)."""
        cutoff = time.time() - stale_s
        swept = 0
        for p in self.dir.iterdir():
            n = p.name
            if n.startswith("."):
                stale = n.endswith(".tmp")
            elif n.endswith((".vec.npy", ".sources.json")):
                stem = n.removesuffix(".vec.npy").removesuffix(".sources.json")
                stale = not (self.dir / f"{stem}.key.npy").exists()
            else:
                stale = False
            try:
                if stale and p.stat().st_mtime < cutoff:
                    p.unlink()
                    swept += 1
            except OSError:
                pass  # gone already, or in use
        return swept
