"""Phrases → vectors in the field's space: the run's text encoder, then the trained text
projector.

AETHER trains the AE projector and the text projector together, so a phrase encoded
by *the same* sentence encoder that embedded the POI texts and projected by the text
head is comparable with every field pixel (both are unit vectors in one space). A
different encoder (another model, other weights, other normalisation) gives vectors
the text head never saw: :func:`encode_phrases` refuses it, naming both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config import TextSection
from ..logs import get_logger

__all__ = ["QueryError", "check_phrases", "encode_phrases", "recorded_encoder"]

log = get_logger("query")


class QueryError(ValueError):
    """A query that cannot be answered as asked; the message says how to fix it."""


def check_phrases(phrases: Sequence[str]) -> list[str]:
    """The phrases, stripped, each once (a repeat is computed once, with a warning).

    Raises :class:`QueryError` for no phrase or an empty one."""
    if isinstance(phrases, str):
        phrases = [phrases]
    out: list[str] = []
    for i, p in enumerate(phrases, 1):
        if not isinstance(p, str) or not p.strip():
            raise QueryError(f"query phrase {i} of {len(phrases)} is empty ({p!r}); give a "
                             "description such as \"a place of cafes\"")
        p = " ".join(p.split())
        if p in out:
            log.warning(f"[query] phrase {p!r} given twice: computed once")
            continue
        out.append(p)
    if not out:
        raise QueryError("no query phrase given; e.g. aether-scale query -w WS "
                         "\"a place of cafes\"")
    return out


def recorded_encoder(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The text encoder a checkpoint says embedded its training texts (None when it does
    not say: reference checkpoints, or ones written before it was recorded)."""
    enc = (checkpoint.get("config") or {}).get("text_encoder")
    return dict(enc) if isinstance(enc, Mapping) and enc.get("model_key") else None


def _run_encoder(text: TextSection) -> dict[str, Any]:
    from ..text.model import model_identity

    key, _ = model_identity(text.model, text.normalize)
    return {"model": text.model, "model_key": key, "normalize": bool(text.normalize)}


def _check(recorded: Mapping[str, Any] | None, run: Mapping[str, Any], text_dim: int,
           where: str, fallback: Mapping[str, Any] | None) -> dict[str, Any]:
    if recorded is None and fallback is not None and fallback.get("model_key"):
        log.warning(f"[query] {where} does not record its text encoder; using the one "
                    "text.zarr records (the texts it was trained on)")
        recorded = fallback
    if recorded is None:
        log.warning(f"[query] {where} does not record its text encoder and the workspace has no "
                    f"text.zarr to say: assuming text.model {run['model']!r} trained it")
        return {**run, "verified": False}
    if recorded["model_key"] != run["model_key"]:
        raise QueryError(
            f"{where} was trained on texts embedded by {recorded.get('model')!r} (identity "
            f"{recorded['model_key']}, normalize={recorded.get('normalize')}), but this run's "
            f"text encoder is {run['model']!r} (identity {run['model_key']}, "
            f"normalize={run['normalize']}): its phrase vectors would not match the field. Set "
            f"text.model (and text.normalize) to what trained the model, e.g. --set "
            f"text.model={recorded.get('model')}")
    if recorded.get("dim") is not None and int(recorded["dim"]) != text_dim:
        raise QueryError(f"{where}: its text head takes {text_dim}-d vectors but the recorded "
                         f"encoder gives {recorded['dim']}-d; the checkpoint is inconsistent — "
                         "retrain")
    return {**run, "dim": text_dim, "verified": True}


def encode_phrases(phrases: Sequence[str], model_dir: str | os.PathLike, text: TextSection,
                   *, text_store: Mapping[str, Any] | None = None
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """``(vectors (k, out_dim) float32 unit rows, encoder info)`` for ``phrases``.

    ``model_dir``: a model folder or checkpoint (local path); ``text``: the run's text
    section (its encoder must be the one the checkpoint records — else
    :class:`QueryError`); ``text_store``: the attrs of the workspace's ``text.zarr``
    (consulted when the checkpoint records no encoder).
    """
    import torch

    from ..model import load_checkpoint, load_text_projector
    from ..text import embed_texts

    phrases = check_phrases(phrases)
    ck = load_checkpoint(model_dir)
    head = load_text_projector(model_dir)
    where = f"model {model_dir}"
    info = _check(recorded_encoder(ck), _run_encoder(text), int(head.in_dim), where,
                  text_store and {k: text_store.get(k) for k in ("model", "model_key", "dim")})
    raw = embed_texts(phrases, text)
    if raw.shape[1] != head.in_dim:
        raise QueryError(f"text.model {text.model!r} gives {raw.shape[1]}-d vectors but the text "
                         f"head of {where} takes {head.in_dim}-d ones (a checkpoint trained with "
                         "another encoder, e.g. a reference checkpoint's OpenAI embeddings); "
                         "query a model trained in this workspace")
    with torch.no_grad():
        vec = head(torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))).numpy()
    return np.ascontiguousarray(vec, dtype=np.float32), info
