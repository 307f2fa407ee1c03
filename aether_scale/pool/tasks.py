"""The pooling's tasks: what one chunk's task computes on a worker, how its result is
recorded for resume, and the sliding window that submits tasks and hands their results
out in order (shared by :mod:`.engine`'s buffers and :mod:`.polygons`).

A task (:func:`chunk_task`) reads its chunk, computes the partial sums of every buffer
reaching into it (:func:`~.kernels.partial_sums`), finishes the points whose buffers lie
inside the chunk and returns the rest as partial sums in the narrowest exact dtype
(:func:`sums_dtype`). With a ledger the result is recorded on the worker, so a rerun
loads it (:class:`Recorded`) instead of computing it again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np

from ..cluster import InTask, _PauseWatch, active_client, n_task_slots, result
from ..heap import keep_freed_memory
from ..logs import Progress
from ..stores.ledger import Ledger
from .kernels import Buffer, finalize, partial_sums

__all__ = ["TASK_PARTS", "Recorded", "TaskResult", "chunk_task", "run_windowed", "sums_dtype"]


def sums_dtype(kind: str, buffers: Sequence[Buffer]) -> np.dtype:
    """The narrowest dtype that holds a chunk's partial sums exactly (what a task returns).

    Code sums are integers bounded by (buffer area) · 127² (counts by the area): float32
    while that is below 2²⁴, int32 below 2³¹, else float64; float fields keep float64.
    Half or a quarter of the bytes a task sends back, and the same numbers."""
    if kind != "codes":
        return np.dtype(np.float64)
    area = max((2 * b.pad_rows + 1) * (2 * b.pad_cols + 1) for b in buffers)
    bound = area * 127 * 127
    if bound < 2**24:
        return np.dtype(np.float32)
    if bound < 2**31 - 1:
        return np.dtype(np.int32)
    return np.dtype(np.float64)


#: per-task seconds a task reports (summed over tasks into :attr:`PoolPlan.task_seconds`)
TASK_PARTS = ("read_ae", "kernel", "decode", "prefix", "runs", "product", "finalize",
              "read_ae_cpu", "kernel_cpu")


def chunk_task(lazy: InTask, payload: InTask, ledger: Ledger | None, key: str) -> TaskResult:
    """One chunk's results; with a ledger they are recorded here, on the worker, so a
    result survives the client (a rerun loads it instead of computing it again).

    Points whose buffers lie inside this one chunk (``whole``) are finished here — mean,
    normalised, exactly as :func:`finalize` does on the client for the others — so the
    client only adds up the partial sums of points that straddle chunks."""
    from .. import storage

    index, whole, normalize, kw = payload.arr
    n0 = storage.retry_count()  # transient remote failures are retried, and counted
    secs: dict[str, float] = {}

    def run() -> np.ndarray:
        secs.clear()
        t0, c0 = time.perf_counter(), time.thread_time()
        block = lazy.read()
        t1, c1 = time.perf_counter(), time.thread_time()
        out = partial_sums(block, **kw, timings=secs)
        secs["read_ae"] = t1 - t0
        secs["kernel"] = time.perf_counter() - t1
        # CPU of this thread (the wall times above include waiting for a core)
        secs["read_ae_cpu"] = c1 - c0
        secs["kernel_cpu"] = time.thread_time() - c1
        return out

    keep_freed_memory()  # the kernel's per-batch temporaries, under dask's malloc setting
    sums = storage.with_retries(run, what=f"pool chunk {key}")
    t0 = time.perf_counter()
    vec, cnt = finalize(sums[whole], kw["kind"], normalize=normalize)
    part = sums[~whole].astype(sums_dtype(kw["kind"], kw["buffers"]), copy=False)
    secs["finalize"] = time.perf_counter() - t0
    res = TaskResult(index[~whole], part, index[whole], vec, cnt, 0, secs)
    if ledger is not None:
        storage.with_retries(lambda: ledger.save_arrays(
            key, {"index": res.index, "sums": res.sums, "done_index": res.done_index,
                  "vectors": res.vectors, "counts": res.counts},
            {"points": int(index.size), "retries": storage.retry_count() - n0}),
            what=f"pool chunk {key}")
    res.retries = storage.retry_count() - n0
    return res


@dataclass
class TaskResult:
    """What one chunk's task returns: partial sums of the points that straddle chunks
    (``index``, ``sums`` in :func:`sums_dtype`) and the finished points (``done_index``,
    ``vectors`` (m, B, C) float32, ``counts`` (m, B) int64)."""

    index: np.ndarray
    sums: np.ndarray
    done_index: np.ndarray
    vectors: np.ndarray
    counts: np.ndarray
    retries: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    """A task result already in the ledger: loaded instead of computed."""

    ledger: Ledger
    key: str

    def load(self) -> TaskResult:
        # (its retries were counted by the run that made it)
        z = self.ledger.load_arrays(self.key)
        if "vectors" in z:
            return TaskResult(z["index"], z["sums"], z["done_index"], z["vectors"], z["counts"])
        # a record of an earlier version: partial sums of every point
        s = z["sums"]
        return TaskResult(z["index"], s, np.zeros(0, np.int64),
                          np.zeros((0, s.shape[1], s.shape[2] - 1), np.float32),
                          np.zeros((0, s.shape[1]), np.int64))


def run_windowed(make: Any, ntask: int, *, window: int | None = None,
                 progress: Progress | None = None) -> Iterator[Any]:
    """Compute ``make(0) … make(ntask-1)`` and yield results in that order.

    ``make(k)`` returns a dask Delayed, or a :class:`Recorded` result (loaded, not
    computed). At most ``window`` tasks are in flight; the Delayed objects are built
    only when submitted. Uses the current distributed client if any, else the
    configured local scheduler (in batches of ``window``).
    """
    client = active_client()
    window = max(1, int(window or 2 * n_task_slots()))

    def tick(res: Any) -> Any:
        if progress is not None:
            progress.advance()
        return res

    if client is None:
        for s in range(0, ntask, window):
            items = [make(k) for k in range(s, min(s + window, ntask))]
            todo = [x for x in items if not isinstance(x, Recorded)]
            computed = iter(dask.compute(*todo)) if todo else iter(())
            for x in items:
                yield tick(x.load() if isinstance(x, Recorded) else next(computed))
        return
    pending: deque = deque()
    nxt = 0

    def submit(k: int) -> Any:
        x = make(k)
        return x if isinstance(x, Recorded) else client.compute(x)

    while nxt < ntask and len(pending) < window:
        pending.append(submit(nxt))
        nxt += 1
    watch = _PauseWatch(client)
    while pending:
        fut = pending.popleft()
        if isinstance(fut, Recorded):
            res = fut.load()
        else:
            res = result(fut, watch)
            fut.release()
        if nxt < ntask:
            pending.append(submit(nxt))
            nxt += 1
        yield tick(res)
