"""The main job end to end: ``aether-scale demo`` on a tiny synthetic city, for real
(LocalCluster worker process, bundled MiniLM, Zarr on disk — the ``tiny_demo`` fixture),
then a rerun that resumes."""

from __future__ import annotations

import json
import shutil

from fixtures import TINY_DEMO

from aether_scale.cli import main
from aether_scale.demo import run_demo
from aether_scale.pipeline import stage_names


def test_demo_runs_every_stage_then_resumes(tiny_demo, tmp_path, caplog, monkeypatch):
    """The first run is the ``tiny_demo`` fixture (``aether-scale demo`` as a subprocess,
    fresh text cache); the rerun, in-process on a copy, does no work."""
    first = tiny_demo["log"].read_text()
    assert "stages run: " + ", ".join(stage_names()) in first
    assert "| AETHER |" in first and "| AETHER text query |" in first
    assert first.count("[sweep] lam-") >= 2 and "| 0.9 |" in first  # the λ study ran
    src = tiny_demo["workspace"]
    metrics = json.loads((src / "report" / "metrics.json").read_text())
    for task, names in (("luc", ("f1", "precision", "recall")), ("sdm", ("kl", "l1", "chebyshev"))):
        for method in ("AE", "AETHER", "AETHER_noaug", "TF-IDF", "LDA"):
            for metric in names:
                values = metrics[task][method][metric]
                assert len(values) == 2 and all(v == v for v in values), (task, method, metric)
    assert (src / "report" / "report.md").read_text().count("AETHER") >= 2
    pool = json.loads((src / "manifests" / "pool.json").read_text())["stats"]
    assert pool["n_triplets"] + pool["n_dropped_no_ae"] + pool["n_dropped_no_text"] <= 3000
    assert pool["n_triplets"] > 2500

    # every stage's manifest matches: a rerun (of a copy: a moved workspace) does no work
    monkeypatch.setenv("HOME", str(tiny_demo["home"]))
    ws = tmp_path / "demo"
    shutil.copytree(src, ws, symlinks=True)
    caplog.set_level("INFO")
    again = run_demo(str(ws), overrides=TINY_DEMO)
    assert set(again) == {"workspace", "results", "city", "retrieval", "sweep", "summary"}
    assert again["workspace"] == str(ws)
    assert str(ws / "city") in again["city"]["pois"]  # the synthetic city lives in the workspace
    assert [r.stage for r in again["results"]] == stage_names()
    assert all(r.skipped for r in again["results"])
    assert caplog.text.count("up to date (manifest matches) — skipped") == len(stage_names())
    assert "stages run: none (all current)" in again["summary"]
    assert "| AETHER |" in again["summary"] and str(ws / "report" / "report.md") in again["summary"]
    assert "| AETHER text query |" in again["summary"]  # text retrieval vs held-out POIs
    assert again["retrieval"]["n_subcategories"] >= 20
    assert [p["state"] for p in again["sweep"]["points"]] == ["reused", "reused"]
    assert "## Metric vs λ" in again["summary"] and "| 0.9 |" in again["summary"]
    assert "already written for this config" in caplog.text  # the city is not rewritten


def test_demo_command_line_reports_config_errors(tmp_path, capsys):
    assert main(["demo", "-w", str(tmp_path / "d"), "--set", "train.epochz=3"]) == 2
    assert "train.epochz" in capsys.readouterr().err
