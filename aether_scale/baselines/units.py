"""Where a location encoder is evaluated for a unit: sample points in the unit's buffer.

A unit's feature from a location encoder (CaLLiPer+, Space2Vec) is the mean of the
encoder over points sampled in the same area the AE and AETHER features pool over
(``regions/``: the disc of ``buffer_m`` around a point unit, or the polygon of an
areal unit). For a disc: its centre and a square lattice of spacing ``buffer_m/2``
inside it (13 points); for a polygon: a lattice of about ``per_polygon`` points inside
it, or its representative point when the lattice misses a thin polygon. CaLLiPer
evaluates its encoder at the locations of the units it maps; averaging over the
buffer is that, made comparable with the pooled raster features (at 50 m the mean and
the centre value differ little: the shortest wavelength is ``min_scale_m``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DISC", "unit_samples", "mean_by_unit"]

# the lattice of spacing r/2 inside the disc of radius r, in units of r
DISC = np.array([(i / 2, j / 2) for i in range(-2, 3) for j in range(-2, 3)
                 if i * i + j * j <= 4], dtype=np.float64)


def unit_samples(units: Any, buffer_m: float | None, per_polygon: int = 16
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(xy (m, 2), unit index (m,))``: the sample points of every unit of a
    GeoDataFrame (points: the disc lattice of ``buffer_m``; polygons: inside them)."""
    import shapely

    geoms = np.asarray(units.geometry.values, dtype=object)
    is_pt = shapely.get_type_id(geoms) == 0
    xs, owners = [], []
    if is_pt.any():
        idx = np.flatnonzero(is_pt)
        c = np.c_[shapely.get_x(geoms[idx]), shapely.get_y(geoms[idx])]
        r = float(buffer_m or 0.0)
        offs = DISC * r if r > 0 else np.zeros((1, 2))
        xs.append((c[:, None, :] + offs[None]).reshape(-1, 2))
        owners.append(np.repeat(idx, len(offs)))
    for i in np.flatnonzero(~is_pt):
        g = geoms[i]  # areal units: the polygon itself (as regions/ pools them)
        x0, y0, x1, y1 = g.bounds
        step = max(np.sqrt((x1 - x0) * (y1 - y0) / per_polygon), 1e-9)
        gx, gy = np.meshgrid(np.arange(x0 + step / 2, x1, step), np.arange(y0 + step / 2, y1, step))
        pts = np.c_[gx.ravel(), gy.ravel()]
        inside = shapely.contains_xy(g, pts[:, 0], pts[:, 1]) if len(pts) else np.zeros(0, bool)
        pts = pts[inside]
        if not len(pts):
            rp = g.representative_point()
            pts = np.array([[rp.x, rp.y]])
        xs.append(pts)
        owners.append(np.full(len(pts), i))
    if not xs:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(owners).astype(np.int64)


def mean_by_unit(values: np.ndarray, owner: np.ndarray, n_units: int) -> np.ndarray:
    """The mean of ``values`` (m, d) over each unit's rows: (n_units, d) float32."""
    sums = np.zeros((n_units, values.shape[1]), np.float64)
    np.add.at(sums, owner, values)
    cnt = np.bincount(owner, minlength=n_units).astype(np.float64)
    return (sums / np.maximum(cnt, 1)[:, None]).astype(np.float32)
