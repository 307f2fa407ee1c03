"""The stage graph as code: one registry, keys that mean what they say, status, logs."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from aether_scale import pipeline
from aether_scale.config import load_config
from aether_scale.pipeline import ARTIFACTS, STAGES, producer, stage_names, status
from aether_scale.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "aether_scale"


def _cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aether_scale", *args], capture_output=True,
                          text=True, env={**os.environ, "AETHER_SCALE_NO_BAR": "1", **(env or {})},
                          check=check, timeout=600)


# --------------------------------------------------------------------------- the registry
def test_every_read_is_written_upstream_and_every_artifact_has_a_writer():
    written: set[str] = set()
    for st in STAGES:
        for kind in st.reads:
            assert kind in written, f"{st.name} reads {kind} before any stage writes it"
        for kind in (*st.reads, *st.optional_reads, *st.writes):
            assert kind in ARTIFACTS, (st.name, kind)
        written.update(st.writes)
        assert callable(st.function())
    assert written == set(ARTIFACTS)
    for kind in ARTIFACTS:
        assert producer(kind) is not None


def test_variant_names_round_trip():
    model, field = ARTIFACTS["model"], ARTIFACTS["field.zarr"]
    assert model.variant("") == "model" and model.variant("noaug") == "model_noaug"
    assert field.variant("noaug") == "field_noaug.zarr"
    assert field.variant_of("field_lam05.zarr") == "lam05" and field.variant_of("field.zarr") == ""
    assert field.variant_of("ae.zarr") is None and model.variant_of("models") is None


def test_runtime_keys_and_input_paths_stay_out_of_the_key():
    cfg = load_config(data={"ingest": {"tiles": ["/a/*.tif"]}, "infer": {"threads": 3}},
                      check_paths=False)
    other = load_config(data={"ingest": {"tiles": ["/elsewhere/*.tif"]},
                              "infer": {"threads": 1, "batch_pixels": 4096}}, check_paths=False)
    for name in ("ingest", "infer"):
        st = pipeline.stage(name)
        assert pipeline.learned_config(st, cfg) == pipeline.learned_config(st, other)
    assert "tiles" not in pipeline.learned_config(pipeline.stage("ingest"), cfg)
    changed = load_config(data={"infer": {"dtype": "int8"}}, check_paths=False)
    st = pipeline.stage("infer")
    assert pipeline.learned_config(st, changed) != pipeline.learned_config(st, cfg)


def test_the_readme_tables_are_the_registry():
    """The README's stage and workspace tables are what `aether-scale stages --markdown`
    prints, so docs and code cannot drift."""
    out = _cli("stages", "--markdown").stdout.strip()
    readme = (REPO / "README.md").read_text()
    assert out in readme


def test_package_has_no_import_cycles():
    """Module-level imports between aether_scale modules form no cycle."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        pkg = mod if rel.name == "__init__" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:  # top level only: lazy imports are fine
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("aether_scale"):
                    deps.add(target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("aether_scale")}
        graph[mod] = deps

    def resolve(d: str) -> str | None:
        while d and d not in graph:
            d = d.rsplit(".", 1)[0] if "." in d else ""
        return d or None

    edges = {m: {r for d in ds if (r := resolve(d)) and r != m} for m, ds in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in edges.get(m, ()):
            # a package importing its own submodules (re-exports) is not a cycle
            if n.startswith(m + "."):
                continue
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " → ".join([*path, m, n]))
            if not state.get(n):
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m, [])


# --------------------------------------------------------------------------- on a workspace
def test_status_current_then_stale_with_the_reason_then_runtime_keys_change_nothing(tiny_demo):
    ws = Workspace(tiny_demo["workspace"])
    saved = str(tiny_demo["workspace"] / "config.yaml")
    rows = status(ws, load_config(saved))
    assert [(r.stage, r.state) for r in rows] == [(s, "current") for s in stage_names()]

    lam = {r.stage: r for r in status(ws, load_config(saved, ["train.lam=0.5"]))}
    assert [s for s in stage_names() if lam[s].state != "current"] == \
        ["train", "infer", "regions", "baselines", "evaluate"]
    assert lam["train"].why == ["train.lam changed: 0.2 → 0.5"]
    for s in ("infer", "regions", "baselines", "evaluate"):
        assert any("train.lam changed: 0.2 → 0.5" in w for w in lam[s].why), lam[s].why

    knobs = ["infer.threads=1", "infer.batch_pixels=2048", "pool.block_mb=64",
             "train.threads=1", "text.batch_size=32", "cluster.n_workers=2",
             "cluster.kind=threads"]
    assert all(r.state == "current" for r in status(ws, load_config(saved, knobs)))

    out = _cli("status", "-w", str(tiny_demo["workspace"]), "--set", "train.lam=0.5").stdout
    assert "train.lam changed: 0.2 → 0.5" in out
    rows = json.loads(_cli("status", "-w", str(tiny_demo["workspace"]), "--json", "--set",
                           "train.lam=0.5").stdout)
    assert [r["state"] for r in rows] == ["current"] * 4 + ["stale"] * 5


