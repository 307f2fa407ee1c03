"""The persistent text-vector cache: shards of (text hash → vector) per model identity.

Layout (safe for concurrent readers, writers and compactions)::

    <cache_dir>/<model_key>/identity.json            what the key stands for
    <cache_dir>/<model_key>/<shard>.vec.npy          (m, dim) float32
    <cache_dir>/<model_key>/<shard>.key.npy          (m,) S16 text hashes
    <cache_dir>/<model_key>/<shard>.sources.json     merged shards only: what it replaced

A shard is complete once its ``.key.npy`` exists; its files are written under
temporary names and renamed, keys last, so readers never see half a shard (a text
encoded twice by two runs is harmless: identical vectors, either copy serves a lookup).
Merging shards is :mod:`.compaction`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .compaction import DEFAULT_MAX_SHARDS, STALE_S, CacheCompaction, _new_shard_name

__all__ = ["DEFAULT_CACHE_DIR", "Lookup", "TextCache", "compact_cache", "text_keys"]

DEFAULT_CACHE_DIR = "~/.cache/aether_scale/text"

_GATHER_TRIES = 5
_REFRESH_PASSES = 5


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """BLAKE2b-128 of each text's UTF-8 bytes, as an ``S16`` array (the cache key)."""
    b2 = hashlib.blake2b
    return np.array([b2(t.encode("utf-8"), digest_size=16).digest() for t in texts], dtype="S16")


@dataclass
class Lookup:
    """Where cached vectors are: shard number and row per query (−1 = not cached)."""

    shard: np.ndarray
    row: np.ndarray

    @property
    def missing(self) -> np.ndarray:
        return self.shard < 0


