"""The projector over pixels: de-quantise, L2-normalise, project, encode — per chunk.

:func:`project_chunk` applies a projector to (n, 64) AE pixels (int8 codes or floats)
in batches of :data:`BATCH_PIXELS`, gathered from and written back to the chunk's own
rows. The projector's math is the module's own ``forward`` (for an ``AEProj``: the
reference's). A hand-written evaluator of it (buffers allocated once, the first layer
and the gated shortcut as one product) lived here until the same-run A/B of
``benchmarks/bench_infer.py`` on 2026-12-02 gave it 1.035× the module and 1.077×
``torch.compile`` for the whole stage (8.4 M px, in-process threads), short of the
1.15× that would justify a second copy of the math. Its one real advantage, no
allocation per batch, mattered only on dask workers, whose glibc the nanny starts
with ``MALLOC_TRIM_THRESHOLD_`` set: :func:`~aether_scale.heap.keep_freed_memory`
fixes that at its cause.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

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
    ``precision`` ``bfloat16`` runs the module under ``torch.autocast`` (its products in
    bf16: ~2× faster where bf16 is native, component errors ~1e-3) and normalises the
    output again in float32.
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
    the chunk).
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
    dev = torch.device(device)
    xbuf = torch.empty(batch, codes.shape[1])  # the batch's pixels as float32, on the host
    xnp = xbuf.numpy()
    scratch = torch.empty(batch, out_dim) if int8_out else None
    gathered = np.empty((batch, out_dim), dtype=out.dtype) if idx is not None else None
    low = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bfloat16"
           else contextlib.nullcontext())
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
            if integer:
                aef.decode_fast(part.astype(np.int8, copy=False), out=xnp[:k])
            else:
                xnp[:k] = part
            t = xbuf[:k] if dev.type == "cpu" else xbuf[:k].to(dev, non_blocking=True)
            with low:
                z = model(F.normalize(t, dim=1))
            if z.dtype != torch.float32:
                z = F.normalize(z.float(), dim=1)
            # NaN or ±inf in any element makes the row's sum non-finite. The projector's
            # rows are unit vectors, so their sums cannot overflow; another module's
            # finite row whose sum passes float32's range (~3.4e38) is counted too, and
            # could not be stored in a float16 field (max 65,504) anyway. One reduction
            # instead of an element-wise mask: ~10 % of the forward pass per batch.
            ok = torch.isfinite(z.sum(dim=1))
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
