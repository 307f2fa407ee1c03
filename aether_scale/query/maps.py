"""PNG maps of query results: similarity over a grey AlphaEarth background.

Each map shows one phrase: the field's similarity (block maxima, so a one-pixel peak
stays visible at any zoom) in a colour ramp that fades to transparent where the
similarity is low, over the first principal component of the AE codes in grey, the
top locations numbered, a colour bar, a scale bar, a north arrow, the CRS and the
phrase as the title. Both rasters are reduced on the fly, chunk by chunk (never a
full-resolution load); the background is computed once per workspace and cached in
``queries/.cache``.
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np

from ..logs import get_logger

if TYPE_CHECKING:
    import geopandas as gpd
    import xarray as xr

    from ..workspace import Workspace

__all__ = ["reduce_factor", "render_maps"]

log = get_logger("query")


def reduce_factor(shape: tuple[int, int], chunks: tuple[int, int], max_px: int) -> int:
    """The smallest reduction that divides both chunk edges and brings the longest
    edge to at most ``max_px`` (the chunk edge when none does)."""
    need = max(shape) / max_px
    if need <= 1:
        return 1
    g = math.gcd(*chunks)
    for s in range(2, g + 1):
        if g % s == 0 and s >= need:
            return s
    return g


def _block_max(b: np.ndarray, s: int) -> np.ndarray:
    h, w = b.shape[:2]
    hh, ww = -(-h // s) * s, -(-w // s) * s
    pad = np.full((hh, ww, *b.shape[2:]), np.nan, dtype=np.float32)
    pad[:h, :w] = b
    pad = pad.reshape(hh // s, s, ww // s, s, *b.shape[2:])
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(pad).any(axis=(1, 3))
        out = np.nanmax(np.where(np.isfinite(pad), pad, -np.inf), axis=(1, 3))
    out[~finite] = np.nan
    return out.astype(np.float32)


def _reduced(arr: Any, s: int, fn: Any, dtype: Any, channels: int) -> np.ndarray:
    """``fn`` over the ``s × s`` blocks of each chunk of a dask ``(y, x, C)`` array."""
    chunks = (tuple(-(-c // s) for c in arr.chunks[0]), tuple(-(-c // s) for c in arr.chunks[1]),
              (channels,))
    red = arr.map_blocks(fn, s, dtype=dtype, chunks=chunks)
    return np.asarray(red.compute())


def _strided(b: np.ndarray, s: int) -> np.ndarray:
    return b[::s, ::s]


def _background(ws: Workspace, ae_name: str, shape: tuple[int, int], s: int) -> np.ndarray | None:
    """The grey background (uint8, reduced by ``s``): PC1 of the AE codes, cached."""
    from .. import aef
    from ..stores.ae import open_ae

    if not ws.exists(f"{ae_name}/zarr.json"):
        return None
    try:
        key = ws.fingerprint(ae_name)
    except FileNotFoundError:
        return None
    cache = ws.path(f"queries/.cache/background-{key}-{s}.npy")
    if ws.fs.exists(cache):
        with ws.fs.open(cache, "rb") as f:
            return np.load(f)
    ae = open_ae(ws.path(ae_name), storage_options=ws.storage_options or None)["embedding"]
    if tuple(ae.shape[:2]) != tuple(shape):
        return None
    codes = _reduced(ae.data, s, _strided, np.int8, ae.shape[2])
    flat = codes.reshape(-1, codes.shape[2])
    valid = np.all(flat != aef.NODATA, axis=1)
    grey = np.zeros(flat.shape[0], dtype=np.uint8)
    if valid.sum() >= 2:
        v = aef.decode_fast(flat[valid])
        rng = np.random.default_rng(0)
        sample = v[rng.choice(v.shape[0], size=min(v.shape[0], 50_000), replace=False)]
        mean = sample.mean(axis=0)
        _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
        pc = (v - mean) @ vt[0]
        lo, hi = np.percentile(pc, [2, 98])
        grey[valid] = (40 + 180 * np.clip((pc - lo) / max(hi - lo, 1e-9), 0, 1)).astype(np.uint8)
    out = grey.reshape(codes.shape[:2])
    ws.fs.makedirs(ws.path("queries/.cache"), exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, out)
    ws.fs.pipe_file(cache, buf.getvalue())
    return out


def _nice(length: float) -> float:
    """1, 2 or 5 × 10ⁿ at or below ``length``."""
    if length <= 0:
        return 0.0
    e = 10 ** math.floor(math.log10(length))
    return max(m * e for m in (1, 2, 5) if m * e <= length)


def _crs_label(crs: Any) -> str:
    if crs is None:
        return "CRS unknown"
    epsg = crs.to_epsg()
    return f"{'EPSG:' + str(epsg) if epsg else 'CRS'} — {crs.name}"


def render_maps(ws: Workspace, folder: str, sim: xr.DataArray, top: gpd.GeoDataFrame, *,
                ae_name: str = "ae.zarr", max_px: int = 1400) -> list[str]:
    """One PNG per phrase of ``sim`` into ``folder`` (``map_<i>.png``); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colors
    from matplotlib.cm import ScalarMappable

    from ..stores.raster import raster_crs

    ny, nx, k = (int(n) for n in sim.shape)
    cy, cx = int(sim.data.chunks[0][0]), int(sim.data.chunks[1][0])
    s = reduce_factor((ny, nx), (cy, cx), max_px)
    red = _reduced(sim.data, s, _block_max, np.float32, k)
    grey = _background(ws, ae_name, (ny, nx), s)
    xs, ys = sim["x"].values, sim["y"].values
    res_x = float(xs[1] - xs[0]) if nx > 1 else 10.0
    res_y = float(ys[1] - ys[0]) if ny > 1 else -10.0
    left, top_edge = xs[0] - res_x / 2, ys[0] - res_y / 2
    right, bottom = left + res_x * nx, top_edge + res_y * ny
    extent = (left, right, bottom, top_edge)
    crs = raster_crs(sim, where="the similarity raster", required=False)
    metres = crs is None or not crs.is_geographic
    cmap = matplotlib.colormaps["inferno"]
    paths = []
    for q in range(k):
        phrase = str(sim["query"].values[q])
        v = red[:, :, q]
        finite = np.isfinite(v)
        lo, hi = (np.percentile(v[finite], [50, 99.9]) if finite.any() else (0.0, 1.0))
        hi = max(hi, lo + 1e-6)
        norm = colors.Normalize(lo, hi)
        rgba = cmap(norm(np.where(finite, v, lo)))
        rgba[..., 3] = np.where(finite, 0.92 * np.clip(norm(v), 0, 1) ** 0.8, 0)
        aspect = (ny * abs(res_y)) / (nx * abs(res_x))
        fig, ax = plt.subplots(figsize=(8.0, min(14.0, 6.9 * aspect + 1.0)), dpi=120,
                               layout="constrained")
        ax.set_facecolor("white")  # no AE data: white
        if grey is not None:
            ax.imshow(np.ma.masked_equal(grey, 0), cmap="gray", vmin=0, vmax=255, extent=extent,
                      interpolation="nearest")
        ax.imshow(rgba, extent=extent, interpolation="nearest")
        sel = top[top["query"] == q]
        ax.scatter(sel["x"], sel["y"], s=110, facecolors="none", edgecolors="cyan",
                   linewidths=1.8, zorder=3)
        for _, row in sel.iterrows():
            ax.annotate(str(int(row["rank"])), (row["x"], row["y"]), xytext=(7, 6),
                        textcoords="offset points", color="cyan", fontsize=9, weight="bold",
                        zorder=4)
        ax.set_xlim(left, right)
        ax.set_ylim(bottom, top_edge)
        ax.ticklabel_format(useOffset=False, style="plain")
        unit = "m" if metres else "°"
        ax.set_xlabel(f"x ({unit}) · {_crs_label(crs)}", fontsize=8)
        ax.set_ylabel(f"y ({unit})", fontsize=8)
        ax.tick_params(labelsize=7)
        # scale bar: a round length of about a fifth of the width, lower left
        width_m = (right - left) * (1.0 if metres else 111_320 * math.cos(math.radians(
            float(np.mean(ys)))))
        bar_m = _nice(width_m / 5)
        bar = bar_m * (right - left) / width_m
        h = top_edge - bottom
        x0, y0 = left + 0.04 * (right - left), bottom + 0.04 * h
        ax.add_patch(matplotlib.patches.Rectangle((x0, y0), bar, 0.012 * h, facecolor="white",
                                                  edgecolor="black", zorder=5))
        ax.text(x0 + bar / 2, y0 + 0.022 * h,
                f"{bar_m / 1000:g} km" if bar_m >= 1000 else f"{bar_m:g} m", ha="center",
                va="bottom", fontsize=9, color="white", weight="bold", zorder=5,
                bbox={"facecolor": "black", "alpha": 0.45, "edgecolor": "none", "pad": 1.5})
        ax.annotate("N", xy=(0.95, 0.96), xytext=(0.95, 0.86), xycoords="axes fraction",
                    ha="center", va="center", fontsize=10, color="white", weight="bold",
                    arrowprops={"arrowstyle": "-|>", "color": "white", "lw": 1.5}, zorder=5)
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.85, pad=0.02)
        cb.set_label("cosine similarity with the phrase (block max)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
        fig.suptitle("\n".join(textwrap.wrap(f"“{phrase}”", 64)[:3]), fontsize=12)
        ax.set_title(f"AETHER field · top {len(sel)} locations numbered · map pixel = "
                     f"{s * abs(res_x):g} {unit} · white: no AE data", fontsize=8, color="0.3")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = f"{folder}/map_{q}.png"
        ws.fs.pipe_file(path, buf.getvalue())
        paths.append(path)
    return paths
