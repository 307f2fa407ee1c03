"""``aether-scale pool``: AE pooled around every POI → ``triplets.zarr``.

Inputs: ``ae.zarr`` (:mod:`aether_scale.stores.ae`), ``pois.parquet``
(:mod:`aether_scale.stores.pois`) and ``text.zarr`` (:mod:`aether_scale.stores.text`);
output ``triplets.zarr`` (:mod:`aether_scale.stores.triplets`).

Rows are in raster-chunk order (row-major over ae.zarr's chunk grid, the input
order within a chunk): spatially coherent, not shuffled — the trainer shuffles. A POI
is absent when it has no geometry, lies outside the raster, has no valid AE pixel in
the base or the aug buffer, or has no text vector; each reason is counted in the
stage's stats and its summary line. Text vectors are read per output chunk, never all
at once; pooled results stream from the cluster through a bounded window of chunk
tasks, each of which records its result in the stage's ledger — a killed run resumes
with the missing raster chunks only.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..config import RunConfig
from ..logs import Progress, get_logger
from ..stores.ae import open_ae
from ..stores.ledger import Ledger
from ..stores.pois import PoiTable
from ..stores.raster import raster_crs
from ..stores.text import TextStore
from ..stores.triplets import TripletWriter
from .engine import plan_pool

__all__ = ["build", "check_same_crs", "pool_triplets"]

log = get_logger("pool")


def check_same_crs(poi_crs: Any, ae_crs: Any, pois_path: str, ae_path: str) -> None:
    """Raise ``ValueError`` when both CRSs are known and differ."""
    if poi_crs is None or ae_crs is None:
        return
    if not poi_crs.equals(ae_crs, ignore_axis_order=True):
        raise ValueError(
            f"{pois_path}: POI geometry CRS {poi_crs.to_string()} differs from {ae_path} CRS "
            f"{ae_crs.to_string()}; rerun `aether-scale pois` so points are in the AE CRS"
        )


def pool_triplets(
    ae_path: str, pois_path: str, text_path: str, out_path: str, cfg: RunConfig,
    *, storage_options: dict | None = None, ledger: str | None = None,
) -> dict[str, Any]:
    """Pool AE around every POI and write ``out_path`` (triplets.zarr); returns stats.

    ``ledger``: a folder recording each raster chunk's result (give a killed run's to
    resume it).
    """
    t0 = time.perf_counter()
    sec = cfg.pool
    so = storage_options or None
    ds = open_ae(ae_path, storage_options=so)
    table = PoiTable(pois_path, storage_options=so)
    pois = table.points()
    if pois["poi_id"].size == 0:
        raise ValueError(f"{pois_path} holds no POIs; rerun `aether-scale pois` with POI sources "
                         "that lie on the AE raster")
    check_same_crs(table.crs, raster_crs(ds, where=ae_path), pois_path, ae_path)
    text = TextStore(text_path, storage_options=so)
    text_row = text.rows_of(pois["poi_id"])

    has_geom = np.isfinite(pois["x"]) & np.isfinite(pois["y"])
    gidx = np.flatnonzero(has_geom)
    plan = plan_pool(ds["embedding"], pois["x"][gidx], pois["y"][gidx], [sec.base, sec.aug],
                     normalize=True, block_bytes=sec.block_mb * 2**20)
    writer = TripletWriter(out_path, plan.grid.n_channels, text, sec.chunk_rows,
                           storage_options=so)
    n_empty = [0, 0]
    n_no_ae = n_no_text = 0
    log.info(f"[pool] {gidx.size:,} POIs on {plan.n_tasks} raster chunks "
             f"(base {sec.base.model_dump(exclude_none=True)}, "
             f"aug {sec.aug.model_dump(exclude_none=True)})")
    led = Ledger.at(ledger, so) if ledger else None
    with Progress(log, "pool", plan.n_tasks, "chunks") as prog:
        for blk in plan.blocks(ledger=led, progress=prog):
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
    stats = {
        "n_pois": int(pois["poi_id"].size),
        "n_no_geometry": int((~has_geom).sum()),
        "n_outside_raster": plan.n_outside,
        "n_empty_base": n_empty[0],
        "n_empty_aug": n_empty[1],
        "n_dropped_no_ae": n_no_ae,
        "n_dropped_no_text": n_no_text,
        "n_text_rows": int(text.n),
        "n_raster_chunks_used": plan.n_tasks,
        "chunks_resumed": plan.n_resumed,
        "chunks_computed": plan.n_tasks - plan.n_resumed,
    }
    writer.close({
        "buffers": {"base": sec.base.model_dump(mode="json"), "aug": sec.aug.model_dump(mode="json")},
        "counts": {k: v for k, v in stats.items() if not k.startswith("chunks_")},
        "layout": "rows = POIs in ae.zarr chunk order; base/aug = L2-normalised mean of de-quantised "
                  "valid AE codes in the buffer; text = text.zarr embedding of the same poi_id",
        "text_encoder": text.encoder(),
    })
    stats["n_triplets"] = writer.n_written
    stats["retries"] = plan.n_retries  # transient remote read/write failures retried
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    dropped = stats["n_no_geometry"] + stats["n_outside_raster"] + n_no_ae + n_no_text
    if dropped + writer.n_written != stats["n_pois"]:  # pragma: no cover - internal invariant
        raise RuntimeError("pool: row accounting mismatch (bug)")
    summary = (f"dropped: no geometry {stats['n_no_geometry']:,}, outside the raster "
               f"{plan.n_outside:,}, no valid AE in a buffer {n_no_ae:,}, no text {n_no_text:,}")
    log.info(f"[pool] wrote {writer.n_written:,} of {stats['n_pois']:,} POIs as triplets; "
             f"{summary}")
    if writer.n_written < 2:
        raise ValueError(f"pool: {writer.n_written} triplet(s) from {stats['n_pois']:,} POIs "
                         f"({summary}); training needs at least 2. The POIs must lie on valid "
                         "AE pixels (nodata or outside the raster drops them)")
    return stats


def build(ctx) -> dict[str, Any]:
    """The ``pool`` stage: ``ae.zarr`` + ``pois.parquet`` + ``text.zarr`` → ``triplets.zarr``."""
    r = ctx.reads
    return pool_triplets(r["ae.zarr"], r["pois.parquet"], r["text.zarr"],
                         ctx.outputs["triplets.zarr"], ctx.cfg,
                         storage_options=ctx.storage_options,
                         ledger=ctx.ledger_path("triplets.zarr"))


def worker_memory(ctx) -> tuple[list[str], list[tuple[str, int]], str]:
    """What one pool task imports and holds: an AE chunk (stored and decoded) and its
    prefix-sum strip."""
    from ..stores.raster import chunk_shape

    cy, cx, cb = chunk_shape(ctx.reads["ae.zarr"], storage_options=ctx.storage_options)
    strip = ctx.cfg.pool.block_mb * 2**20
    return (["aether_scale.pool.stage"],
            [(f"an ae.zarr chunk of {cy}×{cx} px", int(1.5 * cy * cx * cb)),
             ("prefix-sum strip", int(1.5 * strip))],
            "re-ingest with a smaller ingest.chunk_px, or lower pool.block_mb")
