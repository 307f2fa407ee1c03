"""Keys and plans: what a stage run would read, write and be keyed by, before it runs.

A stage's **key** hashes what determines its outputs: the stage and its format version,
its config section without runtime keys and input paths, the fingerprints of its inputs
(workspace artifacts: derived from the key of the stage that wrote them, so keys chain;
external files: their content) and the names of its outputs.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from ..workspace import Workspace, fingerprint_path, output_fingerprint, stable_hash
from .registry import ARTIFACTS, KEY_FORMAT, Stage, is_complete, producer, train_variants

__all__ = ["Available", "Input", "StagePlan", "available", "external_input", "flatten",
           "learned_config", "plan", "runtime_config"]

def _drop(d: Any, pattern: Sequence[str]) -> Any:
    """``d`` without the keys at ``pattern`` (a dotted path split; ``*`` = every item)."""
    if not pattern:
        return d
    head, rest = pattern[0], pattern[1:]
    if isinstance(d, list) and head == "*":
        return [_drop(x, rest) for x in d]
    if isinstance(d, dict):
        if not rest:
            return {k: v for k, v in d.items() if not fnmatch.fnmatchcase(k, head)}
        return {k: (_drop(v, rest) if fnmatch.fnmatchcase(k, head) else v) for k, v in d.items()}
    return d


def learned_config(st: Stage, cfg: RunConfig) -> dict[str, Any]:
    """The part of the stage's section that determines its outputs (hashed into its key)."""
    sec = cfg.section(st.section)
    sec = {k: v for k, v in sec.items() if k not in st.runtime_keys}
    for pattern in st.input_keys:
        sec = _drop(sec, pattern.split("."))
    return _LEGACY.get(st.name, lambda d: d)(sec)


def runtime_config(st: Stage, cfg: RunConfig) -> dict[str, Any]:
    sec = cfg.section(st.section)
    return {k: v for k, v in sec.items() if k in st.runtime_keys}


def _train_legacy(sec: dict[str, Any]) -> dict[str, Any]:
    # keys added after the first release, at the value that reproduces the older behaviour,
    # stay out of the key (checkpoints and workspaces from before them stay current)
    from ..config.sections import TRAIN_LEGACY_DEFAULTS as old

    return {k: v for k, v in sec.items() if not (k in old and v == old[k])}


_LEGACY: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"train": _train_legacy}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists of dicts get their index)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict) and d:
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = d
    return out


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Input:
    """One input of a stage run: what it refers to and its fingerprint."""

    refs: tuple[str, ...]
    fingerprint: str
    producer: str | None = None  # the stage that writes it (workspace inputs)

    def record(self) -> dict[str, Any]:
        ref: Any = self.refs[0] if len(self.refs) == 1 else list(self.refs)
        return {"ref": ref, "fingerprint": self.fingerprint}


def external_input(paths: Sequence[str] | str, storage_options: Mapping[str, Any] | None = None
                   ) -> Input:
    """An external input: files (in order) fingerprinted by content, or a ready
    fingerprint given as ``"id:<fingerprint>"``."""
    if isinstance(paths, str) and paths.startswith("id:"):
        return Input((paths,), paths[3:])
    paths = [paths] if isinstance(paths, str) else list(paths)
    fp = stable_hash([fingerprint_path(p, storage_options) for p in paths])
    return Input(tuple(paths), fp)


Available = dict[str, list[tuple[str, str]]]  # artifact kind → [(entry name, fingerprint)]


def _present(ws: Workspace, kind: str) -> list[tuple[str, str]]:
    """Entries of artifact ``kind`` in the workspace with their fingerprints: those its
    producer's manifest lists (when it completed here), else what was placed by hand."""
    art = ARTIFACTS[kind]
    prod = producer(kind)
    m = ws.manifest(prod.name) if prod else None
    if m is not None and "key" in m:
        names = [n for n in m.get("outputs", []) if art.variant_of(n) is not None
                 or n == art.name]
        return [(n, output_fingerprint(m["key"], n)) for n in names if is_complete(ws, n)]
    names = [art.name] if not art.per_variant else sorted(
        {art.name} | {p.rstrip("/").rsplit("/", 1)[-1]
                      for p in ws.fs.glob(ws.path(art.variant("*")))})
    out = []
    for n in names:
        if art.per_variant and art.variant_of(n) is None:
            continue
        if is_complete(ws, n):
            out.append((n, ws.fingerprint(n)))
    return out


def available(ws: Workspace) -> Available:
    """What the workspace holds now (the inputs a stage run would read)."""
    return {kind: _present(ws, kind) for kind in ARTIFACTS}


# --------------------------------------------------------------------------- plans
@dataclass
class StagePlan:
    """Everything about one stage run that can be known before it runs."""

    stage: Stage
    outputs: list[str]
    inputs: dict[str, Input]
    config: dict[str, Any]
    runtime: dict[str, Any]
    key: str
    reads: dict[str, str] = field(default_factory=dict)  # entry name → workspace path
    missing: list[str] = field(default_factory=list)     # required inputs that are absent

    def record(self) -> dict[str, Any]:
        return {"inputs": {label: i.record() for label, i in self.inputs.items()},
                "config": self.config, "runtime": self.runtime, "key_format": KEY_FORMAT,
                "stage_version": self.stage.version}


def plan(st: Stage, ws: Workspace, cfg: RunConfig, avail: Available) -> StagePlan:
    """The plan of ``st`` given what is (or would be) ``avail``-able upstream.

    Raises ``ValueError`` / ``FileNotFoundError`` from the stage's external inputs (a
    glob matching nothing, a missing file) — those are config problems.
    """
    inputs: dict[str, Input] = {}
    reads: dict[str, str] = {}
    missing: list[str] = []
    for kind in (*st.reads, *st.optional_reads):
        entries = avail.get(kind, [])
        if not entries and kind in st.reads:
            missing.append(kind)
        for name, fp in entries:
            prod = producer(kind)
            inputs[name] = Input((name,), fp, prod.name if prod else None)
            reads[name] = ws.path(name)
    if st.externals:
        mod, fn = st.externals.split(":")
        ext = getattr(importlib.import_module(mod), fn)(cfg)
        for label, paths in ext.items():
            try:
                inputs[label] = external_input(paths)
            except FileNotFoundError as e:
                raise FileNotFoundError(
                    f"{st.section}.{label}: {e}; fix the path in the config (relative paths "
                    "resolve against the config file's folder)") from None
    outputs: list[str] = []
    for kind in st.writes:
        art = ARTIFACTS[kind]
        if not art.per_variant:
            outputs.append(kind)
        elif st.name == "train":
            outputs += [art.variant(v) for v in train_variants(cfg)]
        else:  # follow the models that exist: one output per model variant read
            models = [n for n in reads if ARTIFACTS["model"].variant_of(n) is not None]
            outputs += [art.variant(ARTIFACTS["model"].variant_of(n) or "") for n in models]
    config = learned_config(st, cfg)
    key = stable_hash({"format": KEY_FORMAT, "stage": st.name, "version": st.version,
                       "config": config, "outputs": outputs,
                       "inputs": {label: i.fingerprint for label, i in inputs.items()}})
    return StagePlan(st, outputs, inputs, config, runtime_config(st, cfg), key, reads, missing)
