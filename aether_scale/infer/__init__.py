"""The ``infer`` stage: the trained AE projector over every pixel of ``ae.zarr`` → fields.

The AETHER *field* is the projector f_θ applied to every AlphaEarth pixel (DESIGN.md,
"inference"): :mod:`.stage` (one resumable task per field chunk, :func:`infer_field`),
:mod:`.kernel` (the projector over a chunk's pixels in cache-sized batches,
:func:`project_pixels`) and :mod:`.models` (the model shipped once per worker). The store is
:mod:`aether_scale.stores.field`. Benchmark: ``benchmarks/bench_infer.py``.
"""

from .kernel import INT8_SCALE, project_pixels
from .models import model_load_count
from .stage import field_chunk, infer_field

__all__ = ["INT8_SCALE", "field_chunk", "infer_field", "model_load_count", "project_pixels"]
