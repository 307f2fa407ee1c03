"""``pois.parquet``: the POI table of a workspace (written by ``pois``).

A folder of GeoParquet part files (``part.00000.parquet`` …) — one file is accepted
too — readable with ``geopandas.read_parquet(path)``. Columns: ``poi_id`` (int64,
unique), ``description`` (str, never null), ``name``, ``category``, ``subcategory``,
``source``, ``x``, ``y`` (AE CRS), ``chunk_y``, ``chunk_x`` (the ae.zarr chunk of the
point), kept source columns, and the point ``geometry`` in the AE CRS.

:class:`PoiTable` is the one reader: it checks the schema once when opened and reads
only the columns a stage needs (points for pooling, descriptions for text, token
columns for the POI baselines), column-wise with Arrow. :func:`write_part` is the
writer the ``pois`` stage uses for every part.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["NAME", "PoiTable", "write_part"]

NAME = "pois.parquet"
_FIX = "rerun `aether-scale pois --force`"


class PoiTable:
    """An opened, checked ``pois.parquet`` (a path or fsspec URL; a file or a folder).

    Raises ``FileNotFoundError`` when absent and ``ValueError`` naming the file, the
    column and the fix when ``poi_id``, ``description`` or a geometry is missing.
    """

    def __init__(self, uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None
                 ) -> None:
        import fsspec
        import pyarrow.dataset as pds

        self.uri = str(uri)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **dict(storage_options or {}))
        if not self.fs.exists(self.root):
            raise FileNotFoundError(f"{self.uri} does not exist; run `aether-scale pois` first")
        try:
            self.dataset = pds.dataset(self.root, format="parquet", filesystem=self.fs)
        except Exception as e:  # noqa: BLE001 - any reader failure names the file
            raise ValueError(f"{self.uri}: not a parquet file or folder ({e}); {_FIX}") from None
        if not self.dataset.files:
            raise ValueError(f"{self.uri}: a folder without .parquet files; {_FIX}")
        self.columns = list(self.dataset.schema.names)
        raw = (self.dataset.schema.metadata or {}).get(b"geo")
        self.geo: dict[str, Any] = json.loads(raw) if raw else {}
        self.geometry = self.geo.get("primary_column", "geometry")
        for col in ("poi_id", self.geometry):
            if col not in self.columns:
                raise ValueError(f"{self.uri}: column {col!r} is missing (found {self.columns}); "
                                 f"pois.parquet must hold poi_id and a point geometry — {_FIX}")

    @property
    def crs(self) -> Any:
        """The geometry's CRS (``pyproj.CRS``) from the GeoParquet metadata, or None."""
        crs = self.geo.get("columns", {}).get(self.geometry, {}).get("crs")
        if crs is None:
            return None
        from pyproj import CRS

        return CRS.from_user_input(crs)

    def __len__(self) -> int:
        return int(self.dataset.count_rows())

    # ---------------------------------------------------------------- readers
    def points(self) -> dict[str, np.ndarray]:
        """``poi_id`` (int64), ``x``, ``y`` (float64; NaN where no geometry), batch by batch.

        Raises ``ValueError`` when ids repeat or geometries are not points.
        """
        import shapely

        ids, xs, ys = [], [], []
        for batch in self.dataset.to_batches(columns=["poi_id", self.geometry]):
            ids.append(batch.column("poi_id").to_numpy(zero_copy_only=False))
            geoms = self._geoms(batch)
            missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
            if np.any(~missing & (shapely.get_type_id(geoms) != 0)):
                raise ValueError(f"{self.uri}: column {self.geometry!r} holds non-point "
                                 f"geometries; POIs must be points — {_FIX}")
            x = np.full(geoms.size, np.nan)
            y = np.full(geoms.size, np.nan)
            x[~missing] = shapely.get_x(geoms[~missing])
            y[~missing] = shapely.get_y(geoms[~missing])
            xs.append(x)
            ys.append(y)
        poi_id = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
        if np.unique(poi_id).size != poi_id.size:
            raise ValueError(f"{self.uri}: poi_id is not unique — {_FIX}")
        return {"poi_id": poi_id, "x": np.concatenate(xs) if xs else np.zeros(0),
                "y": np.concatenate(ys) if ys else np.zeros(0)}

    def _geoms(self, batch: Any) -> np.ndarray:
        import shapely

        garr = batch.column(self.geometry)
        if garr.type.num_fields:  # native GeoArrow encoding: let geopandas decode it
            import geopandas as gpd
            import pyarrow as pa

            tbl = pa.Table.from_batches([batch], schema=batch.schema)
            return np.asarray(gpd.GeoDataFrame.from_arrow(tbl)[self.geometry].values,
                              dtype=object)
        return shapely.from_wkb(garr.to_numpy(zero_copy_only=False))

    def descriptions(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(poi_id, distinct descriptions, code per row)``, column-wise with Arrow.

        Raises ``ValueError`` when there is no ``description`` column or a row has none.
        """
        import pyarrow.compute as pc

        if "description" not in self.columns:
            raise ValueError(f"{self.uri}: no column 'description' (found {self.columns}) — "
                             f"{_FIX}")
        table = self.dataset.to_table(columns=["poi_id", "description"])
        desc = table.column("description")
        if desc.null_count:
            raise ValueError(f"{self.uri}: {desc.null_count} rows have no description — {_FIX}")
        poi_id = table.column("poi_id").to_numpy().astype(np.int64, copy=False)
        uniq = pc.unique(desc)
        codes = pc.index_in(desc, value_set=uniq).to_numpy().astype(np.int64, copy=False)
        return poi_id, uniq.to_pylist(), codes

    def frame(self, columns: Sequence[str]) -> Any:
        """A GeoDataFrame of ``columns`` (those present) and the geometry."""
        import geopandas as gpd

        cols = [c for c in columns if c in self.columns and c != self.geometry]
        return gpd.read_parquet(self.root, columns=[*cols, self.geometry], filesystem=self.fs)


def write_part(df: Any, path: str, crs_wkt: str, columns: Sequence[str]) -> int:
    """Write one part: ``df``'s ``columns`` sorted by (chunk_y, chunk_x, poi_id), points
    built from ``x``/``y`` in ``crs_wkt``. Returns the rows written."""
    import fsspec
    import geopandas as gpd
    import pandas as pd

    df = df if len(df.columns) else pd.DataFrame(columns=list(columns))
    df = df.sort_values(["chunk_y", "chunk_x", "poi_id"], kind="stable", ignore_index=True)
    df = df[list(columns)]
    gdf = gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df["x"], df["y"]), crs=crs_wkt)
    with fsspec.open(path, "wb") as f:
        gdf.to_parquet(f, index=False)
    return len(gdf)
