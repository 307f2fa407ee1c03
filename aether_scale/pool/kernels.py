"""Per-chunk pooling kernels: prefix sums over one raster chunk, vectorised over points.

One call of :func:`partial_sums` handles one raster chunk and every point
whose buffers reach into it (points may lie in a neighbouring chunk): it
returns, per point and buffer, the sum of valid values and the number of
valid pixels of the buffer's part inside the chunk. Partial sums of the
chunks a buffer touches add up to the exact total (:func:`finalize` turns
totals into means). Every chunk is thus read once, with no halo, and a buffer
may be wider than a chunk. Pure numpy + scipy.sparse; no loop per point or
pixel.

Algorithm (exact under the DESIGN.md membership rule):

- Values are made additive: AlphaEarth codes ``q`` become the integers
  ``sign(q)·q²`` (the de-quantised value times 127.5², see
  :mod:`aether_scale.aef`), floats stay floats; invalid pixels (any band
  nodata / non-finite) become 0 and a valid-pixel indicator is appended as an
  extra channel, so sums and counts travel together.
- The chunk is cut into row strips sized by a memory budget. Per strip a
  prefix sum down the columns is built, ``P[i, j] = Σ_{i' < i} v[i', j]``,
  one contiguous, SIMD-friendly array add per pixel row. Code sums are
  integers, kept in float32 while a bound proves every partial sum stays
  below 2²⁴ (exact, and the fastest sparse product), else int32 / int64;
  floats in float64. Code results are exact (independent of the chunking);
  float results are deterministic for a given chunking, whatever the
  scheduler.
- Circle of radius r around p: in each pixel column within reach, the member
  pixels form one run of rows ``[ilo, ihi]`` (centres with
  ``(xc − px)² + (yc − py)² ≤ r²``). The run ends come from the circle
  equation and are then corrected by evaluating that very inequality at the
  neighbouring rows, so rounding can never move a pixel in or out. A run's
  sum is ``P[ihi+1, j] − P[ilo, j]``: cost per point ∝ radius in pixels
  (2 look-ups per column), not ∝ area.
- Square window of radius k (the (2k+1)² block around the pixel containing
  p, clipped at the raster edge): the same column runs, 2(2k+1) look-ups.
- All runs of all points of a strip form one sparse ±1 matrix, multiplied
  with ``P`` in one scipy CSR @ dense product (a C loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..aef import NODATA, SCALE

CODE_SCALE = 1.0 / (SCALE * SCALE)  # sum of sign(q)·q² → sum of de-quantised values
POINTS_PER_BATCH = 4096  # points whose runs are built at once (bounds temporary arrays)


@dataclass(frozen=True)
class Buffer:
    """A buffer resolved on a grid: ``circle`` (radius in CRS units) or ``square`` (k px)."""

    shape: str
    radius: float  # metres (circle) or pixels (square)
    pad_rows: int  # how many pixel rows/cols the buffer can reach from the containing pixel
    pad_cols: int

    @classmethod
    def circle(cls, radius_m: float, dx: float, dy: float) -> Buffer:
        # a member centre is within r of p, and p is within half a pixel of its pixel's centre
        return cls("circle", float(radius_m), int(np.ceil(radius_m / abs(dy) + 0.5)) + 1,
                   int(np.ceil(radius_m / abs(dx) + 0.5)) + 1)

    @classmethod
    def square(cls, k: int) -> Buffer:
        return cls("square", float(k), int(k), int(k))


@dataclass(frozen=True)
class RegionSpec:
    """Where a block (one raster chunk) sits on the global grid."""

    row0: int  # global index of the block's first row / column
    col0: int
    ys: np.ndarray  # pixel-centre y of the block's rows
    xs: np.ndarray
    dy: float
    dx: float
    height: int  # global raster shape
    width: int


def _additive_strip(block: np.ndarray, kind: str, out: np.ndarray | None = None,
                    tmp: np.ndarray | None = None) -> np.ndarray:
    """(h, w, C+1) additive values: channels, then the valid-pixel indicator.

    Codes → int16 ``sign(q)·q²`` (nodata pixels 0); floats → float64 (invalid 0).
    ``out`` (and, for codes, an int8 ``tmp`` of the block's shape) may be given
    to reuse memory across strips.
    """
    h, w, c = block.shape
    dtype = np.int16 if kind == "codes" else np.float64
    if out is None:
        out = np.empty((h, w, c + 1), dtype=dtype)
    v = out[..., :c]
    if kind == "codes":
        np.copyto(v, block, casting="unsafe")
        valid = block.min(axis=-1) != NODATA
        absq = np.abs(block, out=tmp)  # int8; −128 stays −128, zeroed below
        np.multiply(v, absq, out=v)
    else:
        v[...] = block
        valid = np.isfinite(v).all(axis=-1)
    invalid = ~valid
    if invalid.any():
        out[invalid] = 0
    out[..., c] = valid
    return out


def _additive(block: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(values with invalid pixels zeroed, valid mask) for a (h, w, C) block."""
    v = _additive_strip(block, kind)
    return v[..., :-1], v[..., -1].astype(bool)


class _Axis:
    """Pixel-centre coordinates of one axis around a block, looked up by local index.

    Inside the block the stored coordinates are used (so the membership rule is
    evaluated on exactly the raster's coordinates); ``margin`` pixels beyond
    each end are extrapolated with the regular step.
    """

    def __init__(self, coords: np.ndarray, step: float, margin: int) -> None:
        n = coords.size
        self.margin = margin
        self.ext = np.concatenate([
            coords[0] + step * np.arange(-margin, 0), coords, coords[0] + step * np.arange(n, n + margin)
        ])

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        return np.take(self.ext, idx + self.margin, mode="clip")


def _runs(
    buf: Buffer, px: np.ndarray, py: np.ndarray, prow: np.ndarray, pcol: np.ndarray,
    reg: RegionSpec, xax: _Axis, yax: _Axis,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Column runs of each point's buffer: (global col, first row, last row, non-empty), each (n, m)."""
    offs = np.arange(-buf.pad_cols, buf.pad_cols + 1)
    gj = pcol[:, None] + offs[None, :]  # global column of each candidate column
    in_raster = (gj >= 0) & (gj < reg.width)
    if buf.shape == "square":
        k = int(buf.radius)
        ilo = np.broadcast_to(np.maximum(prow - k, 0)[:, None], gj.shape)
        ihi = np.broadcast_to(np.minimum(prow + k, reg.height - 1)[:, None], gj.shape)
        return gj, ilo, ihi, in_raster
    dx2 = xax(gj - reg.col0)
    dx2 -= px[:, None]
    dx2 *= dx2
    r2 = buf.radius * buf.radius
    ok = in_raster & (dx2 <= r2)
    half = np.where(ok, r2 - dx2, 0.0)
    np.sqrt(half, out=half)
    half /= abs(reg.dy)
    v = ((py - reg.ys[0]) / reg.dy)[:, None]  # continuous block-local row of p
    ilo = np.ceil(v - half).astype(np.int64)
    ihi = np.floor(v + half).astype(np.int64)
    pyc = py[:, None]

    def member(i: np.ndarray) -> np.ndarray:  # the membership rule, evaluated exactly
        d = yax(i) - pyc
        d *= d
        return dx2 + d <= r2

    ilo -= member(ilo - 1)
    ilo += ~member(ilo)
    ihi += member(ihi + 1)
    ihi -= ~member(ihi)
    ilo += reg.row0  # → global rows, clipped to the raster
    np.maximum(ilo, 0, out=ilo)
    ihi += reg.row0
    np.minimum(ihi, reg.height - 1, out=ihi)
    return gj, ilo, ihi, ok & (ilo <= ihi)


def _run_matrix(
    gj: np.ndarray, ilo: np.ndarray, ihi: np.ndarray, ok: np.ndarray, reg: RegionSpec,
    g0: int, g1: int, dtype: np.dtype,
) -> sp.csr_array:
    """Sparse ±1 matrix summing the parts of each point's column runs inside strip rows [g0, g1).

    Columns index the flattened ``(g1 - g0 + 1, block width)`` prefix array
    whose row ``i`` holds the sums of the strip's first ``i`` rows. Runs are
    clipped to the strip and to the block's columns; empty runs are left out.
    """
    n = gj.shape[0]
    w = reg.xs.size
    lj = gj - reg.col0
    top = np.maximum(ilo, g0) - g0
    bot = np.minimum(ihi, g1 - 1) - g0 + 1
    keep = ok & (top < bot) & (lj >= 0) & (lj < w)
    lj, top, bot = lj[keep], top[keep], bot[keep]
    nnz = lj.size
    indices = np.empty(2 * nnz, dtype=np.int64)
    indices[0::2] = bot * w + lj
    indices[1::2] = top * w + lj
    data = np.empty(2 * nnz, dtype=dtype)
    data[0::2] = 1
    data[1::2] = -1
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(2 * keep.sum(axis=1), out=indptr[1:])
    return sp.csr_array((data, indices, indptr), shape=(n, (g1 - g0 + 1) * w))


def partial_sums(
    block: np.ndarray,
    kind: str,
    reg: RegionSpec,
    px: np.ndarray,
    py: np.ndarray,
    prow: np.ndarray,
    pcol: np.ndarray,
    buffers: list[Buffer],
    *,
    block_bytes: int = 32 * 2**20,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Sums over ``block`` of each point's buffers: (n, B, C+1) float64, last channel = count.

    ``block``: (h, w, C) raw values (int8 codes or floats) of global rows
    ``reg.row0 …`` and columns ``reg.col0 …`` (one raster chunk). Points may
    lie outside the block: only the part of each buffer inside the block is
    summed, so a buffer's total is the sum of its partial sums over the
    chunks it touches (exact for codes: integer sums). ``px, py``: point
    coordinates; ``prow, pcol``: global pixel containing each point.
    ``block_bytes`` caps the prefix-sum array of one strip of rows. ``timings``: a dict
    that receives the seconds spent in each part (``decode``: values made additive,
    ``prefix``: prefix sums, ``runs``: column runs and their sparse matrix, ``product``:
    the sparse products), added to what it holds.
    """
    n = px.size
    h, w, c = block.shape
    nb = len(buffers)
    sums = np.zeros((n, nb, c + 1), dtype=np.float64)
    if n == 0:
        return sums
    pad = max(b.pad_rows for b in buffers)
    if kind == "codes":
        # Code sums are integers. While a point's runs are summed, |partial sums| stay
        # ≤ (buffer area + strip rows) · 127²; the prefix array takes the cheapest dtype
        # that holds such integers exactly: float32 (< 2²⁴, fastest product), int32, int64.
        area = max((2 * b.pad_rows + 1) * (2 * b.pad_cols + 1) for b in buffers)
        step = min(h, max(1, int(block_bytes // (w * (c + 1) * 6))))
        if (area + step + 1) * 127 * 127 < 2**24:
            pdtype = np.dtype(np.float32)
        elif (area + h + 1) * 127 * 127 < 2**31 - 1:
            pdtype = np.dtype(np.int32)
        else:
            pdtype = np.dtype(np.int64)
    else:
        pdtype = np.dtype(np.float64)
    row_bytes = w * (c + 1) * (pdtype.itemsize + (2 if kind == "codes" else 8))
    step = min(h, max(1, int(block_bytes // row_bytes)))
    margin = 2 * max(max(b.pad_rows, b.pad_cols) for b in buffers) + 8
    xax = _Axis(reg.xs, reg.dx, margin)
    yax = _Axis(reg.ys, reg.dy, margin)
    # buffers reused by every strip (fewer page faults under dask's malloc settings)
    vbuf = np.empty((step, w, c + 1), dtype=np.int16 if kind == "codes" else np.float64)
    tbuf = np.empty((step, w, c), dtype=np.int8) if kind == "codes" else None
    pbuf = np.empty((step + 1, w, c + 1), dtype=pdtype)
    order = np.argsort(prow, kind="stable")
    srt = prow[order]
    t_dec = t_pre = t_runs = t_prod = 0.0
    clock = time.perf_counter
    for s in range(0, h, step):
        g0, g1 = reg.row0 + s, reg.row0 + min(s + step, h)  # global rows of this strip
        lo, hi = np.searchsorted(srt, [g0 - pad, g1 + pad])
        if lo == hi:
            continue
        sel = order[lo:hi]
        # column order within the strip: consecutive points read neighbouring prefix
        # columns (cache reuse in the sparse product; each point's sums are unaffected)
        sel = sel[np.argsort(pcol[sel], kind="stable")]
        nr = g1 - g0
        t0 = clock()
        v = _additive_strip(block[g0 - reg.row0 : g1 - reg.row0], kind, out=vbuf[:nr],
                            tmp=None if tbuf is None else tbuf[:nr])
        t1 = clock()
        pre = pbuf[: nr + 1]
        pre[0] = 0
        for i in range(g1 - g0):  # one contiguous (w, C+1) add per pixel row
            np.add(pre[i], v[i], out=pre[i + 1])
        flat = pre.reshape(-1, c + 1)
        t2 = clock()
        t_dec += t1 - t0
        t_pre += t2 - t1
        for t in range(0, sel.size, POINTS_PER_BATCH):
            pts = sel[t : t + POINTS_PER_BATCH]
            for bi, buf in enumerate(buffers):
                t0 = clock()
                gj, ilo, ihi, ok = _runs(buf, px[pts], py[pts], prow[pts], pcol[pts], reg,
                                         xax, yax)
                m = _run_matrix(gj, ilo, ihi, ok, reg, g0, g1, pdtype)
                t1 = clock()
                sums[pts, bi] += m @ flat
                t_runs += t1 - t0
                t_prod += clock() - t1
    if timings is not None:
        for k, v in (("decode", t_dec), ("prefix", t_pre), ("runs", t_runs), ("product", t_prod)):
            timings[k] = timings.get(k, 0.0) + v
    return sums


def finalize(sums: np.ndarray, kind: str, *, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Total sums (..., C+1) → (mean vectors float32, NaN where empty; counts int64).

    Code sums are scaled back to de-quantised units; vectors are
    L2-normalised when ``normalize``.
    """
    c = sums.shape[-1] - 1
    counts = np.rint(sums[..., c]).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        vec = sums[..., :c] / counts[..., None]
        if kind == "codes":
            vec *= CODE_SCALE
        if normalize:
            norm = np.sqrt(np.sum(vec * vec, axis=-1, keepdims=True))
            vec /= np.where(norm > 0, norm, 1.0)
    vec[counts == 0] = np.nan
    return vec.astype(np.float32), counts
