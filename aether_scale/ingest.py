"""AlphaEarth GeoTIFF / COG / VRT tiles → ``ae.zarr`` (the ``ingest`` stage).

What it writes (the workspace contract, DESIGN.md): an xarray Dataset with one
variable ``embedding`` of dims ``(y, x, band)``, dtype int8, holding raw
AlphaEarth codes (decode with :func:`aether_scale.aef.decode`), nodata −128,
``band`` = ``A00``…``A63``, ``x``/``y`` = pixel-centre coordinates, north-up
(``y`` decreasing), CRS and transform on a ``spatial_ref`` coordinate exactly
as rioxarray writes them (``.rio.write_crs`` / ``.rio.write_transform``).

How to open it::

    ds = xr.open_zarr("ws/ae.zarr", mask_and_scale=False)   # int8 codes, lazily
    ds.embedding.rio.crs, ds.rio.transform(), ds.embedding.rio.nodata  # CRS, grid, -128

Nodata is recorded as the Zarr array ``fill_value`` (−128; chunks that are
entirely nodata are not stored at all) and as the attribute ``nodata = -128``
(what ``.rio.nodata`` reads). No CF ``_FillValue`` attribute is written on
purpose, so *every* way of opening it — default ``xr.open_zarr(path)`` included
— returns the raw int8 codes, never a float32 copy with NaNs (4× the memory,
and codes that no longer decode). ``mask_and_scale=False`` is still the
recommended, explicit spelling.

How it works (never the whole raster in memory): the tiles' headers are read
once to fix a target grid; then a dask array is built whose every block is one
task that opens the tiles overlapping that block and reads only their window
(rasterio windowed reads), so a worker holds one block (plus a bounded strip
of temporaries) at a time; ``to_zarr`` streams the blocks to disk. The same
graph runs on the threaded scheduler, a LocalCluster or a remote cluster.

Tile cases handled:

- int8 AEF tiles (nodata −128; a different declared nodata is mapped to −128);
- float32/float64 tiles as Earth Engine exports them: re-quantised with
  :func:`aether_scale.aef.encode` (exact on de-quantised values); NaN and the
  declared nodata → −128;
- bottom-up tiles (positive y pixel size in the geotransform): honoured and
  flipped to north-up;
- mosaics of adjacent tiles; gaps between or around tiles → −128;
- tiles in another CRS (e.g. UTM 30N and 31N onto EPSG:27700) or on an
  unaligned grid: nearest neighbour — each target pixel takes the code of the
  source pixel whose footprint contains the target pixel's centre (centres
  transformed exactly with PROJ, no approximation, so the result does not
  depend on the chunking and codes stay exact);
- VRT files (anything GDAL opens works the same way).

A pixel is *valid* when none of its 64 codes is −128 (AlphaEarth masks whole
pixels; a pixel with some bands missing is written as all −128).

Target grid: CRS = ``crs`` or the first tile's CRS; pixel size =
``resolution``; extent = the union of the tiles' bounds in that CRS, snapped
outwards to whole pixels. The grid's phase follows the first tile whose CRS
and pixel size match the target (so such tiles are copied without resampling);
otherwise it is anchored on multiples of the resolution.

Overlap rule (``overlap``): where two tiles both hold a valid pixel,

- ``"error"`` (default): identical codes are fine (AlphaEarth tiles repeat at
  their edges); different codes raise :class:`IngestError` naming both files
  and the location;
- ``"first"`` / ``"last"``: the earlier / later tile in input order wins.

Where only one tile is valid at a pixel, the valid one wins in every mode.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import aef

OverlapRule = Literal["error", "first", "last"]

#: AE tiles with more than this many bytes per pixel-strip are read in row strips.
_STRIP_VALUES = 1 << 21  # values per temporary strip (float64 encode temp ≈ 16 MB)
_TILE_EXTENSIONS = (".tif", ".tiff", ".vrt", ".gtiff", ".cog")
_GDAL_ENV = {
    # bounded per-process GDAL block cache (MB): workers keep memory for blocks, not caches
    "GDAL_CACHEMAX": 32,
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
}
#: recorded in the stage manifest; bump when the output for the same inputs changes.
INGEST_FORMAT_VERSION = 1
#: default chunk edge: 1024 × 1024 px × 64 bands int8 = 64 MiB per chunk.
DEFAULT_CHUNK_PX = 1024


class IngestError(ValueError):
    """Input tiles that cannot be ingested; the message names the file and the fix."""


# ----------------------------------------------------------------------------- inputs
def resolve_tiles(patterns: Sequence[str]) -> list[str]:
    """Expand tile paths, globs and folders into an ordered list of files.

    A folder contributes its ``*.tif``, ``*.tiff`` and ``*.vrt`` files (sorted);
    a glob contributes its matches (sorted); a URL (``s3://…``, ``/vsicurl/…``)
    is kept as is. Input order is kept (it matters for ``overlap='first'/'last'``)
    and duplicates are dropped.

    Raises :class:`IngestError` when nothing is given, when a glob or folder
    matches no tile, or when a path does not exist.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise IngestError(
            "no AlphaEarth tiles given: set ingest.tiles in the run config to GeoTIFF/COG/VRT "
            "paths, folders or globs (e.g. tiles: ['data/ae/*.tif'])"
        )
    out: list[str] = []
    for pat in patterns:
        pat = str(pat)
        if "://" in pat or pat.startswith("/vsi"):
            found = [pat]
        elif any(ch in pat for ch in "*?["):
            found = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
            found = [f for f in found if os.path.isfile(f)]
            if not found:
                raise IngestError(
                    f"ingest.tiles pattern {pat!r} matched no files: fix the pattern or the "
                    "folder it points at"
                )
        elif os.path.isdir(pat):
            found = sorted(
                os.path.join(pat, f)
                for f in os.listdir(pat)
                if f.lower().endswith(_TILE_EXTENSIONS) and os.path.isfile(os.path.join(pat, f))
            )
            if not found:
                raise IngestError(
                    f"ingest.tiles folder {pat} holds no .tif/.tiff/.vrt files: point "
                    "ingest.tiles at the tiles themselves or at a glob"
                )
        elif os.path.exists(pat):
            found = [pat]
        else:
            raise IngestError(f"ingest.tiles: {pat} does not exist (fix the path in the config)")
        out.extend(os.path.abspath(f) if "://" not in f and not f.startswith("/vsi") else f
                   for f in found)
    return list(dict.fromkeys(out))  # drop repeats, keep first-seen order


@dataclass(frozen=True)
class TileInfo:
    """What the ingest needs to know about one source tile (small and picklable)."""

    path: str
    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]  # a, b, c, d, e, f (GDAL order)
    width: int
    height: int
    dtype: str  # "int8", "float32" or "float64"
    nodata: float | None
    band_indexes: tuple[int, ...]  # 1-based source band for A00…A63
    files: tuple[str, ...]  # every file GDAL reads for it (a VRT's sources included)
    block_rows: int = 256  # rows of the file's internal blocks (read strips follow them)

    @property
    def bottom_up(self) -> bool:
        """True when row 0 is the southern edge (positive y pixel size)."""
        return self.transform[4] > 0


