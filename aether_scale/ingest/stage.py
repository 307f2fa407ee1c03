"""Ingest stage: one task per ``ae.zarr`` chunk (read its window, write it, record it).

:func:`ingest_tiles` plans the target grid from the tiles' headers, writes the store's
template (:func:`aether_scale.stores.ae.template`) and runs one dask task per chunk
that reads the tiles' windows, writes the chunk and records it in the ledger
(:class:`~aether_scale.stores.raster.RasterBuild`); chunks the ledger already holds —
a killed run's — are not computed again. :func:`build` is the registered ``ingest``
stage; :func:`external_inputs` tells the registry which files it reads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .. import aef
from ..logs import get_logger
from ..stores import ae as ae_store
from ..stores.raster import RasterBuild, count_retries, ledger_folder, write_chunks
from ..workspace import stable_hash
from .grid import TargetGrid, _Placement, plan_grid
from .inputs import IngestError, inspect_tile, resolve_tiles
from .reads import OverlapRule, _read_block

__all__ = ["build", "external_inputs", "ingest_tiles"]

log = get_logger("ingest")


def _chunk(placements: Sequence[_Placement], grid: TargetGrid, r0: int, r1: int, c0: int, c1: int,
           overlap: OverlapRule) -> tuple[Any, dict[str, int]]:
    """One chunk's codes (None when it holds no valid pixel), its valid-pixel count and the
    pixels masked for a non-finite value."""
    block, valid, nonfinite = _read_block(placements, grid, r0, r1, c0, c1, overlap)
    n = int(valid.sum())
    return (block if n else None), {"valid": n, "nonfinite": nonfinite}


def ingest_tiles(
    paths: list[str],
    out_uri: str,
    *,
    crs: str | None = None,
    resolution: float = aef.PIXEL_SIZE_M,
    chunk_px: int | None = None,
    overlap: OverlapRule = "error",
    storage_options: dict | None = None,
    ledger: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Ingest AlphaEarth tiles into a Zarr store at ``out_uri``; returns statistics.

    ``paths``: tile files, folders or globs (see :func:`resolve_tiles`), in precedence
    order for ``overlap='first'/'last'``. ``crs``: target CRS (default: the first
    tile's). ``resolution``: target pixel size in CRS units. ``chunk_px``: chunk edge
    (default 1024 → 64 MiB chunks, all 64 bands in a chunk). ``overlap``: the rule for
    overlapping valid pixels (see :mod:`aether_scale.ingest`). ``ledger``: the folder
    recording finished chunks — give the one of a killed run to resume it (default: a
    temporary folder, removed at the end).

    One task per chunk on the current scheduler (distributed client if any); a worker
    holds one chunk at a time. Returns counts (``valid_pixels``, ``nodata_pixels``,
    chunks computed vs resumed, tiles aligned vs reprojected, …) for the manifest.

    Raises :class:`IngestError` (a ``ValueError``) naming the offending file and the
    fix for: no tiles / a glob matching nothing, unreadable files, wrong band count, no
    CRS, unsupported dtype, and (with ``overlap='error'``) overlapping tiles holding
    different valid codes.
    """
    if overlap not in ("error", "first", "last"):
        raise IngestError(f"ingest.overlap must be 'error', 'first' or 'last' (got {overlap!r})")
    t0 = time.perf_counter()
    files = resolve_tiles(paths)
    tiles = [inspect_tile(f) for f in files]
    grid, placements = plan_grid(tiles, crs=crs, resolution=resolution)
    cpx = int(chunk_px or ae_store.DEFAULT_CHUNK_PX)
    if cpx < 1:
        raise IngestError(f"ingest.chunk_px must be positive (got {chunk_px})")
    token = stable_hash([grid, cpx, ae_store.FORMAT_VERSION])

    def job(i: int, j: int, win: tuple[int, int, int, int]) -> tuple[Any, tuple]:
        r0, r1, c0, c1 = win
        mine = [p for p in placements
                if p.rows[0] < r1 and p.rows[1] > r0 and p.cols[0] < c1 and p.cols[1] > c0]
        return _chunk, (mine, grid, r0, r1, c0, c1, overlap)

    with ledger_folder(ledger) as led:
        build = RasterBuild.at(out_uri, led, storage_options).create(
            ae_store.template(grid, cpx), fill_value=aef.NODATA, token=token)
        records, n_todo = write_chunks(build, job, label="ingest", token=token, log=log,
                                       progress=progress)
    n_chunks = len(records)
    n_valid = sum(int(r.get("valid", 0)) for r in records.values())
    n_nonfinite = sum(int(r.get("nonfinite", 0)) for r in records.values())
    seconds = time.perf_counter() - t0
    n_px = grid.width * grid.height
    nbytes = n_px * aef.N_BANDS
    return {
        "tiles": len(tiles),
        "tile_files": files,
        "tiles_aligned": sum(p.aligned for p in placements),
        "tiles_reprojected": sum(not p.aligned for p in placements),
        "tiles_bottom_up": sum(t.bottom_up for t in tiles),
        "tiles_float": sum(t.dtype != "int8" for t in tiles),
        "crs": _crs_label(grid.crs_wkt),
        "resolution": grid.resolution,
        "width": grid.width,
        "height": grid.height,
        "transform": list(grid.transform())[:6],
        "chunk_px": cpx,
        "chunks": n_chunks,
        "chunks_computed": n_todo,
        "chunks_resumed": n_chunks - n_todo,
        "chunks_empty": sum(bool(r.get("empty")) for r in records.values()),
        "overlap": overlap,
        "pixels": int(n_px),
        "valid_pixels": int(n_valid),
        "nodata_pixels": int(n_px - n_valid),
        "nonfinite_pixels_masked": n_nonfinite,
        "retries": count_retries(records),  # transient remote read/write failures retried
        "bytes": int(nbytes),
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / 1e6 / seconds, 2) if seconds > 0 else None,
    }


