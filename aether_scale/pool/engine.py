"""Pooling of a raster in buffers around points, as a dask computation over chunks.

Each raster chunk that any buffer reaches becomes ONE task, which reads that
chunk (exactly once, no halo) and computes the partial sums of every buffer
reaching into it — points are grouped by the chunks their buffers touch, so
buffers may be wider than a chunk. There is no task and no Python loop per
point; the work per point is vectorised in :mod:`.kernels`, the task itself is
:func:`~.tasks.chunk_task`.

A task reads its chunk itself: it receives the (culled) dask graph of that
one chunk and computes it in-thread with the synchronous scheduler, so the
scheduler never holds raster data on a task's behalf and a worker's memory
is bounded by one chunk plus one strip of prefix sums per thread, whatever
the raster size.

Tasks are submitted through a sliding window and their results consumed in
chunk order (row-major over the chunk grid). Partial sums of a point are
added up on the client as they arrive (vectorised, by point index); a point
is complete, normalised and handed out once every chunk it touches has
reported. Results thus stream in a deterministic, spatially coherent order
with bounded memory, on the threaded scheduler as on any ``distributed``
cluster, and are bit-identical between the two.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import xarray as xr

from ..cluster import InTask
from ..config import BufferSpec
from ..logs import Progress
from ..stores.ledger import Ledger
from .grid import Grid, as_yxc, grid_of
from .kernels import Buffer, RegionSpec, finalize
from .tasks import TASK_PARTS, Recorded, chunk_task, run_windowed

DEFAULT_BLOCK_BYTES = 32 * 2**20
"""Cap on one strip's prefix-sum array inside a task (per worker thread; the strip's
decoded values take another half of it)."""


@dataclass
class PoolResult:
    """Pooled vectors for n points and B buffers (in the order the buffers were given).

    - ``vectors[b]``: (n, C) float32; NaN rows where buffer b holds no valid
      pixel or the point is outside the raster.
    - ``counts[b]``: (n,) int64 valid pixels pooled per point.
    - ``n_empty[b]``: points inside the raster whose buffer b has no valid pixel.
    - ``n_outside``: points on no pixel of the raster (``outside`` marks them).
    """

    vectors: list[np.ndarray]
    counts: list[np.ndarray]
    n_empty: list[int]
    n_outside: int
    outside: np.ndarray
    buffers: list[BufferSpec] = field(default_factory=list)

    def valid(self, b: int | None = None) -> np.ndarray:
        """Points with a vector in buffer ``b`` (every buffer when None)."""
        bs = range(len(self.counts)) if b is None else [b]
        ok = ~self.outside
        for i in bs:
            ok &= self.counts[i] > 0
        return ok


@dataclass
class PoolBlock:
    """Points completed when one chunk's task reported: rows ``index`` of the input points."""

    index: np.ndarray  # (m,) int64 positions into the x/y given to the plan
    vectors: np.ndarray  # (m, B, C) float32
    counts: np.ndarray  # (m, B) int64


def resolve_buffers(buffers: Sequence[BufferSpec | dict], grid: Grid) -> list[Buffer]:
    """BufferSpecs (or dicts of their fields) → kernel buffers on ``grid``."""
    out = []
    for b in buffers:
        spec = b if isinstance(b, BufferSpec) else BufferSpec.model_validate(b)
        if spec.shape == "circle":
            out.append(Buffer.circle(float(spec.radius_m), grid.dx, grid.dy))
        else:
            out.append(Buffer.square(int(spec.radius_px)))
    if not out:
        raise ValueError("pool_buffers needs at least one buffer")
    return out


