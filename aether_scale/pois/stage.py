"""The ``pois`` stage: every source → ``pois.parquet`` (GeoParquet parts) + stats.

:func:`process_pois` validates the config, opens the sources
(:mod:`.readers`), applies the row rules per partition (:mod:`.rows`), drops
duplicate ids (first occurrence in source/file order kept), splits the kept rows
into output partitions by AE chunk key (never splitting a chunk) and writes one
sorted GeoParquet part per partition (:func:`aether_scale.stores.pois.write_part`).
:func:`build` is the registered ``pois`` stage. See the :mod:`aether_scale.pois` docstring for the
columns, rules and stats.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import pandas as pd

from ..cluster import persist, run_tasks
from ..config import PoisSection, RunConfig
from ..stores.pois import write_part
from .clean import _template_parts
from .errors import PoiInputError
from .grid import RasterGrid, raster_grid
from .readers import SourceSpec, _nullable, _resolve_source, read_source
from .rows import _ID_STRIDE, DROP_REASONS, _finish, _kept_keys, _part_stats, _prepare, _select

__all__ = ["build", "external_inputs", "process_pois"]

_RESERVED = {
    "poi_id", "description", "name", "category", "subcategory", "source",
    "x", "y", "chunk_y", "chunk_x", "geometry",
}


def _write_part(pieces: list[pd.DataFrame], path: str, crs_wkt: str, columns: list[str]) -> int:
    """Concatenate the pieces of one output partition and write it as one part file."""
    df = pd.concat(pieces, ignore_index=True) if pieces else pd.DataFrame(columns=columns)
    return write_part(df, path, crs_wkt, columns)


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
    flat = persist(flat)
    lens = run_tasks([dask.delayed(len)(p) for p in flat])
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
    finished = persist(finished)
    del flat

    per_part = run_tasks([dask.delayed(_part_stats)(p) for p in finished])
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
    keys = pd.concat(run_tasks([dask.delayed(_kept_keys)(p, ncx) for p in finished]) or
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
    written = run_tasks(writes)

    total = {k: sum(s.get(k, 0) for s in per_source) for k in per_source[0]}
    kept = int(sum(written))
    dropped = {k: total[k] for k in (*DROP_REASONS, "duplicate_id")}
    if kept + sum(dropped.values()) != total["rows"]:  # pragma: no cover - internal invariant
        raise RuntimeError(f"POI accounting mismatch: kept {kept} + dropped {dropped} != {total['rows']}")
    return {
        "rows_read": total["rows"],
        "kept": kept,
        "dropped": dropped,
        "repaired": {"non_point": total["non_point"], "encoding": total["encoding"],
                     "already_named": total["already_named"]},
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


def external_inputs(cfg: RunConfig) -> dict[str, str]:
    """The POI files the stage reads, one input per source (fingerprinted by content)."""
    return {f"sources.{i}.path": s.path for i, s in enumerate(cfg.pois.sources)}


def build(ctx) -> dict[str, Any]:
    """The ``pois`` stage: the configured POI sources → ``pois.parquet`` (a folder of
    GeoParquet parts; see the :mod:`aether_scale.pois` docstring for columns, rules and
    stats). Raises :class:`PoiInputError` (a ValueError) naming the file, config key and
    fix for a missing column / CRS / coordinate setting.
    """
    grid = raster_grid(ctx.reads["ae.zarr"], storage_options=ctx.storage_options)
    stats = process_pois(ctx.cfg.pois, grid, ctx.outputs["pois.parquet"])
    dropped = ", ".join(f"{k} {v:,}" for k, v in stats["dropped"].items() if v) or "none"
    fixed = {"non_point": "non-point geometries → a point on them",
             "encoding": "bad bytes decoded as cp1252", "already_named":
             "descriptions already naming the POI, name not appended again"}
    repaired = "; ".join(f"{fixed[k]} {v:,}" for k, v in stats["repaired"].items() if v)
    ctx.log.info(f"[pois] kept {stats['kept']:,} of {stats['rows_read']:,} POIs "
                 f"(dropped: {dropped}) in {stats['files']} part file(s)"
                 + (f"; repaired: {repaired}" if repaired else ""))
    if stats["kept"] == 0:
        raise PoiInputError(_nothing_kept(stats, grid, ctx.cfg.pois))
    return stats


def _nothing_kept(stats: dict[str, Any], grid: RasterGrid, pcfg: PoisSection) -> str:
    """Why no POI is left, in the words a user can act on."""
    paths = ", ".join(s.path for s in pcfg.sources)
    if stats["rows_read"] == 0:
        return f"pois: the POI sources hold no rows ({paths}); give a file with POIs"
    d = stats["dropped"]
    msg = (f"pois: none of the {stats['rows_read']:,} POIs was kept (dropped: "
           + ", ".join(f"{k} {v:,}" for k, v in d.items() if v) + ")")
    if d.get("outside_coverage") == stats["rows_read"] - sum(
            v for k, v in d.items() if k != "outside_coverage"):
        left, bottom, right, top = grid.bounds()
        msg += (f". Every POI with coordinates lies outside the AE raster (x {left:,.0f}…"
                f"{right:,.0f}, y {bottom:,.0f}…{top:,.0f} in its CRS): are longitude and "
                "latitude swapped (pois.sources[].lon/lat), is pois.sources[].crs wrong, or do "
                "the tiles cover another area?")
    return msg


def worker_memory(ctx) -> tuple[list[str], list[tuple[str, int]], str]:
    """What one pois task imports (geopandas, pyogrio) and holds: one partition of rows."""
    import fsspec

    rows = ctx.cfg.pois.partition_rows
    biggest = 0
    for src in ctx.cfg.pois.sources:  # a partition never holds more than its file
        try:
            fs, p = fsspec.core.url_to_fs(src.path)
            biggest = max(biggest, int(fs.du(p)) if fs.isdir(p) else int(fs.size(p)))
        except (OSError, ValueError):
            biggest = max(biggest, rows * 1024)
    part = min(rows * 2048, 8 * min(biggest, 64 * 2**20))  # pandas/shapely copies
    return (["aether_scale.pois.stage", "geopandas", "dask_geopandas", "pyogrio"],
            [(f"a partition (≤ {rows:,} rows)", part)], "lower pois.partition_rows")
