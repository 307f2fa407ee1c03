"""The workspace raster contract in one place: opening an embedding store, locating points.

Every stage that reads ``ae.zarr`` (or a ``field*.zarr``, same layout) goes
through :func:`open_ae` (the Dataset) or :func:`open_embedding` (its
``embedding`` DataArray), so the store is opened one way — raw int8 codes
(``mask_and_scale=False``), fsspec URLs via ``storage_options``, the CRS
variable made a coordinate so ``.rio`` finds it — and a missing store or
variable is reported one way: the path, what is missing and the stage to run.

:func:`locate_pixels` is the one place that maps map coordinates to pixels.
The POI stage (:meth:`aether_scale.pois.RasterGrid.locate`, from the stored
affine transform) and the pooling engine (:meth:`aether_scale.pooling.grid.Grid.locate`,
from pixel-centre coordinates) both call it, so a POI the POI stage keeps as
"on the raster" lands on the same pixel when it is pooled.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["Transform", "locate_pixels", "open_ae", "open_embedding"]

#: GDAL-order affine coefficients ``(a, b, c, d, e, f)``: x = a·col + b·row + c, y = d·col + e·row + f.
Transform = tuple[float, float, float, float, float, float]


# --------------------------------------------------------------------------- pixels
def locate_pixels(
    transform: Transform, height: int, width: int, x: Any, y: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel ``(row, col)`` containing each point ``(x, y)`` and whether it is on the raster.

    Cells are half-open in pixel space: pixel ``(r, c)`` owns fractional
    coordinates ``[r, r + 1) × [c, c + 1)``. A point on an edge shared by two
    pixels therefore belongs to the one with the larger index (north-up: the
    pixel east of a vertical edge, south of a horizontal one); the raster's
    left and top edges are inside, its right and bottom edges outside.

    ``row``/``col`` are int64 and always valid indices: points off the raster
    (``inside = False``, NaN coordinates included) are clipped to the nearest
    edge pixel (0 for NaN), so callers can index with them and mask afterwards.
    Axis-aligned transforms (``b == d == 0``, every ingest output) divide by the
    pixel size directly, so points built as ``c + k·a`` land exactly on edge ``k``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    a, b, c, d, e, f = (float(v) for v in transform)
    dx, dy = x - c, y - f
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN points are flagged outside below
        if b == 0.0 and d == 0.0:
            colf, rowf = dx / a, dy / e
        else:
            det = a * e - b * d
            colf = (e * dx - b * dy) / det
            rowf = (a * dy - d * dx) / det
        col, row = np.floor(colf), np.floor(rowf)
        finite = np.isfinite(col) & np.isfinite(row)
        inside = finite & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    col = np.clip(np.where(finite, col, 0), 0, width - 1).astype(np.int64)
    row = np.clip(np.where(finite, row, 0), 0, height - 1).astype(np.int64)
    return row, col, inside


# --------------------------------------------------------------------------- stores
def _producer(uri: str) -> str:
    """The stage that writes ``uri`` (named in errors): ``infer`` for field*.zarr, else ``ingest``."""
    name = os.path.basename(str(uri).rstrip("/"))
    return "infer" if name.startswith("field") else "ingest"


def open_ae(uri: str | os.PathLike, *, storage_options: dict | None = None) -> xr.Dataset:
    """Open an ``ae.zarr`` (or ``field*.zarr``) lazily, checked against the workspace contract.

    Returns the Dataset with raw int8 codes (``mask_and_scale=False``: never a
    float32 copy with NaNs), the CRS variable (``spatial_ref`` or the
    ``grid_mapping`` the ``embedding`` variable names) as a coordinate, and the
    ``.rio`` accessor registered. ``uri`` may be an fsspec URL
    (``storage_options`` are passed to fsspec).

    Raises ``FileNotFoundError`` when there is no Zarr store at ``uri`` and
    ``ValueError`` when it cannot be read or has no ``embedding`` variable;
    both name the path and the stage that writes the store.
    """
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    path = str(uri)
    stage = _producer(path)
    fix = f"run the {stage} stage (`aether-scale {stage}`)"
    try:
        with warnings.catch_warnings():  # stores without consolidated metadata are fine
            warnings.simplefilter("ignore", RuntimeWarning)
            ds = xr.open_zarr(path, mask_and_scale=False, storage_options=storage_options or None)
    except (FileNotFoundError, KeyError) as e:  # zarr's GroupNotFoundError is a FileNotFoundError
        raise FileNotFoundError(f"{path}: no Zarr store there ({e}); {fix} first") from None
    except ValueError as e:
        raise ValueError(f"{path}: cannot be read as a Zarr store ({e}); {fix} again") from None
    if "embedding" not in ds:
        raise ValueError(
            f"{path}: no variable 'embedding' (found {list(ds.data_vars)}); "
            f"expected the store written by the {stage} stage — {fix} again"
        )
    emb = ds["embedding"]
    gm = emb.attrs.get("grid_mapping") or emb.encoding.get("grid_mapping")
    for name in {gm or "spatial_ref", "spatial_ref"}:
        if name in ds.data_vars:  # Zarr round trips store the CRS as a variable: make it a coord
            ds = ds.set_coords(name)
    return ds


def open_embedding(
    src: xr.DataArray | xr.Dataset | str | os.PathLike, *, storage_options: dict | None = None
) -> xr.DataArray:
    """The ``embedding`` DataArray ``(y, x, band|dim)`` of a store path/URL, Dataset or DataArray.

    Paths go through :func:`open_ae` (same checks and errors); an in-memory
    Dataset gets the same variable check. Raises ``ValueError`` naming the
    input when the dims are not the workspace contract's ``(y, x, C)``.
    """
    import xarray as xr

    if isinstance(src, (str, os.PathLike)):
        name = str(src)
        src = open_ae(src, storage_options=storage_options)
    else:
        name = "<in-memory raster>"
    if isinstance(src, xr.Dataset):
        if "spatial_ref" in src.data_vars:
            src = src.set_coords("spatial_ref")
        if "embedding" not in src:
            raise ValueError(
                f"{name}: no variable 'embedding' (found {list(src.data_vars)}); "
                "expected ae.zarr as written by the ingest stage (`aether-scale ingest`)"
            )
        src = src["embedding"]
    if src.ndim != 3 or src.dims[:2] != ("y", "x"):
        raise ValueError(
            f"{name}: 'embedding' has dims {src.dims}; expected ('y', 'x', 'band') "
            "(transpose it, e.g. da.transpose('y', 'x', 'band'))"
        )
    return src
