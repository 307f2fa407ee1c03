"""The projector on the workers: shipped once, unpickled once per process, cached.

The model's pickled bytes are scattered to every worker (``broadcast=True``) and each
process keeps the unpickled module in a cache keyed by the bytes' SHA-256, so tasks
only look it up (:func:`model_load_count` tells how many times a process unpickled
it). Without a distributed client the same cache serves the in-process scheduler.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from collections import Counter

import torch

__all__ = ["model_load_count"]

_MODEL_CACHE: dict[tuple[str, str], torch.nn.Module] = {}
_LOAD_COUNTS: Counter[str] = Counter()
_CACHE_LOCK = threading.Lock()
_THREADS_SET: list[int] = []

def model_load_count(key: str | None = None) -> int:
    """How many times this process unpickled a model (``key``: one model's hash; None: all).

    Each worker should report 1 per model after a field inference: the
    model's bytes are shipped once and the module is cached per process.
    """
    return _LOAD_COUNTS[key] if key is not None else sum(_LOAD_COUNTS.values())


def model_key(module: torch.nn.Module) -> str:
    """A content hash of a projector: its class and every parameter and buffer (names,
    dtypes, shapes, values) — the same weights give the same key in every process
    (pickled bytes do not: they carry per-process storage details)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def _model_payload(projector: torch.nn.Module) -> tuple[bytes, str]:
    """Pickled bytes of the CPU, eval-mode projector and its content key (the cache key)."""
    module = projector.to("cpu").eval()
    blob = pickle.dumps(module, protocol=pickle.HIGHEST_PROTOCOL)
    return blob, model_key(module)


def _cached_model(key: str, payload: bytes | None, device: str) -> torch.nn.Module:
    """The process's copy of the model ``key`` on ``device`` (unpickled at most once)."""
    with _CACHE_LOCK:
        m = _MODEL_CACHE.get((key, device))
        if m is not None:
            return m
        cpu = _MODEL_CACHE.get((key, "cpu"))
        if cpu is None:
            if payload is None:
                raise RuntimeError(f"model {key} is not cached in this process and no bytes were sent")
            cpu = pickle.loads(payload).eval()
            _LOAD_COUNTS[key] += 1
            _MODEL_CACHE[(key, "cpu")] = cpu
        m = cpu if device == "cpu" else cpu.to(device)
        _MODEL_CACHE[(key, device)] = m
        return m


def _set_threads(n: int) -> None:
    """Limit torch's intra-op threads once per process (dask provides the parallelism)."""
    if not _THREADS_SET or _THREADS_SET[-1] != n:
        torch.set_num_threads(n)
        _THREADS_SET.append(n)


def seed_cache(key: str, projector: torch.nn.Module) -> None:
    """Put this process's own copy of the model in the cache (in-process schedulers)."""
    with _CACHE_LOCK:
        _MODEL_CACHE.setdefault((key, "cpu"), projector)
