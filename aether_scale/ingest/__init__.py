"""AlphaEarth GeoTIFF / COG / VRT tiles → ``ae.zarr`` (the ``ingest`` stage).

What it writes (the workspace contract, DESIGN.md): an xarray Dataset with one
variable ``embedding`` of dims ``(y, x, band)``, dtype int8, holding raw
AlphaEarth codes (decode with :func:`aether_scale.aef.decode`), nodata −128,
``band`` = ``A00``…``A63``, ``x``/``y`` = pixel-centre coordinates, north-up
(``y`` decreasing), CRS and transform on a ``spatial_ref`` coordinate exactly
as rioxarray writes them (``.rio.write_crs`` / ``.rio.write_transform``).

How to open it::

    from aether_scale.ingest import open_ae
    ds = open_ae("ws/ae.zarr")   # int8 codes, lazily; checked; storage_options= for URLs
    ds.embedding.rio.crs, ds.rio.transform(), ds.embedding.rio.nodata  # CRS, grid, -128

:func:`open_ae` is ``xr.open_zarr(path, mask_and_scale=False)`` plus the
contract checks (a missing store or ``embedding`` variable is an error naming
the path and the stage to run). It returns the Dataset; for the
``embedding`` DataArray of ``ae.zarr`` or a ``field*.zarr`` use
:func:`aether_scale.raster.open_embedding`. Both live in
:mod:`aether_scale.raster`, which every stage reading these stores uses.

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

Layout (the public names below are all importable from ``aether_scale.ingest``):

- :mod:`.inputs` — :class:`IngestError`, :func:`resolve_tiles`, :func:`inspect_tile`,
  :class:`TileInfo` (tile paths and headers);
- :mod:`.grid` — :class:`TargetGrid`, :func:`plan_grid` (target-grid planning);
- :mod:`.reads` — :func:`read_block`, :data:`OverlapRule` (windowed reads,
  reprojection, code conversion, the overlap rule);
- :mod:`.stage` — :func:`build_array`, :func:`build_dataset`, :func:`ingest_tiles`,
  :func:`run_ingest` (dask graph, ``ae.zarr``, the stage), and :func:`open_ae`
  (re-exported from :mod:`aether_scale.raster`).
"""

from .grid import TargetGrid, plan_grid
from .inputs import IngestError, TileInfo, inspect_tile, resolve_tiles
from .reads import OverlapRule, read_block
from .stage import (
    DEFAULT_CHUNK_PX,
    INGEST_FORMAT_VERSION,
    build_array,
    build_dataset,
    ingest_tiles,
    open_ae,
    run_ingest,
)

__all__ = [
    "DEFAULT_CHUNK_PX",
    "INGEST_FORMAT_VERSION",
    "IngestError",
    "OverlapRule",
    "TargetGrid",
    "TileInfo",
    "build_array",
    "build_dataset",
    "ingest_tiles",
    "inspect_tile",
    "open_ae",
    "plan_grid",
    "read_block",
    "resolve_tiles",
    "run_ingest",
]
