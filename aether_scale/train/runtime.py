"""The machinery around the training loop on this device: heap retention, GEMM precision,
the optimizer, RNG state, atomic JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

from ..config import TrainSection
from ..devices import bf16_problem

__all__ = ["compute_dtype", "make_optimizer", "rng_state",
           "set_rng_state", "write_json"]




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
