"""Pooling: raster values averaged in buffers around points or inside polygons.

Public API (used by the pool stage and by region features later)::

    from aether_scale.pooling import pool_buffers, pool_polygons, run_pool

See :mod:`.engine` (points), :mod:`.kernels` (the prefix-sum algorithm),
:mod:`.polygons` and :mod:`.stage` (``triplets.zarr``).
"""

from .engine import PoolBlock, PoolPlan, PoolResult, plan_pool, pool_buffers
from .polygons import PolygonPoolResult, pool_polygons
from .stage import run_pool

__all__ = [
    "PoolBlock",
    "PoolPlan",
    "PoolResult",
    "PolygonPoolResult",
    "plan_pool",
    "pool_buffers",
    "pool_polygons",
    "run_pool",
]
