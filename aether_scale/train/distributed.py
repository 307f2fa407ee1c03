"""Several processes (torchrun): joining the process group, per-rank seeds, rank 0 leads.

Under ``torchrun --nproc-per-node N -m aether_scale.cli train …`` every rank runs the
CLI. Rank 0 owns the workspace — it takes the stage's lock, decides whether the stage
is current and writes the outputs — and tells the other ranks (:func:`tell_ranks`):
``go`` (they join each training run, :func:`aether_scale.train.stage.follow`, writing
nothing) or
``skip``. :class:`Ranks` is what the stage registry uses for this.
"""

from __future__ import annotations

import os

import torch

from .loader import Shard, epoch_seed

__all__ = ["Ranks", "rank_seed", "tell_ranks"]

_RANK_SALT = 0x52414E4B  # keeps rank seeds apart from the loader's per-epoch shuffle seeds


def _env_shard() -> Shard:
    """(rank, world_size) from torchrun's environment; (0, 1) when not distributed."""
    w = int(os.environ.get("WORLD_SIZE", "1"))
    return Shard(int(os.environ.get("RANK", "0")), w) if w > 1 else Shard()


def _init_distributed(device: torch.device) -> Shard:
    """Join the process group when launched by torchrun (idempotent)."""
    shard = _env_shard()
    if shard.world_size == 1:
        return shard
    import torch.distributed as dist

    if device.type == "cuda":  # NCCL and the object collectives use the current device
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    if dist.get_world_size() != shard.world_size:
        raise RuntimeError("WORLD_SIZE does not match the initialised process group")
    return Shard(dist.get_rank(), dist.get_world_size())


def rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank``'s generator, distinct per rank and a pure function of both."""
    return epoch_seed(seed, rank, salt=_RANK_SALT)


def tell_ranks(decision: str) -> None:
    """Rank 0 → other ranks: whether the stage trains (``go``) or is up to date (``skip``)."""
    if _env_shard().world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list([decision], src=0)


class Ranks:
    """This process's rank under torchrun (0 when not distributed)."""

    def __init__(self) -> None:
        self.shard = _env_shard()

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def distributed(self) -> bool:
        return self.shard.world_size > 1
