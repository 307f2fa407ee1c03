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
not valid in the declared encoding is decoded as cp1252 / latin-1). Every text
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
"""

from __future__ import annotations

import codecs
import math
import os
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dask
import numpy as np
import pandas as pd

from .config import PoiSource, PoisSection, RunConfig
from .workspace import StageResult, Workspace

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
    "run_pois",
    "workspace_input",
]

#: Drop buckets, in the order the rules are applied (code = position + 1).
DROP_REASONS: tuple[str, ...] = (
    "no_geometry",
    "nan_coords",
    "bad_id",
    "empty_text",
    "outside_coverage",
)
_KEEP = 0
_CODE = {name: i + 1 for i, name in enumerate(DROP_REASONS)}

#: Fields a description template may use.
TEMPLATE_FIELDS: tuple[str, ...] = ("name", "category", "subcategory")
_ROLE_TEXT = ("name", "category", "subcategory", "description")
_RESERVED = {
    "poi_id", "description", "name", "category", "subcategory", "source",
    "x", "y", "chunk_y", "chunk_x", "geometry",
}
_CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
_PARQUET_SUFFIXES = (".parquet", ".geoparquet", ".pq")
_ID_STRIDE = 2**40
_MARK = "\ue000"  # private-use marker put before each byte repaired by the CSV error handler


class PoiInputError(ValueError):
    """A POI source that cannot be used as configured; the message says which file,
    which config key and how to fix it."""


# ----------------------------------------------------------------------------- encoding
def _cp1252_fallback(err: UnicodeDecodeError) -> tuple[str, int]:
    """Decode error handler: bytes invalid in the declared encoding → cp1252 (or latin-1
    for the five bytes cp1252 leaves undefined), each marked so the row can be counted."""
    bad = err.object[err.start : err.end]
    out = []
    for b in bad:
        one = bytes([b])
        try:
            out.append(_MARK + one.decode("cp1252"))
        except UnicodeDecodeError:
            out.append(_MARK + one.decode("latin-1"))
    return "".join(out), err.end


codecs.register_error("aether_cp1252", _cp1252_fallback)

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200d\u2028\u2029\u2060\ufeff]")
_SPACES = re.compile(r"\s+")


def clean_text(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Normalise a text column: NFC, control/zero-width characters → space, whitespace
    collapsed, ends trimmed, empty → missing.

    Returns ``(cleaned, repaired)`` where ``repaired`` is True on rows in which the CSV
    reader had to decode invalid bytes as cp1252 (their marker is removed here).
    Vectorised pandas string operations; no Python loop per row.
    """
    s = values.astype("string")
    repaired = s.str.contains(_MARK, regex=False).fillna(False).astype(bool)
    if repaired.any():
        s = s.str.replace(_MARK, "", regex=False)
    s = s.str.normalize("NFC")
    s = s.str.replace(_CONTROL, " ", regex=True).str.replace(_SPACES, " ", regex=True).str.strip()
    s = s.mask(s.str.len() == 0)
    return s, repaired


# ----------------------------------------------------------------------------- templates
def _template_parts(template: str, key: str) -> list[tuple[str, str | None]]:
    """``"A {x} b"`` → ``[("A ", "x"), (" b", None)]``; refuses unknown fields."""
    parts: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise PoiInputError(f"config pois.{key} = {template!r} is not a valid template: {e}") from None
    for literal, fld, spec, conv in parsed:
        if fld is not None and fld not in TEMPLATE_FIELDS:
            raise PoiInputError(
                f"config pois.{key} = {template!r} uses {{{fld}}}; allowed fields: "
                + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            )
        if spec or conv:
            raise PoiInputError(f"config pois.{key}: format specs/conversions are not supported "
                                f"({{{fld}!{conv}:{spec}}})")
        parts.append((literal, fld))
    return parts


def _fill(parts: list[tuple[str, str | None]], cols: dict[str, pd.Series], index: pd.Index) -> pd.Series:
    out = pd.Series("", index=index, dtype="string")
    for literal, fld in parts:
        if literal:
            out = out + literal
        if fld is not None:
            out = out + cols[fld]
    return out


