"""Pooling inside polygons: mean of the valid pixels whose centres fall in each polygon.

One dask task per raster chunk touched by any polygon's bounding box. A task
rasterises the ids of its polygons onto the chunk's grid
(``rasterio.features.rasterize``, GDAL's rule: a pixel belongs to a polygon
when its centre is inside) and sums values and valid counts per id with
``np.bincount``. Per-chunk partial sums are added up per polygon, so polygons
spanning chunks are exact; code sums are integers in float64, hence exact
and order-independent.

Overlapping polygons: a rasterised id image holds one id per pixel, so the
polygons are first split into groups whose members do not overlap (greedy
colouring of the graph of pairs whose interiors intersect; polygons that
only touch share a group) and each group is rasterised separately. A pixel
centre lying exactly on an edge shared by two touching polygons goes to one
of them (GDAL's choice), never to both.
"""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import shapely
import xarray as xr
from affine import Affine

from ..cluster import InTask
from .grid import as_yxc, grid_of
from .kernels import CODE_SCALE, _additive
from .tasks import run_windowed


@dataclass
class PolygonPoolResult:
    """``vectors`` (n, C) float32 (NaN where no valid pixel), ``counts`` (n,) int64,
    ``n_empty``: polygons with no valid pixel centre inside (incl. outside the raster).

    Array-like: ``np.asarray(result)`` is ``vectors``, so callers that only want
    the (n, C) features can treat the result as that array.
    """

    vectors: np.ndarray
    counts: np.ndarray
    n_empty: int

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        v = self.vectors if dtype is None else self.vectors.astype(dtype, copy=False)
        return v.copy() if copy else v

    def __len__(self) -> int:
        return len(self.vectors)


def _overlap_groups(geoms: np.ndarray) -> np.ndarray:
    """Group label per polygon such that no two polygons of a group overlap (interiors)."""
    n = geoms.size
    group = np.zeros(n, dtype=np.int64)
    if n < 2:
        return group
    tree = shapely.STRtree(geoms)
    a, b = tree.query(geoms, predicate="intersects")
    keep = a < b
    a, b = a[keep], b[keep]
    if a.size:
        overlap = ~shapely.touches(geoms[a], geoms[b])
        a, b = a[overlap], b[overlap]
    if a.size == 0:
        return group
    # greedy colouring; a loop over the (few) polygons that overlap another one
    nbrs: dict[int, list[int]] = {}
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        nbrs.setdefault(i, []).append(j)
        nbrs.setdefault(j, []).append(i)
    for i in sorted(nbrs):
        used = {int(group[j]) for j in nbrs[i] if j < i}
        g = 0
        while g in used:
            g += 1
        group[i] = g
    return group


def _polygon_task(lazy: InTask, payload: InTask) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.features import rasterize

    ids, geoms, groups, transform, kind = payload.arr
    block = lazy.read()
    h, w, c = block.shape
    v, valid = _additive(block, kind)
    v = v.reshape(h * w, c)
    valid = valid.ravel()
    sums = np.zeros((ids.size, c + 1), dtype=np.float64)
    for g in np.unique(groups):
        sel = np.flatnonzero(groups == g)
        with warnings.catch_warnings():  # south-up transforms trigger a spurious warning
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            labels = rasterize(
                ((geoms[i], int(i) + 1) for i in sel), out_shape=(h, w), transform=transform,
                fill=0, dtype="int32", all_touched=False,
            ).ravel()
        pix = np.flatnonzero((labels > 0) & valid)
        lab = labels[pix] - 1
        for ch in range(c):
            sums[:, ch] += np.bincount(lab, weights=v[pix, ch], minlength=ids.size)
        sums[:, c] += np.bincount(lab, minlength=ids.size)
    return ids, sums


