"""Region features for the downstream tasks: AE and AETHER pooled around label units → ``regions.parquet``.

Two kinds of units (DESIGN.md, "inference"):

- **LUC** points with a land-use label, pooled in a ``regions.luc_buffer_m``
  (50 m) circle;
- **SDM** units (LSOA population-weighted centroids) with a 9-bin NS-SeC
  distribution, pooled in a ``regions.sdm_buffer_m`` (300 m) circle. The
  distribution comes from the units file's ``ns-sec_1…9`` columns (rows are
  re-normalised) or, with ``regions.sdm_table``, from the raw ONS long table
  (code −8 "does not apply" dropped, pivoted, normalised) joined on
  ``regions.sdm_id``.

Units given as polygons are pooled over the pixels inside them instead
(:func:`aether_scale.pooling.pool_polygons`). Every feature — AE (int8 codes),
AETHER and AETHER w/o aug (float16 fields) — goes through the same pooling
engine, so the methods differ only in the raster. The POI-only baselines get
each unit's *bag* of POI tokens (``category=…``, ``subcategory=…`` from
``pois.parquet``) within the same buffer, found with one KD-tree range query
over all units at once.

Output: the folder ``regions.parquet/`` with ``luc.parquet`` and
``sdm.parquet`` (one row per kept unit): ``unit_id``, ``x``, ``y`` (AE CRS),
labels (``label``/``label_name`` or ``ns-sec_*``), one fixed-size-list column
per feature method (``AE``, ``AETHER``, ``AETHER_noaug``), ``poi_tokens`` /
``poi_counts`` (the bag) and ``n_pois``. Units with a bad label, outside the
raster or without a valid pixel are dropped and counted in the manifest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import fsspec
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import xarray as xr
from fsspec.implementations.local import LocalFileSystem
from scipy.spatial import cKDTree

from .config import BufferSpec, RegionsSection, RunConfig
from .workspace import StageResult, Workspace

__all__ = [
    "region_features",
    "load_luc_units",
    "load_sdm_units",
    "read_sdm_table",
    "poi_bags",
    "run_regions",
    "read_regions",
    "FIELD_SOURCES",
]

# method name → workspace raster it is pooled from
FIELD_SOURCES: dict[str, str] = {
    "AE": "ae.zarr",
    "AETHER": "field.zarr",
    "AETHER_noaug": "field_noaug.zarr",
}


# --------------------------------------------------------------------------- rasters
def open_raster(path: str, *, storage_options: dict | None = None) -> xr.DataArray:
    """A workspace raster (``ae.zarr`` / ``field*.zarr``, path or fsspec URL) as its ``embedding``."""
    from .raster import open_embedding

    return open_embedding(path, storage_options=storage_options)


def raster_crs(da: xr.DataArray) -> Any:
    """The raster's CRS (pyproj/rasterio CRS) or raise ValueError saying how to add one."""
    import rioxarray  # noqa: F401

    crs = da.rio.crs
    if crs is None:
        raise ValueError("the raster has no CRS (spatial_ref); re-run 'aether-scale ingest'")
    return crs


