"""Locks: one writer per workspace stage at a time.

Local workspaces use ``flock`` on ``.locks/<stage>.lock`` (the kernel releases it when
the holder dies, however it dies). Object stores have no such primitive, so there the
lock is an object the holder rewrites every 30 s; a lock not refreshed for
:data:`LOCK_STALE_S` is taken to be a dead holder's. Both write who holds the lock
(pid, host, since, command), which the waiting run reports.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..logs import get_logger

__all__ = ["LOCK_STALE_S", "WorkspaceBusy", "file_lock", "object_lock"]

log = get_logger("workspace")

LOCK_STALE_S = 120.0  # object-store locks: a holder refreshes its lock every 30 s


class WorkspaceBusy(RuntimeError):
    """Another process holds the lock of the stage (and waiting was not allowed)."""


@contextlib.contextmanager
def file_lock(path: str, stage: str, holder: dict[str, Any], wait: bool, where: str
              ) -> Iterator[None]:
    """``flock`` on ``path``: released by the kernel when the holder dies."""
    import fcntl

    f = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        told = 0.0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                other = f.read().strip() or "another process"
                if not wait:
                    raise WorkspaceBusy(
                        f"{where}: stage {stage!r} is being run by {other}; wait for it "
                        "to finish (two runs of one stage never write at once)") from None
                if time.monotonic() - told > 60:
                    log.info(f"[{stage}] waiting for the lock held by {other}")
                    told = time.monotonic()
                time.sleep(0.25)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(holder))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


@contextlib.contextmanager
def object_lock(fs: Any, path: str, stage: str, holder: dict[str, Any], wait: bool, where: str
                ) -> Iterator[None]:
    """A lock object on an object store: refreshed by its holder every 30 s, taken over
    once older than :data:`LOCK_STALE_S` (no atomic create-if-absent is assumed)."""
    me = f"{holder['host']}:{holder['pid']}:{id(holder)}"
    told = 0.0
    while True:
        other = None
        try:
            other = json.loads(fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            pass
        fresh = other is not None and time.time() - float(other.get("beat", 0)) < LOCK_STALE_S
        if fresh and other.get("owner") != me:
            if not wait:
                raise WorkspaceBusy(f"{where}: stage {stage!r} is being run by "
                                    f"{other.get('owner')}; wait for it to finish")
            if time.monotonic() - told > 60:
                log.info(f"[{stage}] waiting for the lock held by {other.get('owner')}")
                told = time.monotonic()
            time.sleep(2.0)
            continue
        fs.pipe_file(path, json.dumps({**holder, "owner": me, "beat": time.time()}).encode())
        time.sleep(1.0)  # last writer wins: check that we are that writer
        try:
            if json.loads(fs.cat_file(path)).get("owner") == me:
                break
        except (FileNotFoundError, ValueError):
            continue
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(30.0):
            with contextlib.suppress(Exception):
                fs.pipe_file(path, json.dumps({**holder, "owner": me,
                                                    "beat": time.time()}).encode())

    t = threading.Thread(target=beat, name=f"lock-{stage}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