def build_descriptions(
    cols: dict[str, pd.Series | None],
    *,
    template: str,
    template_no_name: str,
    append_name: bool = True,
    index: pd.Index,
) -> pd.Series:
    """Descriptions for one partition from already-cleaned role columns.

    ``cols`` maps ``name``/``category``/``subcategory``/``description`` to a string
    Series (missing = NA) or None when the role is not mapped. A row with a ready
    description uses it (plus ``", named <name>."`` when ``append_name`` and a name
    exists — a trailing period of the description is dropped first); otherwise the
    template when a name exists, else ``template_no_name``. Missing template fields
    other than ``name`` make the description NA (the row is dropped as ``empty_text``).
    """
    na = pd.Series(pd.NA, index=index, dtype="string")
    filled = {f: (cols.get(f) if cols.get(f) is not None else na) for f in TEMPLATE_FIELDS}
    name = filled["name"]
    has_name = name.notna()
    with_name = _fill(_template_parts(template, "template"), filled, index)
    no_name = _fill(_template_parts(template_no_name, "template_no_name"), filled, index)
    out = with_name.where(has_name, no_name)
    ready = cols.get("description")
    if ready is not None:
        r = ready
        if append_name:
            named = r.str.replace(r"[\s.]+$", "", regex=True) + ", named " + name + "."
            r = named.where(has_name & r.notna(), r)
        # ready description first; the template fills rows that have none
        out = r.where(r.notna(), out)
    return out.mask(out.str.len() == 0)