def _crs_label(wkt: str) -> str:
    from rasterio.crs import CRS

    c = CRS.from_wkt(wkt)
    epsg = c.to_epsg()
    return f"EPSG:{epsg}" if epsg else wkt


def external_inputs(cfg) -> dict[str, list[str]]:
    """The tile files the stage reads, in order (and, for a VRT, every file it reads).

    Raises :class:`IngestError` when ``ingest.tiles`` is empty or matches nothing.
    """
    files = resolve_tiles(cfg.ingest.tiles)
    out = list(files)
    for f in files:
        if f.lower().endswith(".vrt"):
            out += [g for g in inspect_tile(f).files if g not in out]
    return {"tiles": out}


def build(ctx) -> dict[str, Any]:
    """The ``ingest`` stage: ``ingest.tiles`` → ``ae.zarr`` (resumes per chunk)."""
    sec = ctx.cfg.ingest
    stats = ingest_tiles(sec.tiles, ctx.outputs["ae.zarr"], crs=sec.crs,
                         resolution=sec.resolution, chunk_px=sec.chunk_px, overlap=sec.overlap,
                         storage_options=ctx.storage_options,
                         ledger=ctx.ledger_path("ae.zarr"))
    log.info(f"[ingest] {stats['width']:,} × {stats['height']:,} px in {stats['chunks']} chunks "
             f"({stats['chunks_computed']} computed, {stats['chunks_resumed']} resumed); valid "
             f"{stats['valid_pixels']:,}, nodata {stats['nodata_pixels']:,} px; "
             f"{stats['tiles']} tiles ({stats['tiles_reprojected']} reprojected)")
    if stats["retries"]:
        log.warning(f"[ingest] {stats['retries']} transient read/write failure(s) were retried "
                    "(counted in the manifest)")
    if stats["nonfinite_pixels_masked"]:
        log.warning(f"[ingest] {stats['nonfinite_pixels_masked']:,} pixels held an infinite "
                    "value and were masked as nodata (counted in the manifest)")
    if stats["valid_pixels"] == 0:
        raise IngestError("ingest: no valid AlphaEarth pixel in any tile (every pixel is "
                          "nodata); check ingest.tiles and the tiles' nodata value")
    return stats


def worker_memory(ctx) -> tuple[list[str], list[tuple[str, int]], str]:
    """What one ingest task imports and holds: the chunk of codes and its read buffers."""
    c = int(ctx.cfg.ingest.chunk_px or ae_store.DEFAULT_CHUNK_PX)
    block = c * c * aef.N_BANDS
    return (["aether_scale.ingest.stage", "rasterio"],
            [(f"a {c}×{c} px chunk", block), ("read buffers", 2 * block)],
            "ingest.chunk_px smaller")
