"""The embedded synthetic city: determinism, AE calibration, file formats, and the
property the demo depends on (social signal weak in AE, strong in POIs)."""

from __future__ import annotations

import glob

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio

from aether_scale import aef
from aether_scale.config import SynthSection
from aether_scale.synthetic import generate_city, vocab, write_city
from aether_scale.synthetic.diagnostics import (
    ae_statistics,
    region_features,
    socio_probe,
    trace_probe,
)

SMALL = {"size_px": 256, "n_pois": 3000, "n_luc_points": 400, "n_regions": 120, "seed": 3}
MEDIUM = {"size_px": 512, "n_pois": 8000, "n_luc_points": 1000, "n_regions": 300, "seed": 1}


@pytest.fixture(scope="module")
def small_city():
    return generate_city(SynthSection(**SMALL))


@pytest.fixture(scope="module")
def medium_city():
    return generate_city(SynthSection(**MEDIUM))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("city")
    cfg = SynthSection(**SMALL, n_tiles_x=2, n_tiles_y=2)
    return cfg, write_city(out, cfg), generate_city(cfg)


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_city(small_city):
    again = generate_city(SynthSection(**SMALL))
    np.testing.assert_array_equal(again.codes, small_city.codes)
    np.testing.assert_array_equal(again.landuse, small_city.landuse)
    pd.testing.assert_frame_equal(again.pois, small_city.pois)
    pd.testing.assert_frame_equal(again.luc, small_city.luc)
    pd.testing.assert_frame_equal(again.units, small_city.units)


def test_other_seed_other_city_and_parts_independent(small_city):
    other = generate_city(SynthSection(**{**SMALL, "seed": 4}))
    assert np.mean(other.landuse != small_city.landuse) > 0.3
    # changing the POI count leaves the AE raster and the labels untouched
    more = generate_city(SynthSection(**{**SMALL, "n_pois": 3500}))
    np.testing.assert_array_equal(more.codes, small_city.codes)
    pd.testing.assert_frame_equal(more.units, small_city.units)
    assert len(more.pois) == 3500


def test_too_many_tiles_is_refused():
    with pytest.raises(ValueError, match="n_tiles_x"):
        generate_city(SynthSection(size_px=64, n_tiles_x=20))


