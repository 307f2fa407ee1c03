"""Phrase vectors against every field pixel: the similarity raster and its top locations.

One pass over the field serves every phrase: each dask task reads one field chunk,
computes the cosine similarity of its pixels with all ``k`` phrase vectors (a
``(pixels, dim) @ (dim, k)`` product in row batches, never a float32 copy of the whole
chunk), writes the ``(y, x, k)`` block to ``similarity.zarr`` and records the chunk in
a ledger — so a query runs out-of-core on any scheduler and a killed one resumes.

**Top locations.** A location is a pixel whose similarity is the highest within the
square of half-side ``r = min_distance / pixel`` around it (the peak rule of
``skimage.feature.peak_local_max``), so any two locations are more than
``min_distance`` apart; the top ``k`` are the highest such peaks. A plateau (connected
pixels of equal similarity, e.g. identical field vectors) is one location, at its first
pixel in raster order; equal peaks within ``min_distance`` of a kept one are dropped
(a plateau cut by a chunk edge can give one location per side when those are farther
apart). Each task returns its
chunk's best peaks per phrase, found with a separable maximum filter over the chunk.
A peak within ``r`` of an edge shared with another chunk may be dominated by a pixel
over that edge: :func:`top_locations` checks exactly those against the written
similarity raster (a few small window reads), and reads a chunk again for more peaks
when it ran out of listed ones — the result equals the peaks of the whole raster
computed at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import aef
from ..cluster import InTask
from ..logs import get_logger

__all__ = ["block_peaks", "block_similarity", "similarity_raster", "top_locations"]

log = get_logger("query")
ROWS_PER_BATCH = 32  # field rows per GEMM: 512-px rows → 16k pixels, a few MB of float32


class _Float32:
    """A reused float32 batch buffer filled from float16 rows by torch's vectorised
    conversion (about 7× numpy's ``astype`` here, which dominated the pass)."""

    def __init__(self, n: int, d: int) -> None:
        import torch

        self.torch = torch
        self.buf = torch.empty((n, d), dtype=torch.float32)

    def fill(self, rows: np.ndarray) -> np.ndarray:
        out = self.buf[: rows.shape[0]]
        if not rows.flags.writeable:  # torch will not wrap a read-only array: numpy converts
            np.copyto(out.numpy(), rows)
            return out.numpy()
        out.copy_(self.torch.from_numpy(np.ascontiguousarray(rows)))
        return out.numpy()


def block_similarity(block: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, int]:
    """Cosine similarity of each pixel of a field block ``(h, w, dim)`` (float16/32 with
    NaN nodata, or int8 AEF-sqrt codes with −128) with each row of ``vectors``
    ``(k, dim)``: ``((h, w, k) float32 with NaN where the field has no data, valid px)``.
    Pixels are re-normalised, so the result is a cosine even for rounded unit vectors."""
    h, w, d = block.shape
    k = vectors.shape[0]
    out = np.empty((h, w, k), dtype=np.float32)
    flat_out = out.reshape(-1, k)
    q = np.ascontiguousarray(vectors, dtype=np.float32).T
    flat = block.reshape(-1, d)
    n_valid = 0
    step = ROWS_PER_BATCH * w
    buf = _Float32(min(step, flat.shape[0]), d) if flat.dtype == np.float16 else None
    for p0 in range(0, flat.shape[0], step):
        b = flat[p0:p0 + step]
        if b.dtype == np.int8:
            px = aef.decode_fast(b)
            px[np.any(b == aef.NODATA, axis=1)] = np.nan
        elif buf is not None:
            px = buf.fill(b)
        else:
            px = b.astype(np.float32)
        # a nodata pixel (any NaN component) has a NaN norm, and so NaN similarities
        norm = np.sqrt(np.einsum("ij,ij->i", px, px))
        n_valid += int(np.isfinite(norm).sum())
        sim = np.matmul(px, q, out=flat_out[p0:p0 + step])
        sim /= np.maximum(norm, 1e-12)[:, None]
    return out, n_valid


def block_peaks(sim: np.ndarray, r: int, m: int, neighbours: Sequence[bool]
                ) -> list[dict[str, list]]:
    """Per phrase, the ``m`` highest peaks of a similarity block ``(h, w, k)`` (and the
    equal ones within ``r`` listed among them, :func:`_listing`): pixels that are the
    maximum of the ``(2r+1)²`` square around them *within the block*.

    ``neighbours``: (above, below, left, right) — whether another chunk lies across
    that edge; a peak within ``r`` of such an edge is flagged ``border`` (it may be
    dominated from across it). Returns ``[{"row", "col", "value", "border", "more"}]``
    (block coordinates, value-descending; ``more``: peaks were left out)."""
    from scipy.ndimage import label, maximum_filter

    h, w, k = sim.shape
    top, bottom, left, right = (bool(b) for b in neighbours)
    eight = np.ones((3, 3), dtype=bool)
    out = []
    for q in range(k):
        s = sim[:, :, q]
        finite = np.isfinite(s)
        s = np.where(finite, s, -np.inf)
        peak = finite & (s == maximum_filter(s, size=2 * r + 1, mode="constant", cval=-np.inf))
        # adjacent peaks are equal when r ≥ 1 (each is the other's window maximum): a plateau is one
        # connected component of the mask, represented by its first pixel in raster order
        if r > 0:
            lab, n = label(peak, structure=eight)
            flat = lab.ravel()
            at = np.flatnonzero(flat)
            _, first = np.unique(flat[at], return_index=True)
            rows, cols = np.divmod(at[first], w)
        else:  # a 1-px window: every valid pixel is its own location
            rows, cols = np.nonzero(peak)
            n = rows.size
        vals = s[rows, cols]
        order = np.lexsort((cols, rows, -vals))  # value-descending, ties by position
        take = _listing(rows[order], cols[order], r, m)
        more = n > take
        order = order[:take]
        rows, cols, vals = rows[order], cols[order], vals[order]
        border = ((top & (rows < r)) | (bottom & (rows >= h - r))
                  | (left & (cols < r)) | (right & (cols >= w - r)))
        out.append({"row": rows.tolist(), "col": cols.tolist(),
                    "value": [float(v) for v in vals], "border": border.tolist(),
                    "more": bool(more)})
    return out


def _listing(rows: np.ndarray, cols: np.ndarray, r: int, m: int) -> int:
    """How many of a chunk's ordered peaks to list so that ``m`` of them are not within
    ``r`` of an earlier listed one. Two peaks that close are equal (each lies in the
    other's window), so on fields with repeated vectors most of the first ``m`` would be
    ties the global pass drops; they stay listed (the pass decides exactly) but do not
    count, which spares re-reading the chunk for more. At most ``8 m`` are listed."""
    n = rows.size
    if r == 0 or n <= m:
        return min(n, m)
    kept_r: list[int] = []
    kept_c: list[int] = []
    for t in range(min(n, 8 * m)):
        y, x = int(rows[t]), int(cols[t])
        if not any(abs(y - a) <= r and abs(x - b) <= r for a, b in zip(kept_r, kept_c, strict=True)):
            kept_r.append(y)
            kept_c.append(x)
            if len(kept_r) == m:
                return t + 1
    return min(n, 8 * m)


def _query_chunk(region: InTask, vectors: np.ndarray, r: int, m: int,
                 neighbours: tuple[bool, bool, bool, bool]) -> tuple[np.ndarray | None, dict]:
    block = region.read()
    sim, n_valid = block_similarity(block, vectors)
    if n_valid == 0:
        return None, {"valid": 0, "peaks": []}
    return sim, {"valid": n_valid, "peaks": block_peaks(sim, r, m, neighbours)}


def similarity_raster(field: Any, vectors: np.ndarray, phrases: Sequence[str], out_uri: str, *,
                      r: int, per_chunk: int, ledger: str, token: str,
                      storage_options: Mapping[str, Any] | None = None,
                      attrs: Mapping[str, Any] | None = None, progress: bool = True
                      ) -> dict[str, Any]:
    """Write ``similarity.zarr`` for ``phrases`` (their ``vectors``) over ``field`` (the
    ``embedding`` DataArray of a field store) and return the chunk records (valid
    pixels and each chunk's best ``per_chunk`` peaks per phrase) with timings."""
    import dask

    from ..stores import similarity as sim_store
    from ..stores.raster import RasterBuild, write_chunks

    t0 = time.perf_counter()
    arr = field.data
    cy, cx = int(arr.chunks[0][0]), int(arr.chunks[1][0])
    ny, nx = len(arr.chunks[0]), len(arr.chunks[1])
    template = sim_store.template(field, phrases, (cy, cx), attrs or {})
    build = RasterBuild.at(out_uri, ledger, storage_options, variable=sim_store.VARIABLE).create(
        template, fill_value=np.float32(np.nan), token=token)
    vec = np.ascontiguousarray(vectors, dtype=np.float32)

    def job(i: int, j: int, win: tuple[int, int, int, int]) -> tuple[Any, tuple]:
        r0, r1, c0, c1 = win
        (region,) = dask.optimize(arr[r0:r1, c0:c1, :])
        return _query_chunk, (InTask(region), vec, r, per_chunk,
                              (i > 0, i < ny - 1, j > 0, j < nx - 1))

    records, n_todo = write_chunks(build, job, label="query", token=token, log=log,
                                   progress=progress)
    return {"records": records, "chunks": [cy, cx], "n_chunks": len(records),
            "chunks_computed": n_todo, "seconds": time.perf_counter() - t0}


class _Blocks:
    """Decoded similarity chunks, a few at a time (the checks read windows around peaks)."""

    def __init__(self, sim: Any, keep: int = 6) -> None:
        self.data = sim.data
        self.cy, self.cx = int(self.data.chunks[0][0]), int(self.data.chunks[1][0])
        self.shape = self.data.shape
        self.keep = keep
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.reads = 0

    def block(self, i: int, j: int) -> np.ndarray:
        if (i, j) in self.cache:
            self.cache.move_to_end((i, j))
            return self.cache[(i, j)]
        b = np.asarray(self.data.blocks[i, j, 0].compute(scheduler="synchronous"))
        self.reads += 1
        self.cache[(i, j)] = b
        if len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return b

    def window_max(self, row: int, col: int, r: int, q: int) -> float:
        """The highest similarity of phrase ``q`` in the square of half-side ``r``."""
        r0, r1 = max(0, row - r), min(self.shape[0], row + r + 1)
        c0, c1 = max(0, col - r), min(self.shape[1], col + r + 1)
        best = -np.inf
        for i in range(r0 // self.cy, (r1 - 1) // self.cy + 1):
            for j in range(c0 // self.cx, (c1 - 1) // self.cx + 1):
                b = self.block(i, j)[:, :, q]
                y0, x0 = i * self.cy, j * self.cx
                part = b[max(r0 - y0, 0):r1 - y0, max(c0 - x0, 0):c1 - x0]
                if np.isfinite(part).any():
                    best = max(best, float(np.nanmax(part)))
        return best


def _order(c: tuple[float, int, int, bool, tuple[int, int]]) -> tuple[float, int, int]:
    """Candidates by similarity, highest first; equal ones by position (row, column)."""
    return (-c[0], c[1], c[2])


class _Candidates:
    """One phrase's peak candidates from every chunk, value-descending, with each
    chunk's floor (the order key of the last peak it listed, when it left peaks out)."""

    def __init__(self, cy: int, cx: int) -> None:
        self.cy, self.cx = cy, cx
        self.items: list[tuple[float, int, int, bool, tuple[int, int]]] = []
        self.floor: dict[tuple[int, int], tuple[float, int, int]] = {}

    def add(self, ij: tuple[int, int], peaks: Mapping[str, list], start: int = 0) -> None:
        """Add chunk ``ij``'s peaks, replacing its candidates from position ``start`` on
        (those before it were consumed already and are not added again)."""
        y0, x0 = ij[0] * self.cy, ij[1] * self.cx
        used = {(c[1], c[2]) for c in self.items[:start] if c[4] == ij}
        rest = [c for c in self.items[start:] if c[4] != ij]
        rest += [(v, y0 + rr, x0 + cc, b, ij) for v, rr, cc, b in zip(
            peaks["value"], peaks["row"], peaks["col"], peaks["border"], strict=True)
            if (y0 + rr, x0 + cc) not in used]
        rest.sort(key=_order)
        self.items[start:] = rest
        if peaks["more"]:  # what it left out comes after its last listed peak
            self.floor[ij] = (-peaks["value"][-1], y0 + peaks["row"][-1], x0 + peaks["col"][-1])
        else:
            self.floor.pop(ij, None)


def _top_one(q: int, records: Mapping[str, Mapping[str, Any]], blocks: _Blocks, *, k: int,
             r: int, per_chunk: int, stats: dict[str, int]) -> list[tuple[float, int, int]]:
    ny, nx = -(-blocks.shape[0] // blocks.cy), -(-blocks.shape[1] // blocks.cx)
    cands = _Candidates(blocks.cy, blocks.cx)
    cap: dict[tuple[int, int], int] = {}
    for key, rec in records.items():
        if rec.get("peaks"):
            ij = (int(key.split(".")[0]), int(key.split(".")[1]))
            cap[ij] = per_chunk
            cands.add(ij, rec["peaks"][q], len(cands.items))
    cands.items.sort(key=_order)
    accepted: list[tuple[float, int, int]] = []
    i = 0
    while len(accepted) < k and i < len(cands.items):
        v, row, col, border, _ = cands.items[i]
        # a chunk that listed only its best peaks may hide one ahead of this one
        short = [ij for ij, f in cands.floor.items() if f < (-v, row, col)]
        if short:
            for ij in short:
                cap[ij] *= 16
                nb = (ij[0] > 0, ij[0] < ny - 1, ij[1] > 0, ij[1] < nx - 1)
                cands.add(ij, block_peaks(blocks.block(*ij)[:, :, q:q + 1], r, cap[ij], nb)[0],
                          i)
                stats["refills"] += 1
            continue
        i += 1
        if border:
            stats["border_checks"] += 1
            if blocks.window_max(row, col, r, q) > v:
                continue
        if any(abs(row - ar) <= r and abs(col - ac) <= r for _, ar, ac in accepted):
            continue  # a tie (equal values) with a location already taken
        accepted.append((v, row, col))
    return accepted


def top_locations(records: Mapping[str, Mapping[str, Any]], sim: Any, *, k: int, r: int,
                  per_chunk: int) -> tuple[list[list[tuple[float, int, int]]], dict[str, int]]:
    """Per phrase, the ``k`` highest peaks of the whole similarity raster ``sim``
    (``(y, x, query)`` DataArray of the written store) as ``(value, row, col)``, from
    the chunk records :func:`similarity_raster` returned (``per_chunk`` peaks each);
    also counts the border checks, chunk refills and chunk reads."""
    blocks = _Blocks(sim)
    stats = {"border_checks": 0, "refills": 0}
    results = [_top_one(q, records, blocks, k=k, r=r, per_chunk=per_chunk, stats=stats)
               for q in range(sim.shape[2])]
    stats["chunk_reads"] = blocks.reads
    return results, stats
