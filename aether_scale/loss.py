"""The AETHER contrastive objective, standalone (in the style of open_clip's ``loss.py``).

For a batch of N triplets of unit vectors (z_b, z_a, z_poi)::

    L_AE = symmetric InfoNCE(z_b, z_a;   τ_ae)     (intra-modal, base vs augmented view)
    L_AP = symmetric InfoNCE(z_b, z_poi; τ_poi)    (cross-modal, base view vs POI text)
    L    = λ·L_AE + (1−λ)·L_AP                     (use_aug=False: L = L_AP, "AETHER w/o aug")

where symmetric InfoNCE(x, y; τ) = ½·[CE(x·yᵀ/τ, diag) + CE(y·xᵀ/τ, diag)], the
mean over rows of −log softmax at the matching column (paper eqs. 5–7).

Several ranks (DDP): each rank holds a shard of the global batch. The loss
gathers every rank's features, puts its *own* shard back in place of the
gathered copy (so gradient flows to the local shard only; the other shards are
constants), and computes the loss over the whole global batch — every rank
gets the same value, equal to the single-process loss on the concatenated
batch. Summing the local-shard gradients over ranks gives the full gradient;
DDP *averages* them, so a trainer multiplies the loss by ``world_size`` before
``backward`` to reproduce single-process gradients (``aether_scale.train``
does). The collective is injectable (``gather_fn``) so tests can fake it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

GatherFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]

__all__ = [
    "AetherLoss",
    "LossOutput",
    "symmetric_info_nce",
    "symmetric_info_nce_reference",
    "gather_features",
    "dist_gather",
]


class LossOutput(NamedTuple):
    """The total loss and its two components (``L_AE`` is None when use_aug is off)."""

    loss: torch.Tensor
    L_AE: torch.Tensor | None
    L_AP: torch.Tensor


def symmetric_info_nce(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned unit vectors ``x`` and ``y`` (n, d).

    Row i of ``x`` is the positive of row i of ``y``; every other row of the
    batch is a negative. Returns a scalar (mean over rows and both directions),
    equal to ``½·[cross_entropy(L, arange) + cross_entropy(Lᵀ, arange)]`` with
    ``L = x·yᵀ/τ`` (see :func:`symmetric_info_nce_reference`), computed by a
    fused function: one logits matrix, row and column softmax from it, and the
    closed-form gradient ``dL/dlogits = (softmax_rows + softmax_cols)/(2n) − I/n``
    — about 1.4× faster on CPU than autograd through two cross-entropies.
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"symmetric_info_nce: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    return _SymmetricInfoNCE.apply(x, y, float(tau))


def symmetric_info_nce_reference(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """The plain formulation (two cross-entropies through autograd), for checks."""
    logits = (x @ y.t()) / tau
    labels = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class _SymmetricInfoNCE(torch.autograd.Function):
    """Fused symmetric InfoNCE with an analytic backward (first derivatives only)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:  # type: ignore[override]
        n = x.shape[0]
        logits = torch.mm(x, y.t()).mul_(1.0 / tau)
        lo, hi = torch.aminmax(logits)
        if x.device.type == "cpu" and float(hi - lo) < 80.0:
            # One exp for both directions: with a single shift (the global max) every
            # entry stays within exp's float32 range when the logits span < 80 — always
            # true for unit vectors (|logit| ≤ 1/τ) at the usual temperatures. Half the
            # exp work of per-row/per-column shifts, which dominate the loss on CPU.
            p = logits.sub(hi).exp_()
            s_r = p.sum(1, keepdim=True)
            s_c = p.sum(0, keepdim=True)
            lse = 0.5 * (s_r.log().sum() + s_c.log().sum()) + n * hi
            loss = (lse - logits.diagonal().sum()) / n
            grad = torch.div(p, s_r).add_(p.div_(s_c)).mul_(0.5 / n)
        else:  # per-row / per-column shifts: safe for any logits (and no host sync on GPU)
            m_r = logits.amax(1, keepdim=True)
            m_c = logits.amax(0, keepdim=True)
            p_r = torch.exp(logits - m_r)
            s_r = p_r.sum(1, keepdim=True)
            p_c = torch.exp(logits - m_c)
            s_c = p_c.sum(0, keepdim=True)
            lse = 0.5 * ((s_r.log() + m_r).sum() + (s_c.log() + m_c).sum())
            loss = (lse - logits.diagonal().sum()) / n
            grad = p_r.div_(s_r).add_(p_c.div_(s_c)).mul_(0.5 / n)
        grad.diagonal().sub_(1.0 / n)
        ctx.save_for_backward(x, y, grad)
        ctx.tau = tau
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, y, grad = ctx.saved_tensors
        g = grad * (grad_out / ctx.tau)
        gx = g @ y if ctx.needs_input_grad[0] else None
        gy = g.t() @ x if ctx.needs_input_grad[1] else None
        return gx, gy, None


