"""Ledgers: the finished units of work of a store being built, one small file each.

A stage's task writes its chunk (or, for pool, saves its partial sums), then records it
here; a record exists only for work that completed, so a rerun knows exactly what is
left (see :mod:`aether_scale.stores.chunks` for the resume protocol).

Fault injection for tests: with ``AETHER_SCALE_KILL_AFTER=N`` in the environment, the
process SIGKILLs itself right after its N-th ledger record — how the resume tests kill
a stage mid-way at a deterministic point.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .chunks import StoreRef

__all__ = ["Ledger"]

_COMMITS = itertools.count(1)
_KILL_LOCK = threading.Lock()


def _maybe_kill() -> None:
    """``AETHER_SCALE_KILL_AFTER=N``: SIGKILL this process after its N-th ledger record."""
    limit = os.environ.get("AETHER_SCALE_KILL_AFTER")
    if not limit:
        return
    with _KILL_LOCK:
        if next(_COMMITS) >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Ledger:
    """The finished units of work of a store being built (one small file each).

    ``ref`` is a folder (path or URL) in the stage's work area. Records are JSON
    objects written atomically (temporary name, then rename; one PUT on object
    stores), so a record exists only for work that completed. Picklable: tasks on
    dask workers record their own chunks.
    """

    ref: StoreRef

    @classmethod
    def at(cls, uri: str, storage_options: Mapping[str, Any] | None = None) -> Ledger:
        return cls(StoreRef.of(uri, storage_options))

    def _path(self, key: str, suffix: str = ".json") -> str:
        return f"{self.ref.root}/{key}{suffix}"

    def record(self, key: str, entry: Mapping[str, Any], *, work: bool = True) -> None:
        """Record ``key`` as done with ``entry`` (JSON-able); atomic. ``work=False``:
        bookkeeping (not a unit of work; not counted by the test kill switch)."""
        fs = self.ref.fs
        fs.makedirs(self.ref.root, exist_ok=True)
        data = json.dumps(dict(entry), sort_keys=True, default=str).encode()
        final = self._path(key)
        if _is_local(fs):
            tmp = f"{final}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        else:
            fs.pipe_file(final, data)
        if work:
            _maybe_kill()

    def save_arrays(self, key: str, arrays: Mapping[str, np.ndarray], entry: Mapping[str, Any]
                    ) -> None:
        """Store arrays with a record (``.npz`` first, then the record: a record always
        has its arrays)."""
        import io

        fs = self.ref.fs
        fs.makedirs(self.ref.root, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        final = self._path(key, ".npz")
        if _is_local(fs):
            tmp = f"{final}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, final)
        else:
            fs.pipe_file(final, buf.getvalue())
        self.record(key, entry)

    def load_arrays(self, key: str) -> dict[str, np.ndarray]:
        import io

        raw = self.ref.fs.cat_file(self._path(key, ".npz"))
        with np.load(io.BytesIO(raw)) as z:
            return {k: z[k] for k in z.files}

    def clear(self) -> None:
        """Forget every record (the work they recorded is being redone from scratch)."""
        if self.ref.fs.exists(self.ref.root):
            self.ref.fs.rm(self.ref.root, recursive=True)

    def done(self) -> dict[str, dict[str, Any]]:
        """Every record: ``{key: entry}`` (one listing plus one read per record)."""
        fs = self.ref.fs
        if not fs.exists(self.ref.root):
            return {}
        out: dict[str, dict[str, Any]] = {}
        paths = [p for p in fs.ls(self.ref.root, detail=False) if p.endswith(".json")]
        if not paths:
            return out
        blobs = fs.cat(paths) if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
        for p, raw in blobs.items():
            key = os.path.basename(p)[: -len(".json")]
            out[key] = json.loads(raw)
        return out


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)
