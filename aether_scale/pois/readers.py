"""Opening POI sources lazily, one dask partition at a time, and checking the config.

- :func:`read_source` — GeoParquet files/datasets (``dask_geopandas``), plain
  parquet with coordinate columns (``dask.dataframe``), CSV read as
  ``CSV_BLOCKSIZE`` (64 MiB) byte blocks, quote-aware (:mod:`.csv`), and any other
  vector format through pyogrio (``partition_rows`` features per partition).
- ``_resolve_source`` — checks a source's config against the file's columns and
  CRS and returns a :class:`SourceSpec`; every mismatch raises
  :class:`~.errors.PoiInputError` naming the file, the config key and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..config import PoiSource, PoisSection
from .clean import _template_parts
from .csv import CSV_BLOCKSIZE, MAX_RECORD_BYTES, csv_header, csv_parts
from .errors import PoiInputError

__all__ = ["CSV_BLOCKSIZE", "MAX_RECORD_BYTES", "SourceSpec", "read_source"]


_CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
_PARQUET_SUFFIXES = (".parquet", ".geoparquet", ".pq")


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


def read_source(
    src: PoiSource, index: int, *, partition_rows: int, keep_columns: tuple[str, ...] = (),
    blocksize: int | str | None = None,
) -> tuple[list[Any], dict[str, str], str | None, str]:
    """Open one POI source lazily.

    Returns ``(partitions, dtypes, crs_wkt_or_None, kind)``: a list of dask delayed
    objects, one pandas/GeoPandas frame each; the file's columns (geometry excluded)
    with their dtypes (all ``"string"`` for CSV); the file's own CRS (None when it
    declares none); and ``"geo"`` or ``"xy"``. Nothing is read beyond metadata and
    headers. ``blocksize`` (CSV only; default ``CSV_BLOCKSIZE``) sets the bytes per CSV
    partition. Raises :class:`PoiInputError` for unreadable layouts; a CSV quote that never
    closes raises it when the partition holding it is computed.
    """
    path = src.path
    where = f"pois.sources[{index}]"
    suffix = _suffix(path)
    xy_given = bool(src.x or src.y or src.lon or src.lat)
    is_dir = _is_dir(path)
    if suffix in _CSV_SUFFIXES and not is_dir:
        names, sep = csv_header(path, src.encoding)
        if not xy_given:
            raise PoiInputError(
                f"{path}: a CSV needs coordinate columns; set {where}.x/{where}.y (+ {where}.crs) "
                f"or {where}.lon/{where}.lat. Columns in the file: {', '.join(names)}"
            )
        usecols = _needed_columns(src, names, keep_columns)
        parts = csv_parts(path, names=names, sep=sep, encoding=src.encoding, usecols=usecols,
                           blocksize=CSV_BLOCKSIZE if blocksize is None else blocksize)
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
