"""``field*.zarr``: an AETHER embedding field, one per model variant (written by ``infer``).

Variable ``embedding`` of dims (``y``, ``x``, ``dim``) on exactly the grid of
``ae.zarr`` (same ``x``/``y`` coordinates, ``spatial_ref`` CRS and transform, nodata
mask):

- ``dtype: float16`` (default): unit-vector components; masked pixels are NaN in every
  component (the Zarr fill value, so all-nodata chunks are not stored);
- ``dtype: int8``: components quantised with the AlphaEarth sqrt codec
  ``q = round(sign(v)·sqrt(|v|)·127.5)`` (decode ``v = sign(q)·(q/127.5)²``,
  :mod:`aether_scale.aef`); masked pixels are −128. The attrs record
  ``codec="aef-sqrt"``, ``scale=127.5``, ``nodata=-128``, so the pooling engine reads
  the int8 field exactly like AE. Rounding error ≤ sqrt(|v|)/127.5 per component.

Open with :func:`open_field` (checked like every workspace raster).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import aef
from .raster import open_raster

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["NAME", "fill_value", "open_field", "template"]

NAME = "field.zarr"
PRODUCER = "infer"
FORMAT_VERSION = 2


def fill_value(dtype: str) -> Any:
    """The nodata value of a field of ``dtype`` (``float16`` → NaN, ``int8`` → −128)."""
    return aef.NODATA if dtype == "int8" else np.float16(np.nan)


def template(ae: xr.Dataset | xr.DataArray, out_dim: int, chunks: tuple[int, int], dtype: str,
             attrs: Mapping[str, Any]) -> xr.Dataset:
    """The field's Dataset on the grid of ``ae`` (coords, ``spatial_ref``), around a lazy,
    never computed array with ``chunks`` spatial chunks; ``attrs`` describe the model."""
    import dask.array as dsa
    import xarray as xr

    da = ae["embedding"] if isinstance(ae, xr.Dataset) else ae
    np_dtype = np.int8 if dtype == "int8" else np.float16
    data = dsa.zeros((da.sizes["y"], da.sizes["x"], out_dim), dtype=np_dtype,
                     chunks=(chunks[0], chunks[1], out_dim))
    attrs = {"description": "AETHER embedding field: the AE projector applied to every AE pixel",
             "dtype": dtype, **dict(attrs)}
    if dtype == "int8":
        attrs.update(codec="aef-sqrt", scale=aef.SCALE, nodata=aef.NODATA,
                     decode="v = sign(q) * (q / scale) ** 2")
    else:
        attrs.update(nodata="NaN")
    coords = {"y": da["y"].values, "x": da["x"].values,
              "dim": np.arange(out_dim, dtype=np.int32)}
    var = xr.DataArray(data, dims=("y", "x", "dim"), coords=coords, attrs=attrs)
    ds = xr.Dataset({"embedding": var})
    if "spatial_ref" in da.coords:
        var.attrs["grid_mapping"] = "spatial_ref"
        ds = ds.assign_coords(spatial_ref=da.coords["spatial_ref"].variable)
        ds["embedding"].attrs["grid_mapping"] = "spatial_ref"
    for k in ("x", "y"):
        ds[k].attrs.update(da[k].attrs)
    ds.attrs.update(field_format_version=FORMAT_VERSION)
    return ds


def open_field(uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None
               ) -> xr.Dataset:
    """Open a ``field*.zarr`` lazily, checked (see :func:`~.raster.open_raster`)."""
    return open_raster(uri, storage_options=storage_options, producer=PRODUCER,
                       channel_dims=("dim",))
