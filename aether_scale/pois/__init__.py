"""POI files → ``pois.parquet``: descriptions, AE CRS, AE coverage, sorted by raster chunk.

``aether-scale pois`` reads every configured source (``pois.sources``) with dask,
one partition at a time, so a national file never has to fit in one process:

- GeoParquet files and partitioned GeoParquet datasets (a folder) via
  ``dask_geopandas.read_parquet``; plain parquet with coordinate columns via
  ``dask.dataframe.read_parquet``;
- GeoPackage, GeoJSON, Shapefile, FlatGeobuf, … via ``dask_geopandas.read_file``
  (pyogrio), ``partition_rows`` features per partition;
- CSV (``x``/``y`` + ``crs``, or ``lon``/``lat``) read as byte blocks with
  :func:`dask.bytes.read_bytes`; every column is read as text and coordinates
  are parsed as numbers (a bad number is a NaN coordinate).

Each row gets a description — a ready ``description`` column (with
``", named <name>."`` appended when ``append_name`` and a name exists; a
trailing period is replaced, not doubled) or, where there is none, the
template (``"A place of {subcategory}, a type of {category}, named {name}."``;
rows without a name use ``template_no_name``). Points are reprojected to the
CRS of ``ae.zarr`` and tagged with the AE raster chunk they fall in.

Bad rows. Every row ends in exactly one bucket of the manifest's
``stats["dropped"]`` (the first rule that fails, in this order) or is kept:

1. ``no_geometry`` — null or empty geometry;
2. ``nan_coords`` — a coordinate that is missing, NaN, infinite or (CSV) not a number;
3. ``bad_id`` — the id column is mapped but the row's id is missing;
4. ``empty_text`` — no description can be built (empty after cleaning, or a
   template field other than ``name`` missing);
5. ``outside_coverage`` — the point (in the AE CRS) is not inside the AE raster's
   pixel bounds (half-open: the left/top edge is in, the right/bottom edge out);
   coverage is checked against the raster *bounds* only — POIs over nodata
   pixels inside the bounds are kept here and dropped (and counted) by pooling;
6. ``duplicate_id`` — a ``poi_id`` seen before (first occurrence kept, in
   source order then file order).

Repairs that keep the row, counted in ``stats["repaired"]``:
``non_point`` (lines/polygons/multi-geometries → ``shapely.point_on_surface``, a
point guaranteed inside the shape) and ``encoding`` (a CSV byte sequence that is
not valid in the declared encoding is decoded as cp1252 / latin-1), and
``already_named`` (a ready description that already says "named <name>", the
reference's "…, named X." format, does not get ", named X." a second time). Every text
field is Unicode NFC-normalised, control and zero-width characters become
spaces, runs of whitespace collapse to one, and ends are trimmed.

Ids. With ``columns.id`` mapped, integer ids (or integer-valued numbers /
strings) are used as they are; other strings are hashed to a stable positive
int64 (``pandas.util.hash_array``) and the source column is kept beside it.
Without an id column, ``poi_id = source_index * 2**40 + row number in the
file`` — stable as long as the file's row order is.

Output: ``pois.parquet`` is a *folder* of GeoParquet part files
(``part.00000.parquet`` …), read with ``geopandas.read_parquet(path)`` or
``dask_geopandas.read_parquet(path)``. Columns: ``poi_id`` (int64, unique),
``description``, ``name``, ``category``, ``subcategory`` (strings, null when not
mapped), ``source`` (int16, index into ``pois.sources``), ``x``, ``y`` (float64,
AE CRS), ``chunk_y``, ``chunk_x`` (int32, the AE chunk holding the point),
``keep_columns``, and the point ``geometry`` in the AE CRS. Rows are sorted by
(``chunk_y``, ``chunk_x``, ``poi_id``); all POIs of one AE chunk are in the same
part file, and a part holds about ``partition_rows`` rows.

Layout: :mod:`.errors` (``PoiInputError``), :mod:`.clean` (text cleaning,
encoding repair, description templates, ids), :mod:`.grid` (``RasterGrid``,
coverage, chunk keys), :mod:`.readers` (per-format lazy reading, CSV blocks,
config-vs-file checks), :mod:`.rows` (per-partition bad-row rules) and
:mod:`.stage` (``process_pois`` and the registered stage ``build``); the table
itself is :mod:`aether_scale.stores.pois`.
"""

from __future__ import annotations

from .clean import TEMPLATE_FIELDS, build_descriptions, clean_text
from .errors import PoiInputError
from .grid import RasterGrid, raster_grid
from .readers import SourceSpec as SourceSpec  # not in __all__; importable as before
from .readers import read_source
from .rows import DROP_REASONS
from .stage import process_pois

__all__ = [
    "PoiInputError",
    "RasterGrid",
    "DROP_REASONS",
    "TEMPLATE_FIELDS",
    "raster_grid",
    "read_source",
    "clean_text",
    "build_descriptions",
    "process_pois",
]