def pool_polygons(
    da: xr.DataArray, geometries: Any, *, normalize: bool = True, window: int | None = None
) -> PolygonPoolResult:
    """Mean of ``da``'s valid pixels whose centres fall inside each polygon.

    ``da``: as for :func:`aether_scale.pool.pool_buffers` (int8 codes or a
    float field, dims (y, x, band|dim), dask-backed). ``geometries``: a
    GeoSeries or array of shapely (Multi)Polygons in the raster CRS; empty or
    missing geometries yield NaN and count as empty. Vectors are
    L2-normalised when ``normalize``. Raises ``TypeError`` when
    ``geometries`` holds non-polygon geometries.
    """
    da = as_yxc(da)
    if da.chunks is None:
        da = da.chunk({"y": 1024, "x": 1024})
    grid = grid_of(da)
    geoms = np.asarray(getattr(geometries, "values", geometries), dtype=object)
    geoms = np.array([g for g in geoms], dtype=object) if geoms.ndim != 1 else geoms
    n = geoms.size
    missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
    types = shapely.get_type_id(geoms)
    bad = ~missing & ~np.isin(types, [3, 6])  # Polygon, MultiPolygon
    if bad.any():
        raise TypeError(
            f"pool_polygons needs polygons; geometry #{int(np.flatnonzero(bad)[0])} is "
            f"{shapely.get_type_id(geoms[bad][0])} (buffer points first, or use pool_buffers)"
        )
    c = grid.n_channels
    totals = np.zeros((n, c + 1), dtype=np.float64)
    have = np.flatnonzero(~missing)
    groups = _overlap_groups(geoms[have])
    h, w = grid.shape
    # pixel range of each bounding box (centre-based), then the chunks it touches
    b = shapely.bounds(geoms[have])
    cols = np.sort(np.stack([(b[:, 0] - grid.xs[0]) / grid.dx, (b[:, 2] - grid.xs[0]) / grid.dx]), 0)
    rows = np.sort(np.stack([(b[:, 1] - grid.ys[0]) / grid.dy, (b[:, 3] - grid.ys[0]) / grid.dy]), 0)
    c0 = np.clip(np.ceil(cols[0]), 0, w - 1).astype(np.int64)
    c1 = np.clip(np.floor(cols[1]), 0, w - 1).astype(np.int64)
    r0 = np.clip(np.ceil(rows[0]), 0, h - 1).astype(np.int64)
    r1 = np.clip(np.floor(rows[1]), 0, h - 1).astype(np.int64)
    hit = (np.ceil(cols[0]) <= w - 1) & (np.floor(cols[1]) >= 0) & (c0 <= c1)
    hit &= (np.ceil(rows[0]) <= h - 1) & (np.floor(rows[1]) >= 0) & (r0 <= r1)
    pid = have[hit]
    grp = groups[hit]
    bi0, bj0 = grid.chunk_of(r0[hit], c0[hit])
    bi1, bj1 = grid.chunk_of(r1[hit], c1[hit])
    nbi, nbj = bi1 - bi0 + 1, bj1 - bj0 + 1
    reps = nbi * nbj
    owner = np.repeat(np.arange(pid.size), reps)
    k = np.arange(owner.size) - np.repeat(np.cumsum(reps) - reps, reps)
    cbi = bi0[owner] + k // nbj[owner]
    cbj = bj0[owner] + k % nbj[owner]
    nbx = len(grid.col_bounds) - 1
    key = cbi * nbx + cbj
    order = np.argsort(key, kind="stable")
    key, owner = key[order], owner[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if key.size else np.array([], int)
    ends = np.r_[starts[1:], key.size]
    token = uuid.uuid4().hex[:10]

    def make(t: int) -> Any:
        s, e = starts[t], ends[t]
        bi, bj = int(key[s] // nbx), int(key[s] % nbx)
        own = owner[s:e]
        y0, y1 = int(grid.row_bounds[bi]), int(grid.row_bounds[bi + 1])
        x0, x1 = int(grid.col_bounds[bj]), int(grid.col_bounds[bj + 1])
        sub = da.data[y0:y1, x0:x1, :]
        if hasattr(sub, "__dask_graph__"):
            (sub,) = dask.optimize(sub)
        transform = Affine(grid.dx, 0.0, grid.xs[x0] - grid.dx / 2, 0.0, grid.dy,
                           grid.ys[y0] - grid.dy / 2)
        payload = (pid[own], geoms[pid[own]], grp[own], transform, grid.kind)
        return dask.delayed(_polygon_task, pure=False)(
            InTask(sub), InTask(payload), dask_key_name=f"pool-polygons-{token}-{bi}-{bj}"
        )

    for ids, sums in run_windowed(make, len(starts), window=window):
        np.add.at(totals, ids, sums)
    counts = np.rint(totals[:, c]).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        vec = totals[:, :c] / counts[:, None]
        if grid.kind == "codes":
            vec *= CODE_SCALE
        if normalize:
            norm = np.linalg.norm(vec, axis=1)
            vec /= np.where(norm > 0, norm, 1.0)[:, None]
    vec[counts == 0] = np.nan
    return PolygonPoolResult(vec.astype(np.float32), counts, int(np.sum(counts == 0)))
