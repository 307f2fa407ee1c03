"""Ingest stage: the dask graph, the ``ae.zarr`` Dataset and the stage entry point.

:func:`build_array` (lazy dask array, one task per chunk) and
:func:`build_dataset` (coordinates, CRS, transform, attributes) describe the
output; :func:`ingest_tiles` writes it chunk by chunk (each task reads its
block and writes its Zarr chunk) and returns the manifest statistics;
:func:`run_ingest` is the ``ingest`` stage; :func:`open_ae` (defined in
:mod:`aether_scale.raster`, re-exported here) opens and checks the result.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import aef
from ..raster import open_ae as open_ae  # re-exported: the validated opener of ae.zarr
from .grid import TargetGrid, _Placement, plan_grid
from .inputs import IngestError, inspect_tile, resolve_tiles
from .reads import OverlapRule, _read_block, read_block

#: recorded in the stage manifest; bump when the output for the same inputs changes.
INGEST_FORMAT_VERSION = 1
#: default chunk edge: 1024 × 1024 px × 64 bands int8 = 64 MiB per chunk.
DEFAULT_CHUNK_PX = 1024


def _zarr_array(uri: str, options: str):
    """The ``embedding`` Zarr array of a store (opened per task: a few ms, never stale)."""
    import zarr

    so = json.loads(options) or None
    return zarr.open_group(store=uri, mode="r+", storage_options=so)["embedding"]


def _write_block(
    placements: Sequence[_Placement], grid: TargetGrid, r0: int, r1: int, c0: int, c1: int,
    overlap: OverlapRule, out_uri: str, options: str,
) -> int:
    """Read one chunk, write it to its Zarr chunk, return its count of valid pixels.

    Reading and writing in one task keeps a worker's memory to one block and
    lets the statistics come for free (no second pass over the data).
    """
    block, valid = _read_block(placements, grid, r0, r1, c0, c1, overlap)
    if valid.any():  # all-nodata chunks equal the fill value: nothing to store
        _zarr_array(out_uri, options)[r0:r1, c0:c1, :] = block
    return int(valid.sum())


def _chunk_edges(n: int, size: int) -> list[int]:
    return list(range(0, n, size)) + [n]


def _chunk_windows(placements: Sequence[_Placement], ye: list[int], xe: list[int]):
    """Each output chunk's index, pixel window (r0, r1, c0, c1) and the tile placements
    that overlap it — the one place that decides which tiles a chunk reads."""
    for i in range(len(ye) - 1):
        r0, r1 = ye[i], ye[i + 1]
        for j in range(len(xe) - 1):
            c0, c1 = xe[j], xe[j + 1]
            mine = [p for p in placements
                    if p.rows[0] < r1 and p.rows[1] > r0 and p.cols[0] < c1 and p.cols[1] > c0]
            yield i, j, (r0, r1, c0, c1), mine


def build_array(
    placements: Sequence[_Placement], grid: TargetGrid, *, chunk_px: int = DEFAULT_CHUNK_PX,
    overlap: OverlapRule = "error",
):
    """The target raster as a lazy dask array (y, x, band) int8, one task per chunk.

    Each task receives only the placements of tiles that can touch its chunk.
    """
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    ye = _chunk_edges(grid.height, chunk_px)
    xe = _chunk_edges(grid.width, chunk_px)
    name = "ingest-block-" + tokenize(list(placements), grid, chunk_px, overlap)
    dsk: dict[tuple, tuple] = {
        (name, i, j, 0): (read_block, mine, grid, r0, r1, c0, c1, overlap)
        for i, j, (r0, r1, c0, c1), mine in _chunk_windows(placements, ye, xe)
    }
    chunks = (tuple(np.diff(ye)), tuple(np.diff(xe)), (aef.N_BANDS,))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[])
    return da.Array(graph, name, chunks, dtype=np.int8, meta=np.empty((0, 0, 0), np.int8))


def _write_tasks(placements: Sequence[_Placement], grid: TargetGrid, chunk_px: int,
                 overlap: OverlapRule, out_uri: str, storage_options: dict | None):
    """One delayed task per chunk (read its window, write its Zarr chunk); their sum.

    Returns a Delayed evaluating to the total number of valid pixels written.
    """
    import dask
    from dask.base import tokenize

    options = json.dumps(storage_options or {}, sort_keys=True, default=str)
    ye = _chunk_edges(grid.height, chunk_px)
    xe = _chunk_edges(grid.width, chunk_px)
    name = "ingest-block-" + tokenize(list(placements), grid, chunk_px, overlap, out_uri)
    write = dask.delayed(_write_block, pure=True)
    tasks = [
        write(mine, grid, r0, r1, c0, c1, overlap, out_uri, options, dask_key_name=(name, i, j))
        for i, j, (r0, r1, c0, c1), mine in _chunk_windows(placements, ye, xe)
    ]
    return dask.delayed(sum, pure=True)(tasks, dask_key_name="ingest-count-" + name[13:])


def build_dataset(array, grid: TargetGrid):
    """Wrap the codes in the ``ae.zarr`` Dataset (coords, CRS, transform, attrs)."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    ds = xr.Dataset(
        {"embedding": (("y", "x", "band"), array)},
        coords={
            "y": grid.y_centres(),
            "x": grid.x_centres(),
            "band": np.array(aef.BAND_NAMES, dtype=object),
        },
    )
    ds = ds.rio.write_crs(grid.crs_wkt).rio.write_transform(grid.transform())
    ds["embedding"].attrs.update(
        nodata=aef.NODATA,
        long_name="AlphaEarth satellite embedding (int8 codes)",
        codec="v = (q / 127.5) ** 2 * sign(q); q = -128 is nodata (aether_scale.aef.decode)",
    )
    ds["x"].attrs.update(units="m", long_name="pixel centre x")
    ds["y"].attrs.update(units="m", long_name="pixel centre y")
    ds.attrs.update(
        title="AlphaEarth embeddings (aether_scale ingest)",
        how_to_open="xr.open_zarr(path, mask_and_scale=False); nodata = -128 (attrs['nodata'])",
        resolution=grid.resolution,
        ingest_format_version=INGEST_FORMAT_VERSION,
    )
    return ds


