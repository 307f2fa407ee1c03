"""Tiny workspace stores and problems for the tests, written by the real writers.

Every helper here goes through the package's own writers (``stores.ae.write_ae``,
``stores.triplets.write_triplets``, …), so a test reads exactly what a stage would
leave behind — chunk checksums and index included. Test files import from here and
never from each other.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from aether_scale import aef
from aether_scale.config import TrainSection
from aether_scale.model import AEProj
from aether_scale.stores.ae import TargetGrid, write_ae

#: the demo city at test size (seconds, not minutes): every stage, one worker process
TINY_DEMO = [
    "cluster.n_workers=1",
    "cluster.memory_limit=1GiB",  # the issue: the demo runs on 1 GiB workers
    "synth.size_px=256",
    "synth.n_pois=3000",
    "synth.n_luc_points=400",
    "synth.n_regions=120",
    "train.epochs=3",
    "evaluate.seeds=[0, 1]",
    "evaluate.max_epochs=60",
    "sweep.lam=[0, 0.9]",  # the demo's λ study, two points
    "sweep.overrides={train.epochs: 2}",
]

def city_run(city: dict[str, str], tmp, *, chunk_px: int = 32) -> dict:
    """A run config (as data) for a synthetic city written by ``write_city``: small
    chunks (a 256 px city in 32 px chunks has 64 per raster stage), one training epoch,
    a text cache under ``tmp``, the threaded scheduler (set ``cluster`` to change it)."""
    cfg = {
        "cluster": {"kind": "threads"},
        "ingest": {"tiles": [city["ae_tiles"]], "chunk_px": chunk_px},
        "pois": {"sources": [{"path": city["pois"], "columns": {
            "id": "poi_id", "name": "name", "category": "category",
            "subcategory": "subcategory"}}]},
        "text": {"cache_dir": str(tmp / "text-cache")},
        "pool": {"chunk_rows": 512},
        "train": {"epochs": 1, "batch_size": 256, "threads": 1, "variants": {}},
        "evaluate": {"seeds": [0], "max_epochs": 5},
    }
    if "luc_points" in city:
        cfg["regions"] = {"luc_points": city["luc_points"], "sdm_units": city["sdm_units"],
                          "sdm_id": "unit_id"}
    return cfg


NY, NX, CHUNK = 70, 90, 32  # 3 × 3 chunks, ragged at the far edges
LEFT, TOP, RES = 500_000.0, 5_700_000.0, 10.0


def unit(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` scaled to unit length (float32)."""
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def grid(ny: int = NY, nx: int = NX, *, crs: str = "EPSG:32630", left: float = LEFT,
         top: float = TOP, res: float = RES) -> TargetGrid:
    from rasterio.crs import CRS

    return TargetGrid(CRS.from_user_input(crs).to_wkt(), res, left, top, nx, ny)


