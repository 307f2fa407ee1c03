"""``model/`` and ``model_<variant>/``: the trained projectors (written by ``train``).

Each folder holds ``checkpoint.pt`` (best-on-train: state dicts of both heads and the
config that trained them, :mod:`aether_scale.model` format), ``last.pt`` (resumable
state) and ``metrics.json`` (per-epoch losses and seconds, the best epoch, row
counts). A folder is complete when ``checkpoint.pt`` is there. The folders may live
on an fsspec workspace: :func:`load_projector` and :func:`read_metrics` read through
it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

__all__ = ["CHECKPOINT", "METRICS", "NAME", "load_projector", "read_metrics"]

NAME = "model"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


def _fs(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(str(uri), **dict(storage_options or {}))


def load_projector(uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None
                   ) -> Any:
    """The AE projector of a model folder (or checkpoint file), in eval mode on CPU.

    Raises :class:`~aether_scale.model.CheckpointError` naming the file for a missing,
    unsafe or unfitting checkpoint.
    """
    from ..model import CheckpointError
    from ..model import load_projector as load_local

    uri = str(uri)
    if "://" not in uri:
        return load_local(uri)
    from ..model import BUNDLE_WEIGHTS

    fs, root = _fs(uri, storage_options)
    if fs.isdir(root):  # a train output (checkpoint.pt) or a model bundle (model.safetensors)
        ck = next((f"{root.rstrip('/')}/{n}" for n in (CHECKPOINT, BUNDLE_WEIGHTS)
                   if fs.exists(f"{root.rstrip('/')}/{n}")), None)
    else:
        ck = root if fs.exists(root) else None
    if ck is None:
        raise CheckpointError(f"model folder {uri} has no {CHECKPOINT} (is it a finished "
                              f"'train' output?) and no {BUNDLE_WEIGHTS} (a model bundle)")
    with tempfile.TemporaryDirectory(prefix="aether-model-") as d:
        local = os.path.join(d, os.path.basename(ck))
        fs.get(ck, local)
        return load_local(local)


def read_metrics(uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None
                 ) -> dict[str, Any] | None:
    """The folder's ``metrics.json`` (None when it has none)."""
    fs, root = _fs(str(uri), storage_options)
    path = f"{root.rstrip('/')}/{METRICS}"
    try:
        return json.loads(fs.cat_file(path).decode("utf-8"))
    except FileNotFoundError:
        return None