def _xy(units: gpd.GeoDataFrame | tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(units, tuple):
        return np.asarray(units[0], dtype=np.float64), np.asarray(units[1], dtype=np.float64)
    return units.geometry.x.to_numpy(np.float64), units.geometry.y.to_numpy(np.float64)


def _is_points(units: Any) -> bool:
    if isinstance(units, tuple):
        return True
    return bool((units.geometry.geom_type == "Point").all())


def region_features(
    da: xr.DataArray,
    units: gpd.GeoDataFrame | tuple[np.ndarray, np.ndarray],
    buffer_m: float,
) -> np.ndarray:
    """Mean of ``da`` pixels per unit, L2-normalised: (n, C) float32, NaN rows where none valid.

    ``da`` is ``ae.zarr``'s int8 codes or a float field (same code path, the
    pooling engine de-quantises int8). ``units``: points (GeoDataFrame in the
    raster's CRS, or an ``(x, y)`` tuple) pooled in a circle of ``buffer_m``
    metres (pixel centres within the radius); polygons are pooled over the
    pixels whose centres fall inside them (``buffer_m`` is then unused).
    """
    return _pool_units(da, units, buffer_m)[0]


def _pool_units(da: xr.DataArray, units: Any, buffer_m: float) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, C) with NaN rows, outside-the-raster mask (n,)) for points or polygons."""
    if _is_points(units):
        from .pooling import pool_buffers

        x, y = _xy(units)
        res = pool_buffers(da, x, y, [BufferSpec(shape="circle", radius_m=float(buffer_m))])
        outside = getattr(res, "outside", None)
        if outside is None:
            outside = np.zeros(len(x), bool)
        return np.asarray(res.vectors[0], dtype=np.float32), np.asarray(outside, bool)
    from .pooling import pool_polygons

    vec = np.asarray(pool_polygons(da, units.geometry.values), dtype=np.float32)
    return vec, np.zeros(len(vec), bool)


# --------------------------------------------------------------------------- labels
def _read_vector(path: str, crs_fallback: str | None, what: str) -> gpd.GeoDataFrame:
    try:
        gdf = gpd.read_file(path) if not str(path).endswith(".parquet") else gpd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is reported with the file
        raise ValueError(f"{what} {path}: could not be read as a vector file ({e})") from None
    if gdf.crs is None:
        if crs_fallback is None:
            raise ValueError(f"{what} {path} has no CRS; set regions.crs (e.g. EPSG:27700)")
        gdf = gdf.set_crs(crs_fallback)
    return gdf


def _drop_bad_geometry(gdf: gpd.GeoDataFrame) -> tuple[gpd.GeoDataFrame, int]:
    bad = gdf.geometry.isna() | gdf.geometry.is_empty
    return gdf.loc[~bad], int(bad.sum())


def load_luc_units(cfg: RegionsSection, crs: Any) -> tuple[gpd.GeoDataFrame, dict[str, int]]:
    """LUC points with ``label`` (int) and ``label_name``, reprojected to ``crs``.

    Rows without geometry or label are dropped and counted. Raises ValueError
    naming the file and the missing column.
    """
    path = cfg.luc_points
    if path is None:
        raise ValueError("regions.luc_points is not set (a points file with a land-use label)")
    gdf = _read_vector(path, cfg.crs, "regions.luc_points")
    if cfg.luc_label not in gdf.columns:
        raise ValueError(
            f"regions.luc_points {path}: no column {cfg.luc_label!r} (columns: "
            f"{[c for c in gdf.columns if c != 'geometry']}); set regions.luc_label"
        )
    n0 = len(gdf)
    gdf, no_geom = _drop_bad_geometry(gdf)
    label = pd.to_numeric(gdf[cfg.luc_label], errors="coerce")
    bad_label = label.isna() | (label != np.round(label))
    gdf = gdf.loc[~bad_label]
    out = gpd.GeoDataFrame(
        {
            "unit_id": (gdf["loc_id"].astype(str) if "loc_id" in gdf.columns
                        else pd.Series(gdf.index.astype(str), index=gdf.index)),
            "label": label[~bad_label].astype(np.int64),
        },
        geometry=gdf.geometry,
        crs=gdf.crs,
    )
    if cfg.luc_label_name and cfg.luc_label_name in gdf.columns:
        out["label_name"] = gdf[cfg.luc_label_name].astype(str)
    out = out.to_crs(crs).reset_index(drop=True)
    return out, {"rows": n0, "dropped_no_geometry": no_geom, "dropped_bad_label": int(bad_label.sum())}


def _find_col(cols: Sequence[str], want: Sequence[str], what: str, path: str) -> str:
    for w in want:
        for c in cols:
            if c.strip().lower() == w.lower():
                return c
    raise ValueError(f"regions.sdm_table {path}: no {what} column (looked for {list(want)}; "
                     f"columns: {list(cols)})")


def read_sdm_table(path: str, cfg: RegionsSection) -> tuple[pd.DataFrame, dict[str, int]]:
    """The raw ONS long table → one row per area: ``sdm_id`` + normalised ``sdm_columns``.

    Expects (ONS Census 2021 layout) an area-code column, an NS-SeC code column
    (codes −8…9) and an ``Observation`` count. Code −8 ("does not apply") and
    other codes outside 1…len(sdm_columns) are dropped; areas whose remaining
    total is zero are dropped and counted.
    """
    df = pd.read_csv(path)
    cols = list(df.columns)
    area = next((c for c in cols if c.lower().endswith("code") and "ns-sec" not in c.lower()),
                None) or _find_col(cols, [cfg.sdm_id], "area code", path)
    code = next((c for c in cols if "ns-sec" in c.lower() and c.lower().endswith("code")), None)
    if code is None:
        raise ValueError(f"regions.sdm_table {path}: no NS-SeC code column (a column whose name "
                         f"contains 'NS-SeC' and ends with 'Code'); columns: {cols}")
    count = _find_col(cols, ["Observation", "count", "value"], "count (Observation)", path)
    k = len(cfg.sdm_columns)
    codes = pd.to_numeric(df[code], errors="coerce")
    keep = codes.between(1, k)
    n_dna = int((codes == -8).sum())
    sub = df.loc[keep, [area, count]].assign(_c=codes[keep].astype(int))
    wide = sub.pivot_table(index=area, columns="_c", values=count, aggfunc="sum", fill_value=0)
    wide = wide.reindex(columns=range(1, k + 1), fill_value=0).astype(np.float64)
    tot = wide.sum(axis=1)
    zero = tot <= 0
    wide = wide.loc[~zero].div(tot[~zero], axis=0)
    wide.columns = list(cfg.sdm_columns)
    wide.index.name = cfg.sdm_id
    return wide.reset_index(), {
        "table_rows": len(df),
        "table_rows_does_not_apply": n_dna,
        "table_rows_other_codes": int((~keep).sum()) - n_dna,
        "table_areas": int(len(tot)),
        "table_areas_zero_total": int(zero.sum()),
    }


def load_sdm_units(cfg: RegionsSection, crs: Any) -> tuple[gpd.GeoDataFrame, dict[str, int]]:
    """SDM units (points or polygons) with row-normalised ``sdm_columns``, reprojected to ``crs``.

    With ``regions.sdm_table`` the distributions come from the raw table
    (joined on ``regions.sdm_id``; units without a table row are dropped and
    counted). Rows with NaN or zero total are dropped and counted.
    """
    path = cfg.sdm_units
    if path is None:
        raise ValueError("regions.sdm_units is not set (points/polygons with ns-sec_1..9)")
    gdf = _read_vector(path, cfg.crs, "regions.sdm_units")
    stats: dict[str, int] = {"rows": len(gdf)}
    if cfg.sdm_id not in gdf.columns:
        raise ValueError(f"regions.sdm_units {path}: no id column {cfg.sdm_id!r} (columns: "
                         f"{[c for c in gdf.columns if c != 'geometry']}); set regions.sdm_id")
    gdf, stats["dropped_no_geometry"] = _drop_bad_geometry(gdf)
    cols = list(cfg.sdm_columns)
    if cfg.sdm_table:
        table, tstats = read_sdm_table(cfg.sdm_table, cfg)
        stats.update(tstats)
        base = gdf[[cfg.sdm_id, "geometry"]].astype({cfg.sdm_id: str})
        table[cfg.sdm_id] = table[cfg.sdm_id].astype(str)
        merged = base.merge(table, on=cfg.sdm_id, how="left")
        stats["dropped_not_in_table"] = int(merged[cols[0]].isna().sum())
        gdf = gpd.GeoDataFrame(merged, geometry="geometry", crs=gdf.crs)
    else:
        missing = [c for c in cols if c not in gdf.columns]
        if missing:
            raise ValueError(f"regions.sdm_units {path}: missing columns {missing}; set "
                             "regions.sdm_columns or give the raw table as regions.sdm_table")
    q = gdf[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    tot = q.sum(axis=1)
    bad = ~np.isfinite(q).all(axis=1) | ~(tot > 0) | (q < 0).any(axis=1)
    stats["dropped_bad_distribution"] = int(bad.sum()) - stats.get("dropped_not_in_table", 0)
    q = q[~bad] / tot[~bad, None]
    gdf = gdf.loc[~bad]
    out = gpd.GeoDataFrame({"unit_id": gdf[cfg.sdm_id].astype(str).to_numpy()},
                           geometry=gdf.geometry.to_numpy(), crs=gdf.crs)
    for j, c in enumerate(cols):
        out[c] = q[:, j]
    return out.to_crs(crs).reset_index(drop=True), stats


# --------------------------------------------------------------------------- POI bags
def _read_pois(path: str, token_columns: Sequence[str], storage_options: dict | None = None
               ) -> tuple[gpd.GeoDataFrame, list[str]]:
    import pyarrow.dataset as pds

    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    dset = pds.dataset(root, format="parquet", filesystem=fs)  # a file or a partitioned folder
    if not dset.files:
        raise ValueError(f"{path}: a folder without .parquet files")
    schema_cols = dset.schema.names
    cols = [c for c in token_columns if c in schema_cols]
    if not cols:
        raise ValueError(
            f"{path}: none of regions.poi_token_columns {list(token_columns)} is a column "
            f"(columns: {[c for c in schema_cols if c != 'geometry']}); set "
            "regions.poi_token_columns or keep those columns in the pois stage (pois.keep_columns)"
        )
    return gpd.read_parquet(root, columns=[*cols, "geometry"], filesystem=fs), cols


def poi_token_matrix(pois: pd.DataFrame, columns: Sequence[str]) -> tuple[sp.csr_matrix, np.ndarray]:
    """(n_pois × vocab) 0/1 matrix of ``column=value`` tokens and the vocabulary."""
    mats, vocab = [], []
    n = len(pois)
    for c in columns:
        vals = pois[c].astype("string")
        codes, uniques = pd.factorize(vals, use_na_sentinel=True)
        ok = codes >= 0
        m = sp.csr_matrix(
            (np.ones(int(ok.sum()), np.float32), (np.flatnonzero(ok), codes[ok])),
            shape=(n, len(uniques)),
        )
        mats.append(m)
        vocab.extend(f"{c}={u}" for u in uniques)
    return sp.hstack(mats, format="csr"), np.asarray(vocab, dtype=object)


def poi_bags(
    units: gpd.GeoDataFrame,
    pois: gpd.GeoDataFrame,
    token_columns: Sequence[str],
    buffer_m: float,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Token counts of the POIs in each unit's buffer (points) or polygon.

    Returns ``(counts (n_units × vocab) CSR, vocab, n_pois per unit)``. Point
    units: one KD-tree range query for all units (distance ≤ ``buffer_m``,
    the same membership rule as the raster buffers); polygons: a spatial join.
    """
    tokens, vocab = poi_token_matrix(pois, token_columns)
    n_units, n_pois = len(units), len(pois)
    if n_pois == 0:
        return sp.csr_matrix((n_units, len(vocab)), dtype=np.float32), vocab, np.zeros(n_units, int)
    if _is_points(units):
        ux, uy = _xy(units)
        px, py = _xy(pois)
        pairs = cKDTree(np.c_[ux, uy]).sparse_distance_matrix(
            cKDTree(np.c_[px, py]), float(buffer_m), output_type="ndarray"
        )
        ui, pj = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    else:
        joined = gpd.sjoin(pois[["geometry"]].reset_index(drop=True),
                           units[["geometry"]].reset_index(drop=True),
                           predicate="within", how="inner")
        ui = joined["index_right"].to_numpy(np.int64)
        pj = joined.index.to_numpy(np.int64)
    member = sp.csr_matrix((np.ones(len(ui), np.float32), (ui, pj)), shape=(n_units, n_pois))
    counts = (member @ tokens).tocsr()
    counts.sum_duplicates()
    return counts, vocab, np.asarray(member.sum(axis=1)).ravel().astype(np.int64)


