"""``triplets.zarr``: one training triplet per POI (written by ``pool``, read by ``train``).

A Zarr group, every array chunked along the row dimension ``poi`` in whole rows so
a trainer can stream it::

    triplets.zarr/
      poi_id  (poi,)            int64    the POI's id in pois.parquet
      base    (poi, band)       float32  L2-normalised mean AE in pool.base
      aug     (poi, band)       float32  L2-normalised mean AE in pool.aug
      text    (poi, text_dim)   float32  the POI's text embedding from text.zarr
      attrs: buffers, counts (the manifest's stats), layout notes

Rows are in raster-chunk order (spatially coherent, not shuffled — the trainer
shuffles). POIs without valid AE or text are absent (counted in the pool manifest).
:class:`TripletWriter` appends rows in whole chunks; :class:`TripletStore` opens and
validates a store (every read checked, see :mod:`.chunks`); :func:`write_triplets`
writes one from in-memory arrays (tests, benchmarks, tools).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .chunks import (
    StoreRef,
    compressors,
    finish_store,
    quiet_zarr,
    verify_store,
)
from .rows import append_rows, read_rows

__all__ = ["NAME", "REQUIRED", "ArrayRows", "TripletStore", "TripletStoreError", "TripletWriter",
           "write_triplets"]

NAME = "triplets.zarr"
REQUIRED = ("poi_id", "base", "aug", "text")
_FIX = "run `aether-scale pool --force`"


class TripletStoreError(ValueError):
    """``triplets.zarr`` is missing a field or has a wrong shape/dtype/value."""


class TripletStore:
    """An opened, validated ``triplets.zarr`` (a path or fsspec URL).

    Fields: ``poi_id`` (n,) int, ``base`` (n, in_dim) float, ``aug`` (n, in_dim)
    float, ``text`` (n, text_dim) float, all chunked along n. Raises
    :class:`TripletStoreError` naming the store, the field and the fix, or
    :class:`~.chunks.CorruptStoreError` when a chunk is damaged.
    """

    def __init__(self, uri: str, *, storage_options: Mapping[str, Any] | None = None,
                 need_aug: bool = True) -> None:
        self.uri = str(uri)
        self.ref = StoreRef.of(self.uri, storage_options)
        try:
            self.group = self.ref.group("r")
        except Exception as e:  # noqa: BLE001 - zarr raises several types for "not a group"
            raise TripletStoreError(
                f"{self.uri}: cannot open as a Zarr group ({type(e).__name__}: {e}); "
                "run the 'pool' stage first or point train at a triplets.zarr") from None
        names = set(self.group.array_keys())
        needed = [f for f in REQUIRED if need_aug or f != "aug"]
        missing = [f for f in needed if f not in names]
        if missing:
            raise TripletStoreError(
                f"{self.uri}: missing field(s) {missing}; a triplets store needs arrays "
                f"{list(REQUIRED)} (found {sorted(names)}); re-run the 'pool' stage")
        self.base = self.group["base"]
        self.text = self.group["text"]
        self.aug = self.group["aug"] if "aug" in names else None
        self.poi_id = self.group["poi_id"]
        if len(self.poi_id.shape) != 1:
            raise TripletStoreError(f"{self.uri}: field 'poi_id' must be 1-d, has shape "
                                    f"{self.poi_id.shape}")
        n = int(self.poi_id.shape[0])
        self.n = n
        arrays = {"base": self.base, "text": self.text}
        if self.aug is not None:
            arrays["aug"] = self.aug
        for name, arr in arrays.items():
            if len(arr.shape) != 2 or arr.shape[0] != n:
                raise TripletStoreError(
                    f"{self.uri}: field {name!r} has shape {tuple(arr.shape)}, expected ({n}, d) "
                    "(one row per poi_id); the store is inconsistent — re-run the 'pool' stage")
            if not np.issubdtype(arr.dtype, np.floating):
                raise TripletStoreError(
                    f"{self.uri}: field {name!r} has dtype {arr.dtype}, expected float32")
        if self.aug is not None and self.aug.shape[1] != self.base.shape[1]:
            raise TripletStoreError(
                f"{self.uri}: 'aug' has {self.aug.shape[1]} columns but 'base' has "
                f"{self.base.shape[1]}; both views must come from the same AE bands")
        if n < 2:
            raise TripletStoreError(f"{self.uri}: {n} triplet(s); contrastive training needs ≥ 2")
        verify_store(self.ref, fix=_FIX)
        self.attrs = dict(self.group.attrs)
        self.in_dim = int(self.base.shape[1])
        self.text_dim = int(self.text.shape[1])
        self.chunk_rows = int(self.base.chunks[0])
        self.need_aug = need_aug and self.aug is not None

    @property
    def row_bytes(self) -> int:
        """Bytes of one triplet as float32 (the fields training reads)."""
        return 4 * (self.in_dim * (2 if self.need_aug else 1) + self.text_dim)

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """``[(start, stop), …]`` row ranges of the store's chunks."""
        c = self.chunk_rows
        return [(s, min(s + c, self.n)) for s in range(0, self.n, c)]

    def ids(self) -> np.ndarray:
        return np.asarray(read_rows(self.ref, "poi_id", 0, self.n, fix=_FIX), dtype=np.int64)

    def read(self, start: int, stop: int, out: tuple[np.ndarray | None, ...] | None = None
             ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Rows ``[start, stop)`` of base, aug (None unless needed), text as float32.

        ``out``: ``(base, aug, text)`` float32 buffers to read into, each with at least
        ``stop - start`` rows (see :func:`~.rows.read_rows`; a streaming reader passes
        the same chunk-sized buffers every epoch). Raises :class:`TripletStoreError`
        naming the field and row of a non-finite value,
        :class:`~.chunks.CorruptStoreError` for a damaged chunk.
        """
        into = dict(zip(("base", "aug", "text"), out, strict=True)) if out is not None else {}

        def rows(name: str) -> np.ndarray:
            a = read_rows(self.ref, name, start, stop, fix=_FIX, out=into.get(name))
            return a if a.dtype == np.float32 else a.astype(np.float32)

        base = rows("base")
        aug = rows("aug") if self.need_aug else None
        text = rows("text")
        for name, a in (("base", base), ("aug", aug), ("text", text)):
            if a is not None and not np.isfinite(a).all():
                bad = start + int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
                raise TripletStoreError(
                    f"{self.uri}: field {name!r} has non-finite values (first at row {bad}); "
                    "the pool/text stage must drop rows without a valid vector")
        return base, aug, text

    def buffers(self, rows: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Empty ``(base, aug, text)`` buffers of ``rows`` rows for :meth:`read` (None for
        aug unless needed), in the fields' stored dtypes."""
        def buf(arr) -> np.ndarray:
            return np.empty((rows, int(arr.shape[1])), dtype=arr.dtype)

        return buf(self.base), (buf(self.aug) if self.need_aug else None), buf(self.text)


class ArrayRows:
    """In-memory text vectors with the :meth:`take` of :class:`~.text.TextStore`."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.dim = int(self.vectors.shape[1])

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.take(self.vectors, rows, axis=0, out=out)


class TripletWriter:
    """Appends rows to a new ``triplets.zarr`` in whole chunks of ``chunk_rows``.

    ``text`` is where the text vectors come from (a :class:`~.text.TextStore` or
    :class:`ArrayRows`, anything whose ``take(rows, out=)`` gathers rows in any order):
    rows are added with their *row* in it, and the vectors of a chunk are gathered once,
    into one reused buffer, when the chunk is written. Chunks of the uncompressed
    vectors are written straight to their files (:func:`~.rows.append_rows`).
    """

    def __init__(self, uri: str, n_bands: int, text: Any, chunk_rows: int, *,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.ref = StoreRef.of(uri, storage_options)
        self.text = text
        text_dim = int(text.dim)
        self.chunk_rows = int(chunk_rows)
        with quiet_zarr():
            self.group = self.ref.group("w")
        # the vectors go without zstd (see compressors): a trainer streaming from this
        # store reads every row each epoch
        cr, codecs, raw = self.chunk_rows, compressors(), compressors(None)
        # every chunk is written, also one that holds only zeros: Zarr's test for that
        # scanned each 100 MB chunk (2.9 s of the driver's time at 1 M POIs), and a store
        # whose every chunk is on disk is checked whole by its checksums
        full = {"write_empty_chunks": True}
        self.arrays = {
            "poi_id": self.group.create_array("poi_id", shape=(0,), chunks=(cr,), dtype="int64",
                                              dimension_names=["poi"], compressors=codecs, config=full),
            "base": self.group.create_array("base", shape=(0, n_bands), chunks=(cr, n_bands),
                                            dtype="float32", dimension_names=["poi", "band"],
                                            compressors=raw, config=full),
            "aug": self.group.create_array("aug", shape=(0, n_bands), chunks=(cr, n_bands),
                                           dtype="float32", dimension_names=["poi", "band"],
                                           compressors=raw, config=full),
            "text": self.group.create_array("text", shape=(0, text_dim), chunks=(cr, text_dim),
                                            dtype="float32", dimension_names=["poi", "text_dim"],
                                            compressors=raw, config=full),
        }
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._n_pending = 0
        self._text_buf: np.ndarray | None = None
        self.n_written = 0

    @property
    def n_rows(self) -> int:
        """Rows added so far (written or pending)."""
        return self.n_written + self._n_pending

    def add(self, poi_id: np.ndarray, base: np.ndarray, aug: np.ndarray, text_row: np.ndarray
            ) -> None:
        """Add rows: ids (m,), base and aug (m, bands), each row's row in ``text``."""
        if len(poi_id) == 0:
            return
        self._pending.append((np.asarray(poi_id, np.int64), base, aug,
                              np.asarray(text_row, np.int64)))
        self._n_pending += len(poi_id)
        while self._n_pending >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def _flush(self, n: int) -> None:
        cols = [np.concatenate(parts) for parts in zip(*self._pending, strict=True)]
        take = [c[:n] for c in cols]
        rest = [c[n:] for c in cols]
        self._pending = [tuple(rest)] if len(rest[0]) else []
        self._n_pending = len(rest[0])
        pid, base, aug, trow = take
        if self._text_buf is None:  # one buffer for every chunk (fresh ones fault in again)
            self._text_buf = np.empty((self.chunk_rows, int(self.text.dim)), dtype=np.float32)
        text = self.text.take(trow, out=self._text_buf[:n])
        for name, arr in (("poi_id", pid), ("base", base), ("aug", aug), ("text", text)):
            append_rows(self.ref, name, self.arrays[name], arr)
        self.n_written += n

    def close(self, attrs: Mapping[str, Any]) -> None:
        """Write the last partial chunk and the group attributes (``counts`` gains
        ``n_triplets``), consolidate and index the store."""
        if self._n_pending:
            self._flush(self._n_pending)
        attrs = dict(attrs)
        if isinstance(attrs.get("counts"), dict):
            attrs["counts"] = {**attrs["counts"], "n_triplets": self.n_written}
        self.group.attrs.update(attrs)
        finish_store(self.ref)


def write_triplets(uri: str, *, base: np.ndarray, aug: np.ndarray, text: np.ndarray,
                   poi_id: np.ndarray | None = None, chunk_rows: int = 65536,
                   storage_options: Mapping[str, Any] | None = None) -> str:
    """Write a finished ``triplets.zarr`` from in-memory arrays (the pool stage's layout,
    checksums and index). Raises ``ValueError`` when the row counts differ."""
    n = base.shape[0]
    poi_id = np.arange(n, dtype=np.int64) if poi_id is None else np.asarray(poi_id, np.int64)
    for name, arr in (("poi_id", poi_id), ("aug", aug), ("text", text)):
        if arr.shape[0] != n:
            raise ValueError(f"write_triplets: {name} has {arr.shape[0]} rows, base has {n}")
    w = TripletWriter(os.fspath(uri), base.shape[1], ArrayRows(text),
                      min(chunk_rows, max(n, 1)), storage_options=storage_options)
    w.add(poi_id, np.asarray(base, np.float32), np.asarray(aug, np.float32), np.arange(n))
    w.close({})
    return os.fspath(uri)
