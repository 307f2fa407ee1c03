"""The stage graph as code: every stage and artifact declared once.

:data:`ARTIFACTS` names what a workspace holds; :data:`STAGES` says, for each stage in
data-flow order, which artifacts it reads and writes, its config section, which of its
keys are runtime-only (never a reason to rerun) or name external inputs (fingerprinted
by content, not by path), whether it runs dask work on a cluster, and the function that
builds it. The CLI, ``run``, the demo, ``status`` and ``stages`` read this registry;
nothing else lists stages or their inputs.

A stage's **key** hashes what determines its outputs: the stage and its format
version, its config section without runtime keys and input paths, the fingerprints of
its inputs (workspace artifacts: derived from the key of the stage that wrote them, so
keys chain; external files: their content) and the names of its outputs. A stage whose
manifest records the same key is current.

**Variants** belong to train: ``train.variants`` lists the extra models (the paper's
"AETHER w/o aug" by default), written as ``model_<name>/``. infer, regions and evaluate
follow the models that exist: one ``field_<name>.zarr`` per model, one feature column
``AETHER_<name>`` per field.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import RunConfig
from .logs import get_logger
from .workspace import (
    StageResult,
    Work,
    Workspace,
    fingerprint_path,
    output_fingerprint,
    stable_hash,
)

__all__ = [
    "ARTIFACTS",
    "STAGES",
    "Artifact",
    "Stage",
    "StageContext",
    "StageStatus",
    "producer",
    "run_stage",
    "run_stages",
    "stage",
    "stage_names",
    "status",
]

log = get_logger("pipeline")

#: bump to make every stage's key change (the manifest layout or keying rules changed)
KEY_FORMAT = 2


@dataclass(frozen=True)
class Artifact:
    """A workspace entry. ``per_variant``: one per model variant (``model`` → ``model``,
    ``model_noaug``; ``field.zarr`` → ``field.zarr``, ``field_noaug.zarr``).
    ``marker``: a file inside it whose presence means it is complete."""

    name: str
    holds: str
    store: str
    per_variant: bool = False
    marker: str | None = None

    def variant(self, v: str) -> str:
        """The entry name of variant ``v`` ('' = the main one)."""
        if not v:
            return self.name
        stem, dot, ext = self.name.partition(".")
        return f"{stem}_{v}{dot}{ext}"

    def variant_of(self, name: str) -> str | None:
        """The variant an entry name is of this artifact ('' main), or None."""
        if name == self.name:
            return ""
        stem, dot, ext = self.name.partition(".")
        m = re.fullmatch(rf"{re.escape(stem)}_([a-z0-9_]+){re.escape(dot + ext)}", name)
        return m.group(1) if m else None


ARTIFACTS: dict[str, Artifact] = {a.name: a for a in (
    Artifact("ae.zarr", "AlphaEarth int8 codes (y, x, band), CRS, nodata −128",
             "aether_scale.stores.ae", marker="aether_chunks.json"),
    Artifact("pois.parquet", "GeoParquet POIs: poi_id, description, point in the AE CRS",
             "aether_scale.stores.pois", marker="*.parquet"),
    Artifact("text.zarr", "text embeddings (poi, dim) aligned with poi_id",
             "aether_scale.stores.text", marker="aether_chunks.json"),
    Artifact("triplets.zarr", "poi_id, base and aug pooled AE (poi, 64), text (poi, 384)",
             "aether_scale.stores.triplets", marker="aether_chunks.json"),
    Artifact("model", "checkpoint.pt, metrics.json (one folder per variant)",
             "aether_scale.stores.models", per_variant=True, marker="checkpoint.pt"),
    Artifact("field.zarr", "AETHER embedding field (y, x, dim) on the AE grid",
             "aether_scale.stores.field", per_variant=True, marker="aether_chunks.json"),
    Artifact("regions", "luc.parquet, sdm.parquet: GeoParquet units, labels, features",
             "aether_scale.stores.regions"),
    Artifact("report", "metrics.json, report.md, plots", "aether_scale.evaluate.report",
             marker="metrics.json"),
)}


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (see the module docstring)."""

    name: str
    help: str
    section: str
    run: str
    reads: tuple[str, ...] = ()
    optional_reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    runtime_keys: frozenset[str] = frozenset()
    input_keys: tuple[str, ...] = ()
    externals: str | None = None
    cluster: bool | Callable[[RunConfig], bool] = True
    version: int = 1
    #: a module with ``ranks(cfg)``, ``follow(ws, cfg, plan)`` and ``tell(decision)`` for a
    #: stage that runs on several torchrun ranks (rank 0 owns the workspace)
    ranks: str | None = None
    #: ``module:function(ws, log)`` that shows what a skipped run would have shown (the
    #: result a user came for, e.g. evaluate's table)
    on_skip: str | None = None

    def needs_cluster(self, cfg: RunConfig) -> bool:
        return self.cluster(cfg) if callable(self.cluster) else bool(self.cluster)

    def function(self) -> Callable[[StageContext], Mapping[str, Any] | None]:
        mod, fn = self.run.split(":")
        return getattr(importlib.import_module(mod), fn)


