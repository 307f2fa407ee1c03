"""Smooth random fields and small raster helpers for the synthetic city (vectorised numpy)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


class SmoothFields:
    """``n`` standardised Gaussian random fields of correlation scale ``sigma_px``.

    White noise is drawn on a grid coarsened by ``factor ≈ sigma/3``, smoothed
    there, and sampled bilinearly at any pixel coordinates, so a field over a
    large raster costs almost nothing and can be evaluated block by block or
    only at the points that need it (parcel seeds, POIs).
    """

    def __init__(self, rng: np.random.Generator, n: int, size: int, sigma_px: float) -> None:
        self.factor = max(1, int(sigma_px // 3))
        self.pad = 4
        m = size // self.factor + 2 * self.pad + 2
        noise = rng.standard_normal((n, m, m))
        s = sigma_px / self.factor
        self.coarse = ndimage.gaussian_filter(noise, sigma=(0, s, s), mode="reflect")
        inner = self.coarse[:, self.pad:-self.pad, self.pad:-self.pad]
        self.mean = inner.mean(axis=(1, 2))
        self.std = inner.std(axis=(1, 2)) + 1e-12

    def sample(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Field values at (fractional) pixel coordinates → (n, len) float32, ~N(0,1)."""
        r = np.asarray(rows, dtype=np.float64).ravel() / self.factor + self.pad
        c = np.asarray(cols, dtype=np.float64).ravel() / self.factor + self.pad
        out = np.empty((self.coarse.shape[0], r.size), dtype=np.float32)
        for i in range(self.coarse.shape[0]):
            v = ndimage.map_coordinates(self.coarse[i], [r, c], order=1, mode="nearest")
            out[i] = (v - self.mean[i]) / self.std[i]
        return out

    def grid(self, size: int) -> np.ndarray:
        """All fields on the full ``size × size`` pixel grid (pixel centres) → (n, size, size)."""
        rr, cc = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
        return self.sample(rr, cc).reshape(-1, size, size)


def disk_offsets(radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Row/column offsets of the pixels whose centres lie within ``radius_px`` of a pixel centre."""
    k = int(np.floor(radius_px))
    dr, dc = np.mgrid[-k : k + 1, -k : k + 1]
    keep = dr**2 + dc**2 <= radius_px**2 + 1e-9
    return dr[keep].astype(np.int64), dc[keep].astype(np.int64)


def disk_mean(
    grid: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius_px: float, *, batch: int = 256
) -> np.ndarray:
    """Mean of ``grid`` (``(..., H, W)``) over a disk around each (row, col); clipped at edges.

    NaN cells are ignored (``nanmean``); a disk with no finite cell gives NaN.
    Returns ``(n, ...)`` float32.
    """
    h, w = grid.shape[-2:]
    lead = grid.shape[:-2]
    flat = grid.reshape(-1, h * w)
    dr, dc = disk_offsets(radius_px)
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    out = np.full((rows.size, flat.shape[0]), np.nan, dtype=np.float32)
    for s in range(0, rows.size, batch):
        r = rows[s : s + batch, None] + dr[None]
        c = cols[s : s + batch, None] + dc[None]
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        idx = np.clip(r, 0, h - 1) * w + np.clip(c, 0, w - 1)
        vals = flat[:, idx].astype(np.float32)  # (k, b, m)
        vals[:, ~inside] = np.nan
        with np.errstate(invalid="ignore"):
            cnt = np.sum(np.isfinite(vals), axis=-1)
            tot = np.nansum(vals, axis=-1)
            out[s : s + batch] = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan).T
    return out.reshape((rows.size, *lead))


def gumbel_argmax(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``logits`` (Gumbel-max trick, vectorised)."""
    g = rng.gumbel(size=logits.shape)
    return np.argmax(logits + g, axis=-1)