# ----------------------------------------------------------------------------- raster grid
@dataclass(frozen=True)
class RasterGrid:
    """What the POI stage needs of ``ae.zarr``: CRS, affine transform, shape, chunking."""

    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]  # a, b, c, d, e, f (GDAL order a..f)
    height: int
    width: int
    chunk_edges_y: tuple[int, ...]  # row offsets where chunks start, plus the height
    chunk_edges_x: tuple[int, ...]

    @property
    def n_chunks(self) -> tuple[int, int]:
        return len(self.chunk_edges_y) - 1, len(self.chunk_edges_x) - 1

    def locate(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pixel (row, col) of each point, whether it lies inside the raster, and its
        chunk (chunk_y, chunk_x; −1 outside). Vectorised over the arrays."""
        a, b, c, d, e, f = self.transform
        det = a * e - b * d
        dx, dy = x - c, y - f
        colf = (e * dx - b * dy) / det
        rowf = (a * dy - d * dx) / det
        with np.errstate(invalid="ignore"):
            inside = (
                np.isfinite(colf) & np.isfinite(rowf)
                & (colf >= 0) & (colf < self.width) & (rowf >= 0) & (rowf < self.height)
            )
        row = np.where(inside, np.floor(np.where(inside, rowf, 0)), -1).astype(np.int64)
        col = np.where(inside, np.floor(np.where(inside, colf, 0)), -1).astype(np.int64)
        cy = np.searchsorted(np.asarray(self.chunk_edges_y[1:]), row, side="right")
        cx = np.searchsorted(np.asarray(self.chunk_edges_x[1:]), col, side="right")
        cy = np.where(inside, cy, -1).astype(np.int32)
        cx = np.where(inside, cx, -1).astype(np.int32)
        return row, col, inside, np.stack([cy, cx])


def raster_grid(ae_path: str) -> RasterGrid:
    """Read the grid of ``ae.zarr`` (lazily; no pixel data is loaded).

    Raises FileNotFoundError when the store is missing (run ``aether-scale ingest``)
    and ValueError when it has no CRS or no ``embedding`` variable.
    """
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    try:
        ds = xr.open_zarr(ae_path, mask_and_scale=False)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise FileNotFoundError(
            f"{ae_path}: cannot open the AE store ({e}); run `aether-scale ingest` first"
        ) from None
    if "embedding" not in ds:
        raise ValueError(f"{ae_path}: no variable 'embedding' (found: {list(ds.data_vars)})")
    gm = ds["embedding"].attrs.get("grid_mapping") or ds["embedding"].encoding.get("grid_mapping")
    for name in {gm or "spatial_ref", "spatial_ref"}:
        if name in ds.data_vars:  # stored as a variable (no 'coordinates' attr): make it a coord
            ds = ds.set_coords(name)
    emb = ds["embedding"]
    crs = emb.rio.crs or ds.rio.crs
    if crs is None:
        raise ValueError(f"{ae_path}: no CRS (expected a rioxarray 'spatial_ref' coordinate)")
    t = emb.rio.transform()
    chunks = emb.chunks
    if chunks is None:
        enc = emb.encoding.get("chunks") or emb.encoding.get("preferred_chunks")
        ny, nx = emb.sizes["y"], emb.sizes["x"]
        cy_, cx_ = (enc[0], enc[1]) if enc else (ny, nx)
        cys = [cy_] * (ny // cy_) + ([ny % cy_] if ny % cy_ else [])
        cxs = [cx_] * (nx // cx_) + ([nx % cx_] if nx % cx_ else [])
    else:
        ax = dict(zip(emb.dims, chunks, strict=True))
        cys, cxs = list(ax["y"]), list(ax["x"])
    return RasterGrid(
        crs_wkt=crs.to_wkt(),
        transform=(t.a, t.b, t.c, t.d, t.e, t.f),
        height=int(emb.sizes["y"]),
        width=int(emb.sizes["x"]),
        chunk_edges_y=tuple(int(v) for v in np.concatenate([[0], np.cumsum(cys)])),
        chunk_edges_x=tuple(int(v) for v in np.concatenate([[0], np.cumsum(cxs)])),
    )


# ----------------------------------------------------------------------------- reading
@dataclass
class SourceSpec:
    """A source resolved against its file: how to get coordinates and which columns to use."""

    index: int
    path: str
    kind: str  # "geo" (geometry column) or "xy" (coordinate columns)
    crs_wkt: str
    roles: dict[str, str]  # role → source column
    xcol: str | None = None
    ycol: str | None = None
    append_name: bool = True


def _suffix(path: str) -> str:
    p = path.lower().rstrip("/")
    for s in _CSV_SUFFIXES + _PARQUET_SUFFIXES:
        if p.endswith(s):
            return s
    return os.path.splitext(p)[1]


def _is_dir(path: str) -> bool:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.isdir(p)


def _csv_header(path: str, encoding: str) -> tuple[list[str], str]:
    """Column names and the delimiter of a CSV (first line, sniffed)."""
    import csv

    import fsspec

    with fsspec.open(path, "rb", compression="infer") as f:
        first = f.readline(1 << 20)
    text = first.decode(encoding, errors="aether_cp1252").replace(_MARK, "").lstrip("\ufeff")
    try:
        delim = csv.Sniffer().sniff(text, delimiters=",;\t|").delimiter
    except csv.Error:
        delim = ","
    names = next(csv.reader([text.rstrip("\r\n")], delimiter=delim))
    return names, delim


def _parse_csv_block(
    block: bytes, *, names: list[str], header: bool, sep: str, encoding: str, usecols: list[str]
) -> pd.DataFrame:
    import io

    df = pd.read_csv(
        io.BytesIO(block),
        sep=sep,
        header=0 if header else None,
        names=names,
        usecols=usecols,
        dtype=str,
        encoding=encoding,
        encoding_errors="aether_cp1252",
        keep_default_na=True,
    )
    return df.reset_index(drop=True)


def read_source(
    src: PoiSource, index: int, *, partition_rows: int, keep_columns: tuple[str, ...] = ()
) -> tuple[list[Any], dict[str, str], str | None, str]:
    """Open one POI source lazily.

    Returns ``(partitions, dtypes, crs_wkt_or_None, kind)``: a list of dask delayed
    objects, one pandas/GeoPandas frame each; the file's columns (geometry excluded)
    with their dtypes (all ``"string"`` for CSV); the file's own CRS (None when it
    declares none); and ``"geo"`` or ``"xy"``. Nothing is read beyond metadata and
    headers. Raises :class:`PoiInputError` for unreadable layouts.
    """
    path = src.path
    where = f"pois.sources[{index}]"
    suffix = _suffix(path)
    xy_given = bool(src.x or src.y or src.lon or src.lat)
    is_dir = _is_dir(path)
    if suffix in _CSV_SUFFIXES and not is_dir:
        from dask.bytes import read_bytes

        names, sep = _csv_header(path, src.encoding)
        if not xy_given:
            raise PoiInputError(
                f"{path}: a CSV needs coordinate columns; set {where}.x/{where}.y (+ {where}.crs) "
                f"or {where}.lon/{where}.lat. Columns in the file: {', '.join(names)}"
            )
        usecols = _needed_columns(src, names, keep_columns)
        _, blocks = read_bytes(path, delimiter=b"\n", blocksize="64MiB", sample=False,
                               compression="infer")
        parse = dask.delayed(_parse_csv_block, pure=True)
        parts = [
            parse(b, names=names, header=(i == 0), sep=sep, encoding=src.encoding, usecols=usecols)
            for i, b in enumerate(blocks[0])
        ]
        return parts, {c: "string" for c in names}, None, "xy"
    if suffix in _PARQUET_SUFFIXES or is_dir:
        if xy_given:
            import dask.dataframe as dd

            ddf = dd.read_parquet(path)
            return list(ddf.to_delayed()), _dtypes(ddf._meta), None, "xy"
        import dask_geopandas

        try:
            gdf = dask_geopandas.read_parquet(path)
        except (ValueError, KeyError, TypeError) as e:
            raise PoiInputError(
                f"{path}: not readable as GeoParquet ({e}); for plain parquet with coordinate "
                f"columns set {where}.x/{where}.y (+ {where}.crs) or {where}.lon/{where}.lat"
            ) from None
        crs = gdf.crs.to_wkt() if gdf.crs is not None else None
        return list(gdf.to_delayed()), _dtypes(gdf._meta), crs, "geo"
    import dask_geopandas
    import pyogrio

    try:
        info = pyogrio.read_info(path, layer=src.layer)
    except Exception as e:  # pyogrio raises its own DataSourceError family
        raise PoiInputError(f"{path}: cannot open as a vector file ({e}); check {where}.path "
                            f"and {where}.layer") from None
    n = int(info.get("features") or 0)
    gdf = dask_geopandas.read_file(path, layer=src.layer, npartitions=max(1, math.ceil(n / partition_rows)))
    crs = gdf.crs.to_wkt() if gdf.crs is not None else None
    return list(gdf.to_delayed()), _dtypes(gdf._meta), crs, "geo"


def _dtypes(meta: pd.DataFrame) -> dict[str, str]:
    geom = getattr(meta, "_geometry_column_name", None)
    return {
        str(c): ("string" if pd.api.types.is_object_dtype(t) or pd.api.types.is_string_dtype(t) else str(t))
        for c, t in meta.dtypes.items() if c != geom
    }


def _nullable(dtype: str) -> str:
    """A dtype that can hold missing values (numpy int/bool → pandas nullable)."""
    kind = getattr(pd.api.types.pandas_dtype(dtype), "kind", "O")
    return {"i": "Int64", "u": "UInt64", "b": "boolean"}.get(kind, dtype)


def _needed_columns(src: PoiSource, names: list[str], keep: tuple[str, ...]) -> list[str]:
    """Source columns to read: roles, coordinates, kept columns that exist."""
    want = {c for c in src.columns.model_dump().values() if c}
    want |= {c for c in (src.x, src.y, src.lon, src.lat) if c}
    want |= set(keep)
    return [c for c in names if c in want]


def _resolve_source(
    src: PoiSource, index: int, cols: list[str], file_crs: str | None, kind: str,
    pcfg: PoisSection,
) -> SourceSpec:
    """Check the config against the file's columns/CRS; raise PoiInputError with the fix."""
    from pyproj import CRS

    where = f"pois.sources[{index}]"
    have = set(cols)
    listing = ", ".join(cols)
    roles = {r: c for r, c in src.columns.model_dump().items() if c}
    for role, col in roles.items():
        if col not in have:
            raise PoiInputError(
                f"{src.path}: column {col!r} (config {where}.columns.{role}) not found. "
                f"Columns in the file: {listing}. Set {where}.columns.{role} to one of them."
            )
    if "description" not in roles:
        need = {f for _, f in _template_parts(pcfg.template_no_name, "template_no_name") if f}
        missing = sorted(f for f in need if f not in roles)
        if missing:
            raise PoiInputError(
                f"{src.path}: the description template needs "
                + ", ".join("{" + m + "}" for m in missing)
                + f" but {where}.columns maps no "
                + "/".join(missing)
                + f" column (and no ready description). Set {where}.columns."
                + f"{missing[0]} (or {where}.columns.description). Columns in the file: {listing}"
            )
    xcol = ycol = None
    if kind == "xy":
        if src.lon or src.lat:
            xcol, ycol = src.lon, src.lat
            keys = ("lon", "lat")
        else:
            xcol, ycol = src.x, src.y
            keys = ("x", "y")
        for k, c in zip(keys, (xcol, ycol), strict=True):
            if not c:
                raise PoiInputError(f"{src.path}: {where}.{k} is not set (both coordinates are "
                                    f"needed). Columns in the file: {listing}")
            if c not in have:
                raise PoiInputError(f"{src.path}: coordinate column {c!r} (config {where}.{k}) "
                                    f"not found. Columns in the file: {listing}")
    crs_text = src.crs
    if kind == "xy" and crs_text is None:
        if src.lon or src.lat:
            crs_text = "EPSG:4326"
        else:
            raise PoiInputError(f"{src.path}: x/y columns need a CRS; set {where}.crs "
                                f"(e.g. EPSG:27700)")
    if file_crs is not None and crs_text is not None:
        if CRS.from_user_input(crs_text) != CRS.from_wkt(file_crs):
            raise PoiInputError(f"{src.path}: the file declares its CRS ({CRS.from_wkt(file_crs).name}) "
                                f"and {where}.crs says {crs_text}; remove {where}.crs")
    if file_crs is None and crs_text is None:
        raise PoiInputError(f"{src.path}: the file declares no CRS; set {where}.crs")
    try:
        crs_wkt = file_crs or CRS.from_user_input(crs_text).to_wkt()
    except Exception as e:
        raise PoiInputError(f"{src.path}: {where}.crs = {crs_text!r} is not a CRS ({e})") from None
    return SourceSpec(index=index, path=src.path, kind=kind, crs_wkt=crs_wkt, roles=roles,
                      xcol=xcol, ycol=ycol, append_name=src.append_name)


