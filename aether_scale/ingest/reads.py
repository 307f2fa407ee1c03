"""Ingest block reads: one target block from the tiles that touch it.

:func:`read_block` opens only the tiles overlapping a target window, reads only
the source windows they contribute (aligned copies or exact nearest-neighbour
reprojection), converts them to int8 AlphaEarth codes (float tiles
re-quantised, nodata/NaN → −128, whole pixels masked) and merges them by the
overlap rule (:data:`OverlapRule`). Temporaries stay within bounded row strips
(``_STRIP_VALUES``), so memory is one block plus one strip.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np

from .. import aef, storage
from .grid import TargetGrid, _Placement, _same_crs
from .inputs import _GDAL_ENV, IngestError, TileInfo

OverlapRule = Literal["error", "first", "last"]

#: AE tiles with more than this many bytes per pixel-strip are read in row strips.
_STRIP_VALUES = 1 << 21  # values per temporary strip (float64 encode temp ≈ 16 MB)
#: AlphaEarth vectors are unit length (real ones 0.994–1.006): a float tile whose pixels
#: have other norms is not AlphaEarth (scaled, another product …)
_NORM_RANGE = (0.9, 1.1)
_NORM_SAMPLE = 2048  # pixels per strip whose norm is checked
_NORM_BAD_SHARE = 0.05  # more than this share of checked pixels off-norm → refused
_counts = threading.local()  # per task: pixels masked because a value was not finite


def _check_unit(tile: TileInfo, codes: np.ndarray, valid: np.ndarray) -> None:
    """Refuse a float tile whose valid pixels are not unit vectors (a sample, after
    re-quantisation)."""
    idx = np.flatnonzero(valid.ravel())
    if idx.size == 0:
        return
    if idx.size > _NORM_SAMPLE:
        idx = idx[:: idx.size // _NORM_SAMPLE][:_NORM_SAMPLE]
    v = aef.decode(codes.reshape(-1, codes.shape[-1])[idx]).astype(np.float64)
    norm = np.sqrt((v * v).sum(axis=1))
    off = (norm < _NORM_RANGE[0]) | (norm > _NORM_RANGE[1])
    if off.mean() > _NORM_BAD_SHARE:
        raise IngestError(
            f"{tile.path}: {off.mean():.0%} of the pixels checked are not unit vectors (norms "
            f"{np.percentile(norm, 5):.3g}…{np.percentile(norm, 95):.3g}; AlphaEarth vectors "
            "have norm 1). This is not an AlphaEarth embedding tile, or its bands are scaled "
            "or out of order: give the 64 bands A00…A63 as published (int8 codes, or the "
            "de-quantised floats Earth Engine exports)")


def _to_codes(raw: np.ndarray, tile: TileInfo, out: np.ndarray | None = None) -> np.ndarray:
    """Source values (rows, cols, 64) → int8 AEF codes in ``out``; returns the valid mask.

    ``out`` defaults to ``raw`` itself (int8 tiles: converted in place). A pixel
    with any band missing (−128, the declared nodata, NaN) is written as all
    −128: AlphaEarth masks whole pixels. Works in row strips so temporaries stay
    a few MB whatever the window size.
    """
    if out is None:
        if tile.dtype != "int8":
            raise TypeError("float tiles need an int8 output buffer")
        out = raw
    h = raw.shape[0]
    valid = np.empty(raw.shape[:2], bool)
    step = max(1, _STRIP_VALUES // max(1, raw.shape[1] * raw.shape[2]))
    remap = (tile.dtype == "int8" and tile.nodata is not None and tile.nodata != aef.NODATA
             and -128 <= tile.nodata <= 127)
    for i in range(0, h, step):
        src, dst = raw[i:i + step], out[i:i + step]
        if tile.dtype == "int8":
            if remap:
                src[src == np.int8(tile.nodata)] = aef.NODATA
            if dst is not src:
                dst[...] = src
        else:
            missing = np.isnan(src)
            if tile.nodata is not None and not math.isnan(tile.nodata):
                missing |= src == tile.nodata
            inf = np.isinf(src)
            if inf.any():  # not a value: the pixel is masked, and counted
                px = inf.any(axis=-1) & ~missing.any(axis=-1)
                _counts.nonfinite = getattr(_counts, "nonfinite", 0) + int(px.sum())
                missing |= inf
            big = np.abs(np.where(missing, 0.0, src)) > 1.0 + 1e-6
            if big.any():
                raise IngestError(
                    f"{tile.path}: {int(big.sum()):,} values outside [-1, 1] (largest |v| = "
                    f"{float(np.abs(src[big]).max()):.4g}); AlphaEarth embedding components lie "
                    "in [-1, 1] (unit vectors). Was the export scaled (×100, or int8 codes "
                    "saved as floats)? Re-export the de-quantised floats, or give the int8 "
                    "tiles")
            dst[...] = aef.encode(np.where(missing, 0.0, src))
            dst[missing] = aef.NODATA
        bad = (dst == aef.NODATA).any(axis=-1)
        if bad.any():
            dst[bad] = aef.NODATA
        valid[i:i + step] = ~bad
        if tile.dtype != "int8":  # float exports: where scaling mistakes happen
            _check_unit(tile, dst, ~bad)
    return valid


def _read_window(src, tile: TileInfo, r0: int, r1: int, c0: int, c1: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Read source rows [r0, r1) × cols [c0, c1) (storage order) as (rows, cols, 64).

    ``out`` (optional): a view of that shape and the tile's dtype — possibly
    strided or row-reversed — to fill instead of a new array.

    Two ways, same values:

    - an uncompressed local GeoTIFF (:func:`_direct_read`) is read by GDAL straight
      into ``out``'s pixel-interleaved layout (``GTIFF_DIRECT_IO``: no block cache,
      no band-by-band copy), one call;
    - anything else goes through band-first strips (what GDAL decodes fastest) that
      are re-interleaved here (:func:`_interleave`). Strips follow the file's
      internal block rows, so every stored block is decoded once per call, whatever
      the GDAL cache size, and memory stays bounded by the strip.
    """
    from rasterio.windows import Window

    if out is None:
        out = np.empty((r1 - r0, c1 - c0, aef.N_BANDS), dtype=tile.dtype)
    bands = list(tile.band_indexes)
    if _direct_read(tile) and min(out.strides) > 0:
        src.read(bands, window=Window(c0, r0, c1 - c0, r1 - r0), out=out.transpose(2, 0, 1))
        return out
    bh = max(1, tile.block_rows)
    budget = max(1, (4 * _STRIP_VALUES) // max(1, (c1 - c0) * aef.N_BANDS))
    rows_per = bh * max(1, budget // bh)  # whole block rows, at least one
    edges = [r0] + list(range((r0 // rows_per + 1) * rows_per, r1, rows_per)) + [r1]
    buf = np.empty((aef.N_BANDS, max(b - a for a, b in zip(edges, edges[1:], strict=False)),
                    c1 - c0), dtype=tile.dtype)
    for a, b in zip(edges, edges[1:], strict=False):
        part = buf[:, :b - a]
        src.read(bands, window=Window(c0, a, c1 - c0, b - a), out=part)
        _interleave(part, out[a - r0:b - r0])
    return out


def _direct_read(tile: TileInfo) -> bool:
    """Whether GDAL reads this tile straight into a pixel-interleaved buffer: a local,
    uncompressed, pixel-interleaved GeoTIFF (``GTIFF_DIRECT_IO``, set for local tiles in
    :func:`_gdal_env`). Compressed tiles decode through GDAL's per-band block cache, for
    which band-first reads plus :func:`_interleave` are faster; remote ones would turn
    into many small range requests."""
    return (tile.direct_io and not storage.is_url(tile.path)
            and not tile.path.startswith("/vsi"))


def _gdal_env(tile: TileInfo) -> dict:
    """The GDAL settings a chunk task reads ``tile`` with."""
    return {**_GDAL_ENV, "GTIFF_DIRECT_IO": "YES"} if _direct_read(tile) else _GDAL_ENV


_LITTLE = sys.byteorder == "little"
_INTERLEAVE_PX = 4096  # pixels per re-interleave step (temporaries ≈ 0.5 MB, in cache)


def _interleave(planes: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = planes.transpose(1, 2, 0)`` — band planes (64, rows, cols) to pixel
    vectors (rows, cols, 64) — fast for int8.

    numpy's strided byte copy moves one byte at a time (≈150 MB/s here); instead the
    64 planes are merged pairwise into 16-, 32- then 64-bit words with contiguous
    vector shifts and ors, and the 8 words of each pixel are copied as whole words:
    ≈6× faster, the same bytes (little-endian layout; other cases take numpy's copy).
    """
    n = planes.shape[0]
    if (planes.dtype != np.int8 or n % 8 or not _LITTLE or out.strides[-1] != 1
            or out.strides[-2] != n or out.dtype != np.int8):
        out[...] = planes.transpose(1, 2, 0)
        return
    rows, cols = planes.shape[1:]
    words = out.view(np.uint64)  # (rows, cols, n // 8): pixel p's bands 8k…8k+7 in word k
    step = max(1, _INTERLEAVE_PX // max(1, cols))
    for r in range(0, rows, step):
        s = planes[:, r:r + step].view(np.uint8)
        x = s[1::2].astype(np.uint16)
        x <<= 8
        x |= s[0::2]
        y = x[1::2].astype(np.uint32)
        y <<= 16
        y |= x[0::2]
        z = y[1::2].astype(np.uint64)
        z <<= 32
        z |= y[0::2]
        words[r:r + step] = z.transpose(1, 2, 0)


def _read_aligned(src, p: _Placement, tr0: int, tr1: int, tc0: int, tc1: int,
                  out: np.ndarray) -> np.ndarray | None:
    """Copy an aligned tile's codes over target rows [tr0, tr1) × cols [tc0, tc1).

    Writes into ``out`` (shape (tr1-tr0, tc1-tc0, 64)) where the tile reaches and
    returns the mask of pixels it made valid; None when it does not reach.
    """
    t = p.tile
    r0, r1 = max(tr0, p.row_off), min(tr1, p.row_off + t.height)
    c0, c1 = max(tc0, p.col_off), min(tc1, p.col_off + t.width)
    if r0 >= r1 or c0 >= c1:
        return None
    sc0, sc1 = c0 - p.col_off, c1 - p.col_off
    dst = out[r0 - tr0:r1 - tr0, c0 - tc0:c1 - tc0]
    if t.bottom_up:  # storage row s holds target row p.row_off + height - 1 - s
        sr0, sr1 = p.row_off + t.height - r1, p.row_off + t.height - r0
        view = dst[::-1]
    else:
        sr0, sr1 = r0 - p.row_off, r1 - p.row_off
        view = dst
    if t.dtype == "int8":  # straight into the destination, then masked in place
        _read_window(src, t, sr0, sr1, sc0, sc1, out=view)
        ok = _to_codes(dst, t)
    else:
        raw = _read_window(src, t, sr0, sr1, sc0, sc1)
        ok = _to_codes(raw[::-1] if t.bottom_up else raw, t, out=dst)
    valid = np.zeros(out.shape[:2], bool)
    valid[r0 - tr0:r1 - tr0, c0 - tc0:c1 - tc0] = ok
    return valid


def _read_reprojected(src, p: _Placement, grid: TargetGrid, tr0: int, tr1: int, tc0: int,
                      tc1: int, out: np.ndarray) -> np.ndarray | None:
    """Nearest-neighbour codes of a tile in another CRS/grid over a target window.

    Each target pixel centre is transformed exactly (PROJ, no interpolation
    tolerance) into the tile's CRS; the source pixel whose footprint contains it
    gives the codes. Only the source window those pixels need is read. Writes
    into ``out`` and returns the mask of pixels made valid (None: out of reach).
    """
    t = p.tile
    X, Y = np.meshgrid(grid.x_centres(tc0, tc1), grid.y_centres(tr0, tr1))
    if not _same_crs(t.crs_wkt, grid.crs_wkt):
        X, Y = _transformer(grid.crs_wkt, t.crs_wkt).transform(X, Y)
    a, _, c, _, e, f = t.transform
    with np.errstate(invalid="ignore"):
        col = np.floor((X - c) / a)
        row = np.floor((Y - f) / e)
    inside = (col >= 0) & (col < t.width) & (row >= 0) & (row < t.height)
    if not inside.any():
        return None
    col = col[inside].astype(np.int64)
    row = row[inside].astype(np.int64)
    sr0, sr1 = int(row.min()), int(row.max()) + 1
    sc0, sc1 = int(col.min()), int(col.max()) + 1
    raw = _read_window(src, t, sr0, sr1, sc0, sc1)
    codes = raw if t.dtype == "int8" else np.empty(raw.shape, np.int8)
    ok = _to_codes(raw, t, out=codes)
    idx = (row - sr0) * (sc1 - sc0) + (col - sc0)
    out[inside] = codes.reshape(-1, aef.N_BANDS)[idx]
    valid = np.zeros(out.shape[:2], bool)
    valid[inside] = ok.reshape(-1)[idx]
    return valid


_local = threading.local()


def _transformer(src_wkt: str, dst_wkt: str):
    """A PROJ transformer, built once per thread (building one costs ~50 ms)."""
    from pyproj import Transformer

    cache = _local.__dict__.setdefault("transformers", {})
    key = (src_wkt, dst_wkt)
    if key not in cache:
        cache[key] = Transformer.from_crs(src_wkt, dst_wkt, always_xy=True)
    return cache[key]


def _strips(r0: int, r1: int, width: int, values: int) -> list[tuple[int, int]]:
    step = max(1, values // max(1, width * aef.N_BANDS))
    return [(r, min(r + step, r1)) for r in range(r0, r1, step)]


def read_block(
    placements: Sequence[_Placement], grid: TargetGrid, r0: int, r1: int, c0: int, c1: int,
    overlap: OverlapRule,
) -> np.ndarray:
    """Target rows [r0, r1) × cols [c0, c1) as int8 codes (rows, cols, 64).

    Opens the given tiles, reads only the windows they contribute, and merges
    them by the overlap rule. Memory: the block plus one bounded strip.
    Raises :class:`IngestError` on unreadable data or a forbidden overlap.
    """
    return _read_block_codes(placements, grid, r0, r1, c0, c1, overlap)[0]


def _read_block(
    placements: Sequence[_Placement], grid: TargetGrid, r0: int, r1: int, c0: int, c1: int,
    overlap: OverlapRule,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`read_block` plus the (rows, cols) mask of valid pixels and how many pixels
    were masked because a value was not finite (±inf in a float tile)."""
    _counts.nonfinite = 0
    block, valid = _read_block_codes(placements, grid, r0, r1, c0, c1, overlap)
    return block, valid, int(_counts.nonfinite)


def _read_block_codes(
    placements: Sequence[_Placement], grid: TargetGrid, r0: int, r1: int, c0: int, c1: int,
    overlap: OverlapRule,
) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.errors import RasterioError

    h, w = r1 - r0, c1 - c0
    block = np.full((h, w, aef.N_BANDS), aef.NODATA, np.int8)
    valid = np.zeros((h, w), bool)
    if not placements:
        return block, valid
    owner = np.full((h, w), -1, np.int16)  # which placement wrote a pixel (for error messages)
    for k, p in enumerate(placements):
        try:
            with storage.open_raster_file(p.tile.path, **_gdal_env(p.tile)) as src:
                # int8 aligned tiles: one read for the whole block; else bounded strips
                if p.aligned and p.tile.dtype == "int8":
                    strips = [(r0, r1)]
                else:
                    values = _STRIP_VALUES * (4 if p.tile.dtype == "int8" else 1)
                    strips = _strips(r0, r1, w, values)
                for s0, s1 in strips:
                    sub = block[s0 - r0:s1 - r0]
                    old_valid = valid[s0 - r0:s1 - r0]
                    sub_owner = owner[s0 - r0:s1 - r0]
                    if not old_valid.any():
                        # nothing valid here yet (all −128): read straight into the block
                        new_valid = _read_into(src, p, grid, s0, s1, c0, c1, sub)
                        if new_valid is not None:
                            old_valid |= new_valid
                            sub_owner[new_valid] = k
                        continue
                    tmp = np.full_like(sub, aef.NODATA)
                    new_valid = _read_into(src, p, grid, s0, s1, c0, c1, tmp)
                    if new_valid is None:
                        continue
                    both = new_valid & old_valid
                    take = new_valid & ~old_valid
                    if both.any():
                        if overlap == "error":
                            differ = both & (tmp != sub).any(axis=-1)
                            if differ.any():
                                _raise_overlap(placements, sub_owner, differ, p, grid,
                                               s0, c0)
                        elif overlap == "last":
                            take = new_valid
                    sub[take] = tmp[take]
                    old_valid |= take
                    sub_owner[take] = k
        except IngestError:
            raise
        except (RasterioError, OSError) as e:
            err = IngestError(
                f"{p.tile.path}: reading pixels failed ({e}). The file is probably truncated "
                "or corrupt: re-download or re-export it"
            )
            # a remote read may fail in passing (the chunk task retries it, counted)
            err.transient = storage.is_url(p.tile.path) and storage.gdal_read_failure(e)
            raise err from None
    return block, valid


def _read_into(src, p: _Placement, grid: TargetGrid, r0: int, r1: int, c0: int, c1: int,
               out: np.ndarray) -> np.ndarray | None:
    if p.aligned:
        return _read_aligned(src, p, r0, r1, c0, c1, out)
    return _read_reprojected(src, p, grid, r0, r1, c0, c1, out)


def _raise_overlap(placements: Sequence[_Placement], owner: np.ndarray, differ: np.ndarray,
                   p: _Placement, grid: TargetGrid, s0: int, c0: int) -> None:
    rr, cc = np.nonzero(differ)
    prev = placements[int(owner[rr[0], cc[0]])].tile.path
    x = grid.x_centres(c0 + int(cc[0]), c0 + int(cc[0]) + 1)[0]
    y = grid.y_centres(s0 + int(rr[0]), s0 + int(rr[0]) + 1)[0]
    raise IngestError(
        f"overlapping tiles disagree: {prev} and {p.tile.path} both hold valid but different "
        f"AlphaEarth codes at {len(rr)} pixel(s) here, first at x={x:.2f}, y={y:.2f} "
        f"(target CRS). Fix: remove one of the files (different years or versions?), or set "
        f"ingest.overlap to 'first' or 'last' to let input order decide"
    )
