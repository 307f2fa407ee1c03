"""Fused training kernels for the two heads: one autograd node each, analytic backward.

A CPU training step of the AETHER heads is GEMMs on small matrices plus many
elementwise passes and autograd bookkeeping (≈40 % of a step on 2 cores).
These kernels compute exactly :meth:`AEProj.forward <aether_scale.model.AEProj.forward>`
and :meth:`TextProj.forward <aether_scale.model.TextProj.forward>` in training
mode (same dropout mask for the same RNG state) with fewer passes:

- the first layer and the gated shortcut share one GEMM, ``x·[W1; Ws]ᵀ``;
- dropout's ``1/(1−p)`` is folded into the last weight matrix, and the
  shortcut's gate into its weight gradient after the GEMM;
- the L2 normalisations use their closed-form backward, ``(g − u·(u·g))/‖h‖``.

``compute_dtype`` sets the GEMM operands only: ``torch.bfloat16`` gives mixed
precision as on GPUs (bf16 operands, float32 accumulation; normalisations,
gate, biases' gradients, master weights and the optimizer stay float32). On
CPUs with AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later) bf16 GEMMs run
at about twice the float32 rate. ``compute_dtype=None`` computes in the
parameters' dtype — float64 in the tests, where the kernels match autograd
through the modules to round-off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import AEProj, TextProj, drop_mask

__all__ = ["fused_ae_forward", "fused_text_forward"]

_EPS = 1e-12  # F.normalize's default eps


def _normalize(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h/max(‖h‖, eps), max(‖h‖, eps))`` row-wise, like ``F.normalize``."""
    nrm = torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min_(_EPS)
    return h / nrm, nrm


def _normalize_backward(g: torch.Tensor, u: torch.Tensor, nrm: torch.Tensor) -> torch.Tensor:
    """Gradient through ``u = h/‖h‖`` (``nrm`` = the clamped norm; zero rows get ``g/eps``)."""
    dot = (u * g).sum(1, keepdim=True).mul_(nrm > _EPS)
    return torch.addcmul(g, u, dot, value=-1.0).div_(nrm)


