"""AlphaEarth GeoTIFF / COG / VRT tiles → ``ae.zarr`` (the ``ingest`` stage).

What it writes: ``ae.zarr``, the contract of :mod:`aether_scale.stores.ae` (int8
AlphaEarth codes ``(y, x, band)``, nodata −128, CRS and transform on ``spatial_ref``;
open it with :func:`aether_scale.stores.ae.open_ae`).

How it works (never the whole raster in memory): the tiles' headers are read
once to fix a target grid; then one dask task per chunk opens the tiles
overlapping that chunk, reads only their window (rasterio windowed reads),
writes the chunk and records it in the stage's ledger, so a worker holds one
chunk (plus a bounded strip of temporaries) at a time and a killed run resumes
with the missing chunks only. The same tasks run on the threaded scheduler, a
LocalCluster or a remote cluster.

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
- :mod:`.grid` — :func:`plan_grid` (target-grid planning onto
  :class:`~aether_scale.stores.ae.TargetGrid`);
- :mod:`.reads` — :func:`read_block`, :data:`OverlapRule` (windowed reads,
  reprojection, code conversion, the overlap rule);
- :mod:`.stage` — :func:`ingest_tiles` (one task per chunk, resumable) and the
  registered stage :func:`~.stage.build`.
"""

from .grid import TargetGrid, plan_grid
from .inputs import IngestError, TileInfo, inspect_tile, resolve_tiles
from .reads import OverlapRule, read_block
from .stage import ingest_tiles

__all__ = [
    "IngestError",
    "OverlapRule",
    "TargetGrid",
    "TileInfo",
    "ingest_tiles",
    "inspect_tile",
    "plan_grid",
    "read_block",
    "resolve_tiles",
]
