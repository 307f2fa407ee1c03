"""The main job end to end: ``aether-scale demo`` on a tiny synthetic city, for real
(LocalCluster worker process, bundled MiniLM, Zarr on disk), then a rerun that resumes."""

from __future__ import annotations

import json

from fixtures import TINY_DEMO

from aether_scale.cli import main
from aether_scale.demo import run_demo
from aether_scale.pipeline import stage_names


def test_demo_runs_every_stage_then_resumes(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # fresh text cache: the model really runs
    caplog.set_level("INFO")
    ws = tmp_path / "demo"
    out = run_demo(str(ws), overrides=TINY_DEMO)
    assert set(out) == {"workspace", "results", "city", "retrieval", "sweep", "summary"}
    assert [p["state"] for p in out["sweep"]["points"]] == ["ran", "ran"]  # the λ study
    assert "## Metric vs λ" in out["summary"] and "| 0.9 |" in out["summary"]
    assert out["workspace"] == str(ws)
    assert [r.stage for r in out["results"]] == stage_names()
    assert not any(r.skipped for r in out["results"])
    assert str(ws / "city") in out["city"]["pois"]  # the synthetic city lives in the workspace
    assert "| AETHER |" in out["summary"] and str(ws / "report" / "report.md") in out["summary"]
    assert "stages run: " + ", ".join(stage_names()) in out["summary"]
    assert "| AETHER text query |" in out["summary"]  # text retrieval vs held-out POIs
    assert out["retrieval"]["n_subcategories"] >= 20

    metrics = json.loads((ws / "report" / "metrics.json").read_text())
    for task, names in (("luc", ("f1", "precision", "recall")), ("sdm", ("kl", "l1", "chebyshev"))):
        for method in ("AE", "AETHER", "AETHER_noaug", "TF-IDF", "LDA"):
            for metric in names:
                values = metrics[task][method][metric]
                assert len(values) == 2 and all(v == v for v in values), (task, method, metric)
    assert (ws / "report" / "report.md").read_text().count("AETHER") >= 2
    pool = json.loads((ws / "manifests" / "pool.json").read_text())["stats"]
    assert pool["n_triplets"] + pool["n_dropped_no_ae"] + pool["n_dropped_no_text"] <= 3000
    assert pool["n_triplets"] > 2500

    # every stage's manifest matches: a rerun does no work
    caplog.clear()
    again = run_demo(str(ws), overrides=TINY_DEMO)
    assert [r.stage for r in again["results"]] == stage_names()
    assert all(r.skipped for r in again["results"])
    assert caplog.text.count("up to date (manifest matches) — skipped") == len(stage_names())
    assert "stages run: none (all current)" in again["summary"]
    assert [p["state"] for p in again["sweep"]["points"]] == ["reused", "reused"]
    assert "already written for this config" in caplog.text  # the city is not rewritten


def test_demo_command_line_reports_config_errors(tmp_path, capsys):
    assert main(["demo", "-w", str(tmp_path / "d"), "--set", "train.epochz=3"]) == 2
    assert "train.epochz" in capsys.readouterr().err