class _AEProjTrain(torch.autograd.Function):
    """AEProj.forward in training mode (dropout ``p``) as one node."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, ws, bs, gate, w3, b3, w4, b4, p: float, dt):  # type: ignore[override]
        acc = w1.dtype
        hid = w1.shape[0]
        xb = x.to(dt)
        a = torch.addmm(torch.cat((b1, bs)).to(dt), xb, torch.cat((w1, ws)).to(dt).t())
        s = a[:, hid:]
        r1 = torch.relu(a[:, :hid])
        w2b = w2.to(dt)
        g = torch.sigmoid(gate)
        h = torch.addmm(b2.to(dt), r1, w2b.t()).to(acc).addcmul_(s, g)
        hn, nh = _normalize(h)
        hnb = hn.to(dt)
        w3b = w3.to(dt)
        a3 = torch.addmm(b3.to(dt), hnb, w3b.t())
        ge = F.gelu(a3)
        drop = None
        scale = 1.0
        if p > 0.0:
            drop = drop_mask(ge.shape, p).to(ge.device)
            ge.masked_fill_(drop, 0.0)
            scale = 1.0 / (1.0 - p)
        w4b = (w4 * scale).to(dt)
        out, no = _normalize(torch.addmm(b4.to(dt), ge, w4b.t()).to(acc))
        ctx.save_for_backward(xb, s, r1, w2b, g, hn, nh, hnb, w3b, a3, ge, w4b, out, no,
                              *(() if drop is None else (drop,)))
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):  # type: ignore[override]
        xb, s, r1, w2b, g, hn, nh, hnb, w3b, a3, ge, w4b, out, no, *drop = ctx.saved_tensors
        acc, dt = out.dtype, xb.dtype
        # Weight gradients Gᵀ·A need one operand transposed, which bf16 GEMMs on CPU
        # do by copying it: each is arranged so the copy is of the narrower operand
        # (and xᵀ is copied once for both first-layer gradients).
        go = _normalize_backward(gout, out, no)
        gob = go.to(dt)
        gw4 = torch.mm(gob.t(), ge).to(acc).mul_(ctx.scale)
        gb4 = go.sum(0)
        gge = torch.mm(gob, w4b)  # includes the dropout scale
        if drop:
            gge.masked_fill_(drop[0], 0.0)
        ga3 = torch.ops.aten.gelu_backward(gge, a3)
        gw3 = torch.mm(hnb.t(), ga3).t().to(acc)
        gb3 = ga3.sum(0, dtype=acc)
        gh = _normalize_backward(torch.mm(ga3, w3b).to(acc), hn, nh)
        ghb = gh.to(dt)
        gw2 = torch.mm(ghb.t(), r1).to(acc)
        gb2 = gh.sum(0)
        ggate = (gh * s).sum().reshape(1) * g * (1.0 - g)
        ga1 = torch.ops.aten.threshold_backward(torch.mm(ghb, w2b), r1, 0)
        xt = xb.t().contiguous()
        gw1 = torch.mm(xt, ga1).t().to(acc)
        gb1 = ga1.sum(0, dtype=acc)
        gws = torch.mm(xt, ghb).t().to(acc).mul_(g)  # d/dWs of g·(x·Wsᵀ)
        gbs = gb2 * g
        return None, gw1, gb1, gw2, gb2, gws, gbs, ggate, gw3, gb3, gw4, gb4, None, None


class _TextProjTrain(torch.autograd.Function):
    """TextProj.forward as one node (the text embeddings get no gradient)."""

    @staticmethod
    def forward(ctx, t, w, b, dt):  # type: ignore[override]
        tb = t.to(dt)
        out, no = _normalize(torch.addmm(b.to(dt), tb, w.to(dt).t()).to(w.dtype))
        ctx.save_for_backward(tb, out, no)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):  # type: ignore[override]
        tb, out, no = ctx.saved_tensors
        go = _normalize_backward(gout, out, no)
        return None, torch.mm(go.to(tb.dtype).t(), tb).to(out.dtype), go.sum(0), None


def fused_ae_forward(ae: AEProj, x: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``ae(x)`` as one autograd node, GEMMs in ``compute_dtype`` (default: the weights' dtype).

    Dropout is applied when ``ae.training`` (mask from :func:`~aether_scale.model.drop_mask`,
    so the same RNG state drops the same elements as the module). Returns unit
    vectors in the weights' dtype.
    """
    if x.requires_grad:
        raise ValueError("fused_ae_forward gives no gradient for its input x; call the module "
                         "(ae(x)) when you need one")
    dt = compute_dtype or ae.shortcut.weight.dtype
    drop = ae.post_mlp[2]
    p = float(drop.p) if ae.training else 0.0
    if p >= 1.0:
        raise ValueError(f"fused_ae_forward: dropout p={p} drops everything; use p < 1")
    return _AEProjTrain.apply(
        x.to(ae.shortcut.weight.dtype),
        ae.proj[0].weight, ae.proj[0].bias, ae.proj[2].weight, ae.proj[2].bias,
        ae.shortcut.weight, ae.shortcut.bias, ae.gate,
        ae.post_mlp[0].weight, ae.post_mlp[0].bias, ae.post_mlp[3].weight, ae.post_mlp[3].bias,
        p, dt,
    )


def fused_text_forward(txt: TextProj, t: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``txt(t)`` as one autograd node, the GEMM in ``compute_dtype``."""
    if t.requires_grad:
        raise ValueError("fused_text_forward gives no gradient for its input; call the module "
                         "(txt(t)) when you need one")
    w = txt.proj.weight
    return _TextProjTrain.apply(t, w, txt.proj.bias, compute_dtype or w.dtype)
