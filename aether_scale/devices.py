"""One device rule and one CPU-thread rule for every stage (text, train, infer).

``auto`` is CUDA when this process sees a CUDA device (``cuda:LOCAL_RANK`` under
torchrun), else the CPU. An explicitly requested device that is absent is an error
naming the config key — never a silent fallback, so a run meant for a GPU does not
quietly take a hundred times longer on a CPU.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DeviceError", "bf16_problem", "choose_threads", "local_cores", "resolve_device"]


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


#: a core busier than this (other processes) counts as taken when choosing torch threads
_BUSY_PERCENT = 50.0


def local_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def choose_threads(requested: int | None, *, key: str) -> tuple[int, str]:
    """Torch intra-op threads for work in this process, and why.

    ``requested`` (the config's ``threads``) wins. Otherwise one thread per core that is
    idle now: OpenMP threads spin-wait for each other at every parallel region, so one
    thread on a core another process uses stalls them all (measured on 2 cores with one
    busy: 2.3 s/epoch with 2 threads, 0.9 s with 1; idle, 2 threads are 1.5× faster than
    1). The state of the cores is sampled once, for 0.2 s.
    """
    n_cores = local_cores()
    if requested:
        return int(requested), f"{key}={requested}"
    try:
        import psutil

        busy = sum(p > _BUSY_PERCENT for p in psutil.cpu_percent(interval=0.2, percpu=True))
    except Exception:  # noqa: BLE001 - no reading: assume the cores are ours
        busy = 0
    busy = min(busy, n_cores - 1)
    n = max(1, n_cores - busy)
    why = (f"{n} of {n_cores} cores" + (f" ({busy} busy with other work)" if busy else " (idle)")
           + f"; set {key} to choose")
    return n, why


def bf16_problem(device: Any, key: str) -> tuple[str, str] | None:
    """Why ``bfloat16`` GEMMs would not pay off on ``device``: ``("slow", msg)`` on a CPU
    without native bf16 (AVX512-BF16/AMX), ``("unsupported", msg)`` on a GPU below compute
    capability 8.0, None when bf16 is native."""
    import torch

    device = torch.device(device)
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return ("slow", f"this CPU has no native bfloat16 GEMMs (AVX512-BF16/AMX): {key}: "
                        "bfloat16 will be much slower than float32 here")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return ("unsupported", f"{key} is bfloat16 but {torch.cuda.get_device_name(device)} "
                               "has no native bf16 (compute capability < 8.0); use float32")
    return None
