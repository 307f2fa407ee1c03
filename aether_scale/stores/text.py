"""``text.zarr``: the text embedding of every POI (written by ``text``).

A Zarr group with ``embedding`` (``poi``, ``dim``) float32 and ``poi_id`` (``poi``)
int64 in the row order of ``pois.parquet``, chunked along ``poi``; attributes
``model`` (as configured), ``model_path`` (what was loaded), ``model_key`` (the
cache identity), ``dim``, ``normalize``. Checksummed and indexed like every
workspace store (:mod:`.chunks`); ``xr.open_zarr`` reads it as a Dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .chunks import StoreRef, compressors, finish_store, quiet_zarr, verify_store
from .rows import read_rows

__all__ = ["NAME", "TextStore", "write_text_store"]

NAME = "text.zarr"
_FIX = "run `aether-scale text --force`"


class TextStore:
    """An opened, checked ``text.zarr``: ``poi_id`` in memory, vectors read on demand.

    Raises ``FileNotFoundError`` when absent, ``ValueError`` naming the store, the array
    and the fix when an array is missing or the two are not aligned,
    :class:`~.chunks.CorruptStoreError` when damaged.
    """

    def __init__(self, uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None
                 ) -> None:
        self.ref = StoreRef.of(uri, storage_options)
        self.uri = self.ref.uri
        if not self.ref.fs.exists(f"{self.ref.root}/zarr.json"):
            raise FileNotFoundError(f"{self.uri} does not exist; run `aether-scale text` first")
        verify_store(self.ref, fix=_FIX)
        g = self.ref.group("r")
        names = set(g.array_keys())
        for name in ("embedding", "poi_id"):
            if name not in names:
                raise ValueError(f"{self.uri}: array {name!r} is missing — {_FIX}")
        self._emb = g["embedding"]
        self.poi_id = np.asarray(read_rows(self.ref, "poi_id", 0, g["poi_id"].shape[0], fix=_FIX),
                                 dtype=np.int64)
        if self._emb.ndim != 2 or self._emb.shape[0] != self.poi_id.size:
            raise ValueError(f"{self.uri}: embedding {self._emb.shape} is not aligned with "
                             f"poi_id ({self.poi_id.size},) — {_FIX}")
        self.n, self.dim = int(self._emb.shape[0]), int(self._emb.shape[1])
        self.attrs = dict(g.attrs)
        self.chunk_rows = int(self._emb.chunks[0])
        self._last: tuple[int, np.ndarray] | None = None  # the chunk take() decoded last

    def encoder(self) -> dict[str, Any]:
        """What embedded the texts: ``{"model", "model_key", "dim", "normalize"}`` (the key
        is :func:`aether_scale.text.model_identity`'s: same files, same key)."""
        return {k: self.attrs.get(k) for k in ("model", "model_key", "dim", "normalize")}

    def rows_of(self, poi_id: np.ndarray) -> np.ndarray:
        """Row of each id in this store (−1 when it has no text vector). Raises
        ``ValueError`` when the store's ids repeat."""
        order = np.argsort(self.poi_id, kind="stable")
        srt = self.poi_id[order]
        if srt.size and np.any(srt[1:] == srt[:-1]):
            raise ValueError(f"{self.uri}: poi_id repeats — {_FIX}")
        poi_id = np.asarray(poi_id, dtype=np.int64)
        if not srt.size:
            return np.full(poi_id.size, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(srt, poi_id), 0, srt.size - 1)
        return np.where(srt[pos] == poi_id, order[pos], -1).astype(np.int64)

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Vectors of ``rows`` (any order, repeats allowed) as (len(rows), dim) float32,
        reading each chunk they touch once, checked; into ``out`` when given."""
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((rows.size, self.dim), dtype=np.float32)
        if not rows.size:
            return out
        c = self.chunk_rows
        chunk = rows // c
        for ci in np.unique(chunk):
            sel = np.flatnonzero(chunk == ci)
            a = int(ci) * c
            if self._last is None or self._last[0] != ci:
                self._last = (int(ci), read_rows(self.ref, "embedding", a, min(a + c, self.n),
                                                 fix=_FIX))
            out[sel] = self._last[1][rows[sel] - a]
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as float32 (checked)."""
        return np.asarray(read_rows(self.ref, "embedding", start, stop, fix=_FIX),
                          dtype=np.float32)


def write_text_store(uri: str, poi_id: np.ndarray, blocks: Iterable[np.ndarray], *, dim: int,
                     chunk_rows: int, attrs: Mapping[str, Any],
                     storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``text.zarr``: ``blocks`` are consecutive (≤ chunk_rows, dim) row blocks of
    ``embedding`` in ``poi_id`` order (memory: one block at a time). Returns ``uri``."""
    ref = StoreRef.of(uri, storage_options)
    n = int(len(poi_id))
    cr = max(1, min(int(chunk_rows), max(n, 1)))
    with quiet_zarr():
        g = ref.group("w")
        g.attrs.update(dict(attrs))
        ids = g.create_array("poi_id", shape=(n,), chunks=(cr,), dtype="int64",
                             dimension_names=["poi"], compressors=compressors())
        emb = g.create_array("embedding", shape=(n, dim), chunks=(cr, dim), dtype="float32",
                             dimension_names=["poi", "dim"], compressors=compressors())
        if n:
            ids[:] = np.asarray(poi_id, dtype=np.int64)
        a = 0
        for block in blocks:
            b = a + len(block)
            emb[a:b] = np.asarray(block, dtype=np.float32)
            a = b
    if a != n:
        raise RuntimeError(f"write_text_store: {a} rows written for {n} ids (bug)")
    finish_store(ref)
    return uri
