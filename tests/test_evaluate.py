"""The Table 1 protocol: metrics by hand, splits, determinism, report files and schema."""

from __future__ import annotations

import json
import os
import uuid

import geopandas as gpd
import numpy as np
import pytest
import scipy.sparse as sp

from aether_scale.config import EvaluateSection, load_config
from aether_scale.evaluate import (
    evaluate_task,
    luc_metrics,
    make_split,
    sdm_metrics,
    standardize,
)
from aether_scale.evaluate.baselines import bags_to_matrix, lda_features, tfidf_features
from aether_scale.evaluate.report import format_table
from aether_scale.pipeline import run_stage
from aether_scale.regions.bags import bag_columns
from aether_scale.stores.regions import RegionTable, write_region_table
from aether_scale.workspace import Workspace

FAST = EvaluateSection(seeds=[0, 1], max_epochs=60, patience=10, lr=1e-2, lda_topics=4)


def test_sdm_metrics_by_hand():
    q = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    p = np.array([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]])
    m = sdm_metrics(q, p)
    kl0 = 0.5 * np.log(0.5 / 0.25) * 2  # q=0 term contributes nothing
    assert m["kl"] == pytest.approx(kl0 / 2)
    assert m["l1"] == pytest.approx((0.25 + 0.25 + 0.5) / 2)
    assert m["chebyshev"] == pytest.approx(0.5 / 2)
    # p = 0 where q > 0 is floored at eps, not infinite
    m2 = sdm_metrics(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert np.isfinite(m2["kl"]) and m2["kl"] == pytest.approx(-np.log(1e-8))


def test_luc_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 0, 2])
    # class 0: P=1/2 R=1/2; class 1: P=2/3 R=1; class 2: P=1 R=1/2
    prec = (0.5 + 2 / 3 + 1) / 3
    rec = (0.5 + 1 + 0.5) / 3
    f1s = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    m = luc_metrics(y, p)
    assert m["precision"] == pytest.approx(prec)
    assert m["recall"] == pytest.approx(rec)
    assert m["f1"] == pytest.approx(np.mean(f1s))


def test_splits_are_disjoint_deterministic_and_seeded():
    a, b, c = make_split(100, 3), make_split(100, 3), make_split(100, 4)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.test, c.test)
    allidx = np.concatenate([a.train, a.val, a.test])
    assert len(allidx) == 100 and len(np.unique(allidx)) == 100
    assert (len(a.test), len(a.val)) == (20, 10)
    with pytest.raises(ValueError, match="cannot be split"):
        make_split(3, 0)


def test_standardize_uses_train_only():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [100.0, 5.0]])
    s = standardize(x, np.array([0, 1]))
    np.testing.assert_allclose(s[:2, 0], [-1, 1])
    assert s[2, 0] == pytest.approx(99.0)
    np.testing.assert_allclose(s[:2, 1], [0, 0])  # constant train column: std 1


def _luc_data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    centers = rng.normal(size=(4, 8)) * 3
    good = centers[y] + rng.normal(size=(n, 8))
    noise = rng.normal(size=(n, 8))
    return good, noise, y


def test_luc_protocol_learns_and_is_deterministic():
    good, noise, y = _luc_data()
    feats = {"good": good, "noise": noise}
    r1 = evaluate_task("luc", feats, y + 10, FAST)  # labels need not start at 0
    r2 = evaluate_task("luc", feats, y + 10, FAST)
    assert r1 == r2
    assert set(r1) == {"good", "noise"} and set(r1["good"]) == {"f1", "precision", "recall"}
    assert all(len(v) == 2 for v in r1["good"].values())
    assert min(r1["good"]["f1"]) > 0.9
    assert max(r1["noise"]["f1"]) < 0.5
    lin = evaluate_task("luc", feats, y, FAST.model_copy(update={"head": "linear"}))
    assert min(lin["good"]["f1"]) > 0.9


def test_sdm_protocol_informative_beats_noise():
    rng = np.random.default_rng(1)
    n = 300
    z = rng.normal(size=(n, 3))
    logits = z @ rng.normal(size=(3, 5))
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    res = evaluate_task("sdm", {"z": z, "noise": rng.normal(size=(n, 3)), "lda": lambda s: z + s},
                        q, FAST)
    assert np.mean(res["z"]["kl"]) < 0.5 * np.mean(res["noise"]["kl"])
    assert np.mean(res["z"]["l1"]) < np.mean(res["noise"]["l1"])
    assert all(len(v) == 2 for m in res.values() for v in m.values())