# --------------------------------------------------------------------------- output
def _fixed_list(a: np.ndarray) -> pa.FixedSizeListArray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1])


def _bag_columns(counts: sp.csr_matrix, vocab: np.ndarray) -> tuple[pa.Array, pa.Array]:
    counts = counts.tocsr()
    counts.sort_indices()
    offsets = pa.array(counts.indptr.astype(np.int32))
    toks = pa.ListArray.from_arrays(offsets, pa.array(vocab[counts.indices].astype(str),
                                                      type=pa.string()))
    vals = pa.ListArray.from_arrays(offsets, pa.array(counts.data.astype(np.int32)))
    return toks, vals


def _write_task(path: str, units: gpd.GeoDataFrame, label_cols: list[str],
                features: dict[str, np.ndarray], counts: sp.csr_matrix, vocab: np.ndarray,
                n_pois: np.ndarray, meta: dict[str, Any], *,
                fs: fsspec.AbstractFileSystem | None = None) -> None:
    x, y = _xy(units) if _is_points(units) else (units.geometry.centroid.x.to_numpy(),
                                                  units.geometry.centroid.y.to_numpy())
    cols: dict[str, Any] = {"unit_id": pa.array(units["unit_id"].astype(str).to_numpy()),
                            "x": pa.array(x), "y": pa.array(y)}
    for c in label_cols:
        cols[c] = pa.array(units[c].to_numpy())
    for name, arr in features.items():
        cols[name] = _fixed_list(arr)
    cols["poi_tokens"], cols["poi_counts"] = _bag_columns(counts, vocab)
    cols["n_pois"] = pa.array(n_pois.astype(np.int64))
    table = pa.table(cols).replace_schema_metadata({"aether_scale": json.dumps(meta)})
    with (fs or LocalFileSystem()).open(path, "wb") as f:
        pq.write_table(table, f)