def inspect_tile(path: str) -> TileInfo:
    """Read one tile's header and check it is an AlphaEarth raster.

    Raises :class:`IngestError` naming the file and the fix when it cannot be
    opened as a raster, has no CRS, does not have 64 bands, has a dtype other
    than int8/float32/float64, or a rotated/sheared geotransform.
    """
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.Env(**_GDAL_ENV), rasterio.open(path) as src:
            count, crs, tr = src.count, src.crs, src.transform
            dtypes = set(src.dtypes)
            nodata = src.nodata
            descriptions = tuple(src.descriptions)
            width, height = src.width, src.height
            files = tuple(src.files) or (path,)
            block_rows = int(src.block_shapes[0][0]) if src.block_shapes else 256
    except (RasterioError, OSError) as e:
        raise IngestError(
            f"{path}: cannot be read as a raster ({e}). Check that it is a GeoTIFF/COG/VRT that "
            "GDAL can open (e.g. `gdalinfo` it) and is not truncated; re-download or re-export it"
        ) from None
    if count != aef.N_BANDS:
        raise IngestError(
            f"{path}: has {count} band(s); an AlphaEarth tile has {aef.N_BANDS} (A00…A63). "
            "Export or download all 64 embedding bands (one band per embedding dimension) "
            "into each file"
        )
    if crs is None:
        raise IngestError(
            f"{path}: has no CRS. Assign the CRS the tile was produced in, e.g. "
            "`gdal_edit.py -a_srs EPSG:32630 FILE` (AlphaEarth tiles are in their local UTM zone)"
        )
    if len(dtypes) != 1:
        raise IngestError(f"{path}: bands have mixed dtypes {sorted(dtypes)}; "
                          "rewrite it with one dtype (int8 codes or float32 values)")
    dtype = dtypes.pop()
    if dtype not in ("int8", "float32", "float64"):
        raise IngestError(
            f"{path}: dtype {dtype} is not an AlphaEarth encoding. Use int8 codes (the published "
            "COGs, nodata -128) or float32 values as Earth Engine exports them; other integer "
            "types (uint8, int16, …) would be ambiguous, so convert them explicitly"
        )
    if tr.b != 0 or tr.d != 0:
        raise IngestError(
            f"{path}: has a rotated/sheared geotransform {tuple(tr)[:6]}; warp it to a "
            "north-up grid first (e.g. `gdalwarp -r near IN OUT`)"
        )
    band_indexes = tuple(range(1, aef.N_BANDS + 1))
    if all(descriptions) and set(descriptions) == set(aef.BAND_NAMES):
        # bands named A00…A63 in another order: read them in AlphaEarth order
        pos = {name: i + 1 for i, name in enumerate(descriptions)}
        band_indexes = tuple(pos[name] for name in aef.BAND_NAMES)
    return TileInfo(
        path=path,
        crs_wkt=crs.to_wkt(),
        transform=(tr.a, tr.b, tr.c, tr.d, tr.e, tr.f),
        width=width,
        height=height,
        dtype=dtype,
        nodata=None if nodata is None else float(nodata),
        band_indexes=band_indexes,
        files=files,
        block_rows=block_rows,
    )


