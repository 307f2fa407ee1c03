"""Projector variants for the kernel A/B of ``bench_infer.py`` (importable by dask workers).

Both are :class:`~aether_scale.model.AEProj` with the same weights; overriding
``forward`` makes the inference kernel call them as modules instead of through its
fused evaluator (``_FusedAEProj.fits`` accepts only ``AEProj.forward`` itself).
"""

from __future__ import annotations

import torch

from aether_scale.model import AEProj


class PlainAEProj(AEProj):
    """The module's own forward, eager."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return AEProj.forward(self, x)


class CompiledAEProj(AEProj):
    """The module's forward through ``torch.compile`` (compiled once per process)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        fn = self.__dict__.get("_compiled")
        if fn is None:
            fn = self.__dict__["_compiled"] = torch.compile(
                lambda t: AEProj.forward(self, t), dynamic=True)
        return fn(x)

    def __getstate__(self):  # the compiled function stays in its process
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_compiled", None)
        return state


def variant(base: AEProj, cls: type[AEProj]) -> AEProj:
    """A copy of ``base`` (same weights) as ``cls``."""
    import copy

    m = copy.deepcopy(base)
    m.__class__ = cls
    return m.eval()
