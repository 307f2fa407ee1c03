"""``train`` stage: the AETHER projector trained on ``triplets.zarr`` → ``model/``.

- :func:`train_model` — one training run (any triplets store → a folder with
  ``checkpoint.pt`` (best-on-train), ``last.pt`` (resumable) and ``metrics.json``).
- :func:`run_train` — the workspace stage: ``model/`` and, when
  ``evaluate.noaug`` is set, ``model_noaug/`` ("AETHER w/o aug").
- :mod:`aether_scale.train.loader` — in-memory and streaming batch sources.
- :mod:`aether_scale.train.fused` — the CPU training kernels of both heads
  (one autograd node each; ``train.precision: bfloat16`` = bf16 GEMM operands).

CPU note: on cores shared with other jobs, OpenMP's default busy-waiting makes
torch's intra-op threads stall at every parallel region (measured on 2 shared
cores: 705 ms/step with 2 threads vs 45 ms/step with ``OMP_WAIT_POLICY=PASSIVE``
set before torch is imported, or ~50 ms/step with ``train.threads: 1``).
"""

from .loader import InMemoryBatches, StreamingBatches, TripletStore, TripletStoreError
from .trainer import cosine_lr, run_train, train_model, write_triplets

__all__ = [
    "train_model",
    "run_train",
    "cosine_lr",
    "write_triplets",
    "TripletStore",
    "TripletStoreError",
    "InMemoryBatches",
    "StreamingBatches",
]
