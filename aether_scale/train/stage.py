"""The ``train`` stage: ``triplets.zarr`` → ``model/`` and one ``model_<name>/`` per variant.

The stage owns its variants: ``train.variants`` maps a name to the train keys that
differ from the main model (default ``{"noaug": {"use_aug": false}}``, the paper's
"AETHER w/o aug"). Each model trains in the stage's work folder (keyed by the stage's
inputs and learned config), so a rerun after a crash resumes from its ``last.pt``;
a variant whose training equals an earlier one is copied, not trained again.
Under torchrun (``WORLD_SIZE>1``) rank 0 runs the stage and the other ranks join
each training run (:mod:`.distributed`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from ..config import RunConfig, TrainSection
from ..devices import resolve_device
from ..pipeline import ARTIFACTS, train_variants
from .distributed import Ranks, _init_distributed, tell_ranks
from .loop import train_model

__all__ = ["build", "follow", "ranks", "tell", "train_jobs"]


def train_jobs(cfg: RunConfig) -> list[tuple[str, TrainSection, str | None]]:
    """``(output, train section, same_as)`` for every model the stage makes; ``same_as``
    names an earlier output with the identical training (then the output is a copy)."""
    model = ARTIFACTS["model"]
    jobs: list[tuple[str, TrainSection, str | None]] = []
    for v in train_variants(cfg):
        sub = cfg.train.variant(v)
        same = next((name for name, s, _ in jobs if s == sub), None)
        jobs.append((model.variant(v), sub, same))
    return jobs


def build(ctx) -> dict[str, Any]:
    """Train every model of ``train_jobs`` into the stage's outputs."""
    tell_ranks("go")
    src = ctx.reads["triplets.zarr"]
    stats: dict[str, Any] = {}
    for name, sub, same in train_jobs(ctx.cfg):
        out = ctx.outputs[name]
        if same is not None:
            ctx.log.info(f"[train] {name}: the same training as {same}; copied")
            stats[name] = dict(stats[same])
            ctx.ws.fs.copy(ctx.outputs[same], out, recursive=True)
            continue
        where = out if ctx.ws.is_local else ctx.work.local_dir(f"train-{name}")
        if ctx.force and os.path.exists(where):
            shutil.rmtree(where)
        diff = {k: v for k, v in sub.model_dump().items()
                if getattr(ctx.cfg.train, k) != v and k != "variants"}
        ctx.log.info(f"[train] {name}" + (f" ({diff})" if diff else ""))
        stats[name] = train_model(src, sub, where, resume=True, log=ctx.log.info,
                                  storage_options=ctx.storage_options)
        if not ctx.ws.is_local:
            ctx.ws.fs.put(where, out, recursive=True)
    return stats


def follow_rank0(src: str, jobs: list[tuple[str, Any, str | None]],
                 storage_options: dict | None) -> bool:
    """Non-zero ranks: wait for rank 0's decision, then join each training run (writing
    into a scratch folder that is removed). ``jobs``: ``(output, train section,
    same_as)``. Returns whether the stage was skipped."""
    import torch.distributed as dist

    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] == "go":
        scratch = tempfile.mkdtemp(prefix="aether_rank")
        try:
            for name, sub, same in jobs:
                if same is None:  # rank 0 hands its resume state over in train_model
                    train_model(src, sub, os.path.join(scratch, name), resume=True, log=None,
                                storage_options=storage_options or None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return box[0] != "go"


def ranks(cfg: RunConfig) -> Ranks:
    """This process's rank; under torchrun the process group is joined here, before
    rank 0 takes the workspace lock."""
    r = Ranks()
    if r.distributed:
        _init_distributed(resolve_device(cfg.train.device, key="train.device"))
    return r


def follow(ws, cfg: RunConfig, plan) -> bool:
    """A non-zero rank's part of the stage: join rank 0's training runs. Returns whether
    rank 0 found the stage current (skipped)."""
    return follow_rank0(plan.reads["triplets.zarr"], train_jobs(cfg), ws.storage_options or None)


def tell(decision: str) -> None:
    tell_ranks(decision)
