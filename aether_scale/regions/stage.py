"""The ``regions`` stage: AE and every field pooled around the label units → ``regions/``.

LUC points are pooled in a ``regions.luc_buffer_m`` (50 m) circle, SDM units in a
``regions.sdm_buffer_m`` (300 m) circle (DESIGN.md, "inference"); units given as
polygons are pooled over the pixels inside them
(:func:`aether_scale.pool.pool_polygons`). Every feature — AE (int8 codes) and each
field (``AETHER``, ``AETHER_<variant>``, one per ``field*.zarr`` infer left) — goes
through the same pooling engine, so the methods differ only in the raster. The
POI-only baselines get each unit's bag of POI tokens (:mod:`.bags`). Units with a bad
label, outside the raster or without a valid pixel are dropped and counted; the
output is :mod:`aether_scale.stores.regions`.
"""

from __future__ import annotations

import time
from typing import Any

import geopandas as gpd
import numpy as np
import scipy.sparse as sp
import xarray as xr

from ..config import BufferSpec, RunConfig
from ..logs import get_logger
from ..pipeline import ARTIFACTS
from ..stores.pois import PoiTable
from ..stores.raster import open_embedding, raster_crs
from ..stores.regions import write_region_table
from .bags import bag_columns, is_points, poi_bags, unit_xy
from .units import task_units

__all__ = ["build", "build_regions", "external_inputs", "method_of", "region_features"]

log = get_logger("regions")


def method_of(name: str) -> str | None:
    """The feature method pooled from workspace raster ``name``: ``ae.zarr`` → ``AE``,
    ``field.zarr`` → ``AETHER``, ``field_<v>.zarr`` → ``AETHER_<v>``; None otherwise."""
    if name == "ae.zarr":
        return "AE"
    v = ARTIFACTS["field.zarr"].variant_of(name)
    if v is None:
        return None
    return "AETHER" if not v else f"AETHER_{v}"


def region_features(da: xr.DataArray, units: gpd.GeoDataFrame | tuple[np.ndarray, np.ndarray],
                    buffer_m: float) -> np.ndarray:
    """Mean of ``da`` pixels per unit, L2-normalised: (n, C) float32, NaN rows where none valid.

    ``da`` is ``ae.zarr``'s int8 codes or a float field (same code path, the pooling
    engine de-quantises int8). ``units``: points (GeoDataFrame in the raster's CRS, or
    an ``(x, y)`` tuple) pooled in a circle of ``buffer_m`` metres (pixel centres within
    the radius); polygons are pooled over the pixels whose centres fall inside them.
    """
    return _pool_units(da, units, buffer_m)[0]