class _Combiner:
    """Adds up per-chunk partial sums by point; hands out points whose chunks all reported."""

    def __init__(self, need: np.ndarray, shape: tuple[int, int]) -> None:
        self.need = need
        self.idx = np.zeros(0, dtype=np.int64)
        self.sums = np.zeros((0, *shape), dtype=np.float64)
        self.got = np.zeros(0, dtype=np.int64)

    def add(self, idx: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sums = sums.astype(np.float64, copy=False)  # integer-valued for codes: exact
        one = self.need[idx] == 1
        done_idx, done_sums = [idx[one]], [sums[one]]
        if not one.all():
            all_idx = np.concatenate([self.idx, idx[~one]])
            all_sums = np.concatenate([self.sums, sums[~one]])
            all_got = np.concatenate([self.got, np.ones(int((~one).sum()), dtype=np.int64)])
            order = np.argsort(all_idx, kind="stable")  # pending (earlier chunks) first
            uniq, start = np.unique(all_idx[order], return_index=True)
            tot = np.add.reduceat(all_sums[order], start, axis=0)
            got = np.add.reduceat(all_got[order], start)
            complete = got == self.need[uniq]
            done_idx.append(uniq[complete])
            done_sums.append(tot[complete])
            self.idx, self.sums, self.got = uniq[~complete], tot[~complete], got[~complete]
        return np.concatenate(done_idx), np.concatenate(done_sums)


class PoolPlan:
    """Points located on a raster and grouped into one pooling task per chunk they reach.

    Build it with :func:`plan_pool`; iterate :meth:`blocks` to run it.

    ``windows``: for a raster that is a workspace store, a function from a chunk's
    window ``(r0, r1, c0, c1)`` to what its task reads (a
    :class:`~aether_scale.stores.reads.CheckedWindow`: verified chunk reads); without
    it each task is handed the chunk's slice of ``da``'s dask graph, whose cost grows
    with the array.
    """

    def __init__(
        self,
        da: xr.DataArray,
        x: np.ndarray,
        y: np.ndarray,
        buffers: Sequence[BufferSpec | dict],
        *,
        normalize: bool = True,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        windows: Callable[[tuple[int, int, int, int]], Any] | None = None,
    ) -> None:
        da = as_yxc(da)
        if da.chunks is None:  # numpy-backed: give it a chunk layout
            da = da.chunk({"y": 1024, "x": 1024})
        self.da = da
        self.grid = g = grid_of(da)
        self.specs = [b if isinstance(b, BufferSpec) else BufferSpec.model_validate(b) for b in buffers]
        self.buffers = resolve_buffers(self.specs, g)
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
        self.x, self.y = x, y
        self.n = x.size
        self.normalize = normalize
        self.block_bytes = int(block_bytes)
        self.row, self.col, inside = g.locate(x, y)
        self.outside = ~inside
        # every chunk the buffers' bounding box touches: (point, chunk) pairs
        h, w = g.shape
        pr = max(b.pad_rows for b in self.buffers)
        pc = max(b.pad_cols for b in self.buffers)
        pts = np.flatnonzero(inside)
        bi0, bj0 = g.chunk_of(np.maximum(self.row[pts] - pr, 0), np.maximum(self.col[pts] - pc, 0))
        bi1, bj1 = g.chunk_of(np.minimum(self.row[pts] + pr, h - 1),
                              np.minimum(self.col[pts] + pc, w - 1))
        nbj = bj1 - bj0 + 1
        reps = (bi1 - bi0 + 1) * nbj
        self.need = np.zeros(self.n, dtype=np.int64)
        self.need[pts] = reps
        owner = np.repeat(np.arange(pts.size), reps)
        k = np.arange(owner.size) - np.repeat(np.cumsum(reps) - reps, reps)
        nbx = len(g.col_bounds) - 1
        key = (bi0[owner] + k // nbj[owner]) * nbx + bj0[owner] + k % nbj[owner]
        order = np.argsort(key, kind="stable")
        key, idx = key[order], pts[owner[order]]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if key.size else np.array([], int)
        ends = np.r_[starts[1:], key.size]
        self.groups: list[tuple[int, int, np.ndarray]] = [
            (int(key[s] // nbx), int(key[s] % nbx), idx[s:e]) for s, e in zip(starts, ends, strict=True)
        ]
        self._token = uuid.uuid4().hex[:10]
        self.windows = windows
        #: seconds per part summed over the last blocks() run's computed tasks
        #: (:data:`TASK_PARTS`, worker time) and ``combine`` (client: adding up and
        #: finalising partial sums)
        self.task_seconds: dict[str, float] = {}
        self.n_resumed = 0  # tasks loaded from a ledger by the last blocks() run
        self.n_retries = 0  # transient failures retried by the last blocks() run's tasks

    @property
    def n_outside(self) -> int:
        return int(self.outside.sum())

    @property
    def n_tasks(self) -> int:
        return len(self.groups)

    def task_key(self, k: int) -> str:
        """The ledger key of task ``k``: its raster chunk, ``"<row>.<col>"``."""
        bi, bj, _ = self.groups[k]
        return f"{bi}.{bj}"

    def _delayed(self, k: int, ledger: Ledger | None = None) -> Any:
        bi, bj, idx = self.groups[k]
        g = self.grid
        h, w = g.shape
        y0, y1 = int(g.row_bounds[bi]), int(g.row_bounds[bi + 1])
        x0, x1 = int(g.col_bounds[bj]), int(g.col_bounds[bj + 1])
        if self.windows is not None:  # the task reads its chunk itself: no graph slicing
            sub = self.windows((y0, y1, x0, x1))
        else:
            sub = self.da.data.blocks[bi, bj]
            if hasattr(sub, "__dask_graph__"):
                (sub,) = dask.optimize(sub)
        reg = RegionSpec(y0, x0, g.ys[y0:y1].copy(), g.xs[x0:x1].copy(), g.dy, g.dx, h, w)
        kw = dict(
            kind=g.kind, reg=reg, px=self.x[idx], py=self.y[idx], prow=self.row[idx],
            pcol=self.col[idx], buffers=self.buffers, block_bytes=self.block_bytes,
        )
        return dask.delayed(chunk_task, pure=False)(
            InTask(sub), InTask((idx, self.need[idx] == 1, self.normalize, kw)), ledger,
            self.task_key(k),
            dask_key_name=f"pool-chunk-{self._token}-{bi}-{bj}"
        )

    def blocks(self, *, window: int | None = None, ledger: Ledger | None = None,
               progress: Progress | None = None) -> Iterator[PoolBlock]:
        """Run the tasks; yield the points completed by each chunk, in chunk order.

        Every point inside the raster appears in exactly one :class:`PoolBlock`
        (after the last chunk its buffers touch has reported). At most
        ``window`` tasks are in flight (default: twice the number of worker
        threads), so results never pile up in worker memory. Uses the current
        ``distributed`` client when there is one, else the configured local
        dask scheduler.

        With a ``ledger`` (a folder in the stage's work area) every task records its
        result; tasks already recorded — by a killed run — are loaded, not computed
        (:attr:`n_resumed` counts them). ``progress`` advances once per task.
        """
        comb = _Combiner(self.need, (len(self.buffers), self.grid.n_channels + 1))
        done = ledger.done() if ledger is not None else {}
        self.n_resumed = sum(self.task_key(k) in done for k in range(self.n_tasks))

        def make(k: int) -> Any:
            if self.task_key(k) in done:
                return Recorded(ledger, self.task_key(k))
            return self._delayed(k, ledger)

        self.n_retries = 0
        secs = self.task_seconds = dict.fromkeys((*TASK_PARTS, "combine"), 0.0)
        for res in run_windowed(make, len(self.groups), window=window, progress=progress):
            t0 = time.perf_counter()
            self.n_retries += int(res.retries)
            for k, v in res.seconds.items():
                secs[k] = secs.get(k, 0.0) + float(v)
            done, tot = comb.add(res.index, res.sums)
            blk = None
            if done.size:  # points finished here (after those the task finished itself)
                vec, cnt = finalize(tot, self.grid.kind, normalize=self.normalize)
                blk = (np.concatenate([res.done_index, done]),
                       np.concatenate([res.vectors, vec]), np.concatenate([res.counts, cnt]))
            elif res.done_index.size:
                blk = (res.done_index, res.vectors, res.counts)
            secs["combine"] += time.perf_counter() - t0
            if blk is not None:
                yield PoolBlock(*blk)
        if comb.idx.size:
            raise AssertionError(f"{comb.idx.size} points never completed (bug)")


#: Locate points on a raster and group them by chunk; run with ``plan.blocks()``. Use it
#: instead of :func:`pool_buffers` to stream results (millions of points) without holding
#: them all in memory. (The plan class itself: same arguments.)
plan_pool = PoolPlan


def pool_buffers(
    da: xr.DataArray,
    x: np.ndarray,
    y: np.ndarray,
    buffers: Sequence[BufferSpec],
    *,
    normalize: bool = True,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> PoolResult:
    """Mean of the raster's valid pixels in each buffer around each point.

    ``da``: dims (y, x, band|dim), dask-backed (e.g. ``ae.zarr``'s
    ``embedding`` opened with ``mask_and_scale=False``), regular pixel-centre
    ``x``/``y`` coordinates (either direction). int8 values are AlphaEarth
    codes (de-quantised; −128 = nodata pixel); float values are a field
    (NaN in any channel = nodata pixel). ``x``, ``y``: point coordinates in
    the raster CRS. ``buffers``: circles (``radius_m``, CRS units) and/or
    square windows (``radius_px``); membership per DESIGN.md: a pixel is in
    a circle when its centre is within ``radius_m`` of the point, and in a
    square window of radius k when it lies in the (2k+1)² block centred on
    the pixel containing the point (clipped at the raster edge).

    Returns a :class:`PoolResult`; vectors are L2-normalised when
    ``normalize`` (the AETHER contract). Raises ``ValueError`` for a raster
    without regular x/y coordinates, wrong dims or dtype, or x/y of unequal
    length.
    """
    plan = plan_pool(da, x, y, buffers, normalize=normalize, block_bytes=block_bytes)
    c = plan.grid.n_channels
    nb = len(plan.buffers)
    vectors = [np.full((plan.n, c), np.nan, dtype=np.float32) for _ in range(nb)]
    counts = [np.zeros(plan.n, dtype=np.int64) for _ in range(nb)]
    for blk in plan.blocks():
        for b in range(nb):
            vectors[b][blk.index] = blk.vectors[:, b]
            counts[b][blk.index] = blk.counts[:, b]
    inside = ~plan.outside
    n_empty = [int(np.sum(inside & (cnt == 0))) for cnt in counts]
    return PoolResult(vectors, counts, n_empty, plan.n_outside, plan.outside, plan.specs)