def test_baselines():
    tokens = [["a=x", "b=y"], [], ["a=x"], ["b=z", "a=x"]]
    counts = [[2, 1], [], [3], [1, 1]]
    m, vocab = bags_to_matrix(tokens, counts)
    assert list(vocab) == ["a=x", "b=y", "b=z"]
    np.testing.assert_array_equal(m.toarray(), [[2, 1, 0], [0, 0, 0], [3, 0, 0], [1, 0, 1]])
    t = tfidf_features(m)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), [1, 0, 1, 1], atol=1e-6)
    assert t[2, 0] == pytest.approx(1.0)  # a lone token is the whole vector
    th = lda_features(sp.csr_matrix(m), 3, seed=0)
    np.testing.assert_allclose(th.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(th, lda_features(sp.csr_matrix(m), 3, seed=0))


def _regions_folder(path: str, n: int = 240) -> None:
    """A regions/ folder as the regions stage writes it (AE/AETHER features + bags)."""
    os.makedirs(path, exist_ok=True)
    good, noise, y = _luc_data(n, seed=2)
    rng = np.random.default_rng(5)
    units = gpd.GeoDataFrame({"unit_id": [str(i) for i in range(n)], "label": y,
                              "label_name": [f"c{v}" for v in y]},
                             geometry=gpd.points_from_xy(rng.uniform(0, 1, n), rng.uniform(0, 1, n)))
    tok = sp.csr_matrix(rng.poisson(0.5 + (y[:, None] == np.arange(4)) * 2, size=(n, 4)))
    vocab = np.array([f"category=k{i}" for i in range(4)], dtype=object)
    feats = {"AE": np.c_[good, noise].astype(np.float32), "AETHER": np.c_[good, good].astype(np.float32)}
    meta = {"task": "luc", "methods": list(feats), "labels": ["label", "label_name"],
            "buffer_m": 50.0, "stats": {"kept": n}}
    toks, vals = bag_columns(tok, vocab)
    write_region_table(os.path.join(path, "luc.parquet"), units, ["label", "label_name"], feats,
                       toks, vals, np.asarray(tok.sum(1)).ravel(), meta)
    z = good[:, :3]
    logits = z @ rng.normal(size=(3, 9))
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    sdm_cols = [f"ns-sec_{k}" for k in range(1, 10)]
    for k, c in enumerate(sdm_cols):
        units[c] = q[:, k]
    meta = dict(meta, task="sdm", labels=sdm_cols)
    write_region_table(os.path.join(path, "sdm.parquet"), units, sdm_cols, feats, toks, vals,
                       np.asarray(tok.sum(1)).ravel(), meta)


def test_region_table_fixture_reads_back(tmp_path):
    """The regions/ tables written here are what RegionTable reads (features, bags, meta)."""
    path = str(tmp_path / "regions")
    _regions_folder(path)
    regions = RegionTable(path)
    assert regions.tasks() == ["luc", "sdm"]
    table, feats, meta = regions.read("luc")
    assert set(feats) == {"AE", "AETHER"} and feats["AE"].shape == (240, 16)
    assert meta["labels"] == ["label", "label_name"] and len(table) == 240
    m, _ = bags_to_matrix(list(table["poi_tokens"]), list(table["poi_counts"]))
    np.testing.assert_array_equal(m.sum(1).A.ravel(), table["n_pois"].to_numpy())


def test_run_evaluate_writes_report_with_schema(tmp_path, caplog):
    ws = Workspace(str(tmp_path / "ws"))
    _regions_folder(ws.path("regions"))
    cfg = load_config(data={"evaluate": FAST.model_dump()})
    caplog.set_level("INFO")
    res = run_stage("evaluate", ws, cfg)
    assert not res.skipped
    out = caplog.text
    assert "| AETHER |" in out and "LUC F1" in out
    rep = ws.path("report")
    for f in ("metrics.json", "report.md", "metrics.png", "run.json"):
        assert os.path.exists(os.path.join(rep, f)), f
    m = json.load(open(os.path.join(rep, "metrics.json")))
    assert set(m) == {"luc", "sdm"}
    assert set(m["luc"]) == {"AE", "AETHER", "TF-IDF", "LDA"}
    for task, names in (("luc", {"f1", "precision", "recall"}), ("sdm", {"kl", "l1", "chebyshev"})):
        for method in m[task].values():
            assert set(method) == names
            assert all(len(v) == 2 and all(isinstance(x, float) for x in v) for v in method.values())
    md = open(os.path.join(rep, "report.md")).read()
    assert "AlphaEarth (AE)" in md and "60.7" in md and "![metrics.png]" in md
    # the table shows the scaled mean ± std of the per-seed values
    f1 = np.asarray(m["luc"]["AETHER"]["f1"]) * 100
    assert f"{f1.mean():.1f} ± {f1.std():.1f}" in format_table(m)
    assert res.stats["tasks"]["luc"]["units"] == 240
    # rerun: skipped, same numbers
    caplog.clear()
    assert run_stage("evaluate", ws, cfg).skipped
    assert "up to date (manifest matches) — skipped" in caplog.text
    assert json.load(open(os.path.join(rep, "metrics.json"))) == m


def test_run_evaluate_needs_regions(tmp_path):
    with pytest.raises(FileNotFoundError, match="regions"):
        run_stage("evaluate", Workspace(str(tmp_path / "w")), load_config())


def _put_tree(local: str, fs, url: str) -> None:
    """Copy a local folder into an fsspec filesystem file by file, keeping its layout."""
    for dirpath, _dirs, files in os.walk(local):
        for name in files:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, local).replace(os.sep, "/")
            with open(src, "rb") as f:
                fs.pipe_file(f"{url}/{rel}", f.read())


