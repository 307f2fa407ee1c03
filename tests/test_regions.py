"""Region features, label loaders and POI bags (the regions stage's ``regions/`` tables)."""

from __future__ import annotations

import json
import os

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import xarray as xr
from fixtures import NX, NY, projector, write_tiny_ae

from aether_scale import aef
from aether_scale.config import RegionsSection, load_config
from aether_scale.infer import infer_field
from aether_scale.pipeline import run_stage
from aether_scale.regions import (
    build_regions,
    load_luc_units,
    load_sdm_units,
    poi_bags,
    read_sdm_table,
    region_features,
)
from aether_scale.stores.raster import open_embedding
from aether_scale.stores.regions import RegionTable
from aether_scale.workspace import Workspace

CRS = "EPSG:32630"
X0, Y0 = 500_000.0, 5_700_000.0  # raster's top-left corner (10 m pixels, NX × NY)


def brute_pool(da: xr.DataArray, x: float, y: float, r: float) -> np.ndarray:
    """Independent per-point pooling: pixel centres within r, nodata excluded, L2-normalised."""
    vals = da.values
    if np.issubdtype(vals.dtype, np.integer):
        valid = ~np.any(vals == aef.NODATA, axis=-1)
        vals = aef.decode(np.where(vals == aef.NODATA, 0, vals).astype(np.int8))
    else:
        vals = vals.astype(np.float64)
        valid = np.isfinite(vals).all(-1)
    xx, yy = np.meshgrid(da["x"].values, da["y"].values)
    inside = ((xx - x) ** 2 + (yy - y) ** 2 <= r * r) & valid
    if not inside.any():
        return np.full(vals.shape[-1], np.nan)
    m = vals[inside].astype(np.float64).mean(axis=0)
    return m / np.linalg.norm(m)


@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("regions")
    ae = str(d / "ae.zarr")
    write_tiny_ae(ae, seed=4)
    field = str(d / "field.zarr")
    infer_field(ae, projector(), field)
    return {"AE": ae, "AETHER": field, "dir": str(d)}


def _put_tree(local: str, fs, url: str) -> None:
    """Copy a finished local store (folder) into an fsspec filesystem file by file, keeping
    its layout (checksums and chunk index included), as a stage would have left it there."""
    for dirpath, _dirs, files in os.walk(local):
        for name in files:
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, local).replace(os.sep, "/")
            fs.makedirs(f"{url}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            with open(src, "rb") as f:
                fs.pipe_file(f"{url}/{rel}", f.read())


def _put_rasters(ws: Workspace, rasters: dict[str, str]) -> None:
    """ae.zarr and field.zarr placed in ``ws`` (a local path or a URL)."""
    for name, src in (("ae.zarr", rasters["AE"]), ("field.zarr", rasters["AETHER"])):
        _put_tree(src, ws.fs, ws.path(name))


def _put_pois(ws: Workspace, pois: gpd.GeoDataFrame) -> None:
    """pois.parquet as the pois stage leaves it: a folder of GeoParquet parts."""
    ws.fs.makedirs(ws.path("pois.parquet"), exist_ok=True)
    with ws.fs.open(ws.path("pois.parquet/part.00000.parquet"), "wb") as f:
        pois.to_parquet(f)


def _points() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = X0 + rng.uniform(0, NX * 10, 40)
    y = Y0 - rng.uniform(0, NY * 10, 40)
    return x, y


@pytest.mark.parametrize("method", ["AE", "AETHER"])
def test_region_features_match_brute_force(rasters, method):
    da = open_embedding(rasters[method])
    x, y = _points()
    got = region_features(da, (x, y), 35.0)
    for i in range(len(x)):
        want = brute_pool(da, x[i], y[i], 35.0)
        if np.isnan(want).all():
            assert np.isnan(got[i]).all()
        else:
            np.testing.assert_allclose(got[i], want, atol=2e-4)


def test_poi_bags_match_brute_force():
    rng = np.random.default_rng(1)
    pois = gpd.GeoDataFrame(
        {"category": rng.choice(["food", "shop", None], 300),
         "subcategory": rng.choice(["cafe", "bar", "bakery"], 300)},
        geometry=gpd.points_from_xy(rng.uniform(0, 1000, 300), rng.uniform(0, 1000, 300)),
    )
    units = gpd.GeoDataFrame(geometry=gpd.points_from_xy(rng.uniform(0, 1000, 30),
                                                         rng.uniform(0, 1000, 30)))
    # a POI exactly on a unit (distance 0) must count
    pois.loc[0, "geometry"] = units.geometry.iloc[0]
    counts, vocab, n_pois = poi_bags(units, pois, ["category", "subcategory"], 120.0)
    d = np.hypot(units.geometry.x.values[:, None] - pois.geometry.x.values[None],
                 units.geometry.y.values[:, None] - pois.geometry.y.values[None])
    member = d <= 120.0
    np.testing.assert_array_equal(n_pois, member.sum(1))
    dense = counts.toarray()
    for j, tok in enumerate(vocab):
        col, val = tok.split("=", 1)
        has = (pois[col].astype("string") == val).fillna(False).to_numpy()
        np.testing.assert_array_equal(dense[:, j], (member & has[None]).sum(1))
    assert "category=<NA>" not in set(vocab) and not any("None" in v for v in vocab)
    # polygons: a spatial join, same counts for a square around the first unit
    sq = gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 500, 500)])
    c2, _, n2 = poi_bags(sq, pois, ["subcategory"], 0)
    inside = (pois.geometry.x < 500) & (pois.geometry.y < 500)
    assert n2[0] == int(inside.sum()) and c2.sum() == int(inside.sum())


