"""One device rule for every stage (text, train, infer).

``auto`` is CUDA when this process sees a CUDA device (``cuda:LOCAL_RANK`` under
torchrun), else the CPU. An explicitly requested device that is absent is an error
naming the config key — never a silent fallback, so a run meant for a GPU does not
quietly take a hundred times longer on a CPU.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(ValueError):
    """A configured device this process does not have."""


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(spec: str, *, key: str) -> Any:
    """``spec`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``) → a ``torch.device``.

    ``key`` is the config key the spec came from (named in errors). A bare ``cuda``
    takes ``LOCAL_RANK`` as its index (torchrun's one process per GPU). Raises
    :class:`DeviceError` when the device is not present or the spec is not a device.
    """
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    spec = (spec or "auto").strip()
    if spec == "auto":
        return torch.device(f"cuda:{local}") if _cuda_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"{key} is {spec!r}, which is not a device; use auto, cpu, cuda, "
                          "cuda:N or mps") from None
    if dev.type == "cuda":
        if not _cuda_available():
            raise DeviceError(
                f"{key} is {spec!r} but this process sees no CUDA device "
                "(torch.cuda.is_available() is False); use 'auto' or 'cpu', or install the "
                "CUDA build of torch (see README, GPU machines)")
        n = torch.cuda.device_count()
        index = local if dev.index is None else dev.index
        if index >= n:
            raise DeviceError(f"{key} is {spec!r} but only {n} CUDA device(s) are visible")
        return torch.device(f"cuda:{index}")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"{key} is 'mps' but MPS is not available here; use 'auto' or 'cpu'")
    elif dev.type != "cpu":
        raise DeviceError(f"{key} is {spec!r}; supported devices are cpu, cuda and mps")
    return dev
