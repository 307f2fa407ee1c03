"""configs/london.yaml over a synthetic AE raster covering Greater London's real extent.

Real London AlphaEarth tiles cannot be downloaded here, so the test writes an
int8 AEF GeoTIFF in EPSG:27700 over the bounding box of the real London
boundary, nodata outside the boundary polygon. At 10 m the box is ≈ 5,900 ×
4,600 px × 64 bands (1.7 GB) — too big for a unit test — so the tile is
written at 50 m (≈ 1,190 × 930 px, 70 MB) and ingested with
``ingest.resolution=50``: the *real* CRS, extent, boundary mask, label files,
POI sources and buffer radii are exercised, only the pixel size differs. 50 m
keeps the paper's 50 m LUC buffers meaningful (a 50 m circle always holds at
least one 50 m pixel centre, since the grid's covering radius is 35 m).

The run goes through the configured stages ingest → pois → infer → regions →
evaluate; text/pool/train are replaced by the published AETHER London
checkpoint (../shared/data/aether_reference/london_last.pth) as the model.
"""

from __future__ import annotations

import json
import os

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.features import geometry_mask
from rasterio.transform import from_origin

from aether_scale import aef
from aether_scale.config import CONFIG_DIR, load_config
from aether_scale.pipeline import run_stage
from aether_scale.stores.regions import RegionTable
from aether_scale.workspace import Workspace

CONFIG = str(CONFIG_DIR / "london.yaml")  # the shipped config (also configs/london.yaml)
RES = 50.0


