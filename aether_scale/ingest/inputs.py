"""Ingest inputs: resolving tile paths/globs/folders and reading tile headers.

:func:`resolve_tiles` expands the configured ``ingest.tiles`` into an ordered
file list; :func:`inspect_tile` reads one tile's header into a small, picklable
:class:`TileInfo` after checking it is an AlphaEarth raster (64 bands, a CRS,
int8/float dtype, north-up geotransform). :class:`IngestError` — the one error
type of the ingest stage — lives here too.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .. import aef, storage

_TILE_EXTENSIONS = (".tif", ".tiff", ".vrt", ".gtiff", ".cog")
_GDAL_ENV = {
    # bounded per-process GDAL block cache (MB): workers keep memory for blocks, not caches
    "GDAL_CACHEMAX": 32,
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
}


class IngestError(ValueError):
    """Input tiles that cannot be ingested; the message names the file and the fix."""


def resolve_tiles(patterns: Sequence[str]) -> list[str]:
    """Expand tile paths, globs and folders into an ordered list of files.

    A folder contributes its ``*.tif``, ``*.tiff`` and ``*.vrt`` files (sorted);
    a glob contributes its matches (sorted); a URL (``s3://…``) names its object, a URL
    glob or prefix its matching objects (through fsspec, as the workspace; see
    :mod:`aether_scale.storage`); a GDAL ``/vsi…`` path is kept as is. Input order is kept (it matters for ``overlap='first'/'last'``)
    and duplicates are dropped.

    Raises :class:`IngestError` when nothing is given, when a glob or folder
    matches no tile, or when a path does not exist.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise IngestError(
            "no AlphaEarth tiles given: set ingest.tiles in the run config to GeoTIFF/COG/VRT "
            "paths, folders or globs (e.g. tiles: ['data/ae/*.tif'])"
        )
    out: list[str] = []
    for pat in patterns:
        pat = str(pat)
        if pat.startswith("/vsi"):
            found = [pat]  # GDAL's own virtual file systems: GDAL resolves them
        elif storage.is_url(pat):
            found = storage.expand(pat, _TILE_EXTENSIONS)
            if not found:
                raise IngestError(
                    f"ingest.tiles: {pat} matches no tile (no object, no match of the glob, "
                    "or a prefix holding no .tif/.tiff/.vrt): fix the URL, or check the "
                    "storage credentials and endpoint (AWS_* / FSSPEC_* variables)"
                )
        elif any(ch in pat for ch in "*?["):
            found = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
            found = [f for f in found if os.path.isfile(f)]
            if not found:
                raise IngestError(
                    f"ingest.tiles pattern {pat!r} matched no files: fix the pattern or the "
                    "folder it points at"
                )
        elif os.path.isdir(pat):
            found = sorted(
                os.path.join(pat, f)
                for f in os.listdir(pat)
                if f.lower().endswith(_TILE_EXTENSIONS) and os.path.isfile(os.path.join(pat, f))
            )
            if not found:
                raise IngestError(
                    f"ingest.tiles folder {pat} holds no .tif/.tiff/.vrt files: point "
                    "ingest.tiles at the tiles themselves or at a glob"
                )
        elif os.path.exists(pat):
            found = [pat]
        else:
            raise IngestError(f"ingest.tiles: {pat} does not exist (fix the path in the config)")
        out.extend(f if storage.is_url(f) or f.startswith("/vsi") else os.path.abspath(f)
                   for f in found)
    return list(dict.fromkeys(out))  # drop repeats, keep first-seen order


@dataclass(frozen=True)
class TileInfo:
    """What the ingest needs to know about one source tile (small and picklable)."""

    path: str
    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]  # a, b, c, d, e, f (GDAL order)
    width: int
    height: int
    dtype: str  # "int8", "float32" or "float64"
    nodata: float | None
    band_indexes: tuple[int, ...]  # 1-based source band for A00…A63
    files: tuple[str, ...]  # every file GDAL reads for it (a VRT's sources included)
    block_rows: int = 256  # rows of the file's internal blocks (read strips follow them)
    direct_io: bool = False  # uncompressed pixel-interleaved GeoTIFF: GDAL reads it as stored

    @property
    def bottom_up(self) -> bool:
        """True when row 0 is the southern edge (positive y pixel size)."""
        return self.transform[4] > 0


