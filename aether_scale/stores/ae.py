"""``ae.zarr``: the AlphaEarth raster of a workspace (written by ``ingest``).

Contract (DESIGN.md): an xarray Dataset with one variable ``embedding`` of dims
``(y, x, band)``, dtype int8, holding raw AlphaEarth codes (decode with
:func:`aether_scale.aef.decode`), nodata −128, ``band`` = ``A00``…``A63``, ``x``/``y`` =
pixel-centre coordinates, north-up (``y`` decreasing), CRS and transform on a
``spatial_ref`` coordinate exactly as rioxarray writes them.

Nodata is the Zarr ``fill_value`` (−128; chunks that are entirely nodata are not
stored and are listed as such in the chunk index) and the attribute ``nodata = -128``
(what ``.rio.nodata`` reads). No CF ``_FillValue`` is written, so *every* way of
opening it — a default ``xr.open_zarr(path)`` included — returns the raw int8 codes,
never a float32 copy with NaNs.

How to open it::

    from aether_scale.stores.ae import open_ae
    ds = open_ae("ws/ae.zarr")   # int8 codes, lazily, every chunk verified
    ds.embedding.rio.crs, ds.rio.transform(), ds.embedding.rio.nodata
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import aef
from .raster import RasterBuild, open_raster

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["NAME", "FORMAT_VERSION", "TargetGrid", "open_ae", "template", "write_ae"]

NAME = "ae.zarr"
PRODUCER = "ingest"
#: bump when the store written for the same inputs changes
FORMAT_VERSION = 2
#: default chunk edge: 1024 × 1024 px × 64 bands int8 = 64 MiB per chunk.
DEFAULT_CHUNK_PX = 1024


@dataclass(frozen=True)
class TargetGrid:
    """The north-up grid of ``ae.zarr``: CRS, pixel size, top-left corner and size."""

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


def template(grid: TargetGrid, chunk_px: int) -> xr.Dataset:
    """The ``ae.zarr`` Dataset for ``grid`` (coords, CRS, transform, attrs) around a lazy,
    never computed int8 array with ``chunk_px`` chunks — what :class:`RasterBuild` writes
    as metadata before the chunks."""
    import dask.array as dsa
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    data = dsa.zeros((grid.height, grid.width, aef.N_BANDS), dtype=np.int8,
                     chunks=(chunk_px, chunk_px, aef.N_BANDS))
    ds = xr.Dataset(
        {"embedding": (("y", "x", "band"), data)},
        coords={"y": grid.y_centres(), "x": grid.x_centres(),
                "band": np.array(aef.BAND_NAMES, dtype=object)},
    )
    ds = ds.rio.write_crs(grid.crs_wkt).rio.write_transform(grid.transform())
    ds["embedding"].attrs.update(
        nodata=aef.NODATA,
        long_name="AlphaEarth satellite embedding (int8 codes)",
        codec="v = (q / 127.5) ** 2 * sign(q); q = -128 is nodata (aether_scale.aef.decode)",
    )
    # "coordinates" keeps spatial_ref a coordinate on a default open
    ds["embedding"].encoding.update(coordinates="spatial_ref")
    ds["x"].attrs.update(units="m", long_name="pixel centre x")
    ds["y"].attrs.update(units="m", long_name="pixel centre y")
    ds.attrs.update(
        title="AlphaEarth embeddings (aether_scale ingest)",
        how_to_open="xr.open_zarr(path, mask_and_scale=False); nodata = -128 (attrs['nodata'])",
        resolution=grid.resolution,
        ingest_format_version=FORMAT_VERSION,
    )
    return ds


def open_ae(uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None
            ) -> xr.Dataset:
    """Open ``ae.zarr`` lazily, checked (see :func:`~.raster.open_raster`): int8 codes,
    ``spatial_ref`` as a coordinate, every chunk verified when read.

    Raises ``FileNotFoundError`` when there is no store, ``ValueError`` when it breaks
    the contract (e.g. not int8), :class:`~.chunks.CorruptStoreError` when damaged.
    """
    ds = open_raster(uri, storage_options=storage_options, producer=PRODUCER,
                     channel_dims=("band",))
    if ds["embedding"].dtype != np.int8:
        raise ValueError(f"{uri}: 'embedding' is {ds['embedding'].dtype}, expected int8 "
                         "AlphaEarth codes; run `aether-scale ingest --force`")
    return ds


def write_ae(uri: str | os.PathLike, codes: np.ndarray, grid: TargetGrid, *,
             chunk_px: int = DEFAULT_CHUNK_PX, ledger: str | None = None) -> str:
    """Write in-memory codes ``(height, width, 64)`` as a finished ``ae.zarr`` (the same
    template, chunk commits and index as the ingest stage; for tests, examples and
    benchmarks). Returns ``uri``."""
    import shutil
    import tempfile

    codes = np.asarray(codes, dtype=np.int8)
    if codes.shape != (grid.height, grid.width, aef.N_BANDS):
        raise ValueError(f"codes have shape {codes.shape}, the grid needs "
                         f"{(grid.height, grid.width, aef.N_BANDS)}")
    tmp = ledger or tempfile.mkdtemp(prefix="aether-ledger-")
    try:
        build = RasterBuild.at(str(uri), f"{tmp}/ae").create(
            template(grid, chunk_px), fill_value=aef.NODATA, token="write_ae")
        for i, j in build.grid():
            r0, r1, c0, c1 = build.window(i, j)
            block = codes[r0:r1, c0:c1]
            valid = aef.valid_mask(block)
            build.commit(i, j, block if valid.any() else None, {"valid": int(valid.sum())})
        build.finish()
    finally:
        if ledger is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(uri)