def _text_cluster(cfg: RunConfig) -> bool:
    # text encodes in-process unless workers add cores (text.choose_mode): worth a
    # cluster only when it is remote or dask mode is forced
    return cfg.text.mode == "dask" or cfg.cluster.kind in ("gateway", "address")


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "AlphaEarth GeoTIFF/COG/VRT tiles → ae.zarr", "ingest",
          "aether_scale.ingest.stage:build", writes=("ae.zarr",),
          input_keys=("tiles",), externals="aether_scale.ingest.stage:external_inputs",
          version=2),
    Stage("pois", "POI files → pois.parquet (descriptions, AE CRS)", "pois",
          "aether_scale.pois.stage:build", reads=("ae.zarr",), writes=("pois.parquet",),
          input_keys=("sources.*.path",), externals="aether_scale.pois.stage:external_inputs"),
    Stage("text", "POI descriptions → text.zarr (sentence-transformers)", "text",
          "aether_scale.text.stage:build", reads=("pois.parquet",), writes=("text.zarr",),
          runtime_keys=frozenset({"cache_dir", "mode", "batch_size", "flush_texts",
                                  "dask_min_texts", "device", "compact_shards"}),
          input_keys=("model",), externals="aether_scale.text.stage:external_inputs",
          cluster=_text_cluster, version=2),
    Stage("pool", "AE pooled in buffers around POIs → triplets.zarr", "pool",
          "aether_scale.pool.stage:build", reads=("ae.zarr", "pois.parquet", "text.zarr"),
          writes=("triplets.zarr",), runtime_keys=frozenset({"block_mb"}), version=2),
    Stage("train", "train the AETHER projector (and train.variants) → model/", "train",
          "aether_scale.train.stage:build", reads=("triplets.zarr",), writes=("model",),
          runtime_keys=frozenset({"device", "threads", "prefetch", "in_memory"}),
          cluster=False, version=2, ranks="aether_scale.train.stage"),
    Stage("infer", "projector over every AE pixel → field.zarr (one per model)", "infer",
          "aether_scale.infer.stage:build", reads=("ae.zarr", "model"), writes=("field.zarr",),
          runtime_keys=frozenset({"batch_pixels", "device", "threads"}), version=2),
    Stage("regions", "AE and fields pooled around label units → regions/", "regions",
          "aether_scale.regions.stage:build", reads=("ae.zarr",),
          optional_reads=("field.zarr", "pois.parquet"), writes=("regions",),
          input_keys=("luc_points", "sdm_units", "sdm_table"),
          externals="aether_scale.regions.stage:external_inputs", version=2),
    Stage("evaluate", "the paper's Table 1 protocol → report/", "evaluate",
          "aether_scale.evaluate.stage:build", reads=("regions",),
          optional_reads=("ae.zarr", "field.zarr", "model"), writes=("report",),
          cluster=False, version=2, on_skip="aether_scale.evaluate.stage:show_report"),
)

_BY_NAME = {s.name: s for s in STAGES}


def stage_names() -> list[str]:
    """Every stage, in data-flow order."""
    return [s.name for s in STAGES]


def stage(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(_BY_NAME)}") from None


def producer(artifact: str) -> Stage | None:
    """The stage that writes ``artifact`` (a kind such as ``model``), None for none."""
    return next((s for s in STAGES if artifact in s.writes), None)


def artifact_of(name: str) -> tuple[Artifact, str] | None:
    """``(artifact, variant)`` of a workspace entry name (``field_noaug.zarr`` → field, noaug)."""
    for a in ARTIFACTS.values():
        v = a.variant_of(name) if a.per_variant else ("" if name == a.name else None)
        if v is not None:
            return a, v
    return None