def test_run_evaluate_on_memory_workspace_matches_local(tmp_path, caplog):
    """evaluate on an fsspec workspace (memory:// stands in for s3://): same report as locally.

    The inputs include ae.zarr, a field.zarr and a model/ (checkpoint + metrics.json) so
    the fields and loss plots (which open Zarr stores and JSON in the workspace) run on
    the URL too.
    """
    from fixtures import projector, write_tiny_ae

    from aether_scale.infer import infer_field
    from aether_scale.model import TextProj, save_checkpoint

    cfg = load_config(data={"evaluate": FAST.model_dump() | {"seeds": [0]}})  # 3 runs: keep each short
    local = Workspace(str(tmp_path / "ws"))
    _regions_folder(local.path("regions"))
    write_tiny_ae(local.path("ae.zarr"), seed=3)
    infer_field(local.path("ae.zarr"), projector(), local.path("field.zarr"))
    os.makedirs(local.path("model"))
    save_checkpoint(os.path.join(local.path("model"), "checkpoint.pt"), projector(), TextProj(),
                    config={"in_dim": 64, "text_dim": 384}, epoch=2)
    with open(os.path.join(local.path("model"), "metrics.json"), "w") as f:
        json.dump({"epochs": [{"epoch": 1, "loss": 1.0, "L_align": 0.6},
                              {"epoch": 2, "loss": 0.7, "L_align": 0.4}]}, f)
    assert not run_stage("evaluate", local, cfg).skipped

    mem = Workspace(f"memory://aether-eval-{uuid.uuid4().hex[:8]}/run")
    assert not mem.is_local
    caplog.set_level("INFO")
    try:
        for name in ("regions", "ae.zarr", "field.zarr", "model"):
            _put_tree(local.path(name), mem.fs, mem.path(name))
        caplog.clear()
        res = run_stage("evaluate", mem, cfg)
        assert not res.skipped
        assert "| AETHER |" in caplog.text
        assert res.outputs == {"report": mem.path("report")}
        rep = mem.path("report")
        names = sorted(p.rsplit("/", 1)[-1] for p in mem.fs.ls(rep, detail=False))
        assert names == ["fields.png", "loss_model.png", "metrics.json", "metrics.png",
                         "report.md", "run.json"]
        assert names == sorted(os.listdir(local.path("report")))
        local_rep = local.path("report")
        for f in ("metrics.json", "report.md"):  # deterministic: byte-identical to the local run
            with open(os.path.join(local_rep, f), "rb") as fh:
                assert mem.fs.cat_file(f"{rep}/{f}") == fh.read(), f
        m = json.loads(mem.fs.cat_file(f"{rep}/metrics.json"))
        assert set(m) == {"luc", "sdm"} and set(m["luc"]) == {"AE", "AETHER", "TF-IDF", "LDA"}
        for f in ("metrics.png", "fields.png", "loss_model.png"):
            assert mem.fs.cat_file(f"{rep}/{f}")[:8] == b"\x89PNG\r\n\x1a\n", f
        assert json.loads(mem.fs.cat_file(f"{rep}/run.json"))["tasks"]["luc"]["units"] == 240
        # nothing escaped to the local disk, no temporaries left, the manifest is in place
        assert not os.path.exists("memory:")  # the old code's os.makedirs("memory://…") left this
        assert not [p for p in mem.fs.ls(mem.root, detail=False) if ".tmp-" in p]
        assert not mem.fs.exists(mem.path(".work")) or not mem.fs.ls(mem.path(".work"))
        assert mem.manifest("evaluate")["outputs"] == ["report"]
        # resume: skipped (logged) and shows the stored table; --force reruns
        caplog.clear()
        again = run_stage("evaluate", mem, cfg)
        assert again.skipped
        skipped_log = caplog.text
        assert "up to date (manifest matches) — skipped" in skipped_log
        assert not run_stage("evaluate", mem, cfg, force=True).skipped
        assert mem.fs.cat_file(f"{rep}/metrics.json") == json.dumps(m, indent=2).encode()
        assert "| AETHER |" in skipped_log  # the stored report's table, shown on a skipped rerun
    finally:
        mem.fs.rm(mem.root.rsplit("/", 1)[0], recursive=True)


