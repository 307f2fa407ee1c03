"""Checksummed, resumable Zarr stores: the machinery every workspace Zarr artifact shares.

**Integrity.** Every array of a workspace store is written with crc32c as its last
codec (zarr v3's ``Crc32cCodec``: a checksum of the compressed bytes of each chunk,
checked on every read), and a finished store carries an index of its chunks,
``aether_chunks.json``: per array, the chunk grid and the byte size of every stored
chunk (chunks never stored hold the fill value by design and are listed as such).
:func:`verify_store` compares the index with one listing of the store, so a deleted,
truncated or replaced chunk is found before any data is read; the readers of
:mod:`.reads` read chunk by chunk and turn a checksum or decode failure into a
:class:`CorruptStoreError` naming the store and the chunk — a damaged store is never
read as data.

**Resume.** A stage builds a store inside its work folder (see
:mod:`aether_scale.workspace`): the template (metadata and coordinates) first, then one
task per chunk that computes the chunk, writes it and records it in a
:class:`~aether_scale.stores.ledger.Ledger`
(one small file per chunk, written atomically after the chunk). A killed run leaves the
template, the chunks and the ledger; the rerun (same inputs and config, hence the same
work folder) skips every recorded chunk and computes only the missing ones. Chunks are
pure functions of the inputs, so the finished store is byte-identical to an
uninterrupted run. :func:`finish_store` consolidates the metadata the same way for
every store and writes the index last: a store without an index was never finished.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

__all__ = [
    "CHUNK_INDEX",
    "CorruptStoreError",
    "StoreRef",
    "chunk_slices",
    "compressors",
    "finish_store",
    "read_index",
    "verify_store",
]

CHUNK_INDEX = "aether_chunks.json"
INDEX_FORMAT = "aether_scale.chunks/1"


class CorruptStoreError(ValueError):
    """A workspace store whose chunks do not match its index or fail their checksum."""


def compressors(level: int | None = 0) -> tuple[Any, ...]:
    """The codecs after serialisation for every workspace array: zstd, then crc32c.

    zstd ``level`` 0 is zarr's own default (zstd's level 3); the field uses 1
    (:data:`~.field.ZSTD_LEVEL`). ``level=None`` leaves zstd out, for arrays of float32
    vectors that do not compress (the triplets' vectors: zstd saves 11 % of their bytes
    and makes every streamed epoch's read 1.7× slower). crc32c comes last so that it
    covers the bytes on disk (a flipped bit or a truncated file fails the check before
    decompression).
    """
    from zarr.codecs import Crc32cCodec, ZstdCodec

    if level is None:
        return (Crc32cCodec(),)
    return (ZstdCodec(level=level), Crc32cCodec())


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
    """Silence the zarr warnings a user can do nothing about (consolidated metadata is
    not in the v3 spec yet; xarray reads it and every store here writes it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="xarray")
        # the chunk index beside zarr.json is not a Zarr node (zarr says so when it lists)
        warnings.filterwarnings("ignore", message=".*is not recognized as a component of a "
                                "Zarr hierarchy.*")
        yield


# --------------------------------------------------------------------------- store refs
@dataclass(frozen=True)
class StoreRef:
    """A Zarr store's location: a path or fsspec URL plus its storage options (as JSON,
    so the reference is hashable and cheap to ship to dask workers)."""

    uri: str
    options: str = "{}"

    @classmethod
    def of(cls, uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> StoreRef:
        return cls(str(uri).rstrip("/"), json.dumps(dict(storage_options or {}), sort_keys=True,
                                                   default=str))

    @property
    def storage_options(self) -> dict[str, Any] | None:
        return json.loads(self.options) or None

    @cached_property
    def _fs(self) -> tuple[Any, str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.uri, **(self.storage_options or {}))
        return fs, root.rstrip("/")

    @property
    def fs(self) -> Any:
        return self._fs[0]

    @property
    def root(self) -> str:
        """The store's path on :attr:`fs` (no protocol)."""
        return self._fs[1]

    @property
    def name(self) -> str:
        return os.path.basename(self.uri)

    def group(self, mode: str = "r") -> Any:
        import zarr

        kw = {"storage_options": self.storage_options} if self.storage_options else {}
        return zarr.open_group(self.uri, mode=mode, **kw)

    def array(self, name: str, mode: str = "r", *, write_empty_chunks: bool = False) -> Any:
        """The Zarr array ``name`` of this store (opened fresh: a few ms, never stale).

        ``write_empty_chunks``: write a chunk even when it holds only the fill value —
        for writers that leave out empty chunks themselves, so that Zarr does not
        compare every chunk with the fill value first (with a NaN fill, a full
        ``array_equal(equal_nan=True)`` pass: ~10 % of a field task's time)."""
        import zarr

        kw = {"storage_options": self.storage_options} if self.storage_options else {}
        arr = zarr.open_array(f"{self.uri}/{name}", mode=mode, **kw)
        return arr.with_config({"write_empty_chunks": True}) if write_empty_chunks else arr


def chunk_grid(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(1, math.ceil(s / c)) if s else 0 for s, c in zip(shape, chunks, strict=True))


def chunk_slices(idx: Sequence[int], shape: Sequence[int], chunks: Sequence[int]) -> tuple[slice, ...]:
    """The region of chunk ``idx`` of an array (clipped at the array's edge)."""
    return tuple(slice(i * c, min((i + 1) * c, s)) for i, s, c in zip(idx, shape, chunks, strict=True))


def chunk_key(idx: Sequence[int]) -> str:
    """Index key of a chunk, e.g. ``"1.0.0"`` (also its ledger record name)."""
    return ".".join(str(int(i)) for i in idx)


def _chunk_path(ref: StoreRef, array: str, encoded: str) -> str:
    return f"{ref.root}/{array}/{encoded}"


def _encode_key(arr: Any, idx: Sequence[int]) -> str:
    return arr.metadata.chunk_key_encoding.encode_chunk_key(tuple(int(i) for i in idx))


# --------------------------------------------------------------------------- index
def _stored_chunks(ref: StoreRef) -> dict[str, dict[str, int]]:
    """``{array: {encoded chunk key: bytes}}`` from one recursive listing of the store."""
    fs = ref.fs
    out: dict[str, dict[str, int]] = {}
    prefix = ref.root + "/"
    for path, info in fs.find(ref.root, detail=True).items():
        rel = path[len(prefix):] if path.startswith(prefix) else path
        if rel.endswith(".partial"):  # a writer's temporary (zarr never reads these)
            continue
        if rel.endswith("/c"):  # the single chunk of a 0-d array (e.g. spatial_ref)
            array, key = rel[:-2], "c"
        elif "/c/" in rel:
            array, _, rest = rel.partition("/c/")
            key = f"c/{rest}"
        else:  # metadata (zarr.json), the index, anything that is not a chunk
            continue
        out.setdefault(array, {})[key] = int(info.get("size") or 0)
    return out


def _arrays(ref: StoreRef) -> dict[str, Any]:
    g = ref.group("r")
    return {name: arr for name, arr in g.arrays()}


def finish_store(ref: StoreRef, *, tracked: Mapping[str, Mapping[str, Mapping[str, Any]]] | None
                 = None) -> dict[str, Any]:
    """Consolidate the store's metadata and write its chunk index (last).

    ``tracked`` maps an array to its ledger records (``{chunk key: {"empty": bool, …}}``);
    for those arrays every chunk of the grid must have a record, a chunk recorded as
    written must be on disk and a chunk recorded empty must not be — otherwise
    :class:`CorruptStoreError` (the build went wrong; nothing is published).
    Returns the index.
    """
    import zarr

    tracked = dict(tracked or {})
    # temporaries of chunk writes a killed run left behind (zarr writes <chunk>.<id>.partial,
    # then renames): the chunk itself was recomputed, the temporary is garbage
    leftovers = [p for p in ref.fs.find(ref.root) if p.endswith(".partial")]
    if leftovers:
        ref.fs.rm(leftovers)
    with quiet_zarr():
        zarr.consolidate_metadata(ref.uri, **({"storage_options": ref.storage_options}
                                              if ref.storage_options else {}))
    on_disk = _stored_chunks(ref)
    index: dict[str, Any] = {"format": INDEX_FORMAT, "arrays": {}}
    for name, arr in sorted(_arrays(ref).items()):
        shape, chunks = tuple(arr.shape), tuple(arr.chunks)
        files = on_disk.get(name, {})
        if name in tracked:
            records = tracked[name]
            for idx in np.ndindex(*chunk_grid(shape, chunks)):
                k = chunk_key(idx)
                rec = records.get(k)
                enc = _encode_key(arr, idx)
                if rec is None:
                    raise CorruptStoreError(f"{ref.uri}: chunk {name}/{enc} was never computed "
                                            "(no ledger record); the build is incomplete")
                if rec.get("empty") and enc in files:
                    raise CorruptStoreError(f"{ref.uri}: chunk {name}/{enc} is on disk but was "
                                            "recorded as empty")
                if not rec.get("empty") and enc not in files:
                    raise CorruptStoreError(f"{ref.uri}: chunk {name}/{enc} was recorded as "
                                            "written but is not on disk")
        index["arrays"][name] = {"shape": list(shape), "chunks": list(chunks),
                                 "stored": dict(sorted(files.items()))}
    data = json.dumps(index, indent=1, sort_keys=True).encode()
    ref.fs.pipe_file(f"{ref.root}/{CHUNK_INDEX}", data)
    return index


def read_index(ref: StoreRef) -> dict[str, Any] | None:
    """The store's chunk index, or None when it has none (not written by a stage here)."""
    p = f"{ref.root}/{CHUNK_INDEX}"
    try:
        raw = ref.fs.cat_file(p)
    except FileNotFoundError:
        return None
    try:
        idx = json.loads(raw)
        if idx.get("format") != INDEX_FORMAT:
            raise ValueError(f"unknown format {idx.get('format')!r}")
        return idx
    except (ValueError, AttributeError) as e:
        raise CorruptStoreError(f"{ref.uri}/{CHUNK_INDEX} is unreadable ({e}); the store is "
                                "damaged") from None


def verify_store(ref: StoreRef, *, fix: str) -> dict[str, Any] | None:
    """Check every chunk the index lists against one listing of the store.

    Raises :class:`CorruptStoreError` naming the store, the chunk and ``fix`` (what to
    run) when a chunk is missing, has another size, or appears where none was written.
    Returns the index (None for a store without one: warned once, its checksums still
    hold but a deleted chunk cannot be told from fill values).
    """
    index = read_index(ref)
    if index is None:
        warnings.warn(f"{ref.uri} has no chunk index ({CHUNK_INDEX}): it was not written by "
                      "aether_scale, so a deleted chunk would read as fill values; "
                      f"{fix} to rebuild it", stacklevel=3)
        return None
    on_disk = _stored_chunks(ref)
    problems: list[str] = []
    for name, entry in index["arrays"].items():
        files = on_disk.get(name, {})
        for key, size in entry["stored"].items():
            got = files.get(key)
            if got is None:
                problems.append(f"chunk {name}/{key} is missing")
            elif got != size:
                problems.append(f"chunk {name}/{key} has {got} bytes, {size} were written "
                                "(truncated or replaced)")
        extra = sorted(set(files) - set(entry["stored"]))
        problems += [f"chunk {name}/{k} was not written by the stage (unexpected file)"
                     for k in extra]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptStoreError(f"{ref.uri}: {problems[0]}{more}; the store is damaged — {fix}")
    return index
