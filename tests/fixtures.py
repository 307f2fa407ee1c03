"""Tiny workspace stores and problems for the tests, written by the real writers.

Every helper here goes through the package's own writers (``stores.ae.write_ae``,
``stores.triplets.write_triplets``, …), so a test reads exactly what a stage would
leave behind — chunk checksums and index included. Test files import from here and
never from each other.
"""

from __future__ import annotations

import numpy as np
import torch

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