def _write_labels(d: str) -> dict[str, str]:
    """LUC points (GeoJSON in EPSG:4326), SDM centroids (EPSG:32630) and a raw ONS table."""
    rng = np.random.default_rng(2)
    x, y = _points()
    x = np.r_[x, X0 - 5_000, X0 + 40]  # one far outside, one in the nodata corner
    y = np.r_[y, Y0 + 5_000, Y0 - 40]
    luc = gpd.GeoDataFrame({"landuse_id": np.r_[rng.integers(0, 3, 40), 1, 2].astype(float),
                            "landuse": "x", "loc_id": np.arange(42)},
                           geometry=gpd.points_from_xy(x, y), crs=CRS).to_crs("EPSG:4326")
    luc.loc[5, "landuse_id"] = np.nan  # a bad label
    luc_p = os.path.join(d, "luc.geojson")
    luc.to_file(luc_p, driver="GeoJSON")
    codes = [f"E{i:03d}" for i in range(12)]
    q = rng.dirichlet(np.ones(9), 12)
    sdm = gpd.GeoDataFrame({"lsoa21cd": codes, **{f"ns-sec_{k + 1}": q[:, k] * 7 for k in range(9)}},
                           geometry=gpd.points_from_xy(x[:12], y[:12]), crs=CRS)
    sdm.loc[3, "ns-sec_2"] = np.nan
    for k in range(9):
        sdm.loc[4, f"ns-sec_{k + 1}"] = 0.0
    sdm_p = os.path.join(d, "sdm.geojson")
    sdm.to_file(sdm_p, driver="GeoJSON")
    rows = []
    for i, c in enumerate(codes[:-1]):  # the last unit has no table row
        rows.append((c, f"name {c}", -8, "Does not apply", 99))
        for k in range(1, 10):
            n = 0 if i == 6 else int(rng.integers(0, 50))
            rows.append((c, f"name {c}", k, f"cat {k}", n))
    table = pd.DataFrame(rows, columns=[
        "Lower layer Super Output Areas Code", "Lower layer Super Output Areas",
        "National Statistics Socio-economic Classification (NS-SeC) (10 categories) Code",
        "National Statistics Socio-economic Classification (NS-SeC) (10 categories)",
        "Observation"])
    tab_p = os.path.join(d, "table.csv")
    table.to_csv(tab_p, index=False)
    return {"luc": luc_p, "sdm": sdm_p, "table": tab_p}


