"""``regions/``: the label units of each task with their features (written by ``regions``).

One GeoParquet file per task — ``regions/luc.parquet`` (land-use points) and
``regions/sdm.parquet`` (socioeconomic units) — readable by
``geopandas.read_parquet`` with the unit geometry and its CRS (the AE CRS). Columns:

- ``unit_id`` (str), ``x``, ``y`` (the point, or the polygon's centroid), ``geometry``;
- the labels: ``label`` (int) and ``label_name`` (LUC), or ``ns-sec_1`` … (SDM);
- one fixed-size-list column per feature method (``AE``, ``AETHER``,
  ``AETHER_<variant>``): the unit's pooled, L2-normalised vector;
- ``poi_tokens`` / ``poi_counts`` (the unit's bag of POI tokens) and ``n_pois``.

The schema metadata ``aether_scale`` (JSON) records the task, the methods, the label
columns, the buffer and the stage's counts. :func:`write_region_table` writes a task,
:class:`RegionTable` reads one back (features as ``(n, C)`` arrays).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["NAME", "TASKS", "RegionTable", "write_region_table"]

NAME = "regions"
TASKS = ("luc", "sdm")
_FIX = "run `aether-scale regions --force`"


def _fixed_list(a: np.ndarray) -> Any:
    import pyarrow as pa

    a = np.ascontiguousarray(a, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1])


def _geo_metadata(gdf: Any) -> dict[str, Any]:
    """The GeoParquet 1.0 ``geo`` metadata of ``gdf``'s WKB geometry column."""
    return {"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": {
        "encoding": "WKB",
        "geometry_types": sorted(set(gdf.geometry.geom_type.dropna())),
        "crs": gdf.crs.to_json_dict() if gdf.crs is not None else None,
        "bbox": [float(v) for v in gdf.total_bounds] if len(gdf) else [],
    }}}


def write_region_table(path: str, units: Any, label_cols: Sequence[str],
                       features: Mapping[str, np.ndarray], bag_tokens: Any, bag_counts: Any,
                       n_pois: np.ndarray, meta: Mapping[str, Any], *, fs: Any = None) -> None:
    """Write one task's units (a GeoDataFrame with ``unit_id`` and ``label_cols``) with
    their ``features`` (method → (n, C)), POI bags (list arrays) and counts, as
    GeoParquet (WKB geometry, ``geo`` metadata with the CRS)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely
    from fsspec.implementations.local import LocalFileSystem

    pts = units.geometry.geom_type == "Point"
    cen = units.geometry.where(pts, units.geometry.centroid)
    base = units[["unit_id", *label_cols]].copy()
    base["unit_id"] = base["unit_id"].astype(str)
    base["x"], base["y"] = cen.x.to_numpy(np.float64), cen.y.to_numpy(np.float64)
    table = pa.Table.from_pandas(base.reset_index(drop=True), preserve_index=False)
    for name, arr in features.items():
        table = table.append_column(name, _fixed_list(arr))
    table = table.append_column("poi_tokens", bag_tokens)
    table = table.append_column("poi_counts", bag_counts)
    table = table.append_column("n_pois", pa.array(np.asarray(n_pois, np.int64)))
    wkb = shapely.to_wkb(np.asarray(units.geometry.values, dtype=object))
    table = table.append_column("geometry", pa.array(list(wkb), type=pa.binary()))
    md = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    md[b"geo"] = json.dumps(_geo_metadata(units)).encode()
    md[b"aether_scale"] = json.dumps(dict(meta), default=str).encode()
    table = table.replace_schema_metadata(md)
    with (fs or LocalFileSystem()).open(path, "wb") as f:
        pq.write_table(table, f)


class RegionTable:
    """The ``regions/`` folder of a workspace (a path or fsspec URL)."""

    def __init__(self, uri: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec

        self.uri = str(uri).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **dict(storage_options or {}))
        self.root = self.root.rstrip("/")

    def tasks(self) -> list[str]:
        """The tasks with a table here, in :data:`TASKS` order."""
        return [t for t in TASKS if self.fs.exists(f"{self.root}/{t}.parquet")]

    def read(self, task: str) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
        """``(units GeoDataFrame without the features, {method: (n, C) float32}, meta)``.

        Raises ``FileNotFoundError`` when the task has no table, ``ValueError`` when the
        file is not one written by the regions stage.
        """
        import geopandas as gpd
        import pyarrow.parquet as pq
        from fsspec.implementations.local import LocalFileSystem

        p = f"{self.root}/{task}.parquet"
        if not self.fs.exists(p):
            raise FileNotFoundError(f"{self.uri}/{task}.parquet is missing: run 'aether-scale "
                                    f"regions' with regions.{task}_* set")
        if isinstance(self.fs, LocalFileSystem):
            t = pq.read_table(p)  # pyarrow's native reader (memory-mapped) for local files
        else:
            with self.fs.open(p, "rb") as fh:
                t = pq.read_table(fh)
        raw = (t.schema.metadata or {}).get(b"aether_scale")
        if raw is None:
            raise ValueError(f"{self.uri}/{task}.parquet has no aether_scale metadata; {_FIX}")
        meta = json.loads(raw)
        feats = {}
        for name in meta.get("methods", []):
            col = t.column(name).combine_chunks()
            d = col.type.list_size
            feats[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(t), d)
        import shapely

        geo = json.loads((t.schema.metadata or {}).get(b"geo", b"{}"))
        gcol = geo.get("primary_column", "geometry")
        if gcol not in t.column_names:
            raise ValueError(f"{self.uri}/{task}.parquet has no geometry column; {_FIX}")
        crs = geo.get("columns", {}).get(gcol, {}).get("crs")
        rest = t.drop_columns([*feats, gcol])
        geoms = shapely.from_wkb(t.column(gcol).to_numpy(zero_copy_only=False))
        units = gpd.GeoDataFrame(rest.to_pandas(), geometry=geoms, crs=crs)
        return units, feats, meta