def inspect_tile(path: str) -> TileInfo:
    """Read one tile's header and check it is an AlphaEarth raster.

    Raises :class:`IngestError` naming the file and the fix when it cannot be
    opened as a raster, has no CRS, does not have 64 bands, has a dtype other
    than int8/float32/float64, or a rotated/sheared geotransform.
    """
    from rasterio.errors import RasterioError

    def header() -> tuple:
        with storage.open_raster_file(path, **_GDAL_ENV) as src:
            # a remote tile's GDAL names are per-process handles: the URL is the file
            files = (path,) if storage.is_url(path) else (tuple(src.files) or (path,))
            return (src.count, src.crs, src.transform, set(src.dtypes), src.nodata,
                    tuple(src.descriptions), src.width, src.height, files,
                    int(src.block_shapes[0][0]) if src.block_shapes else 256,
                    _stored_as_read(src))

    try:
        # (resolve_tiles checked that the URL exists: its read failures are worth a retry)
        (count, crs, tr, dtypes, nodata, descriptions, width, height, files, block_rows,
         direct_io) = (
            storage.with_retries(header, what=path, is_transient=storage.gdal_read_failure)
            if storage.is_url(path) else header())
    except (RasterioError, OSError) as e:
        raise IngestError(
            f"{path}: cannot be read as a raster ({e}). Check that it is a GeoTIFF/COG/VRT that "
            "GDAL can open (e.g. `gdalinfo` it) and is not truncated; re-download or re-export it"
        ) from None
    if count != aef.N_BANDS:
        raise IngestError(
            f"{path}: has {count} band(s); an AlphaEarth tile has {aef.N_BANDS} (A00…A63). "
            "Export or download all 64 embedding bands (one band per embedding dimension) "
            "into each file"
        )
    if crs is None:
        raise IngestError(
            f"{path}: has no CRS. Assign the CRS the tile was produced in, e.g. "
            "`gdal_edit.py -a_srs EPSG:32630 FILE` (AlphaEarth tiles are in their local UTM zone)"
        )
    if len(dtypes) != 1:
        raise IngestError(f"{path}: bands have mixed dtypes {sorted(dtypes)}; "
                          "rewrite it with one dtype (int8 codes or float32 values)")
    dtype = dtypes.pop()
    if dtype not in ("int8", "float32", "float64"):
        raise IngestError(
            f"{path}: dtype {dtype} is not an AlphaEarth encoding. Use int8 codes (the published "
            "COGs, nodata -128) or float32 values as Earth Engine exports them; other integer "
            "types (uint8, int16, …) would be ambiguous, so convert them explicitly"
        )
    if tr.b != 0 or tr.d != 0:
        raise IngestError(
            f"{path}: has a rotated/sheared geotransform {tuple(tr)[:6]}; warp it to a "
            "north-up grid first (e.g. `gdalwarp -r near IN OUT`)"
        )
    band_indexes = tuple(range(1, aef.N_BANDS + 1))
    if all(descriptions) and set(descriptions) == set(aef.BAND_NAMES):
        # bands named A00…A63 in another order: read them in AlphaEarth order
        pos = {name: i + 1 for i, name in enumerate(descriptions)}
        band_indexes = tuple(pos[name] for name in aef.BAND_NAMES)
    return TileInfo(
        path=path,
        crs_wkt=crs.to_wkt(),
        transform=(tr.a, tr.b, tr.c, tr.d, tr.e, tr.f),
        width=width,
        height=height,
        dtype=dtype,
        nodata=None if nodata is None else float(nodata),
        band_indexes=band_indexes,
        files=files,
        block_rows=block_rows,
        direct_io=direct_io,
    )


def _stored_as_read(src) -> bool:
    """Whether the tile's bytes on disk are its pixel vectors as read: an uncompressed,
    pixel-interleaved GeoTIFF (every band in one file), which GDAL can copy straight
    into a (rows, cols, bands) buffer."""
    from rasterio.enums import Interleaving

    return (src.driver == "GTiff" and src.compression is None
            and src.interleaving == Interleaving.pixel and len(set(src.files)) <= 1)

