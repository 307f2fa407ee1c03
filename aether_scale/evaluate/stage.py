"""The ``evaluate`` stage: ``regions/`` → ``report/`` (metrics.json, report.md, plots).

Every feature method the region tables hold (AE, AETHER and each variant), the trained
baselines of ``baselines/`` (CaLLiPer+, Space2Vec, Place2Vec, Doc2Vec) and the
POI-only baselines go through the protocol of :mod:`.protocol` with the same splits
and seeds; :mod:`.report` writes the Table-1-shaped report. Reads and writes go
through the workspace filesystem, so the stage runs on fsspec workspaces too.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from ..config import EvaluateSection
from ..stores.regions import RegionTable
from .baselines import BASELINE_NAMES, bags_to_matrix, lda_features, tfidf_features
from .protocol import evaluate_task
from .report import write_report

__all__ = ["build", "show_report", "task_inputs"]


def task_inputs(regions: RegionTable, task: str, cfg: EvaluateSection,
                baselines: tuple[str, Any] | None = None
                ) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """``(features by method, labels, info)`` of one task: the region table's features,
    the trained baselines in ``baselines`` (``(uri, filesystem)`` of ``baselines/``) and
    the configured POI baselines (LDA as a function of the seed)."""
    table, feats, meta = regions.read(task)
    if task == "luc":
        y = table["label"].to_numpy()
    else:
        y = table[meta["labels"]].to_numpy(np.float64)
    features: dict[str, Any] = dict(feats)
    if baselines is not None:
        from ..baselines import read_features

        features.update(read_features(baselines[0], task, table, baselines[1]))
    if cfg.baselines and "poi_tokens" in table.columns:
        counts, _vocab = bags_to_matrix(list(table["poi_tokens"]), list(table["poi_counts"]))
        if "tfidf" in cfg.baselines:
            features[BASELINE_NAMES["tfidf"]] = tfidf_features(counts)
        if "lda" in cfg.baselines:
            k = cfg.lda_topics

            def lda(seed: int, _c: Any = counts, _k: int = k) -> np.ndarray:
                return lda_features(_c, _k, seed)

            features[BASELINE_NAMES["lda"]] = lda
    info = {"units": int(len(y)), "regions": meta.get("stats", {}),
            "buffer_m": meta.get("buffer_m")}
    if task == "luc":
        info["classes"] = int(len(np.unique(y)))
    return features, y, info


def _workers(ec: EvaluateSection) -> int:
    from ..devices import local_cores

    return ec.workers if ec.workers is not None else local_cores()


def build(ctx) -> dict[str, Any]:
    """Run the protocol on every task the region tables hold; write ``report/``."""
    ec = ctx.cfg.evaluate
    ws = ctx.ws
    t0 = time.perf_counter()
    regions = RegionTable(ctx.reads["regions"], storage_options=ctx.storage_options)
    have = regions.tasks()
    metrics: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for task in ec.tasks:
        if task not in have:
            ctx.log.warning(f"[evaluate] {task}: no units in regions/ (regions.{task}_* not set) "
                            "— skipped")
            continue
        trained = (ctx.reads["baselines"], ws.fs) if "baselines" in ctx.reads else None
        features, y, info[task] = task_inputs(regions, task, ec, trained)
        metrics[task] = evaluate_task(task, features, y, ec, log=ctx.log.info,
                                      workers=_workers(ec))
    if not metrics:
        raise ValueError("no task could be evaluated: regions/ has neither luc nor sdm "
                         "(set regions.luc_points and/or regions.sdm_units)")
    out = ctx.outputs["report"]
    ws.fs.makedirs(out, exist_ok=True)
    ws.fs.pipe_file(f"{out}/metrics.json", json.dumps(metrics, indent=2).encode("utf-8"))
    run_info = {"config": ctx.cfg.section("evaluate"), "tasks": info,
                "seconds": round(time.perf_counter() - t0, 1)}
    ws.fs.pipe_file(f"{out}/run.json", json.dumps(run_info, indent=2, default=str).encode("utf-8"))
    models = {n: p for n, p in ctx.reads.items() if n.startswith("model")}
    fields = (ctx.reads.get("ae.zarr"), ctx.reads.get("field.zarr"))
    table = write_report(out, metrics, run_info, fs=ws.fs, plots=ec.plots,
                         fields=fields if all(fields) else None, models=models,
                         storage_options=ctx.storage_options)
    for line in table.splitlines():
        ctx.log.info(line)
    return {"tasks": {t: {"units": info[t]["units"], "methods": sorted(metrics[t])}
                      for t in metrics}, "seconds": run_info["seconds"]}


def show_report(ws, log) -> None:
    """Log the table of the report a skipped run left in place (what a run would show)."""
    md = ws.path("report/report.md")
    if ws.fs.exists(md):
        for line in ws.fs.cat_file(md).decode("utf-8").splitlines():
            if line.startswith("## Protocol"):
                break
            if line.startswith(("|", "- ")):
                log.info(line)
