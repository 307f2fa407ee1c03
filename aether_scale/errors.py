"""One error boundary: a failure becomes one paragraph saying what failed and what to do.

The CLI prints :func:`explain` of whatever escaped a stage; ``-v`` adds the traceback.
The project's own errors (config, inputs, damaged stores, checkpoints, memory checks)
already carry the file, the field and the fix, and pass through unchanged; failures
from the libraries underneath — a dask worker killed, a result lost with its worker,
a closed connection, an allocation that failed, a bug — get the words a user can act on.
"""

from __future__ import annotations

__all__ = ["explain"]

_RESUME = "The chunks finished so far are kept: rerun the same command to resume."


def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def explain(exc: BaseException) -> str:
    """``error: …`` text for ``exc``: what failed, where, and what to do."""
    names = _names(exc)
    msg = str(exc) or type(exc).__name__
    if "KilledWorker" in names:
        task = getattr(exc, "task", "?")
        tries = getattr(exc, "allowed_failures", 0) + 1
        return (f"error: a dask task was lost with its worker {tries} times (task {task!r}). "
                "Workers die like this when they run out of memory: give them more "
                "(cluster.memory_limit), fewer threads each (cluster.threads_per_worker), or "
                f"smaller chunks (ingest.chunk_px, infer.chunk_px). {_RESUME}")
    if names & {"FutureCancelledError", "CancelledError"}:
        return ("error: a dask result was lost before it was collected (its worker died or "
                f"the cluster shut down: {msg}). Check the workers' memory and logs. {_RESUME}")
    if names & {"CommClosedError", "StreamClosedError"} or (
            "TimeoutError" in names and "distributed" in type(exc).__module__):
        return (f"error: lost the connection to the dask cluster ({msg}). Is the scheduler "
                f"(or gateway) still running and reachable? {_RESUME}")
    if isinstance(exc, MemoryError):
        if msg == "MemoryError":
            return ("error: this process ran out of memory. Use a smaller workload per step "
                    "(train.in_memory: never streams the triplets; smaller chunks) or a machine "
                    f"with more memory. {_RESUME}")
        return f"error: {msg}"
    if "OutOfMemoryError" in names:  # torch.cuda.OutOfMemoryError
        return (f"error: the GPU ran out of memory ({msg.splitlines()[0]}). Lower "
                "train.batch_size or infer.batch_pixels, or use another device.")
    if isinstance(exc, KeyError):
        return (f"error: internal error (KeyError {msg}) — a bug in aether_scale, not in your "
                "input; run again with -v and report the traceback")
    if isinstance(exc, (FileNotFoundError, ValueError, OSError, RuntimeError)):
        return f"error: {msg}"
    return f"error ({type(exc).__name__}): {msg}"
