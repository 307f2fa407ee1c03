"""Ingest target grid: the north-up output grid and where each tile lands on it.

:func:`plan_grid` fixes the :class:`~aether_scale.stores.ae.TargetGrid` (CRS, pixel size, extent snapped
to whole pixels, phase following the first matching tile) from the tiles'
headers, and one placement per tile: *aligned* (a plain windowed copy) or to
be reprojected, plus the target rows/columns it may touch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .. import aef
from ..stores.ae import TargetGrid
from .inputs import IngestError, TileInfo


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