def dist_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """``torch.distributed.all_gather`` of equal-shaped shards (no gradient)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return parts


def gather_features(
    x: torch.Tensor, *, rank: int, world_size: int, gather_fn: GatherFn | None = None
) -> torch.Tensor:
    """All ranks' shards of ``x`` concatenated in rank order, gradient to the local shard.

    ``gather_fn(x)`` must return the ``world_size`` shards (any gradient they
    carry is dropped); the default is :func:`dist_gather`. Shards must have
    equal shapes on every rank (the trainer guarantees equal local batches).
    """
    if world_size == 1:
        return x
    parts = list((gather_fn or dist_gather)(x))
    if len(parts) != world_size:
        raise RuntimeError(f"gather returned {len(parts)} shards, expected world_size={world_size}")
    parts = [p.detach() for p in parts]
    parts[rank] = x
    return torch.cat(parts, dim=0)


class AetherLoss(nn.Module):
    """λ·L_AE + (1−λ)·L_AP over the (global) batch; see the module docstring.

    Parameters: ``lam`` (λ in [0, 1]), ``tau_ae``, ``tau_poi`` (fixed
    temperatures > 0), ``use_aug`` (False drops the AE↔AE term: L = L_AP),
    ``rank`` / ``world_size`` (DDP position; 0/1 = single process),
    ``gather_fn`` (collective override, default ``torch.distributed.all_gather``).
    """

    def __init__(
        self,
        lam: float = 0.2,
        tau_ae: float = 0.07,
        tau_poi: float = 0.07,
        *,
        use_aug: bool = True,
        rank: int = 0,
        world_size: int = 1,
        gather_fn: GatherFn | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if tau_ae <= 0 or tau_poi <= 0:
            raise ValueError(f"temperatures must be > 0, got tau_ae={tau_ae}, tau_poi={tau_poi}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank/world_size: {rank}/{world_size}")
        self.lam, self.tau_ae, self.tau_poi = float(lam), float(tau_ae), float(tau_poi)
        self.use_aug = use_aug
        self.rank, self.world_size = rank, world_size
        self.gather_fn = gather_fn

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_features(x, rank=self.rank, world_size=self.world_size, gather_fn=self.gather_fn)

    def forward(
        self, z_b: torch.Tensor, z_a: torch.Tensor | None, z_poi: torch.Tensor
    ) -> LossOutput:
        """Loss of the local shards ``z_b``, ``z_a`` (may be None when use_aug is off), ``z_poi``."""
        g_b = self._gather(z_b)
        l_ap = symmetric_info_nce(g_b, self._gather(z_poi), self.tau_poi)
        if not self.use_aug:
            return LossOutput(l_ap, None, l_ap)
        if z_a is None:
            raise ValueError("AetherLoss(use_aug=True) needs the augmented view z_a")
        l_ae = symmetric_info_nce(g_b, self._gather(z_a), self.tau_ae)
        return LossOutput(self.lam * l_ae + (1.0 - self.lam) * l_ap, l_ae, l_ap)
