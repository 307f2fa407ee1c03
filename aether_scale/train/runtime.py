"""The machinery around the training loop on this device: heap retention, GEMM precision
and path, the optimizer, RNG state, atomic JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

from ..config import TrainSection
from ..devices import bf16_problem

__all__ = ["choose_cpu_gemm", "compute_dtype", "make_optimizer", "rng_state",
           "set_rng_state", "write_json"]

#: float32 CPU runs with at least this many steps per epoch measure their products' path
#: on their own step (:func:`choose_cpu_gemm`); below it the measurement (0.4–0.5 s of
#: eager steps on a 2-core Zen 4 at batch 512, plus one compilation more when the run
#: compiles) is a visible part of the run (tests, demos)
CALIBRATE_MIN_STEPS = 256




def compute_dtype(cfg: TrainSection, device: torch.device, say: Callable[[str], None]) -> torch.dtype:
    """The GEMM operand dtype for ``train.precision``: bfloat16 only where it is faster.

    On a CPU without native bf16 GEMMs (no AVX512-BF16/AMX) torch emulates them, many
    times slower than float32 (measured on an AVX2 EPYC, 1 thread: a 1024×256·256×128
    product 15–80 ms in bf16 vs 1.5 ms in float32; a training step ≈15× slower), so
    there ``bfloat16`` runs its GEMMs in float32 and says so. A GPU without bf16 is an
    error (``ValueError``).
    """
    if cfg.precision == "float32":
        return torch.float32
    problem = bf16_problem(device, "train.precision")
    if problem and problem[0] == "unsupported":
        raise ValueError(problem[1])
    if problem:
        say("[train] this CPU has no native bfloat16 GEMMs (AVX512-BF16/AMX); emulated they are "
            "many times slower than float32, so train.precision=bfloat16 runs its GEMMs in "
            "float32 here")
        return torch.float32
    return torch.bfloat16


def choose_cpu_gemm(cfg: TrainSection, device: torch.device, dtype: torch.dtype,
                    modules: tuple[torch.nn.Module, ...], steps_per_epoch: int,
                    say: Callable[[str], None], *, kernels: str = "autograd") -> dict | None:
    """For float32 training on the CPU: which path this run's products take, measured
    both ways on this run's own step (:func:`aether_scale.gemm.calibrate`): the AE and
    text projectors (copies of ``modules``: the run's weights are not touched) run as the
    run will run them (:class:`~.heads.Heads` with ``kernels``: compiled, when the run
    compiles), on random inputs of one batch, both views, and the loss, forward and
    backward. None (the default path, nothing measured) on other devices and dtypes and
    for runs under :data:`CALIBRATE_MIN_STEPS` steps per epoch.

    The compiled step is what is timed because it is what the run steps, and the paths
    can rank differently there (inductor fuses around aten's products but keeps the
    oneDNN op opaque): on the 2-core Zen 4 one run measured the eager step at oneDNN/BLAS
    17.8/17.1 ms (oneDNN kept) and a later one the compiled step at 16.4/13.9 ms (BLAS
    kept); a third process, compiled, measured 12.1/13.7 ms. That host's noise (±25 %
    for one step) is as large as the gap, so there the choice is near a coin toss. On a
    2-core Zen 5 (full-width AVX-512) it is not: 6.0 vs 9.2 ms, oneDNN kept, and the
    command forced onto each path ran 4.8 vs 7.6 s/epoch (2026-12-03). Each path's graph
    is compiled once here and the run's own Heads reuses it (dynamo caches the graph per path, not per module instance), so
    the measurement costs one compilation more than the run makes anyway. The returned
    dict's ``kernels`` is how the copies ran (``autograd`` when compiling them failed:
    the run then does not try again)."""
    import copy

    from .. import gemm
    from ..loss import AetherLoss
    from .heads import Heads

    if device.type != "cpu" or dtype != torch.float32 or steps_per_epoch < CALIBRATE_MIN_STEPS:
        return None
    ae, txt = (copy.deepcopy(m).train() for m in modules)
    heads = Heads(ae, txt, kernels=kernels, compute_dtype=dtype)
    b = int(cfg.batch_size)
    views = 2 if cfg.use_aug else 1  # the AE projector sees base and augmented rows
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(views * b, ae.in_dim, generator=g), dim=1)
    t = torch.randn(b, txt.in_dim, generator=g)
    loss_fn = AetherLoss(cfg.lam, cfg.tau_ae, cfg.tau_poi, use_aug=cfg.use_aug)
    params = list(heads.parameters())

    def step() -> None:
        z, z_t = heads(x, t)
        z_b, z_a = z.split(b) if views == 2 else (z, None)
        try:
            loss_fn(z_b, z_a, z_t).loss.backward()
        except Exception as e:  # noqa: BLE001 - the compiled backward failing, as in the loop
            heads.fall_back("the compiled backward", e)
        for p in params:
            p.grad = None

    shapes = (b, views, ae.in_dim, txt.in_dim, tuple(p.shape for p in params), cfg.lam,
              cfg.use_aug, kernels)
    cal = gemm.calibrate(step, key=("train-step", shapes))
    cal["kernels"] = heads.kernels
    if cal["measured"]:
        ms = cal["ms"]
        how = "compiled" if heads.kernels == "compile" else "eager"
        say(f"[train] float32 CPU products: {cal['backend']} (this run's {how} step, forward "
            f"and backward, measured here: oneDNN {ms['onednn']:.1f} ms, torch's BLAS "
            f"{ms['blas']:.1f} ms; AETHER_CPU_GEMM=onednn|blas sets it)")
    return cal


def make_optimizer(params, cfg: TrainSection, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused when the device supports it (CPU and CUDA in current torch), else foreach."""
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, foreach=device.type != "cpu" or None, **kw)


def write_json(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def rng_state(device: torch.device) -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)