def test_paired_differences_against_ae_by_hand():
    from aether_scale.evaluate.report import format_paired, paired

    metrics = {"sdm": {"AE": {"kl": [0.040, 0.036, 0.038]},
                       "AETHER": {"kl": [0.030, 0.027, 0.0285]},
                       "TF-IDF": {"kl": [0.041, 0.035, 0.038]}},
               "luc": {"AE": {"f1": [0.70, 0.72, 0.71]}, "AETHER": {"f1": [0.73, 0.74, 0.72]}}}
    r = paired(metrics, "sdm", "AETHER")
    d = np.array([25.0, 25.0, 25.0])  # (AE − AETHER) / AE, in %
    assert r["per_seed"] == pytest.approx(d) and r["std"] == pytest.approx(0.0, abs=1e-9)
    assert r["beyond_noise"]
    t = paired(metrics, "sdm", "TF-IDF")
    dd = (np.array([0.040, 0.036, 0.038]) - [0.041, 0.035, 0.038]) / [0.040, 0.036, 0.038] * 100
    half = 4.302652729911275 * dd.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert t["mean"] == pytest.approx(dd.mean()) and t["ci95"][1] == pytest.approx(dd.mean() + half)
    assert not t["beyond_noise"]
    f = paired(metrics, "luc", "AETHER")
    assert f["per_seed"] == pytest.approx([3.0, 2.0, 1.0])
    assert paired(metrics, "luc", "TF-IDF") is None
    md = format_paired(metrics)
    assert "| TF-IDF | – |" in md and "(within noise)" in md.split("TF-IDF")[1]
    assert "+25.0 ± 0.0" in md


def test_heads_in_processes_give_the_same_numbers(monkeypatch):
    """evaluate.workers fits heads in processes; every head is seeded and single-threaded,
    so the metrics equal the in-process run exactly."""
    from aether_scale.evaluate import protocol

    monkeypatch.setattr(protocol, "PARALLEL_MIN_WORK", 0)  # these tiny tasks too
    good, noise, y = _luc_data()
    feats = {"good": good, "noise": noise, "lda": lambda s: good + 0.01 * s}
    serial = evaluate_task("luc", feats, y, FAST)
    assert evaluate_task("luc", feats, y, FAST, workers=2) == serial
    rng = np.random.default_rng(3)
    q = rng.dirichlet(np.ones(4), size=120)
    sdm = {"q": np.log(q + 1e-3), "noise": rng.normal(size=(120, 4))}
    assert evaluate_task("sdm", sdm, q, FAST, workers=2) == evaluate_task("sdm", sdm, q, FAST)


def _evaluate_in_daemon(q) -> None:
    from aether_scale.evaluate import protocol

    protocol.PARALLEL_MIN_WORK = 0
    good, noise, y = _luc_data()
    q.put(evaluate_task("luc", {"good": good, "noise": noise}, y, FAST, workers=2))


def test_a_daemonic_process_fits_its_heads_itself():
    """A dask worker under its nanny is daemonic and may not start processes (a sweep
    point's evaluate runs there): the heads are fitted in-process, same numbers."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_evaluate_in_daemon, args=(q,), daemon=True)
    p.start()
    got = q.get(timeout=300)
    p.join(60)
    good, noise, y = _luc_data()
    assert got == evaluate_task("luc", {"good": good, "noise": noise}, y, FAST)