def test_label_loaders(tmp_path):
    p = _write_labels(str(tmp_path))
    cfg = RegionsSection(luc_points=p["luc"], sdm_units=p["sdm"])
    luc, st = load_luc_units(cfg, CRS)
    assert st == {"rows": 42, "dropped_no_geometry": 0, "dropped_bad_label": 1}
    assert luc.crs.to_epsg() == 32630 and len(luc) == 41 and luc["label"].dtype == np.int64
    x, _ = _points()
    np.testing.assert_allclose(np.sort(luc.geometry.x.values[:39]),
                               np.sort(np.delete(x, 5)[:39]), atol=1e-3)  # reprojected back
    sdm, st = load_sdm_units(cfg, CRS)
    assert st["dropped_bad_distribution"] == 2 and len(sdm) == 10
    q = sdm[[f"ns-sec_{k}" for k in range(1, 10)]].to_numpy()
    np.testing.assert_allclose(q.sum(1), 1.0)
    # raw ONS table: −8 dropped, pivoted, normalised, joined on lsoa21cd
    wide, tst = read_sdm_table(p["table"], cfg)
    raw = pd.read_csv(p["table"])
    assert tst["table_rows_does_not_apply"] == 11 and tst["table_areas_zero_total"] == 1
    one = raw[(raw.iloc[:, 0] == "E001") & (raw.iloc[:, 2] > 0)].sort_values(raw.columns[2])
    np.testing.assert_allclose(wide.set_index("lsoa21cd").loc["E001"].to_numpy(dtype=float),
                               one["Observation"].to_numpy() / one["Observation"].sum())
    cfg_t = RegionsSection(luc_points=p["luc"], sdm_units=p["sdm"], sdm_table=p["table"])
    sdm_t, st_t = load_sdm_units(cfg_t, CRS)
    assert st_t["dropped_not_in_table"] == 2  # E011 (no row) + E006 (zero total)
    assert len(sdm_t) == 10 and "E011" not in set(sdm_t["unit_id"])


def test_bad_label_files_are_refused(tmp_path):
    p = _write_labels(str(tmp_path))
    with pytest.raises(ValueError, match="no column 'landuse_code'"):
        load_luc_units(RegionsSection(luc_points=p["luc"], luc_label="landuse_code"), CRS)
    with pytest.raises(ValueError, match="no id column 'lsoa11cd'"):
        load_sdm_units(RegionsSection(sdm_units=p["sdm"], sdm_id="lsoa11cd"), CRS)
    with pytest.raises(ValueError, match="missing columns"):
        load_sdm_units(RegionsSection(sdm_units=p["sdm"], sdm_columns=["a", "b"]), CRS)


