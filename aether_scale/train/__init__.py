"""The ``train`` stage: the AETHER projector trained on ``triplets.zarr`` → ``model/``.

- :mod:`.loop` — :func:`train_model`, one training run (any triplets store → a folder
  with ``checkpoint.pt`` (best-on-train), ``last.pt`` (resumable) and ``metrics.json``);
- :mod:`.stage` — the registered stage: ``model/`` and one ``model_<name>/`` per entry
  of ``train.variants`` (default: ``model_noaug/``, "AETHER w/o aug");
- :mod:`.loader` — in-memory and streaming batch sources;
- :mod:`.distributed` — torchrun: process group, per-rank seeds, rank 0 leads;
- :mod:`.runtime` — heap retention, GEMM precision, the optimizer, RNG state.

The store read is :mod:`aether_scale.stores.triplets`.

CPU note: on cores shared with other jobs, OpenMP's default busy-waiting makes
torch's intra-op threads stall at every parallel region (measured on 2 shared
cores: 705 ms/step with 2 threads vs 45 ms/step with ``OMP_WAIT_POLICY=PASSIVE``
set before torch is imported, or ~50 ms/step with ``train.threads: 1``).
"""

from .loader import InMemoryBatches, StreamingBatches
from .loop import cosine_lr, train_model

__all__ = ["InMemoryBatches", "StreamingBatches", "cosine_lr", "train_model"]
