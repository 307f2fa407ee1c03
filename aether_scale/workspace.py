"""Workspace: where a run's stage outputs live, with manifests, atomic writes and resume.

A workspace is a folder (local path or fsspec URL such as ``s3://bucket/run``)
holding the outputs named in DESIGN.md (``ae.zarr``, ``pois.parquet``, …) and
``manifests/<stage>.json``. A stage runs through :meth:`Workspace.run_stage`:

1. the inputs' fingerprints and the stage's config are hashed;
2. when ``manifests/<stage>.json`` records the same hash and every output
   exists, the stage is skipped (resume after a crash, cheap reruns);
3. otherwise the stage function writes each output under a temporary name,
   and only when it returns are the temporaries renamed onto the final names
   and the manifest written last. A crash leaves the old outputs (or none),
   never a half-written output under a final name, and never an output of one
   config beside a manifest of another.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

MANIFEST_DIR = "manifests"
_SMALL_FILE = 32 * 1024 * 1024


def _stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


class Workspace:
    """A run's folder of stage outputs (local path or fsspec URL)."""

    def __init__(self, root: str | os.PathLike, *, storage_options: dict | None = None):
        root = str(root)
        self.is_local = "://" not in root or root.startswith("file://")
        if self.is_local:
            root = os.path.abspath(root.removeprefix("file://"))
        self.root = root.rstrip("/")
        self.fs, _ = fsspec.core.url_to_fs(self.root, **(storage_options or {}))
        self.storage_options = storage_options or {}
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.makedirs(self.path(MANIFEST_DIR), exist_ok=True)

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
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)

    # ------------------------------------------------------------ fingerprints
    def fingerprint(self, ref: str) -> str:
        """Fingerprint of an input.

        ``ref`` is a workspace output name (``"ae.zarr"``; its producing stage's
        manifest hash) or an external file/folder/URL (content hash for small
        files, size + modification time otherwise).
        """
        owner = self.producer_of(ref)
        if owner is not None:
            return owner["hash"]
        if "/" not in ref.strip("/") and "://" not in ref:
            if self.exists(ref):
                # a workspace entry put there by hand (no producing stage): hash its files
                return fingerprint_path(self.path(ref))
            if not os.path.exists(ref):
                raise FileNotFoundError(
                    f"input {self.path(ref)} does not exist: run the stage that writes {ref} first"
                )
        return fingerprint_path(ref)

    def producer_of(self, name: str) -> dict[str, Any] | None:
        """The manifest of the stage that wrote workspace output ``name`` (None if none did)."""
        if "/" in name.strip("/") or "://" in name:
            return None
        mdir = self.path(MANIFEST_DIR)
        for p in sorted(self.fs.glob(f"{mdir}/*.json")):
            with self.fs.open(p, "r") as f:
                m = json.load(f)
            if name in m.get("outputs", []):
                return m
        return None

    # ------------------------------------------------------------------ stages
    def run_stage(
        self,
        stage: str,
        *,
        outputs: list[str],
        inputs: Mapping[str, str] | None = None,
        config: Any = None,
        fn: Callable[[dict[str, str]], dict[str, Any] | None],
        force: bool = False,
        log: Callable[[str], None] | None = print,
    ) -> StageResult:
        """Run ``fn`` unless an up-to-date manifest says its outputs are current.

        ``inputs`` maps a label to a workspace output name or an external path.
        ``fn`` receives ``{output name: temporary path}``, writes each output
        there and returns a JSON-able dict of statistics (counts of rows kept
        and dropped, timings) that goes into the manifest.
        """
        inputs = dict(inputs or {})
        prints = {label: self.fingerprint(ref) for label, ref in inputs.items()}
        key = _stable_hash({"stage": stage, "inputs": prints, "config": config, "outputs": outputs})
        final = {name: self.path(name) for name in outputs}
        old = self.manifest(stage)
        if (
            not force
            and old is not None
            and old.get("key") == key
            and all(self.fs.exists(p) for p in final.values())
        ):
            if log:
                log(f"[{stage}] up to date (manifest matches) — skipped; outputs: "
                    + ", ".join(final.values()))
            return StageResult(stage, True, final, old)

        token = uuid.uuid4().hex[:8]
        tmp = {name: self.path(f".tmp-{token}-{name}") for name in outputs}
        try:
            stats = fn(dict(tmp)) or {}
            for name in outputs:
                if not self.fs.exists(tmp[name]):
                    raise RuntimeError(f"stage {stage!r} did not write its output {name!r}")
            # The manifest goes first out of date: remove it before replacing outputs so a
            # crash between the renames can never leave a matching manifest over mixed data.
            if self.fs.exists(self.manifest_path(stage)):
                self.fs.rm(self.manifest_path(stage))
            for name in outputs:
                self._replace(tmp[name], final[name])
        finally:
            for p in tmp.values():
                if self.fs.exists(p):
                    self._remove(p)
        manifest = {
            "stage": stage,
            "key": key,
            "outputs": outputs,
            "inputs": {label: {"ref": ref, "fingerprint": prints[label]} for label, ref in inputs.items()},
            "config": config,
            "stats": stats,
            "completed_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        manifest["hash"] = _stable_hash(manifest)
        tmp_m = self.manifest_path(stage) + f".tmp-{token}"
        with self.fs.open(tmp_m, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=str)
        self.fs.mv(tmp_m, self.manifest_path(stage))
        if log:
            log(f"[{stage}] done → " + ", ".join(final.values()))
        return StageResult(stage, False, final, manifest)

    def _remove(self, p: str) -> None:
        if self.is_local:
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
        else:
            self.fs.rm(p, recursive=True)

    def _replace(self, src: str, dst: str) -> None:
        if self.fs.exists(dst):
            self._remove(dst)
        if self.is_local:
            os.replace(src, dst)
        else:
            self.fs.mv(src, dst, recursive=True)


def fingerprint_path(path: str) -> str:
    """Fingerprint of an external file, folder (recursively) or URL."""
    fs, p = fsspec.core.url_to_fs(str(path))
    if not fs.exists(p):
        raise FileNotFoundError(f"input {path} does not exist")
    h = hashlib.sha256()
    if fs.isdir(p):
        for sub in sorted(fs.find(p, detail=False)):
            info = fs.info(sub)
            h.update(f"{sub[len(p):]}|{info.get('size')}|{info.get('mtime', info.get('LastModified'))}".encode())
        return h.hexdigest()[:16]
    info = fs.info(p)
    size = info.get("size") or 0
    if size <= _SMALL_FILE:
        with fs.open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(f"{p}|{size}|{info.get('mtime', info.get('LastModified'))}".encode())
    return h.hexdigest()[:16]