def read_regions(path: str, task: str, *, storage_options: dict | None = None
                 ) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, Any]]:
    """One task's units from ``regions.parquet``: (table without features, {method: (n, C)}, meta).

    ``path`` may be an fsspec URL (``storage_options`` go to fsspec), so the
    evaluate stage can read a remote workspace such as ``s3://bucket/run``.
    """
    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    f = f"{str(path).rstrip('/')}/{task}.parquet"
    p = f"{root.rstrip('/')}/{task}.parquet"
    if not fs.exists(p):
        raise FileNotFoundError(f"{f} is missing: run 'aether-scale regions' with regions.{task}_* set")
    if isinstance(fs, LocalFileSystem):
        t = pq.read_table(p)  # pyarrow's native reader (memory-mapped) for local files
    else:
        with fs.open(p, "rb") as fh:
            t = pq.read_table(fh)
    meta = json.loads((t.schema.metadata or {}).get(b"aether_scale", b"{}"))
    feats = {}
    for name in meta.get("methods", []):
        col = t.column(name).combine_chunks()
        d = col.type.list_size
        feats[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(t), d)
    rest = t.drop_columns(list(feats)).to_pandas()
    return rest, feats, meta


# --------------------------------------------------------------------------- stage
def _task_units(task: str, cfg: RegionsSection, crs: Any) -> tuple[gpd.GeoDataFrame, list[str],
                                                                  float, dict[str, int]]:
    if task == "luc":
        units, st = load_luc_units(cfg, crs)
        labels = ["label"] + (["label_name"] if "label_name" in units.columns else [])
        return units, labels, cfg.luc_buffer_m, st
    units, st = load_sdm_units(cfg, crs)
    return units, list(cfg.sdm_columns), cfg.sdm_buffer_m, st


