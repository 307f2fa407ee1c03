"""``aether-scale pool``: AE pooled around every POI → ``triplets.zarr``.

Inputs (workspace contract, DESIGN.md): ``ae.zarr`` (int8 codes), ``pois.parquet``
(GeoParquet file or partitioned folder; ``poi_id`` + point geometry in the AE
CRS) and ``text.zarr`` (``embedding`` (n, D) aligned with ``poi_id`` (n,)).

Output layout (zarr v3 group, one array per name, all chunked along the row
dimension ``poi`` in ``pool.chunk_rows`` rows so a trainer can stream it)::

    triplets.zarr/
      poi_id  (poi,)            int64    the POI's id in pois.parquet
      base    (poi, band)       float32  L2-normalised mean AE in cfg.pool.base
      aug     (poi, band)       float32  L2-normalised mean AE in cfg.pool.aug
      text    (poi, text_dim)   float32  the POI's text embedding from text.zarr
      attrs: buffers, counts (the manifest's stats), layout notes

Rows are in raster-chunk order (row-major over ae.zarr's chunk grid, the
input order within a chunk): spatially coherent, not shuffled — the trainer
shuffles. A POI is absent when it has no geometry, lies outside the raster,
has no valid AE pixel in the base or the aug buffer, or has no text vector;
each reason is counted in the stage's stats. Text vectors are read from
text.zarr per output chunk, never all at once; pooled results stream from
the cluster through a bounded window of chunk tasks.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import xarray as xr

from ..config import RunConfig
from ..raster import open_ae
from ..workspace import StageResult, Workspace
from .engine import plan_pool

STAGE = "pool"


# --------------------------------------------------------------------------- inputs
def _geo_meta(schema: Any) -> dict[str, Any]:
    meta = schema.metadata or {}
    raw = meta.get(b"geo")
    return json.loads(raw) if raw else {}


def read_poi_points(path: str, *, storage_options: dict | None = None) -> dict[str, Any]:
    """``poi_id`` (int64), ``x``, ``y`` (float64; NaN where no geometry) and ``crs`` (or None).

    Reads only the id and geometry columns of a GeoParquet file or partitioned
    folder, batch by batch (WKB decoded with shapely). Raises ``ValueError``
    naming the file when ``poi_id`` or the geometry is missing, ids repeat, or
    geometries are not points.
    """
    import fsspec
    import pyarrow.dataset as pds
    import shapely

    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    dset = pds.dataset(p, format="parquet", filesystem=fs)
    geo = _geo_meta(dset.schema)
    gcol = geo.get("primary_column", "geometry")
    for col in ("poi_id", gcol):
        if col not in dset.schema.names:
            raise ValueError(
                f"{path}: column {col!r} is missing (found {dset.schema.names}); "
                "pois.parquet must hold poi_id and a point geometry — rerun `aether-scale pois`"
            )
    ids, xs, ys = [], [], []
    for batch in dset.to_batches(columns=["poi_id", gcol]):
        ids.append(batch.column("poi_id").to_numpy(zero_copy_only=False))
        garr = batch.column(gcol)
        if garr.type.num_fields:  # native GeoArrow encoding: let geopandas decode it
            import geopandas as gpd
            import pyarrow as pa

            tbl = pa.Table.from_batches([batch], schema=batch.schema)
            gs = gpd.GeoDataFrame.from_arrow(tbl)[gcol]
            geoms = np.asarray(gs.values, dtype=object)
        else:
            geoms = shapely.from_wkb(garr.to_numpy(zero_copy_only=False))
        missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
        types = shapely.get_type_id(geoms)
        if np.any(~missing & (types != 0)):
            raise ValueError(f"{path}: column {gcol!r} holds non-point geometries; POIs must be points")
        x = np.full(geoms.size, np.nan)
        y = np.full(geoms.size, np.nan)
        x[~missing] = shapely.get_x(geoms[~missing])
        y[~missing] = shapely.get_y(geoms[~missing])
        xs.append(x)
        ys.append(y)
    poi_id = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    if np.unique(poi_id).size != poi_id.size:
        raise ValueError(f"{path}: poi_id is not unique; rerun `aether-scale pois`")
    crs = geo.get("columns", {}).get(gcol, {}).get("crs")
    return {
        "poi_id": poi_id,
        "x": np.concatenate(xs) if xs else np.zeros(0),
        "y": np.concatenate(ys) if ys else np.zeros(0),
        "crs": crs,
    }


def _raster_crs(ds: xr.Dataset) -> Any:
    from pyproj import CRS

    for name in ("spatial_ref", "crs"):
        if name in ds.variables:
            attrs = ds[name].attrs
            for key in ("crs_wkt", "spatial_ref"):
                if attrs.get(key):
                    return CRS.from_user_input(attrs[key])
    return None


def check_same_crs(poi_crs: Any, ae_crs: Any, pois_path: str, ae_path: str) -> None:
    """Raise ``ValueError`` when both CRSs are known and differ."""
    if poi_crs is None or ae_crs is None:
        return
    from pyproj import CRS

    pc = CRS.from_user_input(poi_crs)
    if not pc.equals(ae_crs, ignore_axis_order=True):
        raise ValueError(
            f"{pois_path}: POI geometry CRS {pc.to_string()} differs from {ae_path} CRS "
            f"{ae_crs.to_string()}; rerun `aether-scale pois` so points are in the AE CRS"
        )


def _text_rows(text_ids: np.ndarray, poi_id: np.ndarray, path: str) -> np.ndarray:
    """Row of each POI in text.zarr (−1 when it has no text vector)."""
    order = np.argsort(text_ids, kind="stable")
    srt = text_ids[order]
    if srt.size and np.any(srt[1:] == srt[:-1]):
        raise ValueError(f"{path}: poi_id repeats; rerun `aether-scale text`")
    pos = np.clip(np.searchsorted(srt, poi_id), 0, max(srt.size - 1, 0))
    found = srt.size > 0
    hit = (srt[pos] == poi_id) if found else np.zeros(poi_id.size, bool)
    return np.where(hit, order[pos] if found else -1, -1).astype(np.int64)


# --------------------------------------------------------------------------- writer
class TripletWriter:
    """Appends rows to the triplets.zarr arrays in whole chunks of ``chunk_rows``."""

    def __init__(self, path: str, n_bands: int, text: Any, chunk_rows: int,
                 storage_options: dict | None = None) -> None:
        import zarr

        self.text = text
        self.chunk_rows = chunk_rows
        kw = {"storage_options": storage_options} if storage_options else {}
        self.group = zarr.open_group(path, mode="w", **kw)
        dim = text.shape[1]
        self.arrays = {
            "poi_id": self.group.create_array(
                "poi_id", shape=(0,), chunks=(chunk_rows,), dtype="int64", dimension_names=["poi"]),
            "base": self.group.create_array(
                "base", shape=(0, n_bands), chunks=(chunk_rows, n_bands), dtype="float32",
                dimension_names=["poi", "band"]),
            "aug": self.group.create_array(
                "aug", shape=(0, n_bands), chunks=(chunk_rows, n_bands), dtype="float32",
                dimension_names=["poi", "band"]),
            "text": self.group.create_array(
                "text", shape=(0, dim), chunks=(chunk_rows, dim), dtype="float32",
                dimension_names=["poi", "text_dim"]),
        }
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._n_pending = 0
        self.n_written = 0

    def add(self, poi_id: np.ndarray, base: np.ndarray, aug: np.ndarray, text_row: np.ndarray) -> None:
        if poi_id.size == 0:
            return
        self._pending.append((poi_id, base, aug, text_row))
        self._n_pending += poi_id.size
        while self._n_pending >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def _flush(self, n: int) -> None:
        cols = [np.concatenate(parts) for parts in zip(*self._pending, strict=True)]
        take = [c[:n] for c in cols]
        rest = [c[n:] for c in cols]
        self._pending = [tuple(rest)] if rest[0].size else []
        self._n_pending = rest[0].size
        pid, base, aug, trow = take
        order = np.argsort(trow)  # zarr reads sorted rows chunk by chunk
        text = np.empty((trow.size, self.text.shape[1]), dtype=np.float32)
        text[order] = self.text.oindex[trow[order], :]
        self.arrays["poi_id"].append(pid, axis=0)
        self.arrays["base"].append(base, axis=0)
        self.arrays["aug"].append(aug, axis=0)
        self.arrays["text"].append(text, axis=0)
        self.n_written += pid.size

    def close(self, attrs: dict[str, Any]) -> None:
        """Write the last partial chunk and the group attributes (counts gain n_triplets)."""
        if self._n_pending:
            self._flush(self._n_pending)
        attrs = dict(attrs)
        if isinstance(attrs.get("counts"), dict):
            attrs["counts"] = {**attrs["counts"], "n_triplets": self.n_written}
        self.group.attrs.update(attrs)


# --------------------------------------------------------------------------- stage
def write_triplets(
    ae_path: str, pois_path: str, text_path: str, out_path: str, cfg: RunConfig,
    *, storage_options: dict | None = None, log: Any = print,
) -> dict[str, Any]:
    """Pool AE around every POI and write ``out_path`` (triplets.zarr); returns stats."""
    import zarr

    t0 = time.perf_counter()
    sec = cfg.pool
    so = storage_options or None
    ds = open_ae(ae_path, storage_options=so)  # validated: names the path and `aether-scale ingest`
    ae = ds["embedding"]
    pois = read_poi_points(pois_path, storage_options=so)
    check_same_crs(pois["crs"], _raster_crs(ds), pois_path, ae_path)
    tg = zarr.open_group(text_path, mode="r", **({"storage_options": so} if so else {}))
    for name in ("embedding", "poi_id"):
        if name not in tg:
            raise ValueError(f"{text_path}: array {name!r} is missing; rerun `aether-scale text`")
    text, text_ids = tg["embedding"], np.asarray(tg["poi_id"][:], dtype=np.int64)
    if text.ndim != 2 or text.shape[0] != text_ids.size:
        raise ValueError(
            f"{text_path}: embedding {text.shape} is not aligned with poi_id ({text_ids.size},); "
            "rerun `aether-scale text`"
        )
    text_row = _text_rows(text_ids, pois["poi_id"], text_path)

    has_geom = np.isfinite(pois["x"]) & np.isfinite(pois["y"])
    gidx = np.flatnonzero(has_geom)
    plan = plan_pool(ae, pois["x"][gidx], pois["y"][gidx], [sec.base, sec.aug],
                     normalize=True, block_bytes=sec.block_mb * 2**20)
    writer = TripletWriter(out_path, plan.grid.n_channels, text, sec.chunk_rows,
                           storage_options=so)
    n_empty = [0, 0]
    n_no_ae = n_no_text = 0
    done, every = 0, max(1, plan.n_tasks // 10)
    log(f"[pool] {gidx.size:,} POIs on {plan.n_tasks} raster chunks "
        f"(base {sec.base.model_dump(exclude_none=True)}, aug {sec.aug.model_dump(exclude_none=True)})")
    for blk in plan.blocks():
        rows = gidx[blk.index]
        n_empty[0] += int(np.sum(blk.counts[:, 0] == 0))
        n_empty[1] += int(np.sum(blk.counts[:, 1] == 0))
        has_ae = (blk.counts[:, 0] > 0) & (blk.counts[:, 1] > 0)
        has_text = text_row[rows] >= 0
        n_no_ae += int(np.sum(~has_ae))
        n_no_text += int(np.sum(has_ae & ~has_text))
        keep = has_ae & has_text
        writer.add(pois["poi_id"][rows[keep]], blk.vectors[keep, 0], blk.vectors[keep, 1],
                   text_row[rows[keep]])
        done += 1
        if done % every == 0 or done == plan.n_tasks:
            log(f"[pool] {done}/{plan.n_tasks} chunks, {writer.n_written + writer._n_pending:,} triplets")
    stats = {
        "n_pois": int(pois["poi_id"].size),
        "n_no_geometry": int((~has_geom).sum()),
        "n_outside_raster": plan.n_outside,
        "n_empty_base": n_empty[0],
        "n_empty_aug": n_empty[1],
        "n_dropped_no_ae": n_no_ae,
        "n_dropped_no_text": n_no_text,
        "n_text_rows": int(text_ids.size),
        "n_raster_chunks_used": plan.n_tasks,
    }
    writer.close({
        "buffers": {"base": sec.base.model_dump(mode="json"), "aug": sec.aug.model_dump(mode="json")},
        "counts": stats,
        "layout": "rows = POIs in ae.zarr chunk order; base/aug = L2-normalised mean of de-quantised "
                  "valid AE codes in the buffer; text = text.zarr embedding of the same poi_id",
    })
    stats["n_triplets"] = writer.n_written
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    dropped = (stats["n_no_geometry"] + stats["n_outside_raster"] + n_no_ae + n_no_text)
    assert dropped + writer.n_written == stats["n_pois"], "row accounting mismatch (bug)"
    log(f"[pool] wrote {writer.n_written:,} triplets; absent: no geometry {stats['n_no_geometry']}, "
        f"outside raster {plan.n_outside}, no valid AE {n_no_ae}, no text {n_no_text}")
    return stats


def run_pool(ws: Workspace, cfg: RunConfig, *, force: bool = False) -> StageResult:
    """The ``pool`` stage: ``ae.zarr`` + ``pois.parquet`` + ``text.zarr`` → ``triplets.zarr``.

    Skipped when the manifest matches (same inputs and ``pool`` config).
    Raises ``FileNotFoundError`` naming the stage to run when an input is
    missing, ``ValueError`` for inputs that break the workspace contract.
    """
    need = {"ae.zarr": "ingest", "pois.parquet": "pois", "text.zarr": "text"}
    for name, stage in need.items():
        if not ws.exists(name):
            raise FileNotFoundError(
                f"{ws.path(name)} does not exist; run `aether-scale {stage} -w {ws.root}` first"
            )

    def fn(tmp: dict[str, str]) -> dict[str, Any]:
        return write_triplets(
            ws.path("ae.zarr"), ws.path("pois.parquet"), ws.path("text.zarr"),
            tmp["triplets.zarr"], cfg, storage_options=ws.storage_options,
        )

    # a workspace output is fingerprinted by its producer's manifest; inputs placed
    # by hand (no manifest) by their files
    inputs = {}
    for label, (name, stage) in zip(("ae", "pois", "text"), need.items(), strict=True):
        m = ws.manifest(stage)
        inputs[label] = name if m is not None and name in m.get("outputs", []) else ws.path(name)
    return ws.run_stage(
        STAGE,
        outputs=["triplets.zarr"],
        inputs=inputs,
        config=cfg.section("pool"),
        fn=fn,
        force=force,
    )