class TextCache(CacheCompaction):
    """On-disk store of text vectors for one model identity (see module doc).

    Shard numbers in a :class:`Lookup` stay valid for the life of the instance: a shard
    removed by a compaction (here or in another process) is *retired*, not renumbered,
    and :meth:`gather` finds its rows again in the shard that replaced it. Retired
    shards keep their keys in memory until the instance is dropped.
    """

    def __init__(self, root: str | os.PathLike | None, key: str, identity: dict[str, Any], *,
                 max_shards: int = DEFAULT_MAX_SHARDS):
        base = Path(os.path.expanduser(str(root or DEFAULT_CACHE_DIR)))
        self.dir = base / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = key
        #: compaction threshold used by :func:`encode_unique` after a run that appended
        #: (0 = never compact automatically)
        self.max_shards = int(max_shards)
        ident_path = self.dir / "identity.json"
        if not ident_path.exists():
            tmp = self.dir / f".identity-{uuid.uuid4().hex}.json"
            tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
            os.replace(tmp, ident_path)
        self._shards: list[str] = []  # shard number → name; numbers never change
        self._index: dict[str, int] = {}
        self._live: list[bool] = []
        self._start = np.zeros(1, dtype=np.int64)  # entries of shard s: _start[s]:_start[s+1]
        self._keys: np.ndarray = np.empty(0, dtype="S16")  # every entry, retired ones too
        self._order: np.ndarray = np.empty(0, dtype=np.int64)  # live entries, sorted by key
        self._sorted: np.ndarray = np.empty(0, dtype="S16")  # _keys[_order]
        self._mmaps: dict[int, np.ndarray] = {}
        self._dim: int | None = None
        self.refresh()

    # -- index
    @property
    def dim(self) -> int | None:
        """Vector length stored here (None while the cache is empty)."""
        s = 0
        while self._dim is None and s < len(self._shards):  # grows if a shard was replaced
            vec = self._open_vectors(s) if self._live[s] else None
            if vec is not None:
                self._dim = int(vec.shape[1])
            s += 1
        return self._dim

    @property
    def n_shards(self) -> int:
        """Complete shards currently indexed (retired ones not counted)."""
        return sum(self._live)

    def __len__(self) -> int:
        """Indexed entries; a text held by two shards counts twice."""
        return len(self._order)

    def _live_shards(self) -> list[int]:
        return [i for i, live in enumerate(self._live) if live]

    def _shard_rows(self, s: int) -> int:
        return int(self._start[s + 1] - self._start[s])

    def _retire(self, s: int) -> None:
        self._live[s] = False
        self._mmaps.pop(s, None)

    def _reindex(self) -> None:
        live = np.repeat(np.asarray(self._live, dtype=bool), np.diff(self._start))
        idx = np.flatnonzero(live)
        self._order = idx[np.argsort(self._keys[idx], kind="stable")]
        self._sorted = self._keys[self._order]

    def refresh(self) -> None:
        """Pick up shards written since (by this or another process) and retire shards a
        compaction removed (their texts are in the shard that replaced them).

        A shard is only deleted once the shard replacing it is complete, so a listing
        made after noticing a deletion holds the replacement; when a shard vanished
        during the pass (a compaction ran meanwhile), the directory is listed again.
        """
        changed = False
        for _ in range(_REFRESH_PASSES):
            raced = False
            on_disk = self._list_shards()
            for s, name in enumerate(self._shards):
                # confirm: a listing racing a rename may miss an entry
                if (self._live[s] and name not in on_disk
                        and not (self.dir / f"{name}.key.npy").exists()):
                    self._retire(s)
                    changed = raced = True
            keys = [self._keys]
            ends = [self._start]
            end = int(self._start[-1])
            for name in sorted(on_disk.difference(self._index)):
                try:
                    k = np.load(self.dir / f"{name}.key.npy")
                except FileNotFoundError:  # merged and removed since the listing
                    raced = True
                    continue
                self._index[name] = len(self._shards)
                self._shards.append(name)
                self._live.append(True)
                keys.append(k.astype("S16", copy=False))
                end += len(k)
                ends.append(np.array([end], dtype=np.int64))
                changed = True
            if len(keys) > 1:
                self._keys = np.concatenate(keys)
                self._start = np.concatenate(ends)
            if not raced:
                break
        if changed:
            self._reindex()

    def _list_shards(self) -> set[str]:
        """Names of the complete shards on disk now."""
        return {p.name[: -len(".key.npy")] for p in self.dir.glob("*.key.npy")
                if not p.name.startswith(".")}

    def lookup(self, keys: np.ndarray) -> Lookup:
        """Locate ``keys`` (S16) in the cache; vectorised (sort + searchsorted). A text in
        several shards (two runs encoded it, or a compaction was interrupted) resolves
        to one of them: their vectors are identical."""
        n = len(keys)
        shard = np.full(n, -1, dtype=np.int32)
        row = np.full(n, -1, dtype=np.int64)
        if n and len(self._sorted):
            pos = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
            hit = self._sorted[pos] == keys
            entry = self._order[pos[hit]]
            s = np.searchsorted(self._start, entry, side="right") - 1
            shard[hit] = s
            row[hit] = entry - self._start[s]
        return Lookup(shard, row)

    # -- vectors
    def _vectors(self, shard: int) -> np.ndarray:
        m = self._mmaps.get(shard)
        if m is None:
            m = np.load(self.dir / f"{self._shards[shard]}.vec.npy", mmap_mode="r")
            self._mmaps[shard] = m
        return m

    def _open_vectors(self, shard: int) -> np.ndarray | None:
        """The shard's vectors, or None when it is retired or its file was removed (an
        open memory map keeps working after removal on POSIX; a new one cannot open)."""
        if not self._live[shard]:
            return None
        try:
            return self._vectors(shard)
        except FileNotFoundError:
            self._retire(shard)
            self._reindex()
            self.refresh()  # index the shard that replaced it, so lookups keep finding its texts
            return None

    def gather(self, loc: Lookup, dim: int) -> np.ndarray:
        """Vectors for located keys, (n, dim) float32; raises KeyError on a miss.

        Rows whose shard was removed by a concurrent compaction since ``loc`` was made
        are looked up again (by key) in the shards now on disk.
        """
        if loc.missing.any():
            raise KeyError(f"{int(loc.missing.sum())} texts are not in the cache {self.dir}")
        n = len(loc.shard)
        out = np.empty((n, dim), dtype=np.float32)
        shard = np.asarray(loc.shard, dtype=np.int64).copy()
        row = np.asarray(loc.row, dtype=np.int64).copy()
        todo = np.arange(n)
        for attempt in range(_GATHER_TRIES):
            moved = []
            for s in np.unique(shard[todo]):
                sel = todo[shard[todo] == s]
                vec = self._open_vectors(int(s))
                if vec is None:
                    moved.append(sel)
                else:
                    out[sel] = vec[row[sel]]
            if not moved:
                return out
            todo = np.concatenate(moved)
            keys = self._keys[self._start[shard[todo]] + row[todo]]
            if attempt:  # a directory listing can race the rename of the new shard
                time.sleep(0.05 * attempt)
            self.refresh()
            new = self.lookup(keys)
            found = ~new.missing
            shard[todo[found]] = new.shard[found]
            row[todo[found]] = new.row[found]
        raise KeyError(f"{len(todo)} cached texts vanished from {self.dir}: their shards were "
                       "removed and no shard on disk holds them (was the folder edited by "
                       "hand?); rerun to encode them again")

    # -- writing
    def _save(self, arr: np.ndarray, final: Path, *, durable: bool = False) -> None:
        """Write ``arr`` as ``final`` via a hidden temporary and an atomic rename."""
        tmp = self.dir / f".{final.name}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)

    def append(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add a shard (vectors first, keys last, each by atomic rename)."""
        if len(keys) == 0:
            return
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
        name = _new_shard_name()
        self._save(np.ascontiguousarray(vectors, dtype=np.float32), self.dir / f"{name}.vec.npy")
        self._save(np.asarray(keys, dtype="S16"), self.dir / f"{name}.key.npy")
        self.refresh()

    # -- compaction


def compact_cache(cache_dir: str | os.PathLike | None = None, model: str | None = None, *,
                  normalize: bool = True, max_shards: int = DEFAULT_MAX_SHARDS,
                  stale_s: float = STALE_S) -> dict[str, dict[str, Any]]:
    """Compact the text cache under ``cache_dir`` (default ``~/.cache/aether_scale/text``):
    the one of ``model`` (a ``text.model`` value, with ``normalize``), or every model's
    when ``model`` is None. ``max_shards=1`` merges each model's shards into one.

    Safe while other processes use the cache (see :meth:`TextCache.compact`). Returns
    ``{model_key: stats}``. Raises FileNotFoundError when ``cache_dir`` does not exist.
    """
    from .model import model_identity

    base = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR)))
    if not base.is_dir():
        raise FileNotFoundError(f"text cache folder {base} does not exist; set text.cache_dir "
                                "or pass the folder the text stage used")
    if model is not None:
        key, ident = model_identity(model, normalize)
        return {key: TextCache(base, key, ident).compact(max_shards, stale_s=stale_s)}
    out: dict[str, dict[str, Any]] = {}
    for ident_path in sorted(base.glob("*/identity.json")):
        key = ident_path.parent.name
        ident = json.loads(ident_path.read_text())
        out[key] = TextCache(base, key, ident).compact(max_shards, stale_s=stale_s)
    return out
