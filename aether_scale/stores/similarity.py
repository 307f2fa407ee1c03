"""``queries/<name>/similarity.zarr``: text-to-field similarity (written by ``query``).

Variable ``similarity`` of dims (``y``, ``x``, ``query``), float32: the cosine
similarity between each phrase's projected text vector and each pixel of a field, on
exactly the field's grid (same ``x``/``y`` coordinates, ``spatial_ref`` CRS and
transform). Pixels where the field is nodata are NaN (the fill value, so chunks
without one valid pixel are not stored). ``query`` is the phrase's position; the
phrases themselves are in the attribute ``phrases`` (same order), and
:func:`open_similarity` puts them on the ``query`` coordinate, so
``sim.sel(query="a place of cafes")`` works.

Band-last like every workspace raster: ``aether-scale export`` writes it band-first
as a Cloud Optimized GeoTIFF for GIS tools.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .raster import open_raster

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["NAME", "VARIABLE", "open_similarity", "template"]

NAME = "similarity.zarr"
VARIABLE = "similarity"
PRODUCER = "query"
FORMAT_VERSION = 1


def template(field: xr.DataArray, phrases: Sequence[str], chunks: tuple[int, int],
             attrs: Mapping[str, Any]) -> xr.Dataset:
    """The similarity Dataset on the grid of ``field`` (``(y, x, dim)`` with
    ``spatial_ref``) around a lazy, never computed array with ``chunks`` spatial chunks
    and every phrase in one chunk."""
    import dask.array as dsa
    import xarray as xr

    k = len(phrases)
    data = dsa.zeros((field.sizes["y"], field.sizes["x"], k), dtype=np.float32,
                     chunks=(chunks[0], chunks[1], k))
    coords = {"y": field["y"].values, "x": field["x"].values,
              "query": np.arange(k, dtype=np.int32)}
    var_attrs = {"description": "cosine similarity of each phrase's projected text vector "
                 "with each field pixel", "units": "1", "nodata": "NaN",
                 "phrases": list(phrases), **dict(attrs)}
    var = xr.DataArray(data, dims=("y", "x", "query"), coords=coords, attrs=var_attrs)
    ds = xr.Dataset({VARIABLE: var})
    if "spatial_ref" in field.coords:
        ds = ds.assign_coords(spatial_ref=field.coords["spatial_ref"].variable)
        ds[VARIABLE].attrs["grid_mapping"] = "spatial_ref"
    for name in ("x", "y"):
        ds[name].attrs.update(field[name].attrs)
    ds.attrs.update(similarity_format_version=FORMAT_VERSION)
    return ds


def open_similarity(uri: str | os.PathLike, *,
                    storage_options: Mapping[str, Any] | None = None) -> xr.DataArray:
    """The ``similarity`` DataArray of a store, lazily and checked (see
    :func:`~.raster.open_raster`), with the phrases as its ``query`` coordinate."""
    ds = open_raster(uri, storage_options=storage_options, producer=PRODUCER,
                     channel_dims=("query",), variable=VARIABLE)
    da = ds[VARIABLE]
    phrases = list(da.attrs.get("phrases") or [])
    if len(phrases) != da.sizes["query"]:
        raise ValueError(f"{uri}: attribute 'phrases' lists {len(phrases)} phrase(s) for "
                         f"{da.sizes['query']} similarity band(s); the store is damaged — rerun "
                         "`aether-scale query`")
    return da.assign_coords(query=np.asarray(phrases, dtype=object))