# ------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class TargetGrid:
    """The north-up output grid: CRS, pixel size, top-left corner and size."""

    crs_wkt: str
    resolution: float
    left: float
    top: float
    width: int
    height: int

    def transform(self):  # -> affine.Affine
        """The grid's affine transform (north-up: negative y pixel size)."""
        from affine import Affine

        return Affine(self.resolution, 0.0, self.left, 0.0, -self.resolution, self.top)

    def x_centres(self, c0: int = 0, c1: int | None = None) -> np.ndarray:
        c1 = self.width if c1 is None else c1
        return self.left + (np.arange(c0, c1, dtype=np.float64) + 0.5) * self.resolution

    def y_centres(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        r1 = self.height if r1 is None else r1
        return self.top - (np.arange(r0, r1, dtype=np.float64) + 0.5) * self.resolution


@dataclass(frozen=True)
class _Placement:
    """How one tile maps onto the target grid."""

    tile: TileInfo
    aligned: bool  # same CRS, same pixel size, whole-pixel offset: a plain windowed copy
    row_off: int  # aligned: target row of the tile's northernmost row
    col_off: int  # aligned: target column of the tile's first column
    rows: tuple[int, int]  # target rows [r0, r1) the tile may touch
    cols: tuple[int, int]  # target cols [c0, c1) the tile may touch


def _tile_bounds(t: TileInfo) -> tuple[float, float, float, float]:
    a, _, c, _, e, f = t.transform
    xs = (c, c + a * t.width)
    ys = (f, f + e * t.height)
    return min(xs), min(ys), max(xs), max(ys)


@functools.lru_cache(maxsize=64)
def _same_crs(wkt_a: str, wkt_b: str) -> bool:
    from rasterio.crs import CRS

    return wkt_a == wkt_b or CRS.from_wkt(wkt_a) == CRS.from_wkt(wkt_b)


def _snap_down(v: float, anchor: float, res: float) -> float:
    k = (v - anchor) / res
    return anchor + math.floor(k + 1e-6) * res


def _snap_up(v: float, anchor: float, res: float) -> float:
    k = (v - anchor) / res
    return anchor + math.ceil(k - 1e-6) * res


def plan_grid(
    tiles: Sequence[TileInfo], *, crs: str | None = None, resolution: float = aef.PIXEL_SIZE_M
) -> tuple[TargetGrid, list[_Placement]]:
    """Fix the target grid for ``tiles`` and where each tile lands on it.

    Raises :class:`IngestError` when ``crs`` is not a valid CRS.
    """
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.warp import transform_bounds

    if not tiles:
        raise IngestError("no tiles to ingest (ingest.tiles is empty)")
    if crs is None:
        target = CRS.from_wkt(tiles[0].crs_wkt)
    else:
        try:
            target = CRS.from_user_input(crs)
        except CRSError as e:
            raise IngestError(f"ingest.crs {crs!r} is not a CRS GDAL knows ({e}); "
                              "use e.g. 'EPSG:27700'") from None
    twkt = target.to_wkt()
    res = float(resolution)

    same = [_same_crs(t.crs_wkt, twkt) for t in tiles]
    bounds = []
    for t, s in zip(tiles, same, strict=True):
        b = _tile_bounds(t)
        if not s:
            b = transform_bounds(CRS.from_wkt(t.crs_wkt), target, *b, densify_pts=21)
        bounds.append(b)
    anchor_x = anchor_y = 0.0
    for t, s in zip(tiles, same, strict=True):
        if s and math.isclose(abs(t.transform[0]), res) and math.isclose(abs(t.transform[4]), res):
            anchor_x, anchor_y = math.fmod(t.transform[2], res), math.fmod(t.transform[5], res)
            break
    left = _snap_down(min(b[0] for b in bounds), anchor_x, res)
    bottom = _snap_down(min(b[1] for b in bounds), anchor_y, res)
    right = _snap_up(max(b[2] for b in bounds), anchor_x, res)
    top = _snap_up(max(b[3] for b in bounds), anchor_y, res)
    grid = TargetGrid(twkt, res, left, top, max(1, round((right - left) / res)),
                      max(1, round((top - bottom) / res)))

    placements = []
    for t, s, b in zip(tiles, same, bounds, strict=True):
        a, _, c, _, e, f = t.transform
        col_f = (c - grid.left) / res
        top_f = (grid.top - max(f, f + e * t.height)) / res
        aligned = (
            s and math.isclose(abs(a), res) and math.isclose(abs(e), res)
            and abs(col_f - round(col_f)) < 1e-6 and abs(top_f - round(top_f)) < 1e-6
        )
        # target pixel range the tile can touch (one pixel of margin for reprojection)
        m = 0 if aligned else 1
        c0 = max(0, math.floor((b[0] - grid.left) / res + 1e-6) - m)
        c1 = min(grid.width, math.ceil((b[2] - grid.left) / res - 1e-6) + m)
        r0 = max(0, math.floor((grid.top - b[3]) / res + 1e-6) - m)
        r1 = min(grid.height, math.ceil((grid.top - b[1]) / res - 1e-6) + m)
        placements.append(_Placement(t, aligned, round(top_f), round(col_f), (r0, r1), (c0, c1)))
    return grid, placements


# ------------------------------------------------------------------------ block reads
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
            dst[...] = aef.encode(np.where(missing, 0.0, src))
            dst[missing] = aef.NODATA
        bad = (dst == aef.NODATA).any(axis=-1)
        if bad.any():
            dst[bad] = aef.NODATA
        valid[i:i + step] = ~bad
    return valid


def _read_window(src, tile: TileInfo, r0: int, r1: int, c0: int, c1: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Read source rows [r0, r1) × cols [c0, c1) (storage order) as (rows, cols, 64).

    ``out`` (optional): a view of that shape and the tile's dtype — possibly
    strided or row-reversed — to fill instead of a new array. Reads go through
    band-first strips that numpy re-interleaves (as fast as GDAL's own strided
    copy, with memory bounded by the strip). Strips follow the file's internal
    block rows, so every stored block is decoded once per call, whatever the
    GDAL cache size.
    """
    from rasterio.windows import Window

    if out is None:
        out = np.empty((r1 - r0, c1 - c0, aef.N_BANDS), dtype=tile.dtype)
    bands = list(tile.band_indexes)
    bh = max(1, tile.block_rows)
    budget = max(1, (4 * _STRIP_VALUES) // max(1, (c1 - c0) * aef.N_BANDS))
    rows_per = bh * max(1, budget // bh)  # whole block rows, at least one
    edges = [r0] + list(range((r0 // rows_per + 1) * rows_per, r1, rows_per)) + [r1]
    buf = np.empty((aef.N_BANDS, max(b - a for a, b in zip(edges, edges[1:], strict=False)),
                    c1 - c0), dtype=tile.dtype)
    for a, b in zip(edges, edges[1:], strict=False):
        part = buf[:, :b - a]
        src.read(bands, window=Window(c0, a, c1 - c0, b - a), out=part)
        out[a - r0:b - r0] = part.transpose(1, 2, 0)
    return out


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
    return _read_block(placements, grid, r0, r1, c0, c1, overlap)[0]


def _read_block(
    placements: Sequence[_Placement], grid: TargetGrid, r0: int, r1: int, c0: int, c1: int,
    overlap: OverlapRule,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_block` plus the (rows, cols) mask of valid pixels."""
    import rasterio
    from rasterio.errors import RasterioError

    h, w = r1 - r0, c1 - c0
    block = np.full((h, w, aef.N_BANDS), aef.NODATA, np.int8)
    valid = np.zeros((h, w), bool)
    if not placements:
        return block, valid
    owner = np.full((h, w), -1, np.int16)  # which placement wrote a pixel (for error messages)
    with rasterio.Env(**_GDAL_ENV):
        for k, p in enumerate(placements):
            try:
                with rasterio.open(p.tile.path) as src:
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
                raise IngestError(
                    f"{p.tile.path}: reading pixels failed ({e}). The file is probably truncated "
                    "or corrupt: re-download or re-export it"
                ) from None
    return block, valid


def _zarr_array(uri: str, options: str):
    """The ``embedding`` Zarr array of a store (opened per task: a few ms, never stale)."""
    import zarr

    so = json.loads(options) or None
    return zarr.open_group(store=uri, mode="r+", storage_options=so)["embedding"]


def _write_block(
    placements: Sequence[_Placement], grid: TargetGrid, r0: int, r1: int, c0: int, c1: int,
    overlap: OverlapRule, out_uri: str, options: str,
) -> int:
    """Read one chunk, write it to its Zarr chunk, return its count of valid pixels.

    Reading and writing in one task keeps a worker's memory to one block and
    lets the statistics come for free (no second pass over the data).
    """
    block, valid = _read_block(placements, grid, r0, r1, c0, c1, overlap)
    if valid.any():  # all-nodata chunks equal the fill value: nothing to store
        _zarr_array(out_uri, options)[r0:r1, c0:c1, :] = block
    return int(valid.sum())


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


# ------------------------------------------------------------------------ dask graph
def _chunk_edges(n: int, size: int) -> list[int]:
    return list(range(0, n, size)) + [n]


def build_array(
    placements: Sequence[_Placement], grid: TargetGrid, *, chunk_px: int = DEFAULT_CHUNK_PX,
    overlap: OverlapRule = "error",
):
    """The target raster as a lazy dask array (y, x, band) int8, one task per chunk.

    Each task receives only the placements of tiles that can touch its chunk.
    """
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    ye = _chunk_edges(grid.height, chunk_px)
    xe = _chunk_edges(grid.width, chunk_px)
    name = "ingest-block-" + tokenize(list(placements), grid, chunk_px, overlap)
    dsk: dict[tuple, tuple] = {}
    for i in range(len(ye) - 1):
        r0, r1 = ye[i], ye[i + 1]
        for j in range(len(xe) - 1):
            c0, c1 = xe[j], xe[j + 1]
            mine = [p for p in placements
                    if p.rows[0] < r1 and p.rows[1] > r0 and p.cols[0] < c1 and p.cols[1] > c0]
            dsk[(name, i, j, 0)] = (read_block, mine, grid, r0, r1, c0, c1, overlap)
    chunks = (tuple(np.diff(ye)), tuple(np.diff(xe)), (aef.N_BANDS,))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[])
    return da.Array(graph, name, chunks, dtype=np.int8, meta=np.empty((0, 0, 0), np.int8))


def _write_tasks(placements: Sequence[_Placement], grid: TargetGrid, chunk_px: int,
                 overlap: OverlapRule, out_uri: str, storage_options: dict | None):
    """One delayed task per chunk (read its window, write its Zarr chunk); their sum.

    Returns a Delayed evaluating to the total number of valid pixels written.
    """
    import dask
    from dask.base import tokenize

    options = json.dumps(storage_options or {}, sort_keys=True, default=str)
    ye = _chunk_edges(grid.height, chunk_px)
    xe = _chunk_edges(grid.width, chunk_px)
    name = "ingest-block-" + tokenize(list(placements), grid, chunk_px, overlap, out_uri)
    write = dask.delayed(_write_block, pure=True)
    tasks = []
    for i in range(len(ye) - 1):
        r0, r1 = ye[i], ye[i + 1]
        for j in range(len(xe) - 1):
            c0, c1 = xe[j], xe[j + 1]
            mine = [p for p in placements
                    if p.rows[0] < r1 and p.rows[1] > r0 and p.cols[0] < c1 and p.cols[1] > c0]
            tasks.append(write(mine, grid, r0, r1, c0, c1, overlap, out_uri, options,
                               dask_key_name=(name, i, j)))
    return dask.delayed(sum, pure=True)(tasks, dask_key_name="ingest-count-" + name[13:])


def build_dataset(array, grid: TargetGrid):
    """Wrap the codes in the ``ae.zarr`` Dataset (coords, CRS, transform, attrs)."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    ds = xr.Dataset(
        {"embedding": (("y", "x", "band"), array)},
        coords={
            "y": grid.y_centres(),
            "x": grid.x_centres(),
            "band": np.array(aef.BAND_NAMES, dtype=object),
        },
    )
    ds = ds.rio.write_crs(grid.crs_wkt).rio.write_transform(grid.transform())
    ds["embedding"].attrs.update(
        nodata=aef.NODATA,
        long_name="AlphaEarth satellite embedding (int8 codes)",
        codec="v = (q / 127.5) ** 2 * sign(q); q = -128 is nodata (aether_scale.aef.decode)",
    )
    ds["x"].attrs.update(units="m", long_name="pixel centre x")
    ds["y"].attrs.update(units="m", long_name="pixel centre y")
    ds.attrs.update(
        title="AlphaEarth embeddings (aether_scale ingest)",
        how_to_open="xr.open_zarr(path, mask_and_scale=False); nodata = -128 (attrs['nodata'])",
        resolution=grid.resolution,
        ingest_format_version=INGEST_FORMAT_VERSION,
    )
    return ds


def _compute(*objs: Any, progress: bool) -> tuple:
    """Compute on the current scheduler (distributed client if one is active)."""
    import dask

    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if client is not None:
        futures = client.compute(list(objs))
        if progress:
            from distributed import progress as dprogress

            dprogress(futures, notebook=False)
        return tuple(client.gather(futures))
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return dask.compute(*objs)
    return dask.compute(*objs)


# --------------------------------------------------------------------------- public
def ingest_tiles(
    paths: list[str],
    out_uri: str,
    *,
    crs: str | None = None,
    resolution: float = aef.PIXEL_SIZE_M,
    chunk_px: int | None = None,
    overlap: OverlapRule = "error",
    storage_options: dict | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Ingest AlphaEarth tiles into a Zarr store at ``out_uri``; returns statistics.

    ``paths``: tile files, folders or globs (see :func:`resolve_tiles`), in
    precedence order for ``overlap='first'/'last'``. ``crs``: target CRS
    (default: the first tile's). ``resolution``: target pixel size in CRS units.
    ``chunk_px``: chunk edge in pixels (default 1024 → 64 MiB chunks, all 64
    bands in a chunk). ``overlap``: the rule for overlapping valid pixels (see
    the module docstring). ``storage_options``: fsspec options for a URL.

    The result is written with dask (current scheduler / distributed client)
    one chunk per task, never holding the whole raster. Returns counts
    (``valid_pixels``, ``nodata_pixels``, tiles aligned vs reprojected, …)
    for the stage manifest.

    Raises :class:`IngestError` (a ``ValueError``) naming the offending file and
    the fix for: no tiles / a glob matching nothing, unreadable files, wrong band
    count, no CRS, unsupported dtype, and (with ``overlap='error'``) overlapping
    tiles holding different valid codes.
    """

    if overlap not in ("error", "first", "last"):
        raise IngestError(f"ingest.overlap must be 'error', 'first' or 'last' (got {overlap!r})")
    t0 = time.perf_counter()
    files = resolve_tiles(paths)
    tiles = [inspect_tile(f) for f in files]
    grid, placements = plan_grid(tiles, crs=crs, resolution=resolution)
    cpx = int(chunk_px or DEFAULT_CHUNK_PX)
    if cpx < 1:
        raise IngestError(f"ingest.chunk_px must be positive (got {chunk_px})")
    arr = build_array(placements, grid, chunk_px=cpx, overlap=overlap)
    ds = build_dataset(arr, grid)
    # fill_value −128: chunks that are all nodata (gaps) are never stored and read back as
    # nodata. "coordinates" keeps spatial_ref a coordinate on a default open (besides the
    # CF grid_mapping attribute rioxarray reads).
    ds["embedding"].encoding.update(chunks=(cpx, cpx, aef.N_BANDS), fill_value=aef.NODATA,
                                    coordinates="spatial_ref")
    with warnings.catch_warnings():
        # consolidated metadata is not in the Zarr v3 spec yet; xarray reads it, others ignore it
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        # writes the metadata and coordinates now; the embedding's chunks are written below
        ds.to_zarr(out_uri, mode="w", compute=False, consolidated=True,
                   storage_options=storage_options)
    counts = _write_tasks(placements, grid, cpx, overlap, out_uri, storage_options)
    (n_valid,) = _compute(counts, progress=progress)
    seconds = time.perf_counter() - t0
    n_px = grid.width * grid.height
    nbytes = n_px * aef.N_BANDS
    return {
        "tiles": len(tiles),
        "tile_files": files,
        "tiles_aligned": sum(p.aligned for p in placements),
        "tiles_reprojected": sum(not p.aligned for p in placements),
        "tiles_bottom_up": sum(t.bottom_up for t in tiles),
        "tiles_float": sum(t.dtype != "int8" for t in tiles),
        "crs": _crs_label(grid.crs_wkt),
        "resolution": grid.resolution,
        "width": grid.width,
        "height": grid.height,
        "transform": list(grid.transform())[:6],
        "chunk_px": cpx,
        "chunks": int(arr.npartitions),
        "overlap": overlap,
        "pixels": int(n_px),
        "valid_pixels": int(n_valid),
        "nodata_pixels": int(n_px - n_valid),
        "bytes": int(nbytes),
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / 1e6 / seconds, 2) if seconds > 0 else None,
    }


