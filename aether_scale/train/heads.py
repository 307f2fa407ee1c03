"""The training forward: both projectors as one module, how it runs (eager autograd or
``torch.compile``, float32 or bfloat16 autocast), and the held-out triplets' losses.

:func:`choose_kernels` resolves ``train.kernels: auto`` for a run; :class:`Heads` is
what the loop of :mod:`.loop` wraps in DDP and steps with one optimizer;
:func:`validate` gives the ``val_*`` metrics of an epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..config import TrainSection
from ..loss import AetherLoss
from ..model import AEProj, TextProj
from .loader import InMemoryBatches

__all__ = ["COMPILE_MIN_STEPS", "KERNELS", "Heads", "choose_kernels", "validate",
           "warn_compile_failed"]

#: ``train.kernels`` values: how the training forward runs (see :class:`Heads`)
KERNELS = ("autograd", "compile")

#: ``train.kernels: auto`` compiles on CPU when an epoch has at least this many steps:
#: compilation (≈10 s once per process and batch shape on 2 cores) then pays for itself
#: within the first epoch; small runs (tests, demos) run the modules eagerly
COMPILE_MIN_STEPS = 256


def choose_kernels(cfg: TrainSection, device: torch.device, steps_per_epoch: int) -> str:
    """``train.kernels`` resolved. ``auto``: ``compile`` on CPU for epochs of at least
    :data:`COMPILE_MIN_STEPS` steps (the fastest in the same-run A/B of
    ``benchmarks/bench_train.py``: at 340k triplets 1.25× autograd's epoch; the former
    hand-written fused kernels were 1.04× compile and were removed), else ``autograd``."""
    if cfg.kernels == "auto":
        return "compile" if device.type == "cpu" and steps_per_epoch >= COMPILE_MIN_STEPS else "autograd"
    return cfg.kernels


def warn_compile_failed(what: str, e: Exception) -> None:
    """The one warning of a compiled run falling back to the eager modules (``what``:
    the part that failed, e.g. ``torch.compile`` or ``the compiled backward``)."""
    first = str(e).splitlines()[0] if str(e) else ""
    warnings.warn(f"train.kernels=compile: {what} failed ({type(e).__name__}: {first}); "
                  "running the modules eagerly (train.kernels=autograd)", RuntimeWarning,
                  stacklevel=4)


class Heads(nn.Module):
    """Both projectors as one module (one DDP wrapper, one optimizer).

    ``kernels`` (``train.kernels``) picks how the training forward runs:
    ``"autograd"`` calls the modules (under autocast when ``compute_dtype`` is
    bfloat16), ``"compile"`` the same function through ``torch.compile`` (compiled
    on the first training batch of each shape; eval mode runs the modules). Outputs
    are float32 either way.
    """

    def __init__(self, ae: AEProj, txt: TextProj, *, kernels: str = "autograd",
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"train.kernels must be one of {KERNELS}, got {kernels!r}")
        self.ae, self.txt = ae, txt
        self.kernels, self.compute_dtype = kernels, compute_dtype
        self._compiled: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        self._compiled_once = False

    def _run_modules(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.compute_dtype != torch.float32
        with torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=low):
            z, z_t = self.ae(x), self.txt(t)
        return z.float(), z_t.float()

    def fall_back(self, what: str, e: Exception) -> None:
        """After ``e`` in a compiled step (``what`` failed): run the modules eagerly from
        now on, with one warning; ``e`` itself is raised when nothing was compiled."""
        if self.kernels != "compile":
            raise e
        warn_compile_failed(what, e)
        self.kernels = "autograd"

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kernels == "compile" and self.training:
            if self._compiled is None:
                self._compiled = torch.compile(self._run_modules, dynamic=False)
            try:
                return self._compiled(x, t)
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for inductor's CPU code
                if self._compiled_once:
                    raise
                self.fall_back("torch.compile", e)
                return self._run_modules(x, t)
            finally:
                self._compiled_once = self.kernels == "compile"
        return self._run_modules(x, t)


@torch.no_grad()
def validate(heads: Heads, val: InMemoryBatches, cfg: TrainSection, *, use_aug: bool
             ) -> dict[str, float]:
    """The held-out triplets' mean losses in eval mode (no dropout), over fixed batches of
    ``val.batch_size`` rows in store order, one process (every rank gets the same)."""
    was = heads.training
    heads.eval()
    loss_fn = AetherLoss(cfg.lam, cfg.tau_ae, cfg.tau_poi, use_aug=use_aug)
    sums = np.zeros(3)
    nb = 0
    b = val.batch_size
    for a in range(0, max(val.n - b + 1, 1), b):
        base, text = val.base[a:a + b], val.text[a:a + b]
        if use_aug:
            z, z_p = heads(torch.cat((base, val.aug[a:a + b])), text)
            z_b, z_a = z.split(base.shape[0])
        else:
            (z_b, z_p), z_a = heads(base, text), None
        out = loss_fn(z_b, z_a, z_p)
        sums += [float(out.loss), float(out.L_AE) if out.L_AE is not None else 0.0,
                 float(out.L_AP)]
        nb += 1
    heads.train(was)
    m = sums / max(nb, 1)
    return {"val_loss": float(m[0]), "val_L_AE": float(m[1]) if use_aug else None,
            "val_L_AP": float(m[2])}