def write_london_tile(path: str, boundary: gpd.GeoDataFrame, res: float = RES, seed: int = 0) -> dict:
    """A synthetic AE tile over the London boundary's bbox (EPSG:27700), nodata outside London.

    Pixels mix a few smooth 'land-cover' prototypes (2 km blobs) with noise, so
    pooled features vary in space like real AE, then are quantised with the
    AEF codec.
    """
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = boundary.total_bounds
    left, top = np.floor(x0 / res) * res - res, np.ceil(y1 / res) * res + res
    w = int(np.ceil((x1 - left) / res)) + 1
    h = int(np.ceil((top - y0) / res)) + 1
    step = int(2000 / res)
    coarse = rng.normal(size=(h // step + 2, w // step + 2, 4))
    iy = np.minimum(np.arange(h) // step, coarse.shape[0] - 1)
    ix = np.minimum(np.arange(w) // step, coarse.shape[1] - 1)
    weights = coarse[iy][:, ix]  # (h, w, 4) blocky land-cover mixture
    protos = rng.normal(size=(4, 64))
    v = weights @ protos + 0.8 * rng.normal(size=(h, w, 64))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    q = aef.encode(v)
    transform = from_origin(left, top, res, res)
    outside = geometry_mask(boundary.geometry, out_shape=(h, w), transform=transform)
    q[outside] = aef.NODATA
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=64, dtype="int8",
                       crs="EPSG:27700", transform=transform, nodata=aef.NODATA,
                       tiled=True, blockxsize=256, blockysize=256) as dst:
        dst.write(np.moveaxis(q, -1, 0))
    return {"width": w, "height": h, "outside": int(outside.sum())}


@pytest.mark.shared_data
def test_london_labels_crs_and_buffers_fast(shared_data, tmp_path):
    """Real label files + real POIs through the loaders and buffers on a coarse London raster."""
    from aether_scale.regions import build_regions
    from aether_scale.stores.ae import TargetGrid, write_ae

    london = shared_data / "london"
    boundary = gpd.read_file(london / "london_boundary.shp")
    tile = str(tmp_path / "london_ae_200m.tif")
    info = write_london_tile(tile, boundary, res=200.0)
    # the tile as ae.zarr, written by the package's own writer (the ingest stage's layout)
    with rasterio.open(tile) as src:
        codes = np.moveaxis(src.read(), 0, -1)
        t = src.transform
        grid = TargetGrid(src.crs.to_wkt(), t.a, t.c, t.f, src.width, src.height)
    write_ae(str(tmp_path / "ae.zarr"), codes, grid, chunk_px=128)
    # the real OSM POIs (EPSG:4326) in the AE CRS, as the pois stage leaves them
    osm = gpd.read_file(shared_data / "london_osm_pois" / "london_pois.geojson").to_crs(27700)
    osm["poi_id"] = np.arange(len(osm), dtype=np.int64)  # the pois table's key column
    osm[["poi_id", "category", "subcategory", "geometry"]].to_parquet(tmp_path / "pois.parquet")
    cfg = load_config(CONFIG, ["regions.luc_buffer_m=150",
                               f"regions.sdm_table={london / 'lon_lsoa_ns-sec.csv'}"])
    st = build_regions({"AE": str(tmp_path / "ae.zarr")}, str(tmp_path / "pois.parquet"), cfg,
                       str(tmp_path / "regions"))
    assert st["luc"]["rows"] == 6697 and st["sdm"]["rows"] == 4994
    assert st["luc"]["dropped_outside_raster"] == 0 and st["sdm"]["dropped_outside_raster"] == 0
    assert st["luc"]["kept"] + st["luc"]["dropped_no_valid_pixel"] == 6697
    assert st["luc"]["kept"] > 6500 and st["sdm"]["kept"] > 4900
    assert st["sdm"]["table_rows_does_not_apply"] == 4994
    assert st["sdm"]["mean_pois_per_unit"] > 1 and st["sdm"]["poi_vocab"] >= 10
    t, feats, meta = RegionTable(str(tmp_path / "regions")).read("sdm")
    assert meta["crs"] == "EPSG:27700" and feats["AE"].shape == (st["sdm"]["kept"], 64)
    np.testing.assert_allclose(np.linalg.norm(feats["AE"], axis=1), 1, atol=1e-5)
    # LSOA centroids stay where the file puts them (EPSG:27700 in and out)
    src = gpd.read_file(london / "london_lsoa_pwc_ns-sec.geojson").set_index("lsoa21cd")
    np.testing.assert_allclose(t["x"].to_numpy(), src.loc[t["unit_id"]].geometry.x, atol=1e-6)
    # distributions from the raw table match the file's rounded ones
    np.testing.assert_allclose(t[meta["labels"]].to_numpy(),
                               src.loc[t["unit_id"], meta["labels"]].to_numpy(), atol=2e-3)
    assert info["outside"] > 0


@pytest.mark.slow
@pytest.mark.shared_data
def test_london_config_runs_on_real_labels(shared_data, tmp_path):
    import torch

    from aether_scale.model import TextProj, load_projector, save_checkpoint
    from aether_scale.stores.raster import open_embedding

    london = shared_data / "london"
    boundary = gpd.read_file(london / "london_boundary.shp")
    assert boundary.crs.to_epsg() == 27700
    tile = str(tmp_path / "london_ae_50m.tif")
    info = write_london_tile(tile, boundary)
    cfg = load_config(CONFIG, [
        f"ingest.tiles=[{tile}]", f"ingest.resolution={RES}", "ingest.chunk_px=512",
        "cluster.kind=threads", "evaluate.seeds=[0]", "evaluate.max_epochs=40",
        "evaluate.patience=5", "evaluate.lr=0.01", "evaluate.lda_topics=5",
        "evaluate.plots=false",
    ])
    ws = Workspace(str(tmp_path / "ws"))
    run_stage("ingest", ws, cfg)
    ae = open_embedding(ws.path("ae.zarr"))
    assert ae.rio.crs.to_epsg() == 27700 and ae.sizes["y"] == info["height"]
    pois = run_stage("pois", ws, cfg)
    assert pois.stats  # both real sources were read and reprojected to EPSG:27700

    # the model: the published AETHER London projector, saved as a workspace model/
    ae_proj = load_projector(shared_data / "aether_reference" / "london_last.pth")
    os.makedirs(ws.path("model"))
    save_checkpoint(os.path.join(ws.path("model"), "checkpoint.pt"), ae_proj, TextProj(),
                    config={"in_dim": 64, "text_dim": 384}, epoch=9)
    inf_res = run_stage("infer", ws, cfg)
    assert list(inf_res.outputs) == ["field.zarr"]  # one field per model: only model/ is there
    inf = inf_res.stats["field.zarr"]
    assert inf["nodata_pixels"] == info["outside"] and inf["crs"] == "EPSG:27700"

    reg = run_stage("regions", ws, cfg).stats
    luc, sdm = reg["luc"], reg["sdm"]
    # every real LUC point and LSOA centroid lies in London; nothing is dropped for CRS reasons
    assert luc["rows"] == 6697 and sdm["rows"] == 4994
    assert luc["dropped_outside_raster"] == 0 and sdm["dropped_outside_raster"] == 0
    assert luc["kept"] + luc["dropped_no_valid_pixel"] + luc["dropped_bad_label"] == 6697
    assert luc["kept"] > 6600 and sdm["kept"] > 4950
    assert sdm["mean_pois_per_unit"] > 1  # 300 m buffers over the real POIs
    table, feats, meta = RegionTable(ws.path("regions")).read("luc")
    assert meta["crs"] == "EPSG:27700" and set(feats) == {"AE", "AETHER"}
    assert sorted(table["label"].unique()) == list(range(10))
    # the units are where the label file puts them (EPSG:27700 in, EPSG:27700 out)
    src = gpd.read_file(london / "sampled_points_landuse.geojson").set_index("loc_id")
    got = table.set_index("unit_id")
    ids = got.index[:50].astype(int)
    np.testing.assert_allclose(got["x"].to_numpy()[:50], src.loc[ids].geometry.x, atol=1e-6)

    # SDM from the raw ONS table gives the file's (rounded) distributions
    cfg_t = load_config(CONFIG, [f"ingest.tiles=[{tile}]", f"ingest.resolution={RES}",
                                 "cluster.kind=threads",
                                 f"regions.sdm_table={london / 'lon_lsoa_ns-sec.csv'}"])
    ws_t = Workspace(str(tmp_path / "ws_table"))
    for name in ("ae.zarr", "field.zarr"):
        os.symlink(ws.path(name), ws_t.path(name))
    st_t = run_stage("regions", ws_t, cfg_t).stats["sdm"]
    assert st_t["table_rows_does_not_apply"] == 4994 and st_t["kept"] == sdm["kept"]
    a, _, _ = RegionTable(ws.path("regions")).read("sdm")
    b, _, meta_b = RegionTable(ws_t.path("regions")).read("sdm")
    cols = meta_b["labels"]
    np.testing.assert_allclose(a.set_index("unit_id")[cols].sort_index(),
                               b.set_index("unit_id")[cols].sort_index(), atol=2e-3)

    torch.manual_seed(0)
    res = run_stage("evaluate", ws, cfg)
    m = json.load(open(os.path.join(res.outputs["report"], "metrics.json")))
    assert set(m["luc"]) == {"AE", "AETHER", "TF-IDF", "LDA"}
    assert all(np.isfinite(v[0]) for t in m.values() for mm in t.values() for v in mm.values())
    assert pd.notna(m["sdm"]["AE"]["kl"][0])
