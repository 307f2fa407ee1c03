"""The projector over pixels: de-quantise, L2-normalise, project, encode — per chunk.

:func:`project_pixels` applies a projector to (n, 64) AE pixels (int8 codes or
floats). An ``AEProj`` runs through :class:`_FusedAEProj`: buffers allocated once per
thread and batch size, the two first-layer GEMMs merged, optionally bf16 GEMMs
(``infer.precision``); small batches (:data:`BATCH_PIXELS`) keep activations in cache, where the
reference's 262,144-pixel batches are memory-bound. Any other module is called as is.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .. import aef

__all__ = ["BATCH_PIXELS", "INT8_SCALE", "project_chunk", "project_pixels"]

#: pixels per projector call. Small enough that the activations (2,048 × 384 float32 =
#: 3 MiB at the widest) stay in this core's share of the caches: the projector runs at
#: 292k px/s per thread at 2,048 against 189k at 16,384 (one thread, whole kernel,
#: measured here; the reference uses 262,144)
BATCH_PIXELS = 2_048

#: the int8 field's AEF sqrt codec scale (per-pixel cosine to the float32 output ≥ 0.99964
#: for 128 dims: :func:`aether_scale.stores.field.int8_cosine_bound`)
INT8_SCALE = aef.SCALE
NODATA = aef.NODATA


class _FusedAEProj:
    """Allocation-free evaluation of an :class:`~aether_scale.model.AEProj` on one batch size.

    Why: dask workers run with ``MALLOC_TRIM_THRESHOLD_`` set (distributed's
    default), which makes glibc return every large temporary to the OS, so an
    eager forward pass page-faults on each of its ~10 activations per batch
    and runs at half speed. Here every activation lives in a buffer allocated
    once per (thread, batch size); the two first-layer GEMMs are one GEMM
    (``proj.0`` and the gated shortcut concatenated, ``sigmoid(gate)`` folded
    into the shortcut's weights). The numbers equal the module's to float32
    round-off (checked in the tests).
    """

    def __init__(self, model: torch.nn.Module, batch: int, device: str,
                 precision: str = "float32") -> None:
        p0, p2 = model.proj[0], model.proj[2]
        q0, q3 = model.post_mlp[0], model.post_mlp[3]
        g = torch.sigmoid(model.gate.detach())
        dev = torch.device(device)
        dt = torch.bfloat16 if precision == "bfloat16" else torch.float32
        self.low = dt != torch.float32

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.detach().contiguous().to(device=dev, dtype=dt)

        with torch.no_grad():
            self.w1 = put(torch.cat([p0.weight, g * model.shortcut.weight]).T)
            self.b1 = put(torch.cat([p0.bias, g * model.shortcut.bias]))
            self.w2, self.b2 = put(p2.weight.T), put(p2.bias)
            self.w3, self.b3 = put(q0.weight.T), put(q0.bias)
            self.w4, self.b4 = put(q3.weight.T), put(q3.bias)
        self.hidden = p0.out_features
        d_in, d_h, d_out, d_p = p0.in_features, p0.out_features, p2.out_features, q0.out_features
        self.x = torch.empty(batch, d_in, device=dev)
        self.xa = torch.empty(batch, d_in, device=dev)
        self.xl = torch.empty(batch, d_in, device=dev, dtype=dt) if self.low else self.x
        self.h1 = torch.empty(batch, d_h + d_out, device=dev, dtype=dt)
        self.h = torch.empty(batch, d_out, device=dev, dtype=dt)
        self.p = torch.empty(batch, d_p, device=dev, dtype=dt)
        self.z = torch.empty(batch, d_out, device=dev, dtype=dt)
        self.zf = torch.empty(batch, d_out, device=dev) if self.low else self.z
        self.n = torch.empty(batch, 1, device=dev)
        self.nl = torch.empty(batch, 1, device=dev, dtype=dt) if self.low else self.n

    @staticmethod
    def fits(model: torch.nn.Module) -> bool:
        """True when ``model`` has exactly the AEProj layout (else the module itself is called)."""
        from torch import nn

        try:
            return (
                isinstance(model.proj, nn.Sequential) and len(model.proj) == 3
                and isinstance(model.proj[0], nn.Linear) and isinstance(model.proj[1], nn.ReLU)
                and isinstance(model.proj[2], nn.Linear)
                and isinstance(model.shortcut, nn.Linear) and model.gate.numel() == 1
                and isinstance(model.post_mlp, nn.Sequential) and len(model.post_mlp) == 4
                and isinstance(model.post_mlp[0], nn.Linear)
                and isinstance(model.post_mlp[1], nn.GELU)
                and model.post_mlp[1].approximate == "none"
                and isinstance(model.post_mlp[2], nn.Dropout)
                and isinstance(model.post_mlp[3], nn.Linear)
                and type(model).forward.__qualname__ == "AEProj.forward"
            )
        except AttributeError:
            return False

    def _normalize_(self, t: torch.Tensor, n: torch.Tensor) -> None:
        torch.linalg.vector_norm(t, dim=1, keepdim=True, out=n)
        t.div_(n.clamp_min_(1e-12))

    def decode_(self, k: int) -> None:
        """AEF codes already copied into ``x[:k]`` as floats → sign(q)·q² (scale is irrelevant:
        the next step L2-normalises), without allocating."""
        x, xa = self.x[:k], self.xa[:k]
        torch.abs(x, out=xa)
        x.mul_(xa)

    def __call__(self, k: int) -> torch.Tensor:
        """Project ``self.x[:k]`` (raw pixels, normalised here); returns a float32 view."""
        x, h1, h, p, z, n = (b[:k] for b in (self.x, self.h1, self.h, self.p, self.z, self.n))
        self._normalize_(x, n)
        xl, nl = self.xl[:k], self.nl[:k]
        if self.low:
            xl.copy_(x)
        torch.addmm(self.b1, xl, self.w1, out=h1)
        a = h1[:, : self.hidden].relu_()
        torch.addmm(h1[:, self.hidden :], a, self.w2, out=h)
        h.add_(self.b2)
        self._normalize_(h, nl)
        torch.addmm(self.b3, h, self.w3, out=p)
        torch.ops.aten.gelu_(p)
        torch.addmm(self.b4, p, self.w4, out=z)
        zf = self.zf[:k]
        if self.low:
            zf.copy_(z)
        self._normalize_(zf, n)
        return zf


_RUNNERS = threading.local()


def _runner(model: torch.nn.Module, batch: int, device: str,
            precision: str = "float32") -> _FusedAEProj | None:
    """This thread's fused evaluator for ``model`` (None when the model is not an AEProj)."""
    cache = getattr(_RUNNERS, "cache", None)
    if cache is None:
        cache = _RUNNERS.cache = {}
    key = (id(model), batch, device, precision)
    if key not in cache:
        cache.clear()  # one model at a time per thread: bounded memory
        cache[key] = (_FusedAEProj(model, batch, device, precision)
                      if _FusedAEProj.fits(model) else None)
    return cache[key]


def project_pixels(
    codes: np.ndarray,
    model: torch.nn.Module,
    *,
    batch_pixels: int = BATCH_PIXELS,
    out_dtype: str = "float16",
    device: str = "cpu",
    precision: str = "float32",
) -> np.ndarray:
    """Apply ``model`` to (n, 64) pixels: int8 AEF codes (nodata −128) or floats (NaN invalid).

    Each valid pixel is de-quantised, L2-normalised and projected; invalid rows
    come back NaN (float16) or −128 (int8, AEF sqrt codec). Returns (n, D).
    An ``AEProj`` runs through an allocation-free fused path (``precision``
    ``bfloat16`` runs its GEMMs in bf16: ~2× faster on CPUs with AVX512-BF16,
    component errors ~1e-3); any other module is called as is, in float32.
    """
    return project_chunk(codes, model, batch_pixels=batch_pixels, out_dtype=out_dtype,
                         device=device, precision=precision)[0]


def project_chunk(
    codes: np.ndarray,
    model: torch.nn.Module,
    *,
    batch_pixels: int = BATCH_PIXELS,
    out_dtype: str = "float16",
    device: str = "cpu",
    precision: str = "float32",
) -> tuple[np.ndarray, int, int]:
    """:func:`project_pixels` plus its counts: ``(out, valid, non_finite)``.

    ``valid`` counts the input pixels with every band present; ``non_finite`` the
    valid pixels whose projection was not finite (a diverged model: the caller
    refuses the chunk). One pass finds the valid pixels; each batch is gathered
    from, and written back to, the chunk's own rows (no compacted copies of
    the chunk), and finiteness is read from the output norms the last
    normalisation computes anyway.
    """
    n = codes.shape[0]
    integer = np.issubdtype(codes.dtype, np.integer)
    bad = (codes == NODATA).any(axis=1) if integer else ~np.isfinite(codes).all(axis=1)
    n_bad = int(np.count_nonzero(bad))
    idx = None if n_bad == 0 else np.flatnonzero(~bad)
    m = n - n_bad
    out_dim = _out_dim(model)
    int8_out = out_dtype == "int8"
    out = np.empty((n, out_dim), dtype=np.int8 if int8_out else np.float16)
    if n_bad:
        out[bad] = NODATA if int8_out else np.nan
    if m == 0:
        return out, 0, 0
    batch = min(batch_pixels, m)
    fused = _runner(model, batch, device, precision)
    on_cpu = device == "cpu"
    xbuf = torch.empty(batch, codes.shape[1]) if fused is None or not on_cpu else fused.x
    xnp = xbuf.numpy()
    scratch = torch.empty(batch, out_dim) if int8_out else None
    gathered = np.empty((batch, out_dim), dtype=out.dtype) if idx is not None else None
    non_finite = 0
    with torch.inference_mode():
        for s in range(0, m, batch):
            if idx is None:
                rows: slice | np.ndarray = slice(s, min(s + batch, m))
            else:
                ib = idx[s : s + batch]
                contiguous = int(ib[-1]) - int(ib[0]) == len(ib) - 1
                rows = slice(int(ib[0]), int(ib[-1]) + 1) if contiguous else ib
            part = codes[rows]
            k = part.shape[0]
            if integer and fused is not None and on_cpu:
                fused.x[:k].copy_(torch.from_numpy(part))  # int8 → float, decoded in place
                fused.decode_(k)
            elif integer:
                aef.decode_fast(part.astype(np.int8, copy=False), out=xnp[:k])
            else:
                xnp[:k] = part
            if fused is not None:
                if not on_cpu:
                    fused.x[:k].copy_(xbuf[:k], non_blocking=True)
                z = fused(k)
                ok = torch.isfinite(fused.n[:k])
            else:
                t = xbuf[:k] if on_cpu else xbuf[:k].to(device)
                z = model(torch.nn.functional.normalize(t, dim=1))
                ok = torch.isfinite(z).all(dim=1)
            if not bool(ok.all()):
                non_finite += int((~ok).sum())
            if z.device.type != "cpu":
                z = z.cpu()
            direct = isinstance(rows, slice)
            dst_np = out[rows] if direct else gathered[:k]  # type: ignore[index]
            dst = torch.from_numpy(dst_np)
            if scratch is not None:  # int8, sqrt codec: round(sign(v) · sqrt(|v|) · 127.5)
                q = scratch[:k].copy_(z)
                q.abs_().sqrt_().mul_(INT8_SCALE).copysign_(z)
                dst.copy_(q.round_().clamp_(-127, 127))
            else:
                dst.copy_(z)
            if not direct:
                out[rows] = dst_np
    return out, m, non_finite


def _out_dim(model: torch.nn.Module) -> int:
    dim = getattr(model, "_aether_out_dim", None)
    if dim is None:
        in_dim = _in_dim(model)
        with torch.inference_mode():
            p = next(model.parameters(), None)
            dev = p.device if p is not None else torch.device("cpu")
            dim = int(model(torch.zeros(1, in_dim, device=dev) + 0.125).shape[-1])
        model._aether_out_dim = dim  # type: ignore[attr-defined]
    return dim


def _in_dim(model: torch.nn.Module) -> int:
    if hasattr(model, "in_dim"):
        return int(model.in_dim)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            return int(mod.in_features)
    return aef.N_BANDS
