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

from .gemm import mm_nt

GatherFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]

__all__ = [
    "AetherLoss",
    "LossOutput",
    "symmetric_info_nce",
    "info_nce_terms",
    "symmetric_info_nce_reference",
    "gather_features",
    "dist_gather",
]


class LossOutput(NamedTuple):
    """The total loss and its two components (``L_AE`` is None when use_aug is off).

    Only ``loss`` carries a gradient; ``L_AE`` and ``L_AP`` are values for logging.
    """

    loss: torch.Tensor
    L_AE: torch.Tensor | None
    L_AP: torch.Tensor


def symmetric_info_nce(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned vectors ``x`` and ``y`` (n, d), usually unit vectors.

    Row i of ``x`` is the positive of row i of ``y``; every other row of the
    batch is a negative. Returns a scalar (mean over rows and both directions),
    equal to ``½·[cross_entropy(L, arange) + cross_entropy(Lᵀ, arange)]`` with
    ``L = x·yᵀ/τ`` (see :func:`symmetric_info_nce_reference`), computed by the
    fused kernel of :func:`info_nce_terms` (one logits matrix, closed-form
    gradient) — about 1.4× faster on CPU than autograd through two cross-entropies.
    """
    return info_nce_terms(x, (y,), (tau,), (1.0,))[0]  # checks the shapes


def symmetric_info_nce_reference(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """The plain formulation (two cross-entropies through autograd), for checks."""
    logits = (x @ y.t()) / tau
    labels = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def info_nce_terms(
    x: torch.Tensor, ys: Sequence[torch.Tensor], taus: Sequence[float], weights: Sequence[float],
    *, gemm_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_k w_k · symmetric_info_nce(x, y_k, τ_k)`` and the terms, sharing the anchor ``x``.

    Returns ``(total, terms)``: ``total`` is differentiable, ``terms`` (k,) holds
    each unweighted InfoNCE (no gradient). All k logits blocks come from one GEMM,
    ``x · [y_1/τ_1; …; y_k/τ_k]ᵀ`` of shape (n, k·n), and the backward is two
    GEMMs against the saved gradient of the logits,
    ``dL/dlogits_k = w_k·[(softmax_rows + softmax_cols)/(2n) − I/n]``; in float32 on
    the CPU all three go through oneDNN (:func:`aether_scale.gemm.mm_nt`).
    ``gemm_dtype=torch.bfloat16`` runs all three GEMMs with bf16 operands, the
    mixed precision autocast gives matmuls: the logits come out of the GEMM
    rounded to bf16 (at most 2⁻⁸ relative: 0.031 at |logit| = 1/0.07), and the
    exp, the sums, the log and the loss stay in the inputs' dtype; on CPU the
    logits GEMM then runs at bf16 speed, 4× float32's on AVX512-BF16 hardware.
    Default: the inputs' dtype.
    """
    if x.dim() != 2 or any(y.shape != x.shape for y in ys):
        raise ValueError(f"info_nce_terms: shapes differ: {tuple(x.shape)} vs "
                         f"{[tuple(y.shape) for y in ys]}")
    if not (len(ys) == len(taus) == len(weights)) or not ys:
        raise ValueError("info_nce_terms: need one tau and one weight per y")
    if x.dtype in (torch.float16, torch.bfloat16):
        # logits up to 1/τ overflow float16's exp and lose the loss to cancellation in
        # bfloat16: compute in float32 (autograd casts the gradients back)
        x, ys = x.float(), [y.float() for y in ys]
    return _InfoNCETerms.apply(x, tuple(float(t) for t in taus), tuple(float(w) for w in weights),
                               gemm_dtype or x.dtype, *ys)


class _InfoNCETerms(torch.autograd.Function):
    """Fused weighted sum of symmetric InfoNCE terms with an analytic backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, taus: tuple[float, ...], weights: tuple[float, ...],  # type: ignore[override]
                gemm_dtype: torch.dtype, *ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = x.shape[0], len(ys)
        yt = torch.cat([y / t for y, t in zip(ys, taus, strict=True)])  # (k·n, d)
        # the GEMMs' operands (the inputs themselves unless gemm_dtype is lower)
        x_g, yt_g = x.to(gemm_dtype), yt.to(gemm_dtype)
        # Σ_i logit_ii per term, straight from the pairs
        pos = torch.stack([(x * y).sum() / t for y, t in zip(ys, taus, strict=True)])
        # |logit| ≤ bound = max‖x‖·max‖y_k‖/τ_k. Below 40, every exp(logit) lies in
        # [e^−40, e^40] and sums of a million of them stay far inside float32's range,
        # so no shift is needed at all and one exp serves both softmax directions —
        # half the exp work of per-row/per-column shifts, which dominate the loss on CPU.
        # (CPU only: the bound is read on the host, which would stall a GPU stream.)
        fast = False
        if x.device.type == "cpu":
            norm_x = float(x.norm(dim=1).amax())
            fast = all(norm_x * float(y.norm(dim=1).amax()) / t < 40.0
                       for y, t in zip(ys, taus, strict=True))
        # per-block factor of dL/dlogits: w_k/(2n), built on the host (no device sync)
        coef = torch.tensor([0.5 * wt / n for wt in weights], dtype=x.dtype).view(1, k, 1)
        coef = coef.to(x.device, non_blocking=True)
        if fast:
            p = mm_nt(x_g, yt_g).to(x.dtype).exp_()  # (n, k·n)
            p3 = p.view(n, k, n)
            s_r = p3.sum(2, keepdim=True)          # (n, k, 1)
            s_c = p3.sum(0, keepdim=True)          # (1, k, n)
            lse = 0.5 * (s_r.log().sum((0, 2)) + s_c.log().sum((0, 2)))
            grad = torch.mul(p3, coef / s_c).addcmul_(p3, coef / s_r)
        else:  # per-row / per-column shifts: safe for any logits (and no host sync on GPU)
            s3 = mm_nt(x_g, yt_g).to(x.dtype).view(n, k, n)
            m_r = s3.amax(2, keepdim=True)
            m_c = s3.amax(0, keepdim=True)
            p_r = torch.exp(s3 - m_r)
            s_r = p_r.sum(2, keepdim=True)
            p_c = torch.exp(s3 - m_c)
            s_c = p_c.sum(0, keepdim=True)
            lse = 0.5 * ((s_r.log() + m_r).sum((0, 2)) + (s_c.log() + m_c).sum((0, 2)))
            grad = p_r.mul_(coef / s_r).add_(p_c.mul_(coef / s_c))
        for j in range(k):
            grad[:, j, :].diagonal().sub_(weights[j] / n)
        terms = (lse - pos) / n
        ctx.save_for_backward(x_g, yt_g, grad.view(n, k * n).to(gemm_dtype))
        ctx.taus, ctx.dtype = taus, x.dtype
        ctx.mark_non_differentiable(terms)
        return sum(wt * terms[j] for j, wt in enumerate(weights)), terms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor, _grad_terms: torch.Tensor):  # type: ignore[override]
        x, yt, grad = ctx.saved_tensors
        gx = mm_nt(grad, yt.t()).to(ctx.dtype).mul_(grad_out) if ctx.needs_input_grad[0] else None
        gys: list[torch.Tensor | None] = [None] * len(ctx.taus)
        if any(ctx.needs_input_grad[4:]):
            # (xᵀ·G)ᵀ: the GEMM then copies the small transposed (n, d) operand, not the
            # (n, k·n) gradient (bf16 GEMMs on CPU take transposed operands by copying)
            gyt = mm_nt(x.t(), grad.t()).to(ctx.dtype).mul_(grad_out).t()
            gys = [g.div_(t) for g, t in zip(gyt.chunk(len(ctx.taus)), ctx.taus, strict=True)]
        return (gx, None, None, None, *gys)


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
    ``gather_fn`` (collective override, default ``torch.distributed.all_gather``),
    ``gemm_dtype`` (operand dtype of the loss's GEMMs, see :func:`info_nce_terms`).
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
        gemm_dtype: torch.dtype | None = None,
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
        self.gemm_dtype = gemm_dtype

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_features(x, rank=self.rank, world_size=self.world_size, gather_fn=self.gather_fn)

    def forward(
        self, z_b: torch.Tensor, z_a: torch.Tensor | None, z_poi: torch.Tensor
    ) -> LossOutput:
        """Loss of the local shards ``z_b``, ``z_a`` (may be None when use_aug is off), ``z_poi``."""
        g_b = self._gather(z_b)
        g_p = self._gather(z_poi)
        if not self.use_aug:
            total, terms = info_nce_terms(g_b, (g_p,), (self.tau_poi,), (1.0,),
                                          gemm_dtype=self.gemm_dtype)
            return LossOutput(total, None, terms[0])
        if z_a is None:
            raise ValueError("AetherLoss(use_aug=True) needs the augmented view z_a")
        # both terms share the anchor z_b: one logits GEMM (n × 2n) instead of two
        total, terms = info_nce_terms(g_b, (self._gather(z_a), g_p), (self.tau_ae, self.tau_poi),
                                      (self.lam, 1.0 - self.lam), gemm_dtype=self.gemm_dtype)
        return LossOutput(total, terms[0], terms[1])