def _compute(*objs: Any, progress: bool) -> tuple:
    """Compute on the current scheduler (distributed client if one is active)."""
    import dask

    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if client is not None:
        futures = client.compute(list(objs))
        if progress:
            from distributed import progress as dprogress

            dprogress(futures, notebook=False)
        return tuple(client.gather(futures))
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return dask.compute(*objs)
    return dask.compute(*objs)


def ingest_tiles(
    paths: list[str],
    out_uri: str,
    *,
    crs: str | None = None,
    resolution: float = aef.PIXEL_SIZE_M,
    chunk_px: int | None = None,
    overlap: OverlapRule = "error",
    storage_options: dict | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Ingest AlphaEarth tiles into a Zarr store at ``out_uri``; returns statistics.

    ``paths``: tile files, folders or globs (see :func:`resolve_tiles`), in
    precedence order for ``overlap='first'/'last'``. ``crs``: target CRS
    (default: the first tile's). ``resolution``: target pixel size in CRS units.
    ``chunk_px``: chunk edge in pixels (default 1024 → 64 MiB chunks, all 64
    bands in a chunk). ``overlap``: the rule for overlapping valid pixels (see
    :mod:`aether_scale.ingest`). ``storage_options``: fsspec options for a URL.

    The result is written with dask (current scheduler / distributed client)
    one chunk per task, never holding the whole raster. Returns counts
    (``valid_pixels``, ``nodata_pixels``, tiles aligned vs reprojected, …)
    for the stage manifest.

    Raises :class:`IngestError` (a ``ValueError``) naming the offending file and
    the fix for: no tiles / a glob matching nothing, unreadable files, wrong band
    count, no CRS, unsupported dtype, and (with ``overlap='error'``) overlapping
    tiles holding different valid codes.
    """

    if overlap not in ("error", "first", "last"):
        raise IngestError(f"ingest.overlap must be 'error', 'first' or 'last' (got {overlap!r})")
    t0 = time.perf_counter()
    files = resolve_tiles(paths)
    tiles = [inspect_tile(f) for f in files]
    grid, placements = plan_grid(tiles, crs=crs, resolution=resolution)
    cpx = int(chunk_px or DEFAULT_CHUNK_PX)
    if cpx < 1:
        raise IngestError(f"ingest.chunk_px must be positive (got {chunk_px})")
    arr = build_array(placements, grid, chunk_px=cpx, overlap=overlap)
    ds = build_dataset(arr, grid)
    # fill_value −128: chunks that are all nodata (gaps) are never stored and read back as
    # nodata. "coordinates" keeps spatial_ref a coordinate on a default open (besides the
    # CF grid_mapping attribute rioxarray reads).
    ds["embedding"].encoding.update(chunks=(cpx, cpx, aef.N_BANDS), fill_value=aef.NODATA,
                                    coordinates="spatial_ref")
    with warnings.catch_warnings():
        # consolidated metadata is not in the Zarr v3 spec yet; xarray reads it, others ignore it
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        # writes the metadata and coordinates now; the embedding's chunks are written below
        ds.to_zarr(out_uri, mode="w", compute=False, consolidated=True,
                   storage_options=storage_options)
    counts = _write_tasks(placements, grid, cpx, overlap, out_uri, storage_options)
    (n_valid,) = _compute(counts, progress=progress)
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
        "chunks": int(arr.npartitions),
        "overlap": overlap,
        "pixels": int(n_px),
        "valid_pixels": int(n_valid),
        "nodata_pixels": int(n_px - n_valid),
        "bytes": int(nbytes),
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / 1e6 / seconds, 2) if seconds > 0 else None,
    }


def _crs_label(wkt: str) -> str:
    from rasterio.crs import CRS

    c = CRS.from_wkt(wkt)
    epsg = c.to_epsg()
    return f"EPSG:{epsg}" if epsg else wkt


def run_ingest(ws, cfg, *, force: bool = False):
    """The ``ingest`` stage: ``cfg.ingest.tiles`` → ``ws/ae.zarr`` (skipped when current).

    Inputs fingerprinted: every tile file (and, for a VRT, every file it reads).
    Raises :class:`IngestError` on bad input (see :func:`ingest_tiles`).
    """
    sec = cfg.ingest
    files = resolve_tiles(sec.tiles)
    inputs: dict[str, str] = {}
    for f in files:
        inputs[f"tile:{f}"] = f
        if f.lower().endswith(".vrt"):
            for g in inspect_tile(f).files:
                inputs.setdefault(f"tile:{g}", g)
    config = {"ingest": cfg.section("ingest"), "format": INGEST_FORMAT_VERSION}

    def fn(tmp: dict[str, str]) -> dict[str, Any]:
        return ingest_tiles(files, tmp["ae.zarr"], crs=sec.crs, resolution=sec.resolution,
                            chunk_px=sec.chunk_px, overlap=sec.overlap,
                            storage_options=ws.storage_options or None, progress=True)

    return ws.run_stage("ingest", outputs=["ae.zarr"], inputs=inputs, config=config, fn=fn,
                        force=force)