def test_a_copied_workspace_is_current_and_its_run_skips_every_stage(tiny_demo, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(tiny_demo["workspace"], copy)
    res = _cli("run", "-w", str(copy), "-q", env={"HOME": str(tiny_demo["home"])})
    for st in stage_names():
        m = json.loads((copy / "manifests" / f"{st}.json").read_text())
        m0 = json.loads((tiny_demo["workspace"] / "manifests" / f"{st}.json").read_text())
        assert m["key"] == m0["key"] and m["completed_at"] == m0["completed_at"], st
    assert "error" not in res.stderr


def test_demo_log_lines_are_short_and_free_of_carriage_returns(tiny_demo):
    raw = tiny_demo["log"].read_bytes()
    assert b"\r" not in raw
    lines = raw.decode("utf-8").splitlines()
    assert max(len(ln) for ln in lines) <= 300
    text = "\n".join(lines)
    for stage in stage_names():
        assert f"[{stage}] done in" in text
    assert "Consolidated metadata" not in text and "Traceback" not in text


def test_regions_are_geoparquet_with_their_crs(tiny_demo):
    import geopandas as gpd
    import pandas as pd

    for task, label in (("luc", "label"), ("sdm", "ns-sec_1")):
        path = tiny_demo["workspace"] / "regions" / f"{task}.parquet"
        gdf = gpd.read_parquet(path)
        assert gdf.crs.to_epsg() == 32630 and len(gdf) > 100
        assert label in gdf.columns and gdf[label].notna().all()
        assert {"AE", "AETHER", "AETHER_noaug"} <= set(gdf.columns)
        assert len(pd.read_parquet(path).columns) == len(gdf.columns)


def test_every_store_opens_without_warnings_and_is_indexed(tiny_demo):
    import xarray as xr

    ws = tiny_demo["workspace"]
    for name in ("ae.zarr", "text.zarr", "triplets.zarr", "field.zarr", "field_noaug.zarr"):
        assert (ws / name / "aether_chunks.json").exists(), name
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            xr.open_zarr(ws / name).close()


def test_stages_that_need_no_cluster_start_none(tmp_path, caplog):
    """`train` and `evaluate` run in-process: a LocalCluster would only slow torch down."""
    from fixtures import make_problem

    from aether_scale.stores.triplets import write_triplets

    ws = Workspace(tmp_path / "ws")
    write_triplets(ws.path("triplets.zarr"), **make_problem(300), chunk_rows=128)
    cfg = load_config(data={"train": {"epochs": 1, "batch_size": 64, "threads": 1,
                                      "variants": {}}})
    caplog.set_level("INFO")
    pipeline.run_stages(["train"], ws, cfg)
    assert "dask:" not in caplog.text and "[train] done in" in caplog.text
    assert os.path.exists(ws.path("model/checkpoint.pt"))
    assert not os.listdir(ws.path(".work"))


def test_a_variant_removed_from_the_config_leaves_no_stale_folder(tmp_path):
    from fixtures import make_problem

    from aether_scale.stores.triplets import write_triplets

    ws = Workspace(tmp_path / "ws")
    write_triplets(ws.path("triplets.zarr"), **make_problem(300), chunk_rows=128)
    base = {"epochs": 1, "batch_size": 64, "threads": 1}
    two = load_config(data={"train": {**base, "variants": {"lam05": {"lam": 0.5}}}})
    r = pipeline.run_stage("train", ws, two)
    assert sorted(r.outputs) == ["model", "model_lam05"]
    ck = json.loads(open(ws.path("model_lam05/metrics.json")).read())
    assert ck["config"]["lam"] == 0.5
    one = load_config(data={"train": {**base, "variants": {}}})
    pipeline.run_stage("train", ws, one)
    assert not ws.exists("model_lam05") and ws.exists("model/checkpoint.pt")


def test_missing_input_is_refused_naming_the_stage_to_run(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(FileNotFoundError, match=r"ae\.zarr does not exist.*aether-scale ingest"):
        pipeline.run_stages(["pool"], ws, load_config())
