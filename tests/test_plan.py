"""``aether-scale plan``: estimates against what the stages really write.

A tiny city written by the project's own writer (``write_city``) is planned, then
ingested and POI-processed for real: the plan's chunk count, grid, POI rows, distinct
descriptions and ae.zarr bytes must match what the stages wrote. The national example
(230,000 km², 4 million POIs) must come out at ≈2.3 billion pixels and ≈150 GB of AE;
worker-hours must not depend on the worker count and wall time must never grow with it
nor fall under the serial floor; ``--calibrate`` must write a file the next plan reads.
No test asserts on a duration.
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from aether_scale.config import SynthSection, deep_merge, load_config
from aether_scale.plan import SyntheticInputs, make_plan, markdown, text
from aether_scale.plan.calibration import load_calibration

WORKERS = [1, 2, 3, 8, 64, 1000]
CHUNK = 96  # 256 px city → 3 × 3 chunks, ragged at the far edges


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> dict:
    """A tiny synthetic city, ingested and POI-processed for real (threads scheduler)."""
    from aether_scale.demo import city_inputs
    from aether_scale.pipeline import run_stages
    from aether_scale.synthetic import write_city
    from aether_scale.workspace import Workspace

    root = tmp_path_factory.mktemp("plan_city")
    paths = write_city(root / "city", SynthSection(size_px=256, n_pois=800, n_luc_points=120,
                                                   n_regions=60, seed=3))
    data = deep_merge({"cluster": {"kind": "threads"}, "ingest": {"chunk_px": CHUNK}},
                      city_inputs(paths))
    cfg = load_config(None, [], data=data)
    ws = Workspace(str(root / "ws"))
    run_stages(["ingest", "pois"], ws, cfg)
    return {"cfg": cfg, "paths": paths, "ws": ws, "root": root,
            "ingest": ws.manifest("ingest")["stats"], "pois": ws.manifest("pois")["stats"]}


def _plan(cfg, **kw):
    kw.setdefault("default_calibration", False)
    kw.setdefault("benchmarks", False)
    return make_plan(cfg, **kw)


def _du(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)


def _stage(plan, name):
    return next(s for s in plan.stages if s.stage == name)


def test_grid_and_chunks_equal_what_ingest_writes(city):
    plan = _plan(city["cfg"], workers=[1, 2])
    ing, g = city["ingest"], plan.inputs.grid
    assert (g.width, g.height) == (ing["width"], ing["height"]) == (256, 256)
    assert g.n_chunks == ing["chunks"] == 9
    assert _stage(plan, "ingest").chunks == _stage(plan, "ingest").tasks == ing["chunks"]
    assert g.tiles == ing["tiles"] == 2 and g.tiles_reprojected == ing["tiles_reprojected"]
    assert g.crs == ing["crs"]


def test_ae_bytes_within_stated_factor_of_the_store(city):
    """The raw estimate is the ingest's own byte count; the stored ae.zarr (zstd +
    crc32c) lies between half of it and it (the factor the plan states for no
    calibration: 'upper bound')."""
    plan = _plan(city["cfg"])
    st = _stage(plan, "ingest")
    assert st.bytes_written_raw == city["ingest"]["bytes"] == 256 * 256 * 64
    real = _du(city["ws"].path("ae.zarr"))
    assert st.bytes_written / 2 <= real <= st.bytes_written * 1.02
    # a calibration's measured zstd ratio brings the estimate onto the store
    cal = load_calibration(None, benchmarks=False, default_file=False)
    assert "upper bound" in cal.figures["ratio_ae"].source


def test_poi_count_and_distinct_descriptions(city):
    plan = _plan(city["cfg"])
    rows = len(pd.read_parquet(city["paths"]["pois"]))
    p = plan.inputs.pois
    assert p.rows == rows == city["pois"]["rows_read"] == 800
    written = pd.read_parquet(city["ws"].path("pois.parquet"))
    assert p.distinct == written["description"].nunique()
    assert p.distinct_source.startswith("exact")
    assert 0 <= p.cached <= p.distinct
    lab = plan.inputs.labels
    assert (lab.luc, lab.sdm) == (120, 60)


def test_sampled_distinct_is_an_upper_estimate(city, monkeypatch):
    import aether_scale.plan.inputs as inputs

    monkeypatch.setattr(inputs, "SAMPLE_ROWS", 200)
    p = _plan(city["cfg"]).inputs.pois
    exact = pd.read_parquet(city["ws"].path("pois.parquet"))["description"].nunique()
    assert p.rows == 800 and p.distinct_source.startswith("upper estimate")
    assert exact <= p.distinct <= p.rows


def test_more_workers_never_cost_more(city):
    for gpu in (False, True):
        plan = _plan(city["cfg"], workers=WORKERS, gpu=gpu)
        hours = [plan.worker_hours()] * len(WORKERS)
        walls = [plan.wall(n) for n in WORKERS]
        assert hours == [plan.worker_hours() for _ in WORKERS]
        assert all(a >= b for a, b in zip(walls, walls[1:], strict=False)), walls
        assert all(w >= plan.serial_floor() - 1e-9 for w in walls)
        for s in plan.stages:
            ws = [s.wall(plan.cal, n, plan.tpw) for n in WORKERS]
            assert all(a >= b for a, b in zip(ws, ws[1:], strict=False)), (s.stage, ws)
            assert ws[-1] >= s.floor(plan.cal) - 1e-9


def test_infer_in_the_client_pays_no_worker_import(city):
    """cluster.kind local runs infer's tasks in the client (infer.scheduler auto): the
    plan charges its workers no torch import there, and does with scheduler cluster."""
    def cfg(scheduler):
        over = {"cluster": {"kind": "local"}, "infer": {"scheduler": scheduler}}
        return load_config(data=deep_merge(city["cfg"].model_dump(), over))

    local, on_workers = (_plan(cfg(s), workers=WORKERS) for s in ("auto", "cluster"))
    a, b = _stage(local, "infer"), _stage(on_workers, "infer")
    assert "worker_torch_import_s" not in a.figures and "worker_torch_import_s" in b.figures
    assert b.per_worker_s - a.per_worker_s == pytest.approx(
        local.cal["worker_torch_import_s"])


def test_national_example():
    cfg = load_config("national")
    syn = SyntheticInputs(area_km2=230_000, pois=4_000_000, luc_points=100_000,
                          sdm_units=42_000)
    cpu = _plan(cfg, synthetic=syn, workers=[1, 8, 64])
    g = cpu.inputs.grid
    assert g.data_pixels == 2_300_000_000
    assert 2.2e9 <= g.pixels <= 2.4e9  # the square around it, whole pixels
    assert g.crs == "EPSG:27700" and g.n_chunks == 47 * 47
    ing = _stage(cpu, "ingest")
    assert 145e9 <= ing.bytes_written_raw <= 150e9  # ≈150 GB of int8 AE a year
    assert cpu.inputs.pois.rows == 4_000_000
    # 1 → 8 → 64 workers: the parallel stages shrink, the serial floor stays
    w1, w8, w64 = (cpu.wall(n) for n in (1, 8, 64))
    assert w1 > w8 > w64 >= cpu.serial_floor()
    assert _stage(cpu, "train").tasks == 0 and _stage(cpu, "train").serial_s > 0
    gpu = _plan(cfg, synthetic=syn, workers=[1, 8, 64], gpu=True)
    assert _stage(gpu, "train").serial_s < _stage(cpu, "train").serial_s
    assert gpu.cal.figures["gpu_train_s_per_triplet"].kind == "assumption"
    out = text(gpu)
    assert "assumption" in out and "gpu_infer_px_s" in out
    md = markdown(cpu)
    assert md.count("\n") == len(cpu.stages) + 2 and "wall N=64" in md
    js = cpu.to_json()
    assert js["inputs"]["grid"]["n_chunks"] == 47 * 47
    assert set(js["total"]["wall_s"]) == {"1", "8", "64"}


def test_tile_index_reprojects_through_the_grid_planner(tmp_path):
    """Two UTM-zone footprints planned onto EPSG:27700 go through plan_grid: reprojected,
    one grid around both."""
    idx = tmp_path / "tiles.yaml"
    idx.write_text("crs: EPSG:32630\ntiles:\n"
                   "  - {bounds: [500000, 5700000, 520480, 5720480]}\n"
                   "  - {bounds: [520480, 5700000, 540960, 5720480], valid_fraction: 0.5}\n")
    cfg = load_config("national")
    plan = _plan(cfg, synthetic=SyntheticInputs(tile_index=str(idx), pois=1000))
    g = plan.inputs.grid
    assert g.tiles == 2 and g.tiles_reprojected == 2 and g.crs == "EPSG:27700"
    assert g.data_pixels == round(2048 * 2048 * 1.5)
    assert g.width * g.height >= 2048 * 4096 and g.n_chunks >= 8


def test_calibrate_writes_what_the_next_plan_uses(city, tmp_path, capsys):
    """``aether-scale plan --calibrate`` (here on an even smaller city, without the
    import-memory and cluster-start extras) writes a JSON; the next plan reads it."""
    from aether_scale.cli import main
    from aether_scale.plan import calibrate

    path = tmp_path / "cal.json"
    doc = calibrate(str(path), city={"size_px": 128, "n_pois": 300, "n_luc_points": 80,
                                     "n_regions": 40}, extras=False)
    saved = json.loads(path.read_text())
    assert saved["format"] == 1 and saved["figures"] == doc["figures"]
    for k in ("ingest_mb_s", "pool_pois_s", "text_texts_s", "train_s_per_triplet",
              "infer_px_s", "evaluate_s_per_unit_head"):
        assert saved["figures"][k]["kind"] == "measured" and saved["figures"][k]["value"] > 0
    plan = _plan(city["cfg"], calibration=str(path))
    f = plan.cal.figures["ingest_mb_s"]
    assert f.kind == "measured" and f.value == saved["figures"]["ingest_mb_s"]["value"]
    ing = _stage(plan, "ingest")
    assert ing.work_s == pytest.approx(256 * 256 * 64 / (f.value * 1e6))
    # through the command line, as JSON
    cfg_file = tmp_path / "run.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(city["cfg"].model_dump(mode="json")))
    capsys.readouterr()
    assert main(["plan", "-c", str(cfg_file), "--calibration", str(path), "--json",
                 "--workers", "1,4"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["calibration"]["figures"]["infer_px_s"]["kind"] == "measured"
    assert js["inputs"]["grid"]["n_chunks"] == city["ingest"]["chunks"]
    assert js["total"]["wall_s"]["1"] >= js["total"]["wall_s"]["4"]
