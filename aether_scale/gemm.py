"""Float32 matrix products on the CPU through oneDNN, where torch's own path is slower.

torch's CPU build sends a float32 ``mm``/``addmm``/``linear`` to MKL's ``sgemm``; its
bfloat16 products already go to oneDNN. On AMD CPUs MKL does not use AVX-512, and on
the 2-core Zen 5 benchmark machine (AVX-512) oneDNN's float32 matmul ran the
projector's and the loss's shapes at 2.0–3.2× MKL's speed (404 vs 197 GFLOP/s over
the six forward shapes of one training step; ``benchmarks/bench_train.py`` and
``bench_infer.py`` record the same-run A/B). Same math, same float32 arithmetic:
only the summation order inside each dot product differs (|Δ| ~ 1e-6 relative).

- :func:`mm_nt` ``(a, b) → a·bᵀ`` (b in the layout of a Linear's weight) and
  :class:`Linear` (an ``nn.Linear`` whose float32 CPU forward and backward use it)
  are what the projectors, the loss and the field's kernel call.
- :func:`backend` is the one rule: ``onednn`` when this torch has the op and a
  one-time check on this machine agrees with ``torch.mm``; ``blas`` (torch's own
  path) otherwise, or when ``AETHER_CPU_GEMM=blas`` is set (for A/B runs and as
  an escape hatch). CUDA, bfloat16 under autocast and anything but 2-D float32
  inputs always take torch's own path.
- :func:`calibrate` makes ``auto`` concrete for one workload: the train stage times
  its own step (its modules' copies at its batch, run as the run runs them, compiled
  or eager, forward and backward, this process's threads) both ways before its first
  step and keeps the faster (infer keeps
  oneDNN: its forward products were as fast or faster through it on every host
  measured, ``bench_infer.py``'s GEMM floor). Which path wins depends on the CPU and the workload: on the AMD EPYC
  hosts oneDNN trained 1.28–1.34× faster than MKL (``bench_train.py``, 2026-12-02),
  on an Intel Xeon (Sapphire Rapids) MKL trained 1.26× faster (5.25 vs 6.61 s per
  epoch) while oneDNN still ran the field's forward products 1.32× faster.

Eagerly the oneDNN op runs through a small ``autograd.Function``; inside
``torch.compile`` through a torch custom op (``aether::linear``) with the same
gradient formula, so inductor keeps it as one opaque call and still fuses the
elementwise work around it.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BACKENDS", "ENV", "Linear", "backend", "calibrate", "mm_nt", "use_onednn"]

#: ``AETHER_CPU_GEMM`` values
BACKENDS = ("auto", "onednn", "blas")
ENV = "AETHER_CPU_GEMM"

#: this process's answer once :func:`backend` has run (read by :func:`use_onednn`)
_ACTIVE: bool | None = None
_WARNED = False


def _onednn_op():
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        return ops._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def _onednn_problem() -> str | None:
    """Why oneDNN cannot serve this process's float32 products (None: it can). Checked
    once: its product must agree with ``torch.mm``, contiguous and strided."""
    op = _onednn_op()
    if op is None:
        return "this torch build has no oneDNN linear op"
    g = torch.Generator().manual_seed(0)
    a = torch.randn(67, 131, generator=g)
    b = torch.randn(45, 131, generator=g)
    try:
        got = op(a, b, None, "none", [], "")
        strided = op(a.t().contiguous().t(), b.t().contiguous().t(), None, "none", [], "")
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        return f"{type(e).__name__}: {e}"
    want = torch.mm(a.double(), b.double().t()).float()
    for name, out in (("contiguous", got), ("strided", strided)):
        if out.shape != want.shape or not torch.allclose(out, want, rtol=1e-4, atol=1e-4):
            return f"its {name} product differs from torch.mm"
    return None


def _wanted() -> str:
    """``AETHER_CPU_GEMM`` as set (``auto`` when unset or empty)."""
    return os.environ.get(ENV, "auto").strip().lower() or "auto"


def backend(*, refresh: bool = False) -> str:
    """``onednn`` or ``blas``: which path float32 CPU products take in this process.

    ``AETHER_CPU_GEMM`` is read on the first call (``refresh=True`` reads it again)."""
    global _ACTIVE, _WARNED
    if _ACTIVE is not None and not refresh:
        return "onednn" if _ACTIVE else "blas"
    want = _wanted()
    if want not in BACKENDS:
        raise ValueError(f"{ENV}={want!r}: use one of {', '.join(BACKENDS)}")
    if want == "blas":
        _ACTIVE = False
        return "blas"
    why = _onednn_problem()
    if want == "onednn" and why:
        raise RuntimeError(f"{ENV}=onednn but oneDNN cannot be used here: {why}; "
                           f"unset {ENV} or set it to blas")
    if why and not _WARNED:
        _WARNED = True
        warnings.warn(f"float32 CPU products use torch's BLAS path: {why}", RuntimeWarning,
                      stacklevel=2)
    _ACTIVE = why is None
    return "onednn" if _ACTIVE else "blas"


def use_onednn(*tensors: torch.Tensor) -> bool:
    """Whether a product of these tensors takes the oneDNN path (2-D float32 on the CPU,
    autocast off, not inside a TorchScript/ONNX trace, backend ``onednn``)."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 2:
            return False
    if torch.is_autocast_enabled("cpu") or torch.jit.is_tracing():
        return False  # autocast's own casts; a TorchScript/ONNX trace records aten ops only
    return _ACTIVE if _ACTIVE is not None else backend() == "onednn"


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _linear_grads(grad: torch.Tensor, x: torch.Tensor | None, w: torch.Tensor | None,
                  needs: tuple[bool, ...], has_bias: bool, product=None):
    """``x·wᵀ + b``'s gradients (``needs``: which of x, w, b want one), their products
    through ``product`` (default: the oneDNN op itself)."""
    mm = product or _onednn_linear
    gx = mm(grad, w.t(), None) if needs[0] else None        # grad · w
    # dL/dw = gradᵀ·x, as (gradᵀ)·(xᵀ)ᵀ: oneDNN reads the two transposed views
    gw = mm(grad.t(), x.t(), None) if needs[1] else None
    gb = grad.sum(0) if has_bias and needs[2] else None
    return gx, gw, gb