# ----------------------------------------------------------------------------- per partition
@lru_cache(maxsize=32)
def _transformer(src_wkt: str, dst_wkt: str):  # noqa: ANN202
    from pyproj import CRS, Transformer

    s, d = CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt)
    if s == d:
        return None
    return Transformer.from_crs(s, d, always_xy=True)


def _ids(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Source ids → (int64 poi_id, valid mask). Integers as they are; other strings
    hashed to a stable positive int64."""
    if pd.api.types.is_integer_dtype(values.dtype):
        valid = values.notna().to_numpy()
        return values.fillna(0).to_numpy(dtype=np.int64), valid
    num = pd.to_numeric(values, errors="coerce")
    as_text = values.astype("string").str.strip()
    valid = (as_text.notna() & (as_text.str.len() > 0)).to_numpy()
    integral = (num.notna() & (num == np.floor(num)) & (num.abs() < 2**62)).to_numpy()
    out = np.zeros(len(values), dtype=np.int64)
    out[integral] = num[integral].to_numpy(dtype=np.float64).astype(np.int64)
    other = valid & ~integral
    if other.any():
        h = pd.util.hash_array(as_text[other].to_numpy(dtype=object))
        out[other] = (h & np.uint64(2**63 - 1)).astype(np.int64)
    return out, valid


def _prepare(
    pdf: pd.DataFrame,
    spec: SourceSpec,
    grid: RasterGrid,
    template: str,
    template_no_name: str,
    keep: dict[str, str | None],
) -> pd.DataFrame:
    """One source partition → the output columns plus ``_reason`` (0 = kept) and
    ``_row`` (row number inside the partition) and repair flags. Vectorised."""
    import shapely

    n = len(pdf)
    pdf = pdf.reset_index(drop=True)
    reason = np.zeros(n, dtype=np.int8)
    non_point = np.zeros(n, dtype=bool)

    def drop(mask: np.ndarray, name: str) -> None:
        reason[(reason == _KEEP) & mask] = _CODE[name]

    # coordinates in the source CRS
    if spec.kind == "geo":
        geoms = np.asarray(pdf.geometry.array, dtype=object) if n else np.empty(0, dtype=object)
        missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
        drop(missing, "no_geometry")
        tid = shapely.get_type_id(geoms)
        non_point = ~missing & (tid != 0)
        pts = geoms.copy()
        if non_point.any():
            pts[non_point] = shapely.point_on_surface(geoms[non_point])
        x = np.full(n, np.nan)
        y = np.full(n, np.nan)
        ok = ~missing
        x[ok] = shapely.get_x(pts[ok])
        y[ok] = shapely.get_y(pts[ok])
    else:
        x = pd.to_numeric(pdf[spec.xcol], errors="coerce").to_numpy(dtype=np.float64)
        y = pd.to_numeric(pdf[spec.ycol], errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    drop(~finite, "nan_coords")

    # ids
    if "id" in spec.roles:
        poi_id, id_ok = _ids(pdf[spec.roles["id"]])
        drop(~id_ok, "bad_id")
    else:
        poi_id = np.full(n, -1, dtype=np.int64)  # assigned once row offsets are known

    # text
    repaired = np.zeros(n, dtype=bool)
    cols: dict[str, pd.Series | None] = {}
    for role in _ROLE_TEXT:
        if role in spec.roles:
            s, rep = clean_text(pdf[spec.roles[role]])
            cols[role] = s
            repaired |= rep.to_numpy()
        else:
            cols[role] = None
    desc = build_descriptions(cols, template=template, template_no_name=template_no_name,
                              append_name=spec.append_name, index=pdf.index)
    drop(desc.isna().to_numpy(), "empty_text")

    # reproject and locate in the AE grid
    tr = _transformer(spec.crs_wkt, grid.crs_wkt)
    if tr is not None and finite.any():
        xx, yy = tr.transform(x[finite], y[finite])
        x = x.copy()
        y = y.copy()
        x[finite], y[finite] = xx, yy
    _, _, inside, chunk = grid.locate(x, y)
    drop(~inside, "outside_coverage")

    na = pd.Series(pd.NA, index=pdf.index, dtype="string")
    out = pd.DataFrame(
        {
            "poi_id": poi_id,
            "description": desc,
            "name": cols["name"] if cols["name"] is not None else na,
            "category": cols["category"] if cols["category"] is not None else na,
            "subcategory": cols["subcategory"] if cols["subcategory"] is not None else na,
            "source": np.full(n, spec.index, dtype=np.int16),
            "x": x,
            "y": y,
            "chunk_y": chunk[0],
            "chunk_x": chunk[1],
        },
        index=pdf.index,
    )
    for c, dtype in keep.items():
        if c in pdf.columns:
            out[c] = pdf[c].astype(dtype) if dtype else pdf[c]
        else:
            out[c] = pd.Series(pd.NA, index=pdf.index, dtype=dtype or "string")
    out["_reason"] = reason
    out["_row"] = np.arange(n, dtype=np.int64)
    out["_non_point"] = non_point
    out["_repaired"] = repaired
    return out


def _finish(part: pd.DataFrame, source: int, offset: int, generated: bool) -> pd.DataFrame:
    """Add the global order key (source, row in file); generate ids when not mapped."""
    part = part.copy()
    order = np.int64(source) * _ID_STRIDE + offset + part["_row"].to_numpy()
    part["_order"] = order
    if generated:
        part["poi_id"] = order
    return part


def _part_stats(part: pd.DataFrame) -> dict[str, int]:
    r = part["_reason"].to_numpy()
    out = {"rows": int(len(part))}
    for name, code in _CODE.items():
        out[name] = int((r == code).sum())
    out["non_point"] = int(part["_non_point"].to_numpy()[r == _KEEP].sum())
    out["encoding"] = int(part["_repaired"].to_numpy()[r == _KEEP].sum())
    return out


def _kept_keys(part: pd.DataFrame, ncx: int) -> pd.DataFrame:
    k = part[part["_reason"].to_numpy() == _KEEP]
    return pd.DataFrame({
        "poi_id": k["poi_id"].to_numpy(),
        "_order": k["_order"].to_numpy(),
        "_key": k["chunk_y"].to_numpy().astype(np.int64) * ncx + k["chunk_x"].to_numpy(),
    })


def _select(part: pd.DataFrame, dup_orders: np.ndarray, bounds: np.ndarray, lo: int, ncx: int) -> pd.DataFrame:
    """Rows of ``part`` that are kept, not duplicates, and whose chunk key falls in
    output partition ``lo`` (keys in ``[bounds[lo], bounds[lo+1])``)."""
    keep = part["_reason"].to_numpy() == _KEEP
    if len(dup_orders):
        keep &= ~np.isin(part["_order"].to_numpy(), dup_orders)
    key = part["chunk_y"].to_numpy().astype(np.int64) * ncx + part["chunk_x"].to_numpy()
    keep &= (key >= bounds[lo]) & (key < bounds[lo + 1])
    return part[keep]


def _write_part(pieces: list[pd.DataFrame], path: str, crs_wkt: str, columns: list[str]) -> int:
    """Concatenate the pieces of one output partition, sort, write one GeoParquet file."""
    import fsspec
    import geopandas as gpd

    df = pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(columns=columns)
    df = df.sort_values(["chunk_y", "chunk_x", "poi_id"], kind="stable", ignore_index=True)
    df = df[columns]
    gdf = gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df["x"], df["y"]), crs=crs_wkt)
    with fsspec.open(path, "wb") as f:
        gdf.to_parquet(f, index=False)
    return len(gdf)


# ----------------------------------------------------------------------------- stage
def _partition_bounds(key_counts: pd.Series, target: int) -> np.ndarray:
    """Split sorted chunk keys into ranges of about ``target`` rows, never splitting a
    key. Returns boundaries ``b`` so partition i holds keys in ``[b[i], b[i+1])``."""
    if key_counts.empty:
        return np.array([0, 1], dtype=np.int64)
    keys = key_counts.index.to_numpy(dtype=np.int64)
    cum = np.cumsum(key_counts.to_numpy())
    bucket = (cum - 1) // target  # partition of each key by its last row
    starts = keys[np.r_[0, np.flatnonzero(np.diff(bucket)) + 1]]
    return np.r_[starts, keys[-1] + 1].astype(np.int64)


def process_pois(pcfg: PoisSection, grid: RasterGrid, out_path: str) -> dict[str, Any]:
    """Read, clean, deduplicate, sort and write every source; return the stats.

    ``out_path`` is a folder that receives ``part.NNNNN.parquet`` files. Raises
    :class:`PoiInputError` on configuration/file mismatches before any data is read.
    """
    import fsspec

    if not pcfg.sources:
        raise PoiInputError("config pois.sources is empty; add at least one POI file "
                            "(path + columns)")
    for k in pcfg.keep_columns:
        if k in _RESERVED:
            raise PoiInputError(f"config pois.keep_columns: {k!r} clashes with an output column "
                                f"({', '.join(sorted(_RESERVED))}); map it as a role instead")
    _template_parts(pcfg.template, "template")
    _template_parts(pcfg.template_no_name, "template_no_name")

    opened = []
    keep_dtypes: dict[str, str | None] = {k: None for k in pcfg.keep_columns}
    for i, src in enumerate(pcfg.sources):
        parts, dtypes, file_crs, kind = read_source(
            src, i, partition_rows=pcfg.partition_rows, keep_columns=tuple(pcfg.keep_columns)
        )
        spec = _resolve_source(src, i, list(dtypes), file_crs, kind, pcfg)
        opened.append((spec, parts, dtypes))
    # kept columns: missing everywhere is an error; dtype = first source that has it
    for k in pcfg.keep_columns:
        if not any(k in cols for _, _, cols in opened):
            raise PoiInputError(
                f"config pois.keep_columns: {k!r} is in none of the sources; columns there: "
                + "; ".join(f"[{s.index}] " + ", ".join(c) for s, _, c in opened)
            )
    for k in pcfg.keep_columns:
        dt = next(d[k] for _, _, d in opened if k in d)
        if not all(k in d for _, _, d in opened):
            dt = _nullable(dt)  # rows of sources without the column hold missing values
        keep_dtypes[k] = dt

    prep = dask.delayed(_prepare, pure=True)
    prepared: list[tuple[SourceSpec, list[Any]]] = []
    for spec, parts, _ in opened:
        prepared.append((spec, [prep(p, spec, grid, pcfg.template, pcfg.template_no_name, keep_dtypes)
                                for p in parts]))
    flat = [p for _, ps in prepared for p in ps]
    flat = list(dask.persist(*flat))
    lens = dask.compute(*[dask.delayed(len)(p) for p in flat])
    fin = dask.delayed(_finish, pure=True)
    finished: list[Any] = []
    j = 0
    for spec, ps in prepared:
        offset = 0
        generated = "id" not in spec.roles
        for _ in ps:
            finished.append(fin(flat[j], spec.index, offset, generated))
            offset += lens[j]
            j += 1
    finished = list(dask.persist(*finished))
    del flat

    per_part = dask.compute(*[dask.delayed(_part_stats)(p) for p in finished])
    per_source: list[dict[str, int]] = []
    j = 0
    for _spec, ps in prepared:
        acc: dict[str, int] = {}
        for st in per_part[j : j + len(ps)]:
            for k, v in st.items():
                acc[k] = acc.get(k, 0) + v
        per_source.append(acc)
        j += len(ps)

    ncy, ncx = grid.n_chunks
    keys = pd.concat(dask.compute(*[dask.delayed(_kept_keys)(p, ncx) for p in finished]) or
                     [pd.DataFrame({"poi_id": [], "_order": [], "_key": []})], ignore_index=True)
    keys = keys.sort_values("_order", kind="stable")
    dup = keys["poi_id"].duplicated(keep="first").to_numpy()
    dup_orders = np.sort(keys["_order"].to_numpy()[dup])
    dup_source = (keys["_order"].to_numpy()[dup] // _ID_STRIDE).astype(int)
    for i, acc in enumerate(per_source):
        acc["duplicate_id"] = int((dup_source == i).sum())
    kept_keys = keys.loc[~dup, "_key"]
    counts = kept_keys.value_counts().sort_index()
    bounds = _partition_bounds(counts, pcfg.partition_rows)
    n_out = len(bounds) - 1

    columns = ["poi_id", "description", "name", "category", "subcategory", "source",
               "x", "y", "chunk_y", "chunk_x", *pcfg.keep_columns]
    fs, root = fsspec.core.url_to_fs(out_path)
    fs.makedirs(root, exist_ok=True)
    sel = dask.delayed(_select, pure=True)
    writer = dask.delayed(_write_part, pure=True)
    writes = []
    for lo in range(n_out):
        pieces = [sel(p, dup_orders, bounds, lo, ncx) for p in finished]
        writes.append(writer(pieces, f"{out_path}/part.{lo:05d}.parquet", grid.crs_wkt, columns))
    written = dask.compute(*writes)

    total = {k: sum(s.get(k, 0) for s in per_source) for k in per_source[0]}
    kept = int(sum(written))
    dropped = {k: total[k] for k in (*DROP_REASONS, "duplicate_id")}
    if kept + sum(dropped.values()) != total["rows"]:  # pragma: no cover - internal invariant
        raise RuntimeError(f"POI accounting mismatch: kept {kept} + dropped {dropped} != {total['rows']}")
    return {
        "rows_read": total["rows"],
        "kept": kept,
        "dropped": dropped,
        "repaired": {"non_point": total["non_point"], "encoding": total["encoding"]},
        "sources": [
            {"path": s.path, "rows_read": per_source[s.index]["rows"],
             "kept": per_source[s.index]["rows"]
             - sum(per_source[s.index][k] for k in (*DROP_REASONS, "duplicate_id")),
             "dropped": {k: per_source[s.index][k] for k in (*DROP_REASONS, "duplicate_id")},
             "ids": "column " + s.roles["id"] if "id" in s.roles else "generated: source*2**40 + row"}
            for s, _ in prepared
        ],
        "files": n_out,
        "chunks_with_pois": int(len(counts)),
        "ae_chunks": [ncy, ncx],
        "coverage_rule": "inside the ae.zarr pixel bounds (nodata is left to pooling)",
    }


def workspace_input(ws: Workspace, name: str) -> str:
    """``name`` when a stage manifest in ``ws`` produced it (fingerprint = that manifest),
    else its full path (fingerprinted as a plain folder/file, e.g. a store written by
    hand or by an older run)."""
    return name if ws._producer_of(name) is not None else ws.path(name)


def run_pois(ws: Workspace, cfg: RunConfig, *, force: bool = False) -> StageResult:
    """``aether-scale pois``: the configured POI sources → ``pois.parquet`` (a folder of
    GeoParquet parts; see the module docstring for columns, rules and stats).

    Raises :class:`PoiInputError` (a ValueError) naming the file, config key and fix for
    a missing column / CRS / coordinate setting, FileNotFoundError when ``ae.zarr`` is
    missing.
    """
    pcfg = cfg.pois
    if not pcfg.sources:
        raise PoiInputError("config pois.sources is empty; add at least one POI file "
                            "(path + columns)")
    inputs = {f"source_{i}": s.path for i, s in enumerate(pcfg.sources)}
    if not ws.exists("ae.zarr"):
        raise FileNotFoundError(f"{ws.path('ae.zarr')} does not exist; run `aether-scale ingest` "
                                "first (the POI stage needs the AE CRS and coverage)")
    inputs["ae"] = workspace_input(ws, "ae.zarr")

    def fn(tmp: dict[str, str]) -> dict[str, Any]:
        grid = raster_grid(ws.path("ae.zarr"))
        return process_pois(pcfg, grid, tmp["pois.parquet"])

    return ws.run_stage("pois", outputs=["pois.parquet"], inputs=inputs,
                        config=cfg.section("pois"), fn=fn, force=force)