def _pool_units(da: xr.DataArray, units: Any, buffer_m: float) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, C) with NaN rows, outside-the-raster mask (n,)) for points or polygons."""
    if is_points(units):
        from ..pool import pool_buffers

        x, y = unit_xy(units)
        res = pool_buffers(da, x, y, [BufferSpec(shape="circle", radius_m=float(buffer_m))])
        return np.asarray(res.vectors[0], dtype=np.float32), np.asarray(res.outside, bool)
    from ..pool import pool_polygons

    vec = np.asarray(pool_polygons(da, units.geometry.values), dtype=np.float32)
    return vec, np.zeros(len(vec), bool)


def build_regions(rasters: dict[str, str], pois_path: str | None, cfg: RunConfig, out_dir: str,
                  *, storage_options: dict | None = None) -> dict[str, Any]:
    """Pool every raster in ``rasters`` ({method: zarr path}) around each task's units.

    Writes ``out_dir/<task>.parquet`` for each task whose units are configured; returns
    per-task counts (kept / dropped by reason, POIs per unit). The AE raster (method
    ``AE``) defines the CRS and the valid units. The rasters, ``pois_path`` and
    ``out_dir`` may be fsspec URLs; the label files are read as given.
    """
    import fsspec

    rc = cfg.regions
    das = {m: open_embedding(p, storage_options=storage_options) for m, p in rasters.items()}
    crs = raster_crs(das["AE"], where=rasters["AE"])
    tasks = [t for t in ("luc", "sdm") if (rc.luc_points if t == "luc" else rc.sdm_units)]
    if not tasks:
        raise ValueError("neither regions.luc_points nor regions.sdm_units is set: nothing to do")
    pois, tok_cols = None, []
    if pois_path is not None:
        table = PoiTable(pois_path, storage_options=storage_options)
        tok_cols = [c for c in rc.poi_token_columns if c in table.columns]
        if not tok_cols:
            raise ValueError(
                f"{pois_path}: none of regions.poi_token_columns {list(rc.poi_token_columns)} is "
                f"a column (columns: {[c for c in table.columns if c != 'geometry']}); set "
                "regions.poi_token_columns or keep those columns in the pois stage "
                "(pois.keep_columns)")
        pois = table.frame(tok_cols)
        pois = pois.to_crs(crs) if pois.crs is not None and not pois.crs.equals(crs) else pois
    fs, out_root = fsspec.core.url_to_fs(str(out_dir), **(storage_options or {}))
    fs.makedirs(out_root, exist_ok=True)
    stats: dict[str, Any] = {}
    for task in tasks:
        t0 = time.perf_counter()
        units, label_cols, buf, st = task_units(task, rc, crs)
        source = rc.luc_points if task == "luc" else rc.sdm_units
        if len(units) == 0:
            why = ", ".join(f"{k[8:].replace('_', ' ')} {v:,}" for k, v in st.items()
                            if k.startswith("dropped_") and v)
            raise ValueError(f"regions.{'luc_points' if task == 'luc' else 'sdm_units'} "
                             f"{source}: no usable unit in {st['rows']:,} rows (dropped: {why}); "
                             "see regions.luc_label / regions.sdm_columns")
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
        if not valid.any():
            raise ValueError(f"regions: no {task} unit of {source} has a valid pixel in its "
                             f"{buf:g} m buffer ({st['dropped_outside_raster']:,} outside the "
                             "raster): do the label files cover the AE tiles (CRS, regions.crs)?")
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
                "crs": crs.to_string(), "poi_token_columns": tok_cols, "stats": st}
        toks, vals = bag_columns(counts, vocab)
        write_region_table(f"{out_root.rstrip('/')}/{task}.parquet", units, label_cols, feats,
                           toks, vals, n_pois, meta, fs=fs)
        stats[task] = st
        dropped = {k: v for k, v in st.items() if k.startswith("dropped_") and v}
        log.info(f"[regions] {task}: kept {st['kept']:,} of {st['rows']:,} units (dropped: "
                 + (", ".join(f"{k[8:].replace('_', ' ')} {v:,}" for k, v in dropped.items())
                    or "none") + f"); {st['mean_pois_per_unit']} POIs/unit")
    return stats


def external_inputs(cfg: RunConfig) -> dict[str, str]:
    """The label files the stage reads (fingerprinted by content)."""
    rc = cfg.regions
    return {k: getattr(rc, k) for k in ("luc_points", "sdm_units", "sdm_table") if getattr(rc, k)}


def build(ctx) -> dict[str, Any]:
    """The ``regions`` stage: every raster the workspace holds (AE and each field) and the
    POI bags (when ``pois.parquet`` is there) per unit → ``regions/``."""
    rasters = {method_of(n): p for n, p in ctx.reads.items() if method_of(n)}
    pois = ctx.reads.get("pois.parquet")
    return build_regions(rasters, pois, ctx.cfg, ctx.outputs["regions"],
                         storage_options=ctx.storage_options)


def worker_memory(ctx) -> tuple[list[str], list[tuple[str, int]], str]:
    """What one regions task imports and holds: a raster chunk (AE or field) and its
    prefix-sum strip."""
    from ..stores.raster import chunk_shape

    cy, cx, cb = chunk_shape(ctx.reads["ae.zarr"], storage_options=ctx.storage_options)
    return (["aether_scale.regions.stage"],
            [(f"a raster chunk of {cy}×{cx} px", int(1.5 * cy * cx * max(cb, 2 * 128))),
             ("prefix-sum strip", int(1.5 * 32 * 2**20))],
            "re-ingest with a smaller ingest.chunk_px")