def is_complete(ws: Workspace, name: str) -> bool:
    """Whether workspace entry ``name`` exists and is whole: a folder holds its artifact's
    marker (a file name, or a glob such as ``*.parquet``); a single file counts as whole
    (a GeoParquet file placed as ``pois.parquet``, say)."""
    found = artifact_of(name)
    marker = found[0].marker if found else None
    if not marker or not ws.exists(name):
        return ws.exists(name)
    if not ws.fs.isdir(ws.path(name)):
        return True
    if any(c in marker for c in "*?["):
        return bool(ws.fs.glob(ws.path(f"{name}/{marker}")))
    return ws.exists(f"{name}/{marker}")


def train_variants(cfg: RunConfig) -> list[str]:
    """The model variants train makes: '' (AETHER) and every name in ``train.variants``."""
    return ["", *sorted(cfg.train.variants)]


# --------------------------------------------------------------------------- config keys
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
    return {k: v for k, v in sec.items() if not (k == "precision" and v == "float32")}


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
            inputs[label] = external_input(paths)
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


# --------------------------------------------------------------------------- running
@dataclass
class StageContext:
    """What a stage's build function gets: the workspace, the config, where to read
    (``reads``: entry name → path) and write (``outputs``: entry name → path in the
    work folder), the work folder itself (ledgers), and its logger."""

    ws: Workspace
    cfg: RunConfig
    plan: StagePlan
    work: Work
    log: logging.Logger
    force: bool = False

    @property
    def reads(self) -> dict[str, str]:
        return self.plan.reads

    @property
    def outputs(self) -> dict[str, str]:
        return self.work.outputs

    @property
    def storage_options(self) -> dict[str, Any] | None:
        return self.ws.storage_options or None

    def ledger_path(self, name: str) -> str:
        """The ledger folder of output ``name`` (inside the work folder)."""
        return self.work.path(f"ledger/{name}")


def _missing_error(ws: Workspace, st: Stage, missing: Sequence[str]) -> FileNotFoundError:
    kind = missing[0]
    prod = producer(kind)
    how = (f"run `aether-scale {prod.name} -w {ws.root}` first (or `aether-scale run -w "
           f"{ws.root} -c CONFIG` for every stage)") if prod else "put it there"
    art = ARTIFACTS[kind]
    what = ("does not exist" if not ws.exists(kind) else
            f"is incomplete (no {art.marker} inside: an interrupted copy?)")
    return FileNotFoundError(f"{ws.path(kind)} {what} (stage {st.name} reads it); {how}")


def check_ready(name: str, ws: Workspace, cfg: RunConfig) -> StagePlan:
    """The plan of stage ``name`` on the workspace as it is, or an error naming the
    missing input and the command that makes it (raised before any cluster starts)."""
    st = stage(name)
    p = plan(st, ws, cfg, available(ws))
    if p.missing:
        raise _missing_error(ws, st, p.missing)
    return p


def run_stage(name: str, ws: Workspace, cfg: RunConfig, *, force: bool = False,
              wait: bool = True) -> StageResult:
    """Run one stage on the workspace as it is (skipped when its manifest matches)."""
    st = stage(name)
    p = check_ready(name, ws, cfg)
    slog = get_logger(name)
    ranks = importlib.import_module(st.ranks) if st.ranks else None
    if ranks is not None:
        r = ranks.ranks(cfg)
        if r.distributed and r.rank != 0:
            return StageResult(name, ranks.follow(ws, cfg, p), {})

    def fn(work: Work) -> Mapping[str, Any] | None:
        return st.function()(StageContext(ws, cfg, p, work, slog, force))

    t0 = time.perf_counter()
    res = ws.run_stage(name, key=p.key, outputs=p.outputs, fn=fn, record=p.record(),
                       force=force, complete=lambda n: is_complete(ws, n), wait=wait)
    if ranks is not None and res.skipped:
        ranks.tell("skip")
    if res.skipped and st.on_skip:
        mod, fn = st.on_skip.split(":")
        getattr(importlib.import_module(mod), fn)(ws, slog)
    if not res.skipped:
        slog.info(f"[{name}] done in {time.perf_counter() - t0:.1f} s → "
                  + ", ".join(p.outputs))
    return res


