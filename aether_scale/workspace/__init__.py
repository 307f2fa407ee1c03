"""Workspace: where a run's stage outputs live — manifests, locks, work folders, resume.

A workspace is a folder (local path or fsspec URL such as ``s3://bucket/run``)
holding the artifacts named in DESIGN.md (``ae.zarr``, ``pois.parquet``, …) and

- ``manifests/<stage>.json`` — what each stage last completed: its key, outputs,
  the inputs' fingerprints, the config it used and counts of what it kept/dropped;
- ``config.yaml`` (the resolved config of the latest run) and ``runs/<time>.yaml``
  (every run's, with its command line);
- ``.work/<stage>-<key>/`` — a stage's outputs while they are built, with its ledger
  of finished chunks (see :mod:`aether_scale.stores.chunks`);
- ``.locks/<stage>.lock`` — one writer per stage at a time.

:meth:`Workspace.run_stage` runs a stage under its lock: when the manifest records the
same key and every output is complete, the stage is skipped; otherwise it builds its
outputs in the work folder named by the key — so a killed run's folder is found again
by the rerun, which resumes from its ledger — and only then are they renamed onto the
final names, the manifest written last. A crash leaves the old outputs (or none), never
a half-written output under a final name or a manifest over outputs of another config.
Work folders of other keys are swept when the stage next runs.

Fingerprints never name where the workspace is: a workspace output's fingerprint is
derived from the key of the stage that wrote it (keys chain the inputs' fingerprints),
hand-placed entries and external inputs are fingerprinted by content. A copied or moved
workspace is therefore current.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ..logs import get_logger
from .fingerprints import fingerprint_path, output_fingerprint, stable_hash
from .locks import WorkspaceBusy, file_lock, object_lock

__all__ = ["StageResult", "Work", "Workspace", "WorkspaceBusy", "fingerprint_path",
           "output_fingerprint", "stable_hash"]

log = get_logger("workspace")

MANIFEST_DIR = "manifests"
WORK_DIR = ".work"
LOCK_DIR = ".locks"
CONFIG_FILE = "config.yaml"
RUNS_DIR = "runs"


@dataclass
class StageResult:
    """What a stage left behind: whether it was skipped, its outputs and manifest."""

    stage: str
    skipped: bool
    outputs: dict[str, str]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, Any]:
        return self.manifest.get("stats", {})


@dataclass(frozen=True)
class Work:
    """A stage's work folder: where its outputs are built (``outputs[name]``) and its
    ledgers kept (:meth:`path`). Same key → same folder, so a rerun resumes."""

    root: str
    outputs: dict[str, str]
    storage_options: dict[str, Any] | None
    is_local: bool

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def local_dir(self, name: str) -> str:
        """A local folder for ``name`` that survives a crash (the work folder itself on a
        local workspace; under the system temp folder, keyed the same way, otherwise)."""
        if self.is_local:
            p = self.path(name)
        else:
            import tempfile

            p = os.path.join(tempfile.gettempdir(), "aether_scale-work",
                             stable_hash(self.root), name)
        os.makedirs(p, exist_ok=True)
        return p


class Workspace:
    """A run's folder of stage outputs (local path or fsspec URL)."""

    def __init__(self, root: str | os.PathLike, *, storage_options: dict | None = None):
        root = str(root)
        self.is_local = "://" not in root or root.startswith("file://")
        if self.is_local:
            root = os.path.abspath(root.removeprefix("file://"))
        self.root = root.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, _ = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.makedirs(self.path(MANIFEST_DIR), exist_ok=True)
        self._removals: list[threading.Thread] | None = None  # see deferred_removals

    def __repr__(self) -> str:
        return f"Workspace({self.root!r})"

    # ------------------------------------------------------------------ paths
    def path(self, name: str) -> str:
        """Full path/URL of a workspace entry, e.g. ``ws.path("ae.zarr")``."""
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def manifest_path(self, stage: str) -> str:
        return self.path(f"{MANIFEST_DIR}/{stage}.json")

    def manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest, or None when the stage has not completed here."""
        p = self.manifest_path(stage)
        try:
            with self.fs.open(p, "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise ValueError(f"{p} is not valid JSON ({e}); delete it to redo the "
                             f"stage {stage!r}") from None

    def producer_of(self, name: str) -> dict[str, Any] | None:
        """The manifest of the stage that wrote workspace output ``name`` (None if none did)."""
        mdir = self.path(MANIFEST_DIR)
        for p in sorted(self.fs.glob(f"{mdir}/*.json")):
            with self.fs.open(p, "r") as f:
                m = json.load(f)
            if name in m.get("outputs", []):
                return m
        return None

    # ------------------------------------------------------------ fingerprints
    def fingerprint(self, name: str) -> str:
        """Fingerprint of workspace entry ``name``: derived from the key of the stage that
        wrote it, or (placed by hand) from its content. Raises FileNotFoundError."""
        owner = self.producer_of(name)
        if owner is not None and "key" in owner:
            return output_fingerprint(owner["key"], name)
        if not self.exists(name):
            raise FileNotFoundError(f"{self.path(name)} does not exist")
        return fingerprint_path(self.path(name), self.storage_options)

    # ------------------------------------------------------------------ locks
    @contextlib.contextmanager
    def lock(self, stage: str, *, wait: bool = True) -> Iterator[None]:
        """Hold the stage's lock for the block: one writer per stage at a time.

        A second process waits (logging who holds the lock), or with ``wait=False``
        raises :class:`WorkspaceBusy`. Local workspaces use ``flock`` (released by the
        kernel when the holder dies); object stores a lock object the holder refreshes,
        taken over once it is older than two minutes.
        """
        self.fs.makedirs(self.path(LOCK_DIR), exist_ok=True)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv[:6])[:200]}
        path = self.path(f"{LOCK_DIR}/{stage}.lock")
        if self.is_local:
            with file_lock(path, stage, holder, wait, self.root):
                yield
        else:
            with object_lock(self.fs, path, stage, holder, wait, self.root):
                yield

    # ------------------------------------------------------------------ stages
    def work_root(self, stage: str, key: str) -> str:
        return self.path(f"{WORK_DIR}/{stage}-{key}")

    def _sweep(self, stage: str, keep: str | None, outputs: Sequence[str]) -> None:
        """Remove work folders this stage left under other keys (killed runs, old
        configs), and temporaries of older versions of the workspace layout."""
        wdir = self.path(WORK_DIR)
        if self.fs.exists(wdir):
            for p in self.fs.ls(wdir, detail=False):
                base = os.path.basename(p.rstrip("/"))
                if base.startswith(f"{stage}-") and base != f"{stage}-{keep}":
                    log.info(f"[{stage}] removing the work folder of an earlier run: {base}")
                    self._remove(self.path(f"{WORK_DIR}/{base}"))
                elif base.startswith("trash-"):  # a deletion cut short (or still going:
                    self._remove(self.path(f"{WORK_DIR}/{base}"))  # two rmtrees do no harm)
        for p in self.fs.ls(self.root, detail=False):
            base = os.path.basename(p.rstrip("/"))
            if base.startswith(".tmp-") and any(base.endswith(f"-{o}") for o in outputs):
                self._remove(self.path(base))

    def run_stage(
        self,
        stage: str,
        *,
        key: str,
        outputs: Sequence[str],
        fn: Callable[[Work], Mapping[str, Any] | None],
        record: Mapping[str, Any] | None = None,
        force: bool = False,
        complete: Callable[[str], bool] | None = None,
        wait: bool = True,
    ) -> StageResult:
        """Run ``fn`` under the stage's lock unless the manifest says its outputs are current.

        ``key`` identifies what the stage would produce (stage, inputs' fingerprints,
        learned config, outputs); ``record`` (inputs, config, runtime settings) goes
        into the manifest as is. ``fn`` receives the :class:`Work` folder, writes each
        output to ``work.outputs[name]`` and returns JSON-able statistics. ``complete``
        tells whether a published output is whole (default: it exists). ``force``
        discards any partial work and runs the stage again.
        """
        outputs = list(outputs)
        complete = complete or self.exists
        final = {name: self.path(name) for name in outputs}
        with self.lock(stage, wait=wait):
            old = self.manifest(stage)
            if (not force and old is not None and old.get("key") == key
                    and all(complete(n) for n in outputs)):
                log.info(f"[{stage}] up to date (manifest matches) — skipped")
                return StageResult(stage, True, final, old)
            self._sweep(stage, None if force else key, outputs)
            root = self.work_root(stage, key)
            work = Work(root, {n: f"{root}/out/{n}" for n in outputs},
                        self.storage_options or None, self.is_local)
            self.fs.makedirs(f"{root}/out", exist_ok=True)
            t0 = time.perf_counter()
            stats = dict(fn(work) or {})
            for name in outputs:
                if not self.fs.exists(work.outputs[name]):
                    raise RuntimeError(f"stage {stage!r} did not write its output {name!r}")
            # The manifest goes first out of date: removed before outputs are replaced, so a
            # crash between the renames never leaves a matching manifest over mixed data.
            if self.fs.exists(self.manifest_path(stage)):
                self.fs.rm(self.manifest_path(stage))
            for name in outputs:
                self._replace(work.outputs[name], final[name])
            for name in (old or {}).get("outputs", []):
                if name not in final and self.exists(name):  # no longer produced (a variant
                    self._remove(self.path(name))           # was removed from the config)
            manifest = {
                "stage": stage,
                "key": key,
                "outputs": outputs,
                **dict(record or {}),
                "stats": stats,
                "seconds": round(time.perf_counter() - t0, 2),
                "completed_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            }
            tmp_m = f"{self.manifest_path(stage)}.tmp-{os.getpid()}"
            with self.fs.open(tmp_m, "w") as f:
                json.dump(manifest, f, indent=2, sort_keys=True, default=str)
            self.fs.mv(tmp_m, self.manifest_path(stage))
            self._remove(root)
        return StageResult(stage, False, final, manifest)

    # ------------------------------------------------------------------ configs
    def save_config(self, text: str, command: Sequence[str]) -> str:
        """Save a run's resolved config (YAML text): ``config.yaml`` (latest) and
        ``runs/<UTC time>.yaml`` with the command line as a comment. Returns the latter."""
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        header = f"# aether-scale {' '.join(command)}\n# saved {stamp}\n"
        self.fs.makedirs(self.path(RUNS_DIR), exist_ok=True)
        run = self.path(f"{RUNS_DIR}/{stamp}.yaml")
        self.fs.pipe_file(run, (header + text).encode())
        self.fs.pipe_file(self.path(CONFIG_FILE), (header + text).encode())
        return run

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def deferred_removals(self) -> Iterator[None]:
        """Within this block, a replaced local output is renamed out of the way at once and
        deleted in a background thread; leaving the block waits for those deletions.

        ``run_stages`` leaves it after closing its cluster, so deleting the old output of
        a ``--force`` run (0.95 s for a 1.8 GB, 498-file field here) overlaps the cluster's
        shut-down instead of adding to it. The rename is atomic like the removal it
        replaces; a deletion cut short by a crash leaves a ``.work/trash-*`` folder,
        which the next run of any stage removes.
        """
        outer = self._removals
        self._removals = [] if outer is None else outer
        try:
            yield
        finally:
            if outer is None:
                pending, self._removals = self._removals, None
                for t in pending:
                    t.join()

    def _discard(self, p: str) -> None:
        """Remove an output being replaced: in the background inside
        :meth:`deferred_removals` (local workspaces), else now."""
        if self._removals is None or not self.is_local or not os.path.isdir(p):
            self._remove(p)
            return
        trash = self.path(f"{WORK_DIR}/trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(os.path.dirname(trash), exist_ok=True)
        os.rename(p, trash)
        t = threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True},
                             name="aether-remove-replaced")
        t.start()
        self._removals.append(t)

    def _remove(self, p: str) -> None:
        if self.is_local:
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)
        elif self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def _replace(self, src: str, dst: str) -> None:
        if self.fs.exists(dst):
            self._discard(dst)
        if self.is_local:
            os.replace(src, dst)
            return
        # Object stores have no rename: copy every object (server-side, in one batch)
        # and then delete the sources. Listing files only matters: "directories" are
        # key prefixes, and copying one (fs.mv(recursive=True) does) is an error on
        # servers that list them (NoSuchKey from CopyObject).
        src_p = self.fs._strip_protocol(src).rstrip("/")
        dst_p = self.fs._strip_protocol(dst).rstrip("/")
        files = sorted(self.fs.find(src_p))
        if files:
            self.fs.copy(files, [dst_p + f[len(src_p):] for f in files])
        self.fs.rm(src_p, recursive=True)
