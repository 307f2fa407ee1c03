"""The label units of the evaluation tasks, read and checked: LUC points and SDM units.

- **LUC**: points with a land-use label (``regions.luc_label``, an integer class);
- **SDM**: units (LSOA population-weighted centroids, or polygons) with a 9-bin
  NS-SeC distribution, from the units file's ``ns-sec_*`` columns (rows re-normalised)
  or, with ``regions.sdm_table``, from the raw ONS long table (code −8 "does not apply"
  dropped, pivoted, normalised) joined on ``regions.sdm_id``.

Rows without geometry or with a bad label are dropped and counted. Every problem with
a file names the file, the column and the config key to set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from .. import storage
from ..config import RegionsSection

__all__ = ["load_luc_units", "load_sdm_units", "read_sdm_table", "task_units"]


def _read_vector(path: str, crs_fallback: str | None, what: str) -> gpd.GeoDataFrame:
    try:
        gdf = storage.read_vector(str(path))
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


def task_units(task: str, cfg: RegionsSection, crs: Any) -> tuple[gpd.GeoDataFrame, list[str],
                                                                 float, dict[str, int]]:
    """``(units, label columns, buffer in metres, counts)`` of ``task`` (``luc``/``sdm``)."""
    if task == "luc":
        units, st = load_luc_units(cfg, crs)
        labels = ["label"] + (["label_name"] if "label_name" in units.columns else [])
        return units, labels, cfg.luc_buffer_m, st
    units, st = load_sdm_units(cfg, crs)
    return units, list(cfg.sdm_columns), cfg.sdm_buffer_m, st
