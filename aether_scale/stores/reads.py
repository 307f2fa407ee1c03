"""Verified reads of workspace stores: every chunk checked before its values are used.

A chunk is read by :func:`verified_chunk`: present, with the byte size the store's
chunk index recorded (:mod:`.chunks`), and passing its crc32c checksum and decode;
anything else raises :class:`~.chunks.CorruptStoreError` naming the store, the chunk
and the fix. Chunks the index lists as never stored are the fill value without
touching storage. Three readers build on it, one per way the stages read:

- :func:`checked_array` — a whole array as a dask array, one task per Zarr chunk
  (what :func:`~.raster.open_raster` gives the evaluation and the exports);
- :class:`CheckedWindow` — one rectangular window, read inside a raster stage's task
  without a graph of the whole array (pool, infer), optionally sharing decoded chunks
  between the threads of one pass (:mod:`.chunk_cache`);
- :class:`ChunkReader` — an array-like for ``dask.array.from_array`` whose selections
  read only the Zarr chunks they touch, optionally transformed along the last axis
  (:func:`~.field.open_field`: a field's write chunk is 16 Zarr chunks, and a small
  window should fetch one).

The two window readers assemble a window with :func:`read_window`, from the chunks it
overlaps; they differ only in how they look a chunk's size up and read it (through the
pass's chunk cache or directly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .chunks import CorruptStoreError, StoreRef, _chunk_path, _encode_key, chunk_grid, chunk_slices

__all__ = ["UNSTORED", "CheckedWindow", "ChunkReader", "checked_array", "read_window",
           "verified_chunk"]


def verified_chunk(ref: StoreRef, array: str, idx: tuple[int, ...], size: int | None,
                   fix: str, *, opened: Any = None) -> np.ndarray:
    """Chunk ``idx`` of ``array``, verified: with ``size`` (its bytes in the index) it
    must be present with that size; it must pass its checksum and decode. ``opened``:
    the Zarr array, already open (else it is opened here)."""
    arr = opened if opened is not None else ref.array(array)
    sl = chunk_slices(idx, arr.shape, arr.chunks)
    enc = _encode_key(arr, idx)
    where = f"{ref.uri}: chunk {array}/{enc}"
    if size is not None:
        try:
            got = ref.fs.size(_chunk_path(ref, array, enc))
        except FileNotFoundError:
            raise CorruptStoreError(f"{where} is missing; the store is damaged — {fix}") from None
        if got != size:
            raise CorruptStoreError(f"{where} has {got} bytes, {size} were written (truncated or "
                                    f"replaced); the store is damaged — {fix}")
    try:
        return np.asarray(arr[sl])
    except Exception as e:  # noqa: BLE001 - every decode failure means a damaged chunk
        raise CorruptStoreError(f"{where} cannot be decoded ({type(e).__name__}: {e}); the "
                                f"store is damaged — {fix}") from None


#: :func:`read_window`'s ``size_of`` answer for a chunk the index lists as never stored
UNSTORED = -1


def read_window(shape: Sequence[int], chunks: Sequence[int], rows: tuple[int, int],
                cols: tuple[int, int], depth: tuple[int, int], *, dtype: Any, fill: Any,
                size_of: Callable[[int, int], int | None],
                read: Callable[[tuple[int, int, int], int | None], np.ndarray]) -> np.ndarray:
    """Rows ``[r0, r1)``, columns ``[c0, c1)`` and ``[d0, d1)`` of the last axis of a 3-d
    array chunked ``chunks`` whose last axis is one chunk, assembled from the chunks the
    window overlaps: ``size_of(a, b)`` is chunk ``(a, b, 0)``'s bytes in the index (None:
    no index; :data:`UNSTORED`: never stored, so the fill value without a read) and
    ``read(idx, size)`` its verified values (the whole chunk)."""
    (r0, r1), (c0, c1), (d0, d1) = rows, cols, depth
    out = np.empty((r1 - r0, c1 - c0, d1 - d0), dtype=dtype)
    if not out.size:
        return out
    cy, cx = int(chunks[0]), int(chunks[1])
    for a in range(r0 // cy, (r1 - 1) // cy + 1):
        for b in range(c0 // cx, (c1 - 1) // cx + 1):
            sy, sx, _ = chunk_slices((a, b, 0), shape, chunks)
            ya, yb = max(r0, sy.start), min(r1, sy.stop)
            xa, xb = max(c0, sx.start), min(c1, sx.stop)
            size = size_of(a, b)
            if size == UNSTORED:
                out[ya - r0:yb - r0, xa - c0:xb - c0] = fill
                continue
            chunk = read((a, b, 0), size)
            out[ya - r0:yb - r0, xa - c0:xb - c0] = chunk[ya - sy.start:yb - sy.start,
                                                         xa - sx.start:xb - sx.start, d0:d1]
    return out


def _stored(index: Mapping[str, Any] | None, array: str, unlisted: Any = None
            ) -> Mapping[str, int] | None:
    """The index's ``{encoded chunk key: bytes}`` of ``array``; None without an index,
    ``unlisted`` for an array the index does not list."""
    return None if index is None else index["arrays"].get(array, {}).get("stored", unlisted)


def checked_array(ref: StoreRef, array: str, index: Mapping[str, Any] | None, *, fix: str) -> Any:
    """The array as a dask array with one verified read per Zarr chunk.

    With an ``index`` (from :func:`~.chunks.verify_store`) each task checks its chunk's
    presence and size before reading; chunks the index lists as never stored are the
    fill value without touching storage.
    """
    import dask.array as dsa
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    arr = ref.array(array)
    shape, chunks = tuple(arr.shape), tuple(arr.chunks)
    stored = _stored(index, array)
    name = f"read-{array}-" + tokenize(ref, array, stored)
    dsk: dict[tuple, Any] = {}
    fill = arr.fill_value
    for idx in np.ndindex(*chunk_grid(shape, chunks)):
        enc = _encode_key(arr, idx)
        if stored is not None and enc not in stored:
            sl = chunk_slices(idx, shape, chunks)
            dsk[(name, *idx)] = (np.full, tuple(s.stop - s.start for s in sl), fill, arr.dtype)
        else:
            size = None if stored is None else stored[enc]
            dsk[(name, *idx)] = (verified_chunk, ref, array, tuple(idx), size, fix)
    dchunks = tuple(tuple(min(c, s - i * c) for i in range(g))
                    for s, c, g in zip(shape, chunks, chunk_grid(shape, chunks), strict=True))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[])
    return dsa.Array(graph, name, dchunks, dtype=arr.dtype,
                     meta=np.empty((0,) * len(shape), dtype=arr.dtype))


@dataclass(frozen=True)
class CheckedWindow:
    """A window ``[r0, r1) × [c0, c1)`` (all of the last axis) of a 3-d array, read by
    verified chunk reads like :func:`checked_array`'s — without a dask graph of the
    whole array. A raster stage's task carries one: slicing a country's dask array per
    task costs time that grows with the array, and so does the whole graph.

    ``stored``: the index entries (``{chunk key: bytes}``) of the chunks the window
    touches, or None for a store without an index. ``np.asarray(window)`` reads it.

    ``reuse``: a token naming one pass over a store that does not change during it
    (a stage run's). Windows with the same token share the chunks they read, verified
    when read, through :data:`~.chunk_cache.CACHE`: a 1024² AE chunk feeding four 512²
    field tasks is read and decompressed once per process, whichever of its threads
    run them, even at the same moment. Memory stays at most one chunk per thread."""

    ref: StoreRef
    array: str
    window: tuple[int, int, int, int]
    stored: Mapping[str, int] | None
    fix: str
    reuse: str | None = None

    @classmethod
    def of(cls, ref: StoreRef, array: str, index: Mapping[str, Any] | None,
           window: tuple[int, int, int, int], *, fix: str, opened: Any = None,
           reuse: str | None = None) -> CheckedWindow:
        """The window's reader; ``opened``: the Zarr array, already open (the caller
        building many windows opens it once)."""
        arr = opened if opened is not None else ref.array(array)
        stored = _stored(index, array, {})
        if stored is not None:
            stored = {k: stored[k] for k in (_encode_key(arr, i) for i in
                                            cls._chunks(arr.chunks, window)) if k in stored}
        return cls(ref, array, tuple(int(v) for v in window), stored, fix, reuse)

    @staticmethod
    def _chunks(chunks: Sequence[int], window: tuple[int, int, int, int]
                ) -> list[tuple[int, int, int]]:
        r0, r1, c0, c1 = window
        cy, cx = int(chunks[0]), int(chunks[1])
        return [(i, j, 0) for i in range(r0 // cy, (r1 - 1) // cy + 1)
                for j in range(c0 // cx, (c1 - 1) // cx + 1)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.ref.array(self.array)
        r0, r1, c0, c1 = self.window
        stored = self.stored

        def size_of(a: int, b: int) -> int | None:
            if stored is None:
                return None
            return stored.get(_encode_key(arr, (a, b, 0)), UNSTORED)

        out = read_window(arr.shape, arr.chunks, (r0, r1), (c0, c1), (0, int(arr.shape[2])),
                          dtype=arr.dtype, fill=arr.fill_value, size_of=size_of,
                          read=self._read)
        return out if dtype is None else out.astype(dtype, copy=False)

    def _read(self, idx: tuple[int, int, int], size: int | None) -> np.ndarray:
        if self.reuse is None:
            return verified_chunk(self.ref, self.array, idx, size, self.fix)
        from .chunk_cache import CACHE

        return CACHE.get(self.reuse, (self.ref.uri, self.array, idx, size),
                         lambda: verified_chunk(self.ref, self.array, idx, size, self.fix))


class ChunkReader:
    """Array-like over a 3-d array whose last axis is one chunk, for
    ``dask.array.from_array(reader, asarray=False)``: a selection reads only the Zarr
    chunks its box touches (:func:`verified_chunk`; unstored chunks are the fill value
    without touching storage).

    ``transform``: applied to the box read, whole along the last axis (so a selection
    along it reads every component first), giving ``dtype`` — e.g. a field's decode to
    unit vectors. None keeps the stored values."""

    def __init__(self, ref: StoreRef, array: str, index: Mapping[str, Any] | None, *, fix: str,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 dtype: Any = None) -> None:
        arr = ref.array(array)
        self.ref, self.array, self.fix, self.transform = ref, array, fix, transform
        self.shape = tuple(int(s) for s in arr.shape)
        self.chunks = tuple(int(c) for c in arr.chunks)
        if arr.ndim != 3 or self.chunks[2] < self.shape[2]:
            raise ValueError(f"{ref.uri}: '{array}' is chunked {self.chunks} along "
                             f"{self.shape}; it must keep all of a pixel's values in one "
                             f"chunk — {fix}")
        self.raw_dtype = np.dtype(arr.dtype)
        self.fill = arr.fill_value
        self.dtype = np.dtype(dtype) if transform is not None and dtype is not None \
            else self.raw_dtype
        self.ndim = 3
        #: the index's ``{chunk key: bytes}`` of the array (None: no index), e.g. for a token
        self.stored = stored = _stored(index, array)
        self.sizes: np.ndarray | None = None  # bytes per chunk, UNSTORED where none was stored
        if stored is not None:
            sizes = np.full(chunk_grid(self.shape, self.chunks), UNSTORED, dtype=np.int64)
            for key, size in stored.items():
                sizes[tuple(int(p) for p in key.split("/")[1:])] = size
            self.sizes = sizes

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        box: list[tuple[int, int]] = []
        picks: list[Any] = []  # per axis, what to take from the box read
        for ax, (k, n) in enumerate(zip(key, self.shape, strict=True)):
            if ax == 2 and self.transform is not None:  # it needs every component
                box.append((0, n))
                picks.append(k)
            elif isinstance(k, slice):
                a, b, s = k.indices(n)
                if s == 1:
                    box.append((a, max(a, b)))
                    picks.append(slice(None))
                else:
                    idx = np.arange(a, b, s)
                    lo = int(idx.min()) if idx.size else 0
                    box.append((lo, int(idx.max()) + 1 if idx.size else 0))
                    picks.append(idx - lo)
            elif np.ndim(k) == 0:
                i = int(k) + (n if int(k) < 0 else 0)
                box.append((i, i + 1))
                picks.append(0)
            else:  # an index array (dask passes at most one)
                idx = np.asarray(k)
                idx = np.flatnonzero(idx) if idx.dtype == bool else np.where(idx < 0, idx + n, idx)
                lo = int(idx.min()) if idx.size else 0
                box.append((lo, int(idx.max()) + 1 if idx.size else 0))
                picks.append(idx - lo)
        out = self._read_box(box)
        if self.transform is not None:
            out = self.transform(out)
        for ax in (2, 1, 0):  # integers drop axes: from the last one
            p = picks[ax]
            if isinstance(p, slice) and p == slice(None):
                continue
            out = out[(slice(None),) * ax + (p,)]
        return out

    def _read_box(self, box: list[tuple[int, int]]) -> np.ndarray:
        """The stored values of the box ``[(y0, y1), (x0, x1), (d0, d1)]``."""
        sizes, opened = self.sizes, []

        def size_of(a: int, b: int) -> int | None:
            return None if sizes is None else int(sizes[a, b, 0])

        def read(idx: tuple[int, int, int], size: int | None) -> np.ndarray:
            if not opened:  # opened once per box, and only when a chunk is read
                opened.append(self.ref.array(self.array))
            return verified_chunk(self.ref, self.array, idx, size, self.fix, opened=opened[0])

        return read_window(self.shape, self.chunks, box[0], box[1], box[2],
                           dtype=self.raw_dtype, fill=self.fill, size_of=size_of, read=read)