# --------------------------------------------------------------------------- latent structure
def test_land_use_is_coherent_and_complete(small_city):
    lu = small_city.landuse
    assert set(np.unique(lu)) == set(range(vocab.N_CLASSES))
    # spatially coherent patches: most 4-neighbours share the class
    same = np.mean(lu[1:] == lu[:-1]) + np.mean(lu[:, 1:] == lu[:, :-1])
    assert same / 2 > 0.85
    # dense core, green fringe
    n = lu.shape[0]
    core = lu[n // 2 - n // 8 : n // 2 + n // 8, n // 2 - n // 8 : n // 2 + n // 8]
    ring = np.ones_like(lu, dtype=bool)
    ring[n // 8 : -n // 8, n // 8 : -n // 8] = False
    built = (vocab.HDR, vocab.MDR, vocab.LARGE)
    assert np.isin(core, built).mean() > np.isin(lu[ring], built).mean() + 0.2
    green = (vocab.AGRI, vocab.WOOD)
    assert np.isin(lu[ring], green).mean() > np.isin(core, green).mean() + 0.2


def test_socio_field_is_smooth_and_independent_of_land_use(small_city):
    s = small_city.socio
    assert s.shape == (2, *small_city.landuse.shape)
    np.testing.assert_allclose(s.mean(axis=(1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(s.std(axis=(1, 2)), 1, atol=1e-3)
    assert np.mean(np.abs(np.diff(s[0], axis=0))) < 0.05  # smooth at 10 m
    res = np.isin(small_city.landuse, vocab.RESIDENTIAL)
    # residential areas span the whole social range
    assert s[0][res].min() < -1.0 and s[0][res].max() > 1.0
    assert abs(np.corrcoef(s[0].ravel(), res.ravel())[0, 1]) < 0.3


# --------------------------------------------------------------------------- AE calibration
def test_ae_statistics_match_real_alphaearth(medium_city):
    st = ae_statistics(medium_city)
    assert 0.08 <= st["random_pair_cos"] <= 0.26, st["random_pair_cos"]
    within = np.array(list(st["within_class_cos"].values()))
    assert len(within) == vocab.N_CLASSES
    assert within.min() >= 0.27 and within.max() <= 0.55, within
    assert 0.3 <= within.mean() <= 0.5
    norms = np.array(list(st["class_mean_norm"].values()))
    assert norms.min() >= 0.5 and norms.max() <= 0.75, norms
    assert 0.26 <= st["class_mean_cos_median"] <= 0.61, st["class_mean_cos_median"]
    assert min(st["class_mean_cos"]) >= 0.1


def test_ae_codes_are_unit_vectors_with_some_nodata(small_city):
    codes = small_city.codes
    assert codes.dtype == np.int8 and codes.shape == (256, 256, 64)
    valid = aef.valid_mask(codes)
    np.testing.assert_array_equal(valid, small_city.valid)
    assert 0.002 < 1 - valid.mean() < 0.05
    assert np.all(codes[~valid] == aef.NODATA)  # whole pixels masked
    v = aef.decode(codes[valid][:5000])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=0.03)


# --------------------------------------------------------------------------- files
def test_ae_tiles_format(written):
    cfg, paths, city = written
    tiles = sorted(glob.glob(paths["ae_tiles"]))
    assert len(tiles) == 4
    mosaic = np.full(city.codes.shape, 99, dtype=np.int16)
    for t in tiles:
        with rasterio.open(t) as src:
            assert src.count == 64 and src.dtypes == ("int8",) * 64
            assert src.nodata == -128
            assert src.crs.to_epsg() == 32630
            assert src.res == (10.0, 10.0) and src.transform.e < 0  # north-up
            assert src.descriptions == aef.BAND_NAMES
            assert src.profile["tiled"] and src.compression.name.lower() == "deflate"
            c0 = round((src.transform.c - city.transform.c) / 10.0)
            r0 = round((city.transform.f - src.transform.f) / 10.0)
            data = src.read()
        mosaic[r0 : r0 + data.shape[1], c0 : c0 + data.shape[2]] = data.transpose(1, 2, 0)
    np.testing.assert_array_equal(mosaic, city.codes)  # tiles cover the city exactly once
    assert np.any(mosaic == -128)


def test_vector_files_format(written):
    cfg, paths, city = written
    pois = gpd.read_parquet(paths["pois"])
    assert list(pois.columns) == ["poi_id", "name", "category", "subcategory", "geometry"]
    assert pois["poi_id"].dtype == np.int64 and pois["poi_id"].is_unique
    assert pois.crs.to_epsg() == 32630 and (pois.geom_type == "Point").all()
    assert len(pois) == cfg.n_pois
    assert pois["name"].isna().mean() > 0.03
    top = pois["name"].value_counts()
    assert top.iloc[0] >= 20  # chains repeat
    assert {"Tesco Express", "Costa Coffee"} & set(top.index)
    assert pois["category"].nunique() == 10 and pois["subcategory"].nunique() >= 50
    minx, miny, maxx, maxy = pois.total_bounds
    assert minx >= cfg.origin_x and maxy <= cfg.origin_y
    assert maxx <= cfg.origin_x + 10 * cfg.size_px and miny >= cfg.origin_y - 10 * cfg.size_px

    luc = gpd.read_file(paths["luc_points"])
    assert luc.crs.to_epsg() == 32630
    assert sorted(luc["landuse_id"].unique()) == list(range(10))
    assert all(luc["landuse"] == np.asarray(vocab.LANDUSE_NAMES)[luc["landuse_id"]])
    counts = luc["landuse_id"].value_counts().sort_index().to_numpy()
    assert counts[0] > 3 * counts[9]  # London-like class imbalance
    assert len(luc) == cfg.n_luc_points and luc["loc_id"].is_unique

    units = gpd.read_file(paths["sdm_units"])
    assert units.crs.to_epsg() == 32630 and len(units) == cfg.n_regions
    cols = [f"ns-sec_{i}" for i in range(1, 10)]
    np.testing.assert_allclose(units[cols].sum(axis=1), 1.0, atol=1e-9)
    assert (units[cols] >= 0).all().all() and units["unit_id"].is_unique
    # LSOA-like centroids sit where people live
    lu_at = city.landuse[city.units["row"], city.units["col"]]
    assert np.isin(lu_at, (*vocab.RESIDENTIAL, vocab.LARGE)).mean() > 0.9

    truth = np.load(paths["truth"])
    np.testing.assert_array_equal(truth["landuse"], city.landuse)
    assert truth["socio"].shape == (2, 256, 256)


def test_cli_synth_writes_the_city(tmp_path, capsys):
    from aether_scale.cli import main

    rc = main(["synth", "--out", str(tmp_path), "--set", "synth.size_px=128",
               "--set", "synth.n_pois=200", "--set", "synth.n_regions=20",
               "--set", "synth.n_luc_points=50"])
    assert rc == 0
    assert len(glob.glob(str(tmp_path / "ae" / "*.tif"))) == 2
    assert (tmp_path / "pois.parquet").exists() and (tmp_path / "sdm_units.geojson").exists()


# --------------------------------------------------------------------------- the design point
def _pixel_separability(city, a, b, seed=0):
    """Held-out-parcel accuracy of a logistic classifier telling pixel sets a and b apart."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    ia = rng.choice(np.flatnonzero(a.ravel()), 3000, replace=False)
    ib = rng.choice(np.flatnonzero(b.ravel()), 3000, replace=False)
    idx = np.concatenate([ia, ib])
    y = np.r_[np.zeros(3000), np.ones(3000)]
    X = aef.decode(city.codes.reshape(-1, 64)[idx])
    parcels = city.parcel.ravel()[idx]
    test = np.isin(parcels, rng.permutation(np.unique(parcels))[: np.unique(parcels).size // 3])
    m = LogisticRegression(max_iter=1000).fit(X[~test], y[~test])
    return m.score(X[test], y[test])


def test_social_field_is_not_visible_in_physical_form(medium_city):
    """Affluent and deprived residential areas of the same class look alike from space
    (their pixels are barely separable on held-out parcels, unlike two morphologies),
    while their POI mixes differ strongly."""
    c = medium_city
    s = c.socio[0]
    cls = vocab.LDR
    base = c.valid & (c.landuse == cls)
    rich, poor = base & (s > 0.7) & (c.morph == 1), base & (s < -0.7) & (c.morph == 1)
    assert rich.sum() > 3000 and poor.sum() > 3000
    social = _pixel_separability(c, rich, poor)
    physical = _pixel_separability(c, base & (c.morph == 1), base & (c.morph == 0))
    assert social < 0.7
    assert physical > 0.85

    p = c.pois
    res = p["landuse_id"].isin(vocab.RESIDENTIAL)
    mix_rich = p.loc[res & (p["affluence"] > 0.7), "subcategory"].value_counts(normalize=True)
    mix_poor = p.loc[res & (p["affluence"] < -0.7), "subcategory"].value_counts(normalize=True)
    tv = 0.5 * mix_rich.sub(mix_poor, fill_value=0).abs().sum()
    assert tv > 0.25
    assert mix_rich.get("wine bars", 0) > 3 * mix_poor.get("wine bars", 0)
    assert mix_poor.get("betting shops", 0) > 3 * mix_rich.get("betting shops", 0)


def test_socio_probe_poi_sees_more_than_ae(medium_city):
    """The diagnostic behind the demo: POI counts within 300 m predict the hidden social
    field far better than 300 m-pooled raw AE; AE wins on land use (50 m)."""
    blocked = socio_probe(medium_city, n_train=200, split="blocked", metrics=("socio_r2", "luc_f1"))
    ae, poi = blocked["ae"], blocked["poi"]
    assert poi["socio_r2"] > 0.4
    assert poi["socio_r2"] > ae["socio_r2"] + 0.3
    assert ae["luc_f1"] > poi["luc_f1"] + 0.15
    # under the paper's random split, nearby units share pixels: AE is above chance
    rand = socio_probe(medium_city, n_train=200, split="random", metrics=("socio_r2",))
    assert rand["ae"]["socio_r2"] > 0.1


def test_social_trace_is_present_in_ae_pixels(medium_city):
    """The trace is in AE (so a projector can find it) and comes from ``socio_trace``."""
    with_trace = trace_probe(medium_city)["corr"]
    blind = generate_city(SynthSection(**{**MEDIUM, "socio_trace": 0.0, "n_pois": 100}))
    without = trace_probe(blind)["corr"]
    assert with_trace > 0.1
    assert with_trace > without + 0.15


@pytest.mark.slow
def test_aether_like_projector_amplifies_the_trace():
    """Proxy of the paper's finding on the default demo city: a small contrastive
    AE↔POI-text projector, applied per pixel and pooled at 300 m, predicts the social
    field and NS-SeC clearly better than raw AE, while LUC F1 holds."""
    city = generate_city(SynthSection())
    feats = region_features(city, aether=True)
    rand = socio_probe(city, features=feats, split="random")
    assert rand["aether"]["sdm_kl"] < 0.8 * rand["ae"]["sdm_kl"]
    assert rand["aether"]["luc_f1"] >= rand["ae"]["luc_f1"] - 0.03
    blocked = socio_probe(city, features=feats, split="blocked", metrics=("socio_r2",))
    assert blocked["aether"]["socio_r2"] > blocked["ae"]["socio_r2"] + 0.2