def build_regions(
    rasters: dict[str, str],
    pois_path: str | None,
    cfg: RunConfig,
    out_dir: str,
    *,
    log: Any = print,
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """Pool every raster in ``rasters`` ({method: zarr path}) around each task's units.

    Writes ``out_dir/<task>.parquet`` for each task whose units are
    configured; returns per-task counts (kept / dropped by reason, POIs per
    unit). The AE raster (method ``AE``) defines the CRS and the valid units.
    The rasters, ``pois_path`` and ``out_dir`` may be fsspec URLs
    (``storage_options`` go to fsspec); the label files are read as given.
    """
    rc = cfg.regions
    das = {m: open_raster(p, storage_options=storage_options) for m, p in rasters.items()}
    crs = raster_crs(das["AE"])
    tasks = [t for t in ("luc", "sdm") if (rc.luc_points if t == "luc" else rc.sdm_units)]
    if not tasks:
        raise ValueError("neither regions.luc_points nor regions.sdm_units is set: nothing to do")
    pois, tok_cols = (None, [])
    if pois_path is not None:
        pois, tok_cols = _read_pois(pois_path, rc.poi_token_columns, storage_options)
        pois = pois.to_crs(crs) if pois.crs is not None and pois.crs != crs else pois
    fs, out_root = fsspec.core.url_to_fs(str(out_dir), **(storage_options or {}))
    fs.makedirs(out_root, exist_ok=True)
    stats: dict[str, Any] = {}
    for task in tasks:
        t0 = time.perf_counter()
        units, label_cols, buf, st = _task_units(task, rc, crs)
        feats, outside = {}, np.zeros(len(units), bool)
        for m, da in das.items():
            feats[m], out_m = _pool_units(da, units, buf)
            if m == "AE":
                outside = out_m
        valid = np.ones(len(units), bool)
        for arr in feats.values():
            valid &= np.isfinite(arr).all(axis=1)
        st["dropped_outside_raster"] = int((outside & ~valid).sum())
        st["dropped_no_valid_pixel"] = int((~outside & ~valid).sum())
        units = units.loc[valid].reset_index(drop=True)
        feats = {m: a[valid] for m, a in feats.items()}
        if pois is not None:
            counts, vocab, n_pois = poi_bags(units, pois, tok_cols, buf)
        else:
            counts, vocab, n_pois = (sp.csr_matrix((len(units), 0), dtype=np.float32),
                                     np.array([], dtype=object), np.zeros(len(units), np.int64))
        st.update(kept=len(units), buffer_m=buf, poi_vocab=len(vocab),
                  units_without_pois=int((n_pois == 0).sum()),
                  mean_pois_per_unit=round(float(n_pois.mean()), 2) if len(units) else 0.0,
                  seconds=round(time.perf_counter() - t0, 2))
        meta = {"task": task, "methods": list(feats), "labels": label_cols, "buffer_m": buf,
                "crs": str(crs), "poi_token_columns": tok_cols, "stats": st}
        _write_task(f"{out_root.rstrip('/')}/{task}.parquet", units, label_cols, feats,
                    counts, vocab, n_pois, meta, fs=fs)
        stats[task] = st
        if log:
            log(f"[regions] {task}: kept {st['kept']:,} of {st['rows']:,} units "
                f"(outside raster {st['dropped_outside_raster']}, no valid pixel "
                f"{st['dropped_no_valid_pixel']}); {st['mean_pois_per_unit']} POIs/unit")
    return stats


def run_regions(ws: Workspace, cfg: RunConfig, *, force: bool = False) -> StageResult:
    """Stage ``regions``: AE / AETHER / AETHER w/o aug + POI bags per unit → ``regions.parquet/``.

    Uses every raster present among ``ae.zarr``, ``field.zarr`` and
    ``field_noaug.zarr`` (the latter only with ``evaluate.noaug``), and
    ``pois.parquet`` when present (for the TF-IDF / LDA baselines).
    Raises FileNotFoundError when ``ae.zarr`` is missing.
    """
    if not ws.exists("ae.zarr"):
        raise FileNotFoundError(f"{ws.path('ae.zarr')} is missing: run 'aether-scale ingest' first")
    rasters = {m: name for m, name in FIELD_SOURCES.items() if ws.exists(name)}
    if not cfg.evaluate.noaug:
        rasters.pop("AETHER_noaug", None)

    inputs: dict[str, str] = dict(rasters)
    pois = "pois.parquet" if ws.exists("pois.parquet") else None
    if pois:
        inputs["pois"] = pois
    rc = cfg.regions
    for key in ("luc_points", "sdm_units", "sdm_table"):
        if getattr(rc, key):
            inputs[key] = getattr(rc, key)

    def fn(tmp: dict[str, str]) -> dict[str, Any]:
        return build_regions({m: ws.path(n) for m, n in rasters.items()},
                             ws.path(pois) if pois else None, cfg, tmp["regions.parquet"],
                             storage_options=ws.storage_options)

    return ws.run_stage("regions", outputs=["regions.parquet"], inputs=inputs,
                        config={"regions": cfg.section("regions"), "methods": sorted(rasters)},
                        fn=fn, force=force)