def test_run_regions_writes_features_bags_and_counts(rasters, tmp_path, caplog):
    labels = _write_labels(str(tmp_path))
    ws = Workspace(str(tmp_path / "ws"))
    _put_rasters(ws, rasters)
    rng = np.random.default_rng(3)
    pois = gpd.GeoDataFrame(
        {"poi_id": np.arange(200), "description": "d",
         "category": rng.choice(["food", "shop"], 200), "subcategory": rng.choice(["a", "b", "c"], 200)},
        geometry=gpd.points_from_xy(X0 + rng.uniform(0, NX * 10, 200), Y0 - rng.uniform(0, NY * 10, 200)),
        crs=CRS)
    _put_pois(ws, pois)
    cfg = load_config(data={"regions": {"luc_points": labels["luc"], "sdm_units": labels["sdm"],
                                        "luc_buffer_m": 30.0, "sdm_buffer_m": 60.0}})
    res = run_stage("regions", ws, cfg)
    assert not res.skipped and res.outputs == {"regions": ws.path("regions")}
    st = res.stats
    da = open_embedding(ws.path("ae.zarr"))
    units, _ = load_luc_units(cfg.regions, CRS)
    empty = sum(np.isnan(brute_pool(da, p.x, p.y, 30.0)).all() for p in units.geometry[:-2])
    assert st["luc"]["dropped_outside_raster"] == 1
    assert st["luc"]["dropped_no_valid_pixel"] == empty + 1 >= 1  # + the nodata-corner point
    kept = 41 - 2 - empty
    assert st["luc"]["kept"] == kept
    regions = RegionTable(ws.path("regions"))
    assert regions.tasks() == ["luc", "sdm"]
    table, feats, meta = regions.read("luc")
    assert set(feats) == {"AE", "AETHER"} and feats["AE"].shape == (kept, 64)
    assert feats["AETHER"].shape == (kept, 128) and np.isfinite(feats["AETHER"]).all()
    assert table.crs.to_epsg() == 32630 and len(table) == kept
    i = 7
    np.testing.assert_allclose(feats["AE"][i], brute_pool(da, table.x[i], table.y[i], 30.0),
                               atol=2e-4)
    d = np.hypot(table.x.values[:, None] - pois.geometry.x.values[None],
                 table.y.values[:, None] - pois.geometry.y.values[None])
    np.testing.assert_array_equal(table["n_pois"].to_numpy(), (d <= 30.0).sum(1))
    assert [sum(c) for c in table["poi_counts"]] == list(2 * table["n_pois"])
    assert meta["labels"] == ["label", "label_name"]
    sdm, sfeats, smeta = regions.read("sdm")
    assert smeta["labels"] == [f"ns-sec_{k}" for k in range(1, 10)]
    np.testing.assert_allclose(sdm[smeta["labels"]].sum(axis=1), 1.0)
    manifest = json.load(open(ws.manifest_path("regions")))
    assert manifest["stats"]["sdm"]["dropped_bad_distribution"] == 2
    caplog.set_level("INFO")
    assert run_stage("regions", ws, cfg).skipped
    assert "up to date (manifest matches) — skipped" in caplog.text


def test_regions_follows_the_fields_that_exist(rasters, tmp_path):
    """One feature column per field in the workspace: AE alone without a field,
    AETHER_<v> for field_<v>.zarr."""
    import shutil

    labels = _write_labels(str(tmp_path))
    cfg = load_config(data={"regions": {"luc_points": labels["luc"], "luc_buffer_m": 30.0}})
    ws = Workspace(str(tmp_path / "ws"))
    _put_tree(rasters["AE"], ws.fs, ws.path("ae.zarr"))
    run_stage("regions", ws, cfg)
    regions = RegionTable(ws.path("regions"))
    assert regions.tasks() == ["luc"]
    t_ae, f_ae, m_ae = regions.read("luc")
    assert set(f_ae) == {"AE"} and m_ae["methods"] == ["AE"]
    assert (t_ae["n_pois"] == 0).all()  # no pois.parquet: empty bags
    for name in ("field.zarr", "field_noaug.zarr"):
        shutil.copytree(rasters["AETHER"], ws.path(name))
    res = run_stage("regions", ws, cfg)
    assert not res.skipped
    t, feats, meta = RegionTable(ws.path("regions")).read("luc")
    assert set(feats) == {"AE", "AETHER", "AETHER_noaug"}
    np.testing.assert_array_equal(feats["AETHER"], feats["AETHER_noaug"])
    assert feats["AETHER"].shape == (len(t), 128)
    # the AE features of the units kept by both runs are the same
    both = t["unit_id"].isin(t_ae["unit_id"]).to_numpy()
    keep = t_ae["unit_id"].isin(t["unit_id"]).to_numpy()
    np.testing.assert_array_equal(feats["AE"][both], f_ae["AE"][keep])


