"""The registry: every workspace artifact and every stage, declared once, in data-flow order.

:data:`ARTIFACTS` names what a workspace holds; :data:`STAGES` says, for each stage,
which artifacts it reads and writes, its config section, which of its keys are
runtime-only (never a reason to rerun) or name external inputs (fingerprinted by
content, not by path), whether it runs dask work on a cluster, and the function that
builds it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import RunConfig

if TYPE_CHECKING:
    from ..workspace import Workspace

__all__ = ["ARTIFACTS", "KEY_FORMAT", "STAGES", "Artifact", "Stage", "artifact_of", "is_complete",
           "producer", "stage", "stage_names", "train_variants"]

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
    Artifact("baselines", "CaLLiPer+, Space2Vec, Place2Vec, Doc2Vec unit features: a folder "
             "per method (a .npy per task, meta.json, the encoder)",
             "aether_scale.baselines.stage"),
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
    #: ``module:function(ctx) -> (modules, [(what, bytes)], fix)``: what one task of the
    #: stage imports and holds, checked against the workers' memory before it starts
    memory: str | None = None

    def needs_cluster(self, cfg: RunConfig) -> bool:
        return self.cluster(cfg) if callable(self.cluster) else bool(self.cluster)

    def function(self) -> Callable[..., Mapping[str, Any] | None]:
        """The build function: ``fn(ctx: StageContext) -> stats``."""
        mod, fn = self.run.split(":")
        return getattr(importlib.import_module(mod), fn)


def _text_cluster(cfg: RunConfig) -> bool:
    # text encodes in-process unless workers add cores (text.choose_mode): worth a
    # cluster only when it is remote or dask mode is forced
    return cfg.text.mode == "dask" or cfg.cluster.kind in ("gateway", "address")


def infer_in_process(cfg: RunConfig) -> int | None:
    """The threads infer runs its tasks on in this process, or None when they go to the
    run's cluster (``infer.scheduler``; ``auto`` keeps a ``local`` cluster's worker
    processes out of it: each task reads and writes one chunk, so they add start-up,
    three imports of torch and inter-process traffic, and no memory safety that a
    bounded task needs; measured on 8.4 M px here: 31.4 vs 34.8–40.0 s whole command)."""
    mode, kind = cfg.infer.scheduler, cfg.cluster.kind
    if mode == "cluster" or (mode == "auto" and kind != "local"):
        return None
    return max(1, cfg.cluster.n_workers * cfg.cluster.threads_per_worker)


def _infer_cluster(cfg: RunConfig) -> bool:
    return infer_in_process(cfg) is None


def _stage_fn(name: str, fn: str) -> str:
    return f"aether_scale.{name}.stage:{fn}"


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "AlphaEarth GeoTIFF/COG/VRT tiles → ae.zarr", "ingest",
          _stage_fn("ingest", "build"), writes=("ae.zarr",), input_keys=("tiles",),
          externals=_stage_fn("ingest", "external_inputs"),
          memory=_stage_fn("ingest", "worker_memory"), version=2),
    Stage("pois", "POI files → pois.parquet (descriptions, AE CRS)", "pois",
          _stage_fn("pois", "build"), reads=("ae.zarr",), writes=("pois.parquet",),
          input_keys=("sources.*.path",), externals=_stage_fn("pois", "external_inputs"),
          memory=_stage_fn("pois", "worker_memory")),
    Stage("text", "POI descriptions → text.zarr (sentence-transformers)", "text",
          _stage_fn("text", "build"), reads=("pois.parquet",), writes=("text.zarr",),
          runtime_keys=frozenset({"cache_dir", "mode", "batch_size", "flush_texts",
                                  "dask_min_texts", "device", "compact_shards", "threads"}),
          input_keys=("model",), externals=_stage_fn("text", "external_inputs"),
          cluster=_text_cluster, version=2),
    Stage("pool", "AE pooled in buffers around POIs → triplets.zarr", "pool",
          _stage_fn("pool", "build"), reads=("ae.zarr", "pois.parquet", "text.zarr"),
          writes=("triplets.zarr",), runtime_keys=frozenset({"block_mb"}),
          memory=_stage_fn("pool", "worker_memory"), version=2),
    Stage("train", "train the AETHER projector (and train.variants) → model/", "train",
          _stage_fn("train", "build"), reads=("triplets.zarr",), writes=("model",),
          runtime_keys=frozenset({"device", "threads", "prefetch", "in_memory", "save_every",
                                  "kernels"}),
          cluster=False, version=2, ranks="aether_scale.train.stage"),
    Stage("infer", "projector over every AE pixel → field.zarr (one per model)", "infer",
          _stage_fn("infer", "build"), reads=("ae.zarr", "model"), writes=("field.zarr",),
          runtime_keys=frozenset({"batch_pixels", "device", "threads", "scheduler"}),
          cluster=_infer_cluster, memory=_stage_fn("infer", "worker_memory"), version=2),
    Stage("regions", "AE and fields pooled around label units → regions/", "regions",
          _stage_fn("regions", "build"), reads=("ae.zarr",),
          optional_reads=("field.zarr", "pois.parquet"), writes=("regions",),
          input_keys=("luc_points", "sdm_units", "sdm_table"),
          externals=_stage_fn("regions", "external_inputs"),
          memory=_stage_fn("regions", "worker_memory"), version=2),
    Stage("baselines", "CaLLiPer+, Space2Vec, Place2Vec, Doc2Vec → baselines/", "baselines",
          _stage_fn("baselines", "build"), reads=("pois.parquet", "regions"),
          optional_reads=("text.zarr",), writes=("baselines",),
          runtime_keys=frozenset({"device", "threads"}), cluster=False),
    Stage("evaluate", "the paper's Table 1 protocol → report/", "evaluate",
          _stage_fn("evaluate", "build"), reads=("regions",),
          optional_reads=("ae.zarr", "field.zarr", "model", "baselines"), writes=("report",),
          runtime_keys=frozenset({"workers"}), cluster=False, version=2, on_skip=_stage_fn("evaluate", "show_report")),
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