def run_stages(names: Sequence[str], ws: Workspace | str, cfg: RunConfig, *,
               force: bool = False, wait: bool = True) -> list[StageResult]:
    """Run stages in order on one cluster session (opened only for stages that need it).

    The first stage's inputs must be in the workspace (checked before any cluster
    starts); later stages get theirs from the earlier ones.
    """
    from .cluster import ClusterSession

    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    if names:
        check_ready(names[0], ws, cfg)
    results = []
    with ClusterSession(cfg.cluster) as session:
        for name in names:
            st = stage(name)
            # a stage that is current is skipped without starting a cluster for it
            session.require(st.needs_cluster(cfg) and (force or not _current(st, ws, cfg)))
            results.append(run_stage(name, ws, cfg, force=force, wait=wait))
    return results


def _current(st: Stage, ws: Workspace, cfg: RunConfig) -> bool:
    """Whether ``st`` is current now (checked again, under its lock, when it runs)."""
    p = plan(st, ws, cfg, available(ws))
    m = ws.manifest(st.name)
    return (not p.missing and m is not None and m.get("key") == p.key
            and all(is_complete(ws, n) for n in p.outputs))


# --------------------------------------------------------------------------- status
@dataclass
class StageStatus:
    """``state``: ``current``, ``stale`` (``why`` lists the reasons), ``missing`` (never
    run, or its outputs are gone) or ``blocked`` (an input is missing upstream)."""

    stage: str
    state: str
    why: list[str]
    outputs: list[str]


def _config_changes(old: Mapping[str, Any], new: Mapping[str, Any], section: str) -> list[str]:
    a, b = flatten(dict(old)), flatten(dict(new))
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{section}.{k} changed: {a.get(k, 'unset')!r} → {b.get(k, 'unset')!r}")
    return out


def status(ws: Workspace, cfg: RunConfig) -> list[StageStatus]:
    """Each stage's state against ``cfg``, as a run would see it: a stale stage makes
    everything that reads its outputs stale too (their inputs would change), with the
    upstream cause named."""
    avail = available(ws)
    result: list[StageStatus] = []
    cause: dict[str, str] = {}  # entry name → the upstream reason it will change
    for st in STAGES:
        try:
            p = plan(st, ws, cfg, avail)
        except (FileNotFoundError, ValueError) as e:
            result.append(StageStatus(st.name, "blocked", [str(e)], []))
            continue
        if p.missing:
            result.append(StageStatus(st.name, "blocked",
                                      [f"needs {', '.join(p.missing)}"], p.outputs))
            continue
        m = ws.manifest(st.name)
        own: list[str] = []       # reasons of this stage itself
        inherited: list[str] = []  # inputs that an upstream rerun will change
        if m is None:
            state = "missing"
            own.append("never run here")
        elif m.get("key") == p.key and all(is_complete(ws, n) for n in p.outputs):
            state = "current"
        else:
            complete = all(is_complete(ws, n) for n in m.get("outputs", []))
            state = "stale" if complete else "missing"
            if not complete:
                own.append("an output is missing or incomplete")
            own += _config_changes(m.get("config", {}), p.config, st.section)
            old_in = m.get("inputs", {})
            for label, inp in p.inputs.items():
                prev = old_in.get(label, {}).get("fingerprint")
                if label in cause:
                    inherited.append(f"input {label} will change ({cause[label]})")
                elif prev != inp.fingerprint:
                    own.append(f"input {label} changed" if prev else f"new input {label}")
            own += [f"input {label} is gone" for label in old_in if label not in p.inputs]
            if sorted(m.get("outputs", [])) != sorted(p.outputs):
                own.append(f"outputs change: {m.get('outputs')} → {p.outputs}")
            if not own and not inherited:
                own.append("stage format changed (a new version of aether_scale)")
        if state != "current":
            root = f"{st.name} is {state}: {own[0]}" if own else inherited[0].split("(", 1)[1][:-1]
            for n in p.outputs:
                cause[n] = root
        # downstream stages see this stage's outputs as they would be after a run
        for kind in st.writes:
            avail[kind] = [(n, output_fingerprint(p.key, n)) for n in p.outputs
                           if artifact_of(n) and artifact_of(n)[0].name == kind]
        result.append(StageStatus(st.name, state, own + inherited, p.outputs))
    return result
