"""Location encoders of the Table 1 baselines: CaLLiPer+ and a Space2Vec-style encoder.

Both map projected coordinates (metres, the AE CRS) to a ``dim``-vector as
``NN(PE(x, y))``:

- **PE** — Space2Vec's multi-scale sinusoidal encoding (Mai et al., 2020, the
  *theory* variant): the position, relative to the POIs' centre, is projected on
  three unit vectors 120° apart, and each projection ``p`` gives ``cos(p/λ_s)``,
  ``sin(p/λ_s)`` for ``S`` wavelengths ``λ_s`` geometric between ``min_scale_m`` and
  ``max_scale_m`` (6·S features).
- **NN** — an MLP (``hidden`` wide, ``layers`` hidden layers, ReLU) to ``dim``.

**CaLLiPer+** (Wang et al., 2025; Liu et al., 2025) aligns the encoder with the POI
texts *with names* (``text.zarr``: the same sentence-transformer vectors AETHER
aligns with) by the symmetric InfoNCE of :func:`aether_scale.loss.symmetric_info_nce`
(the loss module AETHER trains with), through a linear projection of the frozen text
vectors; both sides are L2-normalised.

**Space2Vec** here is the same encoder trained *without text*: from a POI's location
it predicts the category mix of the POIs within ``context_m`` (soft cross-entropy
against the observed subcategory shares). The published Space2Vec learns from POI
types around locations too (its POI-type classification task); this keeps it a pure
coordinate model that knows nothing but where POI types occur.

Training streams ``(x, y, target)`` from the stores chunk by chunk (shuffled chunk
order per epoch, a shuffle buffer of a few chunks), so memory is bounded by the
buffer, not the number of POIs. CPU and CUDA alike (``device``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LocationEncoder", "TrainResult", "category_targets", "train_calliper",
           "train_space2vec"]

DIRECTIONS = np.array([[math.cos(a), math.sin(a)] for a in (0.0, 2 * math.pi / 3,
                                                             4 * math.pi / 3)])


class LocationEncoder(nn.Module):
    """``NN(PE(x, y))``: projected coordinates (n, 2) in metres → (n, dim)."""

    def __init__(self, centre: Sequence[float], *, dim: int = 128, n_scales: int = 32,
                 min_scale_m: float = 10.0, max_scale_m: float = 20_000.0, hidden: int = 256,
                 layers: int = 2) -> None:
        super().__init__()
        if not 0 < min_scale_m < max_scale_m:
            raise ValueError(f"baselines: need 0 < min_scale_m < max_scale_m, got {min_scale_m}, "
                             f"{max_scale_m}")
        self.config = {"dim": dim, "n_scales": n_scales, "min_scale_m": min_scale_m,
                       "max_scale_m": max_scale_m, "hidden": hidden, "layers": layers}
        g = (max_scale_m / min_scale_m) ** (np.arange(n_scales) / max(n_scales - 1, 1))
        self.register_buffer("centre", torch.tensor(np.asarray(centre, np.float64),
                                                    dtype=torch.float64))
        self.register_buffer("inv_scale", torch.tensor(1.0 / (min_scale_m * g),
                                                       dtype=torch.float32))
        self.register_buffer("dirs", torch.tensor(DIRECTIONS.T, dtype=torch.float32))
        mods: list[nn.Module] = []
        width = 6 * n_scales
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        mods.append(nn.Linear(width, dim))
        self.mlp = nn.Sequential(*mods)

    def encode_position(self, xy: torch.Tensor) -> torch.Tensor:
        rel = (xy.to(torch.float64) - self.centre).to(torch.float32)  # metres from the centre
        p = (rel @ self.dirs)[:, :, None] * self.inv_scale  # (n, 3, S)
        return torch.cat([torch.cos(p), torch.sin(p)], dim=1).flatten(1)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encode_position(xy))

    @torch.no_grad()
    def embed(self, xy: np.ndarray, batch: int = 65_536) -> np.ndarray:
        """Embeddings of ``xy`` (n, 2) as float32 (eval mode, in batches)."""
        self.eval()
        dev = self.centre.device
        out = [self(torch.as_tensor(xy[i:i + batch], dtype=torch.float64, device=dev)).cpu()
               for i in range(0, len(xy), batch)]
        d = self.config["dim"]
        return torch.cat(out).numpy() if out else np.zeros((0, d), np.float32)


@dataclass
class TrainResult:
    encoder: LocationEncoder
    losses: list[float]
    seconds: float
    samples: int


def _batches(n: int, chunk_rows: int, read: Callable[[int, int], tuple[np.ndarray, ...]],
             batch: int, rng: np.random.Generator, buffer_chunks: int = 4
             ) -> Iterator[tuple[np.ndarray, ...]]:
    """One epoch of shuffled batches over rows ``[0, n)``: chunks in random order,
    ``buffer_chunks`` at a time shuffled together (bounded memory); the last short
    batch is dropped when a full one exists (InfoNCE wants full batches)."""
    starts = np.arange(0, n, chunk_rows)
    rng.shuffle(starts)
    carry: tuple[np.ndarray, ...] | None = None
    for g in range(0, len(starts), buffer_chunks):
        parts = [read(int(a), int(min(a + chunk_rows, n))) for a in starts[g:g + buffer_chunks]]
        cols = [np.concatenate([p[c] for p in parts]) for c in range(len(parts[0]))]
        if carry is not None:
            cols = [np.concatenate([a, b]) for a, b in zip(carry, cols, strict=True)]
        perm = rng.permutation(len(cols[0]))
        cols = [c[perm] for c in cols]
        full = len(perm) // batch * batch
        for i in range(0, full, batch):
            yield tuple(c[i:i + batch] for c in cols)
        carry = tuple(c[full:] for c in cols) if full < len(perm) else None
    if carry is not None and len(carry[0]) >= 2 and n < batch:
        yield carry  # fewer rows than one batch: train on what there is


def _fit(model: nn.Module, params: Sequence[nn.Parameter], step: Callable[..., torch.Tensor],
         epoch_batches: Callable[[np.random.Generator], Iterator[tuple[np.ndarray, ...]]], *,
         epochs: int, lr: float, seed: int, device: str,
         log: Callable[[str], None] | None, what: str) -> tuple[list[float], int]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    samples = 0
    for ep in range(epochs):
        model.train()
        tot, nb = 0.0, 0
        for cols in epoch_batches(rng):
            ts = [torch.as_tensor(c, device=device) for c in cols]
            loss = step(*ts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            nb += 1
            samples += len(cols[0])
        losses.append(tot / max(nb, 1))
        if log and (ep == epochs - 1 or ep % max(1, epochs // 4) == 0):
            log(f"[baselines] {what}: epoch {ep + 1}/{epochs} loss {losses[-1]:.4f}")
    return losses, samples


def _run(enc: LocationEncoder, both: nn.Module, read: Callable[[int, int], tuple[np.ndarray, ...]],
         step: Callable[..., torch.Tensor], *, n: int, chunk_rows: int, batch_size: int,
         epochs: int, lr: float, seed: int, device: str, log: Callable[[str], None] | None,
         what: str) -> TrainResult:
    """Train ``both`` (the encoder and its head) on streamed batches; the encoder on CPU."""
    t0 = time.perf_counter()
    losses, samples = _fit(both, list(both.parameters()), step,
                           lambda rng: _batches(n, chunk_rows, read, batch_size, rng),
                           epochs=epochs, lr=lr, seed=seed, device=device, log=log, what=what)
    return TrainResult(enc.cpu(), losses, time.perf_counter() - t0, samples)


def train_calliper(xy: np.ndarray, text_read: Callable[[int, int], np.ndarray], chunk_rows: int,
                   *, text_dim: int, encoder: dict[str, Any], epochs: int, batch_size: int,
                   lr: float, tau: float, seed: int, device: str = "cpu",
                   log: Callable[[str], None] | None = None) -> TrainResult:
    """CaLLiPer+: align ``LocationEncoder`` with the text vectors of the same rows.

    ``xy`` (n, 2) float64: POI coordinates, row-aligned with ``text_read(a, b)`` (rows
    ``[a, b)`` of the text store as float32)."""
    from ..loss import symmetric_info_nce

    torch.manual_seed(seed)
    n = len(xy)
    if n < 2:
        raise ValueError(f"baselines.calliper: {n} POI(s) with text — need at least 2")
    enc = LocationEncoder(np.nanmean(xy, axis=0), **encoder).to(device)
    head = nn.Linear(text_dim, enc.config["dim"]).to(device)
    both = nn.ModuleDict({"loc": enc, "text": head})

    def read(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        ok = np.isfinite(xy[a:b]).all(axis=1)  # text rows of POIs without a location
        return xy[a:b][ok], text_read(a, b)[ok]

    def step(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z_loc = F.normalize(enc(p), dim=1)
        z_txt = F.normalize(head(t.float()), dim=1)
        return symmetric_info_nce(z_loc, z_txt, tau)

    return _run(enc, both, read, step, n=n, chunk_rows=chunk_rows, batch_size=batch_size,
                epochs=epochs, lr=lr, seed=seed, device=device, log=log, what="CaLLiPer+")


def category_targets(xy: np.ndarray, codes: np.ndarray, n_classes: int, radius_m: float
                     ) -> Callable[[int, int], np.ndarray]:
    """``rows(a, b)`` → the subcategory shares (b − a, n_classes) float32 of the POIs
    within ``radius_m`` of each of POIs ``[a, b)`` (itself included), from one KD-tree."""
    from scipy.spatial import cKDTree

    tree = cKDTree(xy)

    def rows(a: int, b: int) -> np.ndarray:
        nbrs = tree.query_ball_point(xy[a:b], r=float(radius_m))
        out = np.zeros((b - a, n_classes), np.float32)
        for i, nb in enumerate(nbrs):
            c = np.bincount(codes[np.asarray(nb, dtype=np.int64)], minlength=n_classes)
            out[i] = c / max(c.sum(), 1)
        return out

    return rows


def train_space2vec(xy: np.ndarray, targets: Callable[[int, int], np.ndarray], n_classes: int,
                    chunk_rows: int, *, encoder: dict[str, Any], epochs: int, batch_size: int,
                    lr: float, seed: int, device: str = "cpu",
                    log: Callable[[str], None] | None = None) -> TrainResult:
    """The coordinate baseline: ``LocationEncoder`` + a linear head predicting the
    category mix ``targets(a, b)`` around POIs ``[a, b)`` (soft cross-entropy)."""
    torch.manual_seed(seed)
    n = len(xy)
    if n < 2:
        raise ValueError(f"baselines.space2vec: {n} POI(s) — need at least 2")
    enc = LocationEncoder(xy.mean(axis=0), **encoder).to(device)
    head = nn.Linear(enc.config["dim"], n_classes).to(device)
    both = nn.ModuleDict({"loc": enc, "head": head})

    def read(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        return xy[a:b], targets(a, b)

    def step(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return -(q * F.log_softmax(head(enc(p)), dim=1)).sum(1).mean()

    return _run(enc, both, read, step, n=n, chunk_rows=chunk_rows, batch_size=batch_size,
                epochs=epochs, lr=lr, seed=seed, device=device, log=log, what="Space2Vec")
