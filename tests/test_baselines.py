"""The trained Table 1 baselines: CaLLiPer+, Space2Vec, Place2Vec, Doc2Vec (``baselines/``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pytest
import shapely
import torch

from aether_scale.baselines.cooccur import doc2vec_features, place2vec_vectors
from aether_scale.baselines.location import LocationEncoder, train_calliper
from aether_scale.baselines.units import DISC, mean_by_unit, unit_samples
from aether_scale.config import load_config
from aether_scale.evaluate.protocol import evaluate_task
from aether_scale.evaluate.stage import task_inputs
from aether_scale.stores.regions import RegionTable

METHODS = ("CaLLiPer+", "Space2Vec", "Place2Vec", "Doc2Vec")


# --------------------------------------------------------------------------- pieces
def test_the_encoding_separates_scales_and_is_centred():
    enc = LocationEncoder([500_000.0, 5_700_000.0], dim=8, n_scales=4, min_scale_m=10.0,
                          max_scale_m=1000.0)
    pe = enc.encode_position(torch.tensor([[500_000.0, 5_700_000.0], [500_005.0, 5_700_000.0]],
                                          dtype=torch.float64))
    assert pe.shape == (2, 24)
    # at the centre every projection is 0: cos = 1, sin = 0
    assert torch.allclose(pe[0, :12], torch.ones(12)) and torch.allclose(pe[0, 12:], torch.zeros(12))
    # 5 m moves the 10 m wavelength a lot and the 1 km one hardly at all
    d = (pe[1] - pe[0]).abs().reshape(2, 3, 4)
    assert d[:, 0, 0].max() > 0.3 and d[:, 0, 3].max() < 0.01
    with pytest.raises(ValueError, match="min_scale_m < max_scale_m"):
        LocationEncoder([0, 0], min_scale_m=100, max_scale_m=10)


def test_unit_samples_cover_the_buffer_or_the_polygon():
    units = gpd.GeoDataFrame(geometry=[shapely.Point(100, 200), shapely.box(0, 0, 40, 20),
                                       shapely.Point(0, 0)])
    xy, owner = unit_samples(units, 50.0)
    assert (owner == 0).sum() == len(DISC) == 13 and (owner == 2).sum() == 13
    p0 = xy[owner == 0]
    assert np.allclose(p0.mean(axis=0), [100, 200])
    assert np.hypot(*(p0 - [100, 200]).T).max() == pytest.approx(50.0)
    poly = xy[owner == 1]
    assert len(poly) >= 8 and shapely.contains_xy(units.geometry[1], poly[:, 0], poly[:, 1]).all()
    means = mean_by_unit(np.c_[owner.astype(float)], owner, 3)
    assert means.ravel().tolist() == [0.0, 1.0, 2.0]


def test_calliper_learns_which_text_is_where():
    """Two kinds of text in two halves of a city: after training, a location's
    embedding is closer to the projected text of its own half."""
    rng = np.random.default_rng(0)
    n = 512
    xy = np.c_[rng.uniform(0, 2000, n), rng.uniform(0, 1000, n)]
    east = xy[:, 0] > 1000
    a, b = rng.standard_normal((2, 16)).astype(np.float32)
    text = np.where(east[:, None], a, b) + 0.1 * rng.standard_normal((n, 16)).astype(np.float32)
    xy[5] = np.nan  # a text row whose POI has no location: left out
    res = train_calliper(xy, lambda i, j: text[i:j], 128, text_dim=16,
                         encoder={"dim": 16, "n_scales": 8, "min_scale_m": 50.0,
                                  "max_scale_m": 5000.0, "hidden": 64, "layers": 2},
                         epochs=15, batch_size=64, lr=3e-3, tau=0.1, seed=0)
    assert res.losses[-1] < res.losses[0]
    emb = res.encoder.embed(np.array([[1800.0, 500.0], [200.0, 500.0]]))
    assert np.isfinite(emb).all() and emb.shape == (2, 16)
    assert res.samples == 15 * (511 // 64) * 64


def test_place2vec_and_doc2vec_are_deterministic_and_separate_types():
    rng = np.random.default_rng(1)
    # cafes and bars cluster together, schools elsewhere
    xy = np.r_[rng.normal(0, 50, (200, 2)), rng.normal(3000, 50, (100, 2))]
    types = np.array(["cafe", "bar"] * 100 + ["school"] * 100, dtype=object)
    v1 = place2vec_vectors(xy, types, neighbours=5, dim=16, epochs=10, seed=0)
    v2 = place2vec_vectors(xy, types, neighbours=5, dim=16, epochs=10, seed=0)
    assert all(np.array_equal(v1[t], v2[t]) for t in v1)

    def cos(p, q):
        return float(v1[p] @ v1[q] / np.linalg.norm(v1[p]) / np.linalg.norm(v1[q]))

    assert cos("cafe", "bar") > cos("cafe", "school") + 0.2
    toks = [["a=x", "a=y"], [], ["a=z"]]
    cnts = [[2, 1], [], [3]]
    d1 = doc2vec_features(toks, cnts, dim=8, epochs=5, seed=0)
    assert d1.shape == (3, 8) and not d1[1].any() and d1[0].any()
    assert np.array_equal(d1, doc2vec_features(toks, cnts, dim=8, epochs=5, seed=0))


# --------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def ws(tiny_demo, tmp_path_factory):
    """A private copy of the tiny demo workspace (the demo ran the baselines stage)."""
    dst = tmp_path_factory.mktemp("bdemo") / "ws"
    shutil.copytree(tiny_demo["workspace"], dst, ignore=shutil.ignore_patterns("city", "field*",
                                                                               "queries"))
    os.symlink(tiny_demo["workspace"] / "city", dst / "city")
    return dst


def _cli(ws, *args, home):
    env = {**os.environ, "HOME": str(home), "AETHER_SCALE_NO_BAR": "1"}
    return subprocess.run([sys.executable, "-m", "aether_scale", *args, "-w", str(ws)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_each_baseline_beats_a_random_feature(ws, tiny_demo):
    """Every trained baseline is in the demo's report, and on at least one task it beats
    a random feature of its own width by a margin, on the same splits and seeds."""
    metrics = json.loads((ws / "report" / "metrics.json").read_text())
    for task in ("luc", "sdm"):
        assert set(METHODS) <= set(metrics[task])
    cfg = load_config(str(ws / "config.yaml"), check_paths=False)
    regions = RegionTable(str(ws / "regions"))
    import fsspec

    fs = fsspec.filesystem("file")
    got: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    rand: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    for task, key in (("luc", "f1"), ("sdm", "kl")):
        feats, y, _ = task_inputs(regions, task, cfg.evaluate, (str(ws / "baselines"), fs))
        rng = np.random.default_rng(0)
        both = {m: feats[m] for m in METHODS}
        both |= {f"random_{m}": rng.standard_normal(feats[m].shape).astype(np.float32)
                 for m in METHODS}
        res = evaluate_task(task, both, y, cfg.evaluate)
        for m in METHODS:
            got[m][task] = float(np.mean(res[m][key]))
            rand[m][task] = float(np.mean(res[f"random_{m}"][key]))
            # the report holds the same numbers the protocol gives here
            assert np.allclose(res[m][key], metrics[task][m][key])
    for m in METHODS:
        luc_win = got[m]["luc"] >= rand[m]["luc"] + 0.08
        sdm_win = got[m]["sdm"] <= 0.7 * rand[m]["sdm"]
        assert luc_win or sdm_win, (m, got[m], rand[m])


def test_a_changed_setting_retrains_only_its_method(ws, tiny_demo):
    out = _cli(ws, "baselines", "--set", "baselines.doc_epochs=7", home=tiny_demo["home"])
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    for m in ("CaLLiPer+", "Space2Vec", "Place2Vec"):
        assert f"[baselines] {m}: unchanged" in log
    assert "[baselines] Doc2Vec: unchanged" not in log and "[baselines] Doc2Vec:" in log
    meta = json.loads((ws / "baselines" / "doc2vec" / "meta.json").read_text())
    assert meta["settings"]["doc_epochs"] == 7
    again = _cli(ws, "baselines", "--set", "baselines.doc_epochs=7", home=tiny_demo["home"])
    assert "up to date (manifest matches) — skipped" in again.stdout + again.stderr


def test_a_new_model_reuses_every_baseline(ws, tiny_demo):
    """Retraining AETHER rebuilds regions/ (new field features), but the units and bags
    the baselines use are the same: every method is copied, none trained again."""
    from aether_scale.baselines.stage import units_key
    from aether_scale.stores.regions import RegionTable as RT

    rt = RT(str(ws / "regions"))
    tasks = {t: rt.read(t) for t in rt.tasks()}
    key = units_key(tasks)
    changed = {t: (u, {k: v + 1 for k, v in f.items()}, m) for t, (u, f, m) in tasks.items()}
    assert units_key(changed) == key  # features do not enter the key
    fewer = {t: (u.iloc[1:], f, m) for t, (u, f, m) in tasks.items()}
    assert units_key(fewer) != key
    # the stage reruns (its config changed: the same methods in another order), each
    # method's own key is the same
    out = _cli(ws, "baselines", "--set", "baselines.methods=[doc2vec, place2vec, space2vec, "
               "calliper]", home=tiny_demo["home"])
    assert out.returncode == 0, out.stderr
    assert (out.stdout + out.stderr).count("unchanged") == 4
    out = _cli(ws, "baselines", "--force", home=tiny_demo["home"])
    assert out.returncode == 0 and "unchanged" not in out.stdout + out.stderr


def test_features_of_other_units_are_refused(ws, tmp_path):
    from aether_scale.baselines import read_features

    units, _, _ = RegionTable(str(ws / "regions")).read("sdm")
    import fsspec

    fs = fsspec.filesystem("file")
    assert set(read_features(str(ws / "baselines"), "sdm", units, fs)) == set(METHODS)
    with pytest.raises(ValueError, match="other sdm units.*rerun `aether-scale baselines"):
        read_features(str(ws / "baselines"), "sdm", units.iloc[1:], fs)


def test_bad_inputs_name_the_fix(ws, tiny_demo, tmp_path):
    bad = tmp_path / "ws"
    shutil.copytree(ws, bad, symlinks=True)
    out = _cli(bad, "baselines", "--set", "baselines.type_column=nope",
               "--set", "baselines.methods=[space2vec]", home=tiny_demo["home"])
    assert out.returncode != 0 and "baselines.type_column" in out.stderr
    shutil.rmtree(bad / "text.zarr")
    out = _cli(bad, "baselines", "--set", "baselines.methods=[calliper]",
               home=tiny_demo["home"])
    assert out.returncode != 0 and "text.zarr" in out.stderr and "aether-scale text" in out.stderr