def random_codes(ny: int = NY, nx: int = NX, *, seed: int = 0) -> np.ndarray:
    """AE codes of random unit vectors with a masked corner and a few masked pixels
    across a chunk edge (what nodata looks like in AlphaEarth: whole pixels)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(ny, nx, aef.N_BANDS))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    q = aef.encode(v)
    q[:12, :9] = aef.NODATA
    q[min(40, ny - 1), 31:34] = aef.NODATA
    return q


def write_tiny_ae(path: str, *, seed: int = 0, crs: str = "EPSG:32630", ny: int = NY,
                  nx: int = NX, chunk: int = CHUNK, codes: np.ndarray | None = None) -> np.ndarray:
    """A finished tiny ``ae.zarr`` at ``path`` (the ingest stage's layout); returns its codes."""
    q = random_codes(ny, nx, seed=seed) if codes is None else codes
    write_ae(path, q, grid(q.shape[0], q.shape[1], crs=crs), chunk_px=chunk)
    return q


def projector(seed: int = 1) -> AEProj:
    """An untrained AE projector with the shortcut made to matter, in eval mode."""
    torch.manual_seed(seed)
    m = AEProj()
    with torch.no_grad():
        m.gate.fill_(0.5)
    return m.eval()


def make_problem(n: int, seed: int = 0, text_dim: int = 384) -> dict[str, np.ndarray]:
    """Triplets where the text is a noisy nonlinear function of the base AE vector."""
    rng = np.random.default_rng(seed)
    proj = np.random.default_rng(1234).standard_normal((64, text_dim)).astype(np.float32)
    base = unit(rng.standard_normal((n, 64)))
    aug = unit(base + 0.4 * rng.standard_normal((n, 64)))
    text = unit(np.tanh(2.0 * base @ proj) + 0.6 * rng.standard_normal((n, text_dim)))
    return {"base": base, "aug": aug, "text": text, "poi_id": np.arange(n, dtype=np.int64) + 10 * n}


def small_cfg(**kw) -> TrainSection:
    """A quick train section (3 epochs, batch 128, one thread)."""
    d = dict(epochs=3, batch_size=128, threads=1, prefetch=2)
    d.update(kw)
    return TrainSection(**d)


# --------------------------------------------------------------------------- pooling rasters
#: pixel size (m) of make_raster
PIX = 10.0


def make_raster(
    h: int = 70, w: int = 90, c: int = 8, *, chunk: int = 16, seed: int = 0,
    y_decreasing: bool = True, kind: str = "codes",
) -> tuple[xr.DataArray, np.ndarray]:
    """A chunked (y, x, band) raster with nodata holes; returns (DataArray, decoded float64)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-127, 128, size=(h, w, c), dtype=np.int16).astype(np.int8)
    codes[5:14, 20:33] = -128  # a nodata block crossing chunk edges
    codes[h - 6 :, : w // 3] = -128  # nodata at the raster edge
    holes = rng.random((h, w)) < 0.05
    codes[holes] = -128
    codes[rng.random((h, w)) < 0.01, 3] = -128  # nodata in one band only: pixel invalid too
    q = codes.astype(np.float64)
    dec = np.sign(q) * (q / 127.5) ** 2
    dec[codes == -128] = np.nan
    x = 500_000.0 + PIX / 2 + PIX * np.arange(w)
    y = 6_000_000.0 + PIX / 2 + PIX * np.arange(h)
    if y_decreasing:
        y = y[::-1]
        codes, dec = codes[::-1].copy(), dec[::-1].copy()
    if kind == "codes":
        data, dim = codes, "band"
    else:
        data, dim = dec.astype(np.float32), "dim"
    da = xr.DataArray(data, dims=("y", "x", dim), coords={"y": y, "x": x}).chunk(
        {"y": chunk, "x": chunk}
    )
    return da, dec


def points_for(da: xr.DataArray, n: int = 150, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random points + points near chunk edges, raster edges, in nodata, and outside."""
    rng = np.random.default_rng(seed)
    xs, ys = da.x.values, da.y.values
    x0, x1 = xs.min() - PIX / 2, xs.max() + PIX / 2
    y0, y1 = ys.min() - PIX / 2, ys.max() + PIX / 2
    px = list(rng.uniform(x0, x1, n))
    py = list(rng.uniform(y0, y1, n))
    # just either side of chunk boundaries (every 16 px) and of the raster edges
    for cx in (16, 32, 48):
        for eps in (-0.3, 0.3):
            px.append(x0 + cx * PIX + eps)
            py.append(rng.uniform(y0, y1))
            px.append(rng.uniform(x0, x1))
            py.append(y1 - cx * PIX + eps)
    px += [x0 + 0.1, x1 - 0.1, x0 + 0.1, x1 - 0.1]
    py += [y0 + 0.1, y1 - 0.1, y1 - 0.1, y0 + 0.1]
    px += [x0 - 3.0, x1 + 25.0]  # outside
    py += [y0 + 100.0, y1 - 50.0]
    return np.array(px), np.array(py)


BUFFERS = [
    {"shape": "circle", "radius_m": 50.0},
    {"shape": "circle", "radius_m": 100.0},
    {"shape": "circle", "radius_m": 215.0},  # wider than a 16-px chunk (160 m)
    {"shape": "square", "radius_px": 4},
    {"shape": "square", "radius_px": 20},  # window wider than a chunk
]


def count_chunk_reads(monkeypatch) -> list[tuple]:
    """Record the chunk index of every verified chunk read (``stores.reads.verified_chunk``)
    from now on in this test; the reads still happen."""
    from aether_scale.stores import reads as rd

    reads: list[tuple] = []
    real = rd.verified_chunk
    monkeypatch.setattr(rd, "verified_chunk", lambda *a, **k: reads.append(a[2]) or real(*a, **k))
    return reads