class _OneDNNLinear(torch.autograd.Function):
    """Eager ``x·wᵀ + b`` through oneDNN with its gradients (no torch._dynamo import: a
    custom op's first call costs a process ~1.1 s of importing it)."""

    @staticmethod
    def forward(ctx, x, w, b):  # type: ignore[override]
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, w)
        return _onednn_linear(x, w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, w = ctx.saved_tensors
        return _linear_grads(grad, x, w, ctx.needs_input_grad, ctx.has_bias)


# Inside torch.compile the same product is an opaque custom op: inductor then keeps the
# oneDNN call as it is and fuses the elementwise work around it (traced through the
# autograd.Function above, inductor fails to lower the oneDNN op in a training graph).
@torch.library.custom_op("aether::linear", mutates_args=())
def _linear_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _onednn_linear(x, w, b)


@_linear_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


def _linear_setup(ctx, inputs, output) -> None:
    x, w, b = inputs
    ctx.has_bias = b is not None
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                          w if ctx.needs_input_grad[0] else None)


def _linear_backward(ctx, grad):
    x, w = ctx.saved_tensors
    # the backward's products are the custom op too: in a compiled backward graph a bare
    # oneDNN op is lowered by inductor, which fails on some transposed layouts
    return _linear_grads(grad, x, w, ctx.needs_input_grad, ctx.has_bias, _linear_op)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x·wᵀ + b`` through oneDNN: plain under no_grad/inference, else with its gradients."""
    if torch.compiler.is_compiling():
        return _linear_op(x, w, b)
    if not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad
                                           or (b is not None and b.requires_grad)):
        return _onednn_linear(x, w, b)
    return _OneDNNLinear.apply(x, w, b)


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a · bᵀ`` for ``a`` (m, k) and ``b`` (n, k): oneDNN for float32 on the CPU (see
    :func:`backend`), ``torch.mm`` otherwise. Differentiable either way."""
    if use_onednn(a, b):
        return _linear(a, b, None)
    return torch.mm(a, b.t())


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose 2-D float32 CPU forward and
    backward go through oneDNN (see :func:`backend`); everything else (CUDA, autocast,
    batched inputs) is ``nn.Linear``'s own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_onednn(x, self.weight):
            return _linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


#: blas must beat oneDNN by this factor to be chosen (closer is this machine's noise)
CALIBRATION_MARGIN = 0.95
_CALIBRATED: dict[tuple, dict] = {}
_CAL_LOCK = threading.Lock()


def calibrate(step: Callable[[], None], *, key: Hashable, repeats: int = 5) -> dict:
    """Time one unit of a workload (``step``: e.g. a training step's forward and
    backward on copies of its modules) with this process's float32 products through
    oneDNN and through torch's BLAS, and make the faster this process's path
    (:func:`backend` ``auto`` only; ``AETHER_CPU_GEMM`` set, or oneDNN unusable here,
    measures nothing).

    The two paths alternate over ``repeats`` rounds of three steps after one warm-up
    step each; each keeps its best round. ``blas`` is chosen only when at least 5 %
    faster (:data:`CALIBRATION_MARGIN`). The whole step is timed, not its products one
    by one: on a 2-core Zen 4 the products alone, each through ``autograd.grad``, put
    BLAS 1.4× ahead (10.9 vs 15.2 ms) while the training step itself ran about as fast
    either way (oneDNN/BLAS 17.2/19.5, 18.3/18.3 and 19.0/18.1 ms in three probes).
    A workload measured before in this process (same ``key``, same threads) is not
    measured again. Returns ``{"backend", "measured", "ms": {path: best step}}``.
    """
    global _ACTIVE
    want = _wanted()
    if want != "auto" or backend(refresh=True) != "onednn":
        return {"backend": backend(), "measured": False, "ms": None}
    key = (key, torch.get_num_threads())
    with _CAL_LOCK:  # the threads of one process calibrate once, not against each other
        found = _CALIBRATED.get(key)
        if found is None:
            found = _CALIBRATED[key] = _measure(step, repeats)
        _ACTIVE = found["backend"] == "onednn"
        return dict(found)


def _measure(step: Callable[[], None], repeats: int) -> dict:
    global _ACTIVE
    best = {"onednn": math.inf, "blas": math.inf}
    try:
        for name in best:
            _ACTIVE = name == "onednn"
            step()  # warm-up: first-call set-up, caches
        for r in range(repeats):
            for name in (("onednn", "blas") if r % 2 == 0 else ("blas", "onednn")):
                _ACTIVE = name == "onednn"
                t = time.perf_counter()
                for _ in range(3):
                    step()
                best[name] = min(best[name], (time.perf_counter() - t) / 3)
    finally:
        _ACTIVE = True  # calibrate runs only where the default path is oneDNN
    chosen = "blas" if best["blas"] < CALIBRATION_MARGIN * best["onednn"] else "onednn"
    return {"backend": chosen, "measured": True,
            "ms": {k: round(v * 1e3, 3) for k, v in best.items()}}
