"""The ``pool`` stage and the pooling engine: raster values averaged in buffers around
points or inside polygons.

Public API (used by the pool stage and by the region features)::

    from aether_scale.pool import pool_buffers, pool_polygons, plan_pool

See :mod:`.engine` (points, one task per raster chunk), :mod:`.tasks` (what a chunk's
task computes, its ledger record for resume, the sliding window of submissions),
:mod:`.kernels` (the prefix-sum algorithm), :mod:`.polygons` and :mod:`.stage`
(``triplets.zarr``).
"""

from .engine import PoolBlock, PoolPlan, PoolResult, plan_pool, pool_buffers
from .polygons import PolygonPoolResult, pool_polygons

__all__ = [
    "PoolBlock",
    "PoolPlan",
    "PoolResult",
    "PolygonPoolResult",
    "plan_pool",
    "pool_buffers",
    "pool_polygons",
]
