"""The raster grid behind a pooling input: axis order, pixel geometry, value kind.

Pooling works on any ``(y, x, C)`` raster (AlphaEarth int8 codes in ``ae.zarr``,
or a float AETHER field). This module turns an ``xarray.DataArray`` into a
:class:`Grid` — regular pixel-centre coordinates, the chunk layout and how to
read valid values — and locates points on it. Everything here is cheap
(no pixel data is read).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from ..stores.raster import Transform, locate_pixels

CHANNEL_DIMS = ("band", "dim")


@dataclass(frozen=True)
class Grid:
    """A regular raster grid with pixel-centre coordinates ``xs`` (W,) and ``ys`` (H,).

    ``dx``/``dy`` are signed pixel steps (``dy`` < 0 for north-up rasters);
    ``row_bounds``/``col_bounds`` are the chunk edges along y and x
    (``len = n_chunks + 1``). ``kind`` is ``"codes"`` for integer AlphaEarth
    codes (nodata −128) or ``"float"`` for a float field (NaN = nodata).
    """

    xs: np.ndarray
    ys: np.ndarray
    dx: float
    dy: float
    row_bounds: np.ndarray
    col_bounds: np.ndarray
    n_channels: int
    kind: str

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ys), len(self.xs)

    @property
    def transform(self) -> Transform:
        """The affine transform (GDAL order) implied by the pixel centres.

        Derived the way rioxarray derives a transform from coordinates (outer
        edge = first centre − half a step), so :meth:`locate` agrees with the
        POI stage's :class:`~aether_scale.pois.RasterGrid`, which reads the
        transform stored with the raster.
        """
        left = float(self.xs[0]) - self.dx / 2
        top = float(self.ys[0]) - self.dy / 2
        return (self.dx, 0.0, left, 0.0, self.dy, top)

    def locate(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixel (row, col) containing each point and a mask of points inside the raster.

        A point belongs to the pixel whose half-open cell contains it (the
        convention of :func:`aether_scale.stores.raster.locate_pixels`, shared with
        the POI stage's :meth:`~aether_scale.pois.RasterGrid.locate`); points
        on no pixel of the raster get ``inside = False`` (their row/col are
        clipped so they can still be used as indices).
        """
        h, w = self.shape
        return locate_pixels(self.transform, h, w, x, y)

    def chunk_of(self, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chunk index (block row, block col) of each pixel."""
        bi = np.searchsorted(self.row_bounds, row, side="right") - 1
        bj = np.searchsorted(self.col_bounds, col, side="right") - 1
        return bi, bj


def as_yxc(da: xr.DataArray) -> xr.DataArray:
    """``da`` with dims ordered ``(y, x, C)``; C is ``band`` or ``dim``.

    Raises ``ValueError`` naming the dims found when the array is not a
    3-d raster with ``y``, ``x`` and one channel dimension.
    """
    if not isinstance(da, xr.DataArray):
        raise TypeError(f"pooling needs an xarray.DataArray, got {type(da).__name__}")
    dims = tuple(da.dims)
    if da.ndim != 3 or "x" not in dims or "y" not in dims:
        raise ValueError(
            f"pooling needs a raster with dims (y, x, band|dim); got dims {dims} "
            "(open ae.zarr/field.zarr with xarray and pass its 'embedding' variable)"
        )
    (cdim,) = [d for d in dims if d not in ("x", "y")]
    if cdim not in CHANNEL_DIMS:
        raise ValueError(f"channel dim must be one of {CHANNEL_DIMS}, got {cdim!r} (dims {dims})")
    return da.transpose("y", "x", cdim)


def _regular_step(coord: np.ndarray, name: str) -> float:
    if coord.size < 2:
        raise ValueError(f"raster coordinate {name!r} needs at least 2 pixels, got {coord.size}")
    steps = np.diff(coord)
    step = float((coord[-1] - coord[0]) / (coord.size - 1))
    if step == 0 or not np.allclose(steps, step, rtol=1e-6, atol=abs(step) * 1e-6):
        raise ValueError(
            f"raster coordinate {name!r} is not a regular grid (steps {steps.min()}…{steps.max()}); "
            "pooling needs pixel-centre coordinates of a regular raster (write it with ingest)"
        )
    return step


def grid_of(da: xr.DataArray) -> Grid:
    """Describe ``da`` (dims ``(y, x, C)``, see :func:`as_yxc`) as a :class:`Grid`.

    Raises ``ValueError`` when coordinates are missing or irregular, or the
    dtype is neither integer codes nor float.
    """
    for c in ("x", "y"):
        if c not in da.coords:
            raise ValueError(f"raster has no {c!r} coordinate; pooling needs pixel-centre x/y coords")
    xs = np.asarray(da["x"].values, dtype=np.float64)
    ys = np.asarray(da["y"].values, dtype=np.float64)
    dx = _regular_step(xs, "x")
    dy = _regular_step(ys, "y")
    if da.dtype == np.int8:
        kind = "codes"
    elif np.issubdtype(da.dtype, np.floating):
        kind = "float"
    else:
        raise ValueError(
            f"raster dtype {da.dtype} is neither int8 AE codes nor a float field "
            "(open ae.zarr with mask_and_scale=False to keep the int8 codes)"
        )
    chunks = da.chunks
    if chunks is None:  # numpy-backed: one chunk
        ychunks, xchunks = (len(ys),), (len(xs),)
    else:
        ychunks, xchunks = chunks[0], chunks[1]
    row_bounds = np.concatenate([[0], np.cumsum(ychunks)]).astype(np.int64)
    col_bounds = np.concatenate([[0], np.cumsum(xchunks)]).astype(np.int64)
    return Grid(xs, ys, dx, dy, row_bounds, col_bounds, int(da.shape[2]), kind)
