"""Row-chunked arrays (the triplets' and the text vectors'), read and appended chunk by
chunk: :func:`read_rows` and :func:`append_rows`.

Arrays stored uncompressed (codecs ``bytes`` little-endian + ``crc32c``: the triplets'
vectors, which a streaming trainer reads whole every epoch) on a local disk skip Zarr's
codec pipeline: a chunk's file is read straight into the caller's buffer and written
straight from the caller's rows, and its crc32c is checked (or written) over the whole
chunk, the same bytes Zarr reads and writes. Every other array, and remote stores, go
through Zarr, each read checked (:class:`~.chunks.CorruptStoreError` names the chunk).
Split from :mod:`.chunks`, whose store machinery (refs, index, checked reads) they use.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np

from .chunks import CorruptStoreError, StoreRef, _chunk_path, _encode_key

__all__ = ["append_rows", "read_rows"]


def read_rows(ref: StoreRef, array: str, start: int, stop: int, *, fix: str,
              out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``[start, stop)`` of a row-chunked array, chunk by chunk, each read checked
    (a decode or checksum failure names the chunk).

    ``out``: an array of the array's dtype with at least ``stop - start`` rows to read
    into (its first ``stop - start`` rows are returned; rows after them may be
    overwritten, up to the end of the last chunk), so a reader that visits a store
    repeatedly (a streaming trainer, every epoch) reuses its memory: fresh buffers of
    ~100 MB each cost their page faults again on every read, which on the 2-core
    benchmark machine took longer than reading the bytes. Uncompressed chunks on a local
    disk (``bytes`` + ``crc32c``, the triplets' vectors) are read straight into it
    (:func:`_read_raw_chunk`); any other array goes through Zarr.
    """
    arr = ref.array(array)
    c = int(arr.chunks[0])
    n = max(stop - start, 0)
    raw = _raw_layout(ref, arr)
    if out is not None:
        if out.shape[0] < n or tuple(out.shape[1:]) != tuple(arr.shape[1:]) or out.dtype != arr.dtype:
            raise ValueError(f"read_rows: out {out.shape} {out.dtype} cannot hold rows "
                             f"[{start}, {stop}) of {array} {arr.shape} {arr.dtype}")
        dst = out
    elif raw is not None:
        dst = np.empty((n, *arr.shape[1:]), dtype=arr.dtype)
    else:
        dst = None
    parts = []
    for ci in range(start // c, (max(stop, start + 1) - 1) // c + 1):
        a, b = max(start, ci * c), min(stop, (ci + 1) * c)
        if a >= b:
            continue
        enc = _encode_key(arr, (ci,) + (0,) * (arr.ndim - 1))
        if raw is not None:  # (then dst is set)
            here = dst[a - start:]
            lo = a - ci * c
            # the whole chunk fits in place (a reader's chunk-sized buffer): read all of it
            hi = c if lo == 0 and here.shape[0] >= c else b - ci * c
            if _read_raw_chunk(ref, array, enc, raw, here[: hi - lo], lo, hi, fix):
                continue
        try:  # through Zarr (also a raw chunk that is not on disk: Zarr's fill value)
            block = np.asarray(arr[a:b])
        except Exception as e:  # noqa: BLE001 - a decode failure means a damaged chunk
            raise CorruptStoreError(f"{ref.uri}: chunk {array}/{enc} cannot be decoded "
                                    f"({type(e).__name__}: {e}); the store is damaged — {fix}"
                                    ) from None
        if dst is not None:
            dst[a - start: b - start] = block
        else:
            parts.append(block)
    if dst is not None:
        return dst[:n]
    if not parts:
        return np.asarray(arr[start:stop])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _raw_layout(ref: StoreRef, arr: Any) -> tuple[tuple[int, ...], int] | None:
    """``(chunk shape, bytes on disk)`` when the array's chunks are its values as stored in
    memory plus a crc32c (codecs ``bytes`` (little-endian) then ``crc32c``, one chunk
    across all but the first dimension) in files on the local disk; else None."""
    import sys

    from fsspec.implementations.local import LocalFileSystem

    md = arr.metadata
    if getattr(md, "zarr_format", None) != 3 or not isinstance(ref.fs, LocalFileSystem):
        return None
    names = [type(codec).__name__ for codec in md.codecs]
    if names != ["BytesCodec", "Crc32cCodec"]:
        return None
    endian = getattr(md.codecs[0].endian, "value", md.codecs[0].endian)
    dt = np.dtype(arr.dtype)
    if sys.byteorder != "little" or (dt.itemsize > 1 and endian != "little") or dt.byteorder == ">":
        return None
    chunks = tuple(int(c) for c in arr.chunks)
    if chunks[1:] != tuple(int(s) for s in arr.shape[1:]):
        return None
    return chunks, math.prod(chunks) * dt.itemsize + 4


def _read_raw_chunk(ref: StoreRef, array: str, enc: str, raw: tuple[tuple[int, ...], int],
                    into: np.ndarray, lo: int, hi: int, fix: str) -> bool:
    """Read rows ``[lo, hi)`` of one uncompressed chunk's file into ``into`` (C-contiguous)
    and check the chunk's crc32c (the rows outside pass through a small reused buffer for
    the checksum only); False when the file does not exist (a chunk Zarr never wrote)."""
    import google_crc32c

    where = f"{ref.uri}: chunk {array}/{enc}"
    try:
        f = open(_chunk_path(ref, array, enc), "rb", buffering=0)  # noqa: SIM115
    except FileNotFoundError:
        return False
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != raw[1]:
            raise CorruptStoreError(f"{where} cannot be decoded: it has {size} bytes, {raw[1]} "
                                    f"expected (truncated or replaced); the store is damaged — "
                                    f"{fix}")
        row = (raw[1] - 4) // raw[0][0]
        crc = _skim(f, lo * row, 0)
        view = into.reshape(-1).view(np.uint8)
        got = 0
        while got < view.size:
            k = f.readinto(memoryview(view[got:]))
            if not k:
                break
            got += k
        if got != view.size:  # the file shrank while being read
            raise CorruptStoreError(f"{where} cannot be decoded: the file ended early; the "
                                    f"store is damaged — {fix}")
        crc = google_crc32c.extend(crc, view)
        crc = _skim(f, raw[1] - 4 - hi * row, crc)
        tail = f.read(4)
    if crc != int.from_bytes(tail, "little"):
        raise CorruptStoreError(f"{where} cannot be decoded (its crc32c checksum does not "
                                f"match its bytes); the store is damaged — {fix}")
    return True


def _skim(f: Any, nbytes: int, crc: int) -> int:
    """The crc32c of the next ``nbytes`` of ``f`` extended onto ``crc`` (read in 4 MiB pieces
    into one buffer per thread)."""
    import google_crc32c

    buf = getattr(_SCRATCH, "buf", None)
    if buf is None:
        buf = _SCRATCH.buf = np.empty(4 << 20, dtype=np.uint8)
    while nbytes > 0:
        k = f.readinto(memoryview(buf[: min(nbytes, buf.size)]))
        if not k:
            break
        crc = google_crc32c.extend(crc, buf[:k])
        nbytes -= k
    return crc


#: per thread: the buffer the bytes outside a partial read pass through for their checksum
_SCRATCH = threading.local()


def append_rows(ref: StoreRef, name: str, arr: Any, rows: np.ndarray) -> None:
    """Append ``rows`` to the row-chunked array ``arr`` (named ``name`` in ``ref``, opened
    for writing) as whole chunks, the last one padded with the fill value like Zarr's.

    Uncompressed arrays on a local disk (``bytes`` + ``crc32c``, the triplets' vectors)
    whose length is a whole number of chunks get each chunk file written straight from
    ``rows`` — the values, then the crc32c of those bytes, the same file Zarr writes —
    and then the new shape; Zarr's own path copies every 100 MB chunk twice on the way
    (into a chunk buffer, then again to append the checksum). Any other array goes
    through ``arr.append``.
    """
    import google_crc32c

    rows = np.asarray(rows)
    raw = _raw_layout(ref, arr)
    n0, m = int(arr.shape[0]), int(rows.shape[0])
    c = int(arr.chunks[0])
    if (raw is None or n0 % c or rows.dtype != arr.dtype or m == 0
            or tuple(rows.shape[1:]) != tuple(arr.shape[1:])):
        arr.append(rows, axis=0)
        return
    rows = np.ascontiguousarray(rows)
    pad_row = np.full((1, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
    for a in range(0, m, c):
        piece = rows[a: a + c]
        enc = _encode_key(arr, ((n0 + a) // c,) + (0,) * (arr.ndim - 1))
        path = _chunk_path(ref, name, enc)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        view = piece.reshape(-1).view(np.uint8)
        crc = google_crc32c.extend(0, view)
        with open(path, "wb") as f:
            f.write(memoryview(view))
            if piece.shape[0] < c:  # the short last chunk: padded to the chunk's size
                pad = np.repeat(pad_row, c - piece.shape[0], axis=0).reshape(-1).view(np.uint8)
                crc = google_crc32c.extend(crc, pad)
                f.write(memoryview(pad))
            f.write(crc.to_bytes(4, "little"))
    arr.resize((n0 + m, *arr.shape[1:]))