def test_region_tables_are_geoparquet(rasters, tmp_path):
    """regions/<task>.parquet is real GeoParquet: geopandas reads the geometry and its CRS."""
    labels = _write_labels(str(tmp_path))
    cfg = load_config(data={"regions": {"luc_points": labels["luc"], "sdm_units": labels["sdm"],
                                        "luc_buffer_m": 30.0, "sdm_buffer_m": 60.0}})
    out = str(tmp_path / "regions")
    st = build_regions({"AE": rasters["AE"], "AETHER": rasters["AETHER"]}, None, cfg, out)
    for task in ("luc", "sdm"):
        table, _, _ = RegionTable(out).read(task)
        g = gpd.read_parquet(os.path.join(out, f"{task}.parquet"))
        assert g.crs is not None and g.crs.to_epsg() == 32630
        assert len(g) == st[task]["kept"] == len(table)
        np.testing.assert_allclose(g.geometry.x.to_numpy(), table.geometry.x.to_numpy())
        np.testing.assert_allclose(g["x"].to_numpy(), table["x"].to_numpy())


def test_build_regions_requires_a_task(rasters, tmp_path):
    with pytest.raises(ValueError, match="nothing to do"):
        build_regions({"AE": rasters["AE"]}, None, load_config(), str(tmp_path / "r"))


def test_run_regions_needs_ae(tmp_path):
    labels = _write_labels(str(tmp_path))
    cfg = load_config(data={"regions": {"luc_points": labels["luc"]}})
    with pytest.raises(FileNotFoundError, match="aether-scale ingest"):
        run_stage("regions", Workspace(str(tmp_path / "empty")), cfg)


def test_run_regions_on_a_memory_workspace_matches_local(rasters, tmp_path):
    """The regions stage on an fsspec workspace (memory:// stands in for s3://)."""
    import uuid

    import fsspec

    labels = _write_labels(str(tmp_path))
    rng = np.random.default_rng(5)
    pois = gpd.GeoDataFrame(
        {"poi_id": np.arange(100), "category": rng.choice(["food", "shop"], 100),
         "subcategory": rng.choice(["a", "b"], 100)},
        geometry=gpd.points_from_xy(X0 + rng.uniform(0, NX * 10, 100), Y0 - rng.uniform(0, NY * 10, 100)),
        crs=CRS)
    cfg = load_config(data={"regions": {"luc_points": labels["luc"], "sdm_units": labels["sdm"],
                                        "luc_buffer_m": 30.0, "sdm_buffer_m": 60.0}})
    local = Workspace(str(tmp_path / "ws"))
    mem = Workspace(f"memory://aether-regions-{uuid.uuid4().hex[:8]}/run")
    fs = fsspec.filesystem("memory")
    try:
        for ws in (local, mem):
            _put_rasters(ws, rasters)
            _put_pois(ws, pois)
            res = run_stage("regions", ws, cfg)
            assert not res.skipped and res.stats["luc"]["kept"] > 0
            assert res.stats["luc"]["mean_pois_per_unit"] > 0  # the POIs were read
        assert fs.exists(mem.path("regions/luc.parquet").removeprefix("memory://"))
        assert not os.path.exists("memory:")  # nothing went to a local folder named like the URL
        for task in ("luc", "sdm"):
            t_loc, f_loc, m_loc = RegionTable(local.path("regions")).read(task)
            t_mem, f_mem, m_mem = RegionTable(mem.path("regions")).read(task)
            pd.testing.assert_frame_equal(t_loc, t_mem)
            assert f_loc.keys() == f_mem.keys() == {"AE", "AETHER"}
            for k in f_loc:
                np.testing.assert_array_equal(f_loc[k], f_mem[k])
            assert m_loc["stats"]["kept"] == m_mem["stats"]["kept"]
        assert run_stage("regions", mem, cfg).skipped
    finally:
        fs.rm(mem.path("").removeprefix("memory://").rstrip("/"), recursive=True)
