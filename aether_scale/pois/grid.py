"""The AE raster grid as the POI stage sees it: CRS, transform, shape and chunking.

:func:`raster_grid` reads it from ``ae.zarr`` (metadata only) and
:meth:`RasterGrid.locate` maps points in the AE CRS to pixels, the coverage test
(half-open pixel bounds) and the AE chunk ``(chunk_y, chunk_x)`` each falls in —
the key the output is sorted and partitioned by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stores.ae import open_ae
from ..stores.raster import Transform, locate_pixels, raster_crs

__all__ = ["RasterGrid", "raster_grid"]


@dataclass(frozen=True)
class RasterGrid:
    """What the POI stage needs of ``ae.zarr``: CRS, affine transform, shape, chunking."""

    crs_wkt: str
    transform: Transform  # a, b, c, d, e, f (GDAL order)
    height: int
    width: int
    chunk_edges_y: tuple[int, ...]  # row offsets where chunks start, plus the height
    chunk_edges_x: tuple[int, ...]

    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` of the raster in its CRS."""
        a, _, c, _, e, f = self.transform
        xs, ys = (c, c + a * self.width), (f, f + e * self.height)
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def n_chunks(self) -> tuple[int, int]:
        return len(self.chunk_edges_y) - 1, len(self.chunk_edges_x) - 1

    def locate(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pixel (row, col) of each point, whether it lies inside the raster, and its
        chunk (chunk_y, chunk_x). Row, col and chunk are −1 outside. Vectorised.

        The pixel rule is :func:`aether_scale.stores.raster.locate_pixels` (half-open
        cells), the same the pooling engine's ``Grid.locate`` uses, so every
        POI kept here is on the raster when it is pooled.
        """
        row, col, inside = locate_pixels(self.transform, self.height, self.width, x, y)
        row = np.where(inside, row, -1)
        col = np.where(inside, col, -1)
        cy = np.searchsorted(np.asarray(self.chunk_edges_y[1:]), row, side="right")
        cx = np.searchsorted(np.asarray(self.chunk_edges_x[1:]), col, side="right")
        cy = np.where(inside, cy, -1).astype(np.int32)
        cx = np.where(inside, cx, -1).astype(np.int32)
        return row, col, inside, np.stack([cy, cx])


def raster_grid(ae_path: str, *, storage_options: dict | None = None) -> RasterGrid:
    """Read the grid of ``ae.zarr`` (lazily; no pixel data is loaded).

    The store is opened with :func:`aether_scale.stores.ae.open_ae`: FileNotFoundError
    when it is missing (run ``aether-scale ingest``), ValueError when it breaks the
    contract or has no CRS.
    """
    ds = open_ae(ae_path, storage_options=storage_options)
    emb = ds["embedding"]
    crs = raster_crs(ds, where=str(ae_path))
    t = emb.rio.transform()
    chunks = emb.chunks
    if chunks is None:
        enc = emb.encoding.get("chunks") or emb.encoding.get("preferred_chunks")
        ny, nx = emb.sizes["y"], emb.sizes["x"]
        cy_, cx_ = (enc[0], enc[1]) if enc else (ny, nx)
        cys = [cy_] * (ny // cy_) + ([ny % cy_] if ny % cy_ else [])
        cxs = [cx_] * (nx // cx_) + ([nx % cx_] if nx % cx_ else [])
    else:
        ax = dict(zip(emb.dims, chunks, strict=True))
        cys, cxs = list(ax["y"]), list(ax["x"])
    return RasterGrid(
        crs_wkt=crs.to_wkt(),
        transform=(t.a, t.b, t.c, t.d, t.e, t.f),
        height=int(emb.sizes["y"]),
        width=int(emb.sizes["x"]),
        chunk_edges_y=tuple(int(v) for v in np.concatenate([[0], np.cumsum(cys)])),
        chunk_edges_x=tuple(int(v) for v in np.concatenate([[0], np.cumsum(cxs)])),
    )