def _crs_label(wkt: str) -> str:
    from rasterio.crs import CRS

    c = CRS.from_wkt(wkt)
    epsg = c.to_epsg()
    return f"EPSG:{epsg}" if epsg else wkt


def open_ae(uri: str, *, storage_options: dict | None = None):
    """Open an ``ae.zarr`` lazily with raw int8 codes (the recommended way; ``.rio`` ready)."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    return xr.open_zarr(uri, mask_and_scale=False, storage_options=storage_options)


def run_ingest(ws, cfg, *, force: bool = False):
    """The ``ingest`` stage: ``cfg.ingest.tiles`` → ``ws/ae.zarr`` (skipped when current).

    Inputs fingerprinted: every tile file (and, for a VRT, every file it reads).
    Raises :class:`IngestError` on bad input (see :func:`ingest_tiles`).
    """
    sec = cfg.ingest
    files = resolve_tiles(sec.tiles)
    inputs: dict[str, str] = {}
    for f in files:
        inputs[f"tile:{f}"] = f
        if f.lower().endswith(".vrt"):
            for g in inspect_tile(f).files:
                inputs.setdefault(f"tile:{g}", g)
    config = {"ingest": cfg.section("ingest"), "format": INGEST_FORMAT_VERSION}

    def fn(tmp: dict[str, str]) -> dict[str, Any]:
        return ingest_tiles(files, tmp["ae.zarr"], crs=sec.crs, resolution=sec.resolution,
                            chunk_px=sec.chunk_px, overlap=sec.overlap,
                            storage_options=ws.storage_options or None, progress=True)

    return ws.run_stage("ingest", outputs=["ae.zarr"], inputs=inputs, config=config, fn=fn,
                        force=force)
