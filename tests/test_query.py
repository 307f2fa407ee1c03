"""Text queries over the field: similarity, exact top locations, outputs, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pytest
import torch
from fixtures import projector, unit, write_tiny_ae
from scipy.ndimage import maximum_filter

from aether_scale import aef
from aether_scale.config import InferSection, load_config
from aether_scale.infer import infer_field
from aether_scale.query import QueryError, block_similarity, check_phrases, query, top_locations
from aether_scale.query.search import similarity_raster
from aether_scale.stores.field import open_field
from aether_scale.stores.similarity import open_similarity


# --------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_block_similarity_is_the_cosine(dtype):
    rng = np.random.default_rng(0)
    v = unit(rng.standard_normal((40 * 30, 128))).reshape(40, 30, 128)
    if dtype == "int8":
        block = aef.encode(v)
        block[3, 4] = aef.NODATA
        ref = aef.decode(block.reshape(-1, 128)).astype(np.float64)
    else:
        block = v.astype(np.float16)
        block[3, 4] = np.nan
        ref = block.reshape(-1, 128).astype(np.float64)
    q = unit(rng.standard_normal((3, 128)))
    sim, n = block_similarity(block, q)
    assert n == 40 * 30 - 1 and sim.dtype == np.float32
    ref = (ref / np.linalg.norm(ref, axis=1, keepdims=True)) @ q.T.astype(np.float64)
    ref = ref.reshape(40, 30, 3)
    assert np.isnan(sim[3, 4]).all() and np.isnan(ref[3, 4]).all()
    np.testing.assert_allclose(sim, ref, atol=2e-6)


def test_phrases_are_checked():
    assert check_phrases(["  a place  of cafes ", "pubs", "pubs"]) == ["a place of cafes", "pubs"]
    for bad in ([], [""], ["pubs", "   "]):
        with pytest.raises(QueryError, match="empty|no query phrase"):
            check_phrases(bad)


def _global_peaks(sim: np.ndarray, r: int, k: int) -> list[list[tuple[float, int, int]]]:
    """Brute force on the whole raster: peaks of the (2r+1)² square, one per plateau
    (its first pixel), highest first, ties by position; equal peaks within r of a
    taken one dropped."""
    from scipy.ndimage import label

    out = []
    for q in range(sim.shape[2]):
        s = np.where(np.isfinite(sim[:, :, q]), sim[:, :, q], -np.inf)
        peak = np.isfinite(s) & (s == maximum_filter(s, size=2 * r + 1, mode="constant",
                                                      cval=-np.inf))
        if r:
            lab, _ = label(peak, structure=np.ones((3, 3)))
        else:  # every pixel its own location
            lab = np.zeros(peak.shape, dtype=np.int64)
            lab[peak] = np.arange(1, int(peak.sum()) + 1)
        firsts = {}
        for rr, cc in zip(*np.nonzero(lab), strict=True):
            firsts.setdefault(lab[rr, cc], (int(rr), int(cc)))
        cands = sorted(((float(s[p]), p[0], p[1]) for p in firsts.values()),
                       key=lambda c: (-c[0], c[1], c[2]))
        got: list[tuple[float, int, int]] = []
        for v, rr, cc in cands:
            if any(abs(rr - a) <= r and abs(cc - b) <= r for _, a, b in got):
                continue
            got.append((v, rr, cc))
            if len(got) == k:
                break
        out.append(got)
    return out


@pytest.fixture(scope="module")
def tiny_field(tmp_path_factory):
    """A 70 × 90 px field in 3 × 3 chunks of 32 (ragged), with nodata."""
    d = tmp_path_factory.mktemp("qfield")
    write_tiny_ae(str(d / "ae.zarr"))
    infer_field(str(d / "ae.zarr"), projector(), str(d / "field.zarr"), InferSection(),
                progress=False)
    return str(d / "field.zarr")


@pytest.mark.parametrize("r,k,per_chunk", [(0, 5, 7), (1, 8, 3), (3, 12, 2), (7, 6, 1),
                                           (20, 4, 2)])
def test_top_locations_equal_whole_raster_peaks(tmp_path, tiny_field, r, k, per_chunk):
    """Chunk-wise peaks, border checks and refills give exactly the peaks of the whole
    raster — including peaks that sit on chunk edges and chunks that run out of listed
    peaks (per_chunk tiny)."""
    fld = open_field(tiny_field)["embedding"]
    rng = np.random.default_rng(r)
    vec = unit(rng.standard_normal((3, 128)))
    out = similarity_raster(fld, vec, ["a", "b", "c"], str(tmp_path / "sim.zarr"), r=r,
                            per_chunk=per_chunk, ledger=str(tmp_path / "led"), token="t",
                            progress=False)
    sim = open_similarity(str(tmp_path / "sim.zarr"))
    got, stats = top_locations(out["records"], sim, k=k, r=r, per_chunk=per_chunk)
    want = _global_peaks(sim.values, r, k)
    assert [[(round(v, 6), a, b) for v, a, b in g] for g in got] == \
        [[(round(v, 6), a, b) for v, a, b in w] for w in want]
    assert all(len(g) == k for g in got)
    if r >= 3:
        assert stats["border_checks"] > 0
    if per_chunk < k and r <= 7:  # (at r=20 a 32-px chunk holds too few peaks to run out)
        assert stats["refills"] > 0


def test_a_plateau_is_one_location():
    """Connected pixels of equal similarity (identical field vectors) are one location,
    even when the plateau is wider than the window."""
    import dask.array as dsa
    import xarray as xr

    from aether_scale.query.search import block_peaks

    sim = np.zeros((30, 30, 1), dtype=np.float32)
    sim[5:15, 5:15, 0] = 1.0  # 10 × 10 plateau, window half-side 2
    sim[25, 25, 0] = 0.5
    sim[0, 29, 0] = 0.5  # an equal, separate peak: a location of its own
    peaks = block_peaks(sim, 2, 50, (False, False, False, False))[0]
    assert (peaks["value"][0], peaks["row"][0], peaks["col"][0]) == (1.0, 5, 5)
    assert peaks["value"][1:3] == [0.5, 0.5] and peaks["value"].count(1.0) == 1
    da = xr.DataArray(dsa.from_array(sim, chunks=(30, 30, 1)), dims=("y", "x", "query"))
    got, _ = top_locations({"0.0.0": {"peaks": [peaks]}}, da, k=3, r=2, per_chunk=50)
    assert got[0] == [(1.0, 5, 5), (0.5, 0, 29), (0.5, 25, 25)]
    assert got[0] == _global_peaks(sim, 2, 3)[0]


@pytest.mark.parametrize("r,k,per_chunk", [(2, 12, 2), (4, 10, 2)])
def test_ties_spread_over_a_chunk_are_exact_and_spare_refills(r, k, per_chunk):
    """Repeated field vectors give equal, unconnected peaks within ``r`` of each other
    (here: twin peaks ``r`` apart, at random heights, over a quantised background).
    Chunks list such ties beyond their quota (they do not count), so the result still
    equals the whole-raster peaks, with fewer chunk re-reads."""
    import dask.array as dsa
    import xarray as xr

    from aether_scale.query import search

    rng = np.random.default_rng(r)
    sim = rng.integers(0, 3, size=(96, 96, 2)).astype(np.float32) / 10  # ties below 0.3
    step = 2 * r + 3
    for y in range(1, 96, step):
        for x in range(1, 96 - r, 2 * step):
            sim[y, x] = sim[y, x + r] = 0.5 + rng.random(2)  # a twin: equal, r apart
    sim[rng.random(sim.shape) < 0.02] = np.nan
    da = xr.DataArray(dsa.from_array(sim, chunks=(32, 32, 2)), dims=("y", "x", "query"))

    def records(listing):
        old, search._listing = search._listing, listing
        try:
            return {f"{i}.{j}.0": {"peaks": search.block_peaks(
                sim[32 * i:32 * i + 32, 32 * j:32 * j + 32], r, per_chunk,
                (i > 0, i < 2, j > 0, j < 2))} for i in range(3) for j in range(3)}
        finally:
            search._listing = old

    want = _global_peaks(sim, r, k)
    got, stats = top_locations(records(search._listing), da, k=k, r=r, per_chunk=per_chunk)
    assert got == want and all(len(g) == k for g in got)
    plain, plain_stats = top_locations(records(lambda rows, cols, r, m: min(rows.size, m)),
                                       da, k=k, r=r, per_chunk=per_chunk)
    assert plain == want  # exact either way: the quota only changes the work done
    assert stats["refills"] < plain_stats["refills"]


# --------------------------------------------------------------------------- workspace
@pytest.fixture(scope="module")
def demo_ws(tiny_demo, tmp_path_factory):
    """A private copy of the tiny demo workspace (tests here write queries into it)."""
    dst = tmp_path_factory.mktemp("qdemo") / "ws"
    shutil.copytree(tiny_demo["workspace"], dst, ignore=shutil.ignore_patterns("city"))
    os.symlink(tiny_demo["workspace"] / "city", dst / "city")
    return dst


def test_query_end_to_end(demo_ws):
    phrases = ["A place of cafes, a type of Eating and drinking.", "a place of parks"]
    res = query(demo_ws, phrases, top_k=5, min_distance_m=200, progress=False)
    sim = res.similarity
    assert list(sim["query"].values) == phrases and sim.dims == ("y", "x", "query")
    fld = open_field(demo_ws / "field.zarr")["embedding"]
    assert sim.shape[:2] == fld.shape[:2]
    np.testing.assert_array_equal(sim["x"].values, fld["x"].values)
    # a known point: a valid pixel's similarity is its cosine with the projected phrase
    from aether_scale.model import load_text_projector
    from aether_scale.text import embed_texts

    cfg = load_config(str(demo_ws / "config.yaml"))
    head = load_text_projector(str(demo_ws / "model"))
    with torch.no_grad():
        t = head(torch.from_numpy(embed_texts(phrases, cfg.text))).numpy()
    row, col = 77, 141
    px = fld.values[row, col].astype(np.float64)
    assert np.isfinite(px).all()
    np.testing.assert_allclose(sim.values[row, col], (px / np.linalg.norm(px)) @ t.T, atol=1e-5)
    assert np.isnan(sim.values[~np.isfinite(fld.values).all(axis=2)]).all()
    # top locations: pairwise farther than 200 m, each the best within its square
    top = res.top
    assert len(top) == 10 and set(top["rank"]) == set(range(1, 6))
    for q in (0, 1):
        t_q = top[top["query"] == q].sort_values("rank")
        assert t_q["similarity"].is_monotonic_decreasing
        xy = t_q[["x", "y"]].to_numpy()
        d = np.abs(xy[:, None, :] - xy[None, :, :]).max(axis=2)
        assert (d[~np.eye(len(xy), dtype=bool)] > 200).all()
        for _, row_ in t_q.iterrows():
            r0, c0 = int(row_["row"]), int(row_["col"])
            win = sim.values[max(0, r0 - 20):r0 + 21, max(0, c0 - 20):c0 + 21, q]
            assert row_["similarity"] == pytest.approx(float(np.nanmax(win)))
            assert float(fld["x"][c0]) == row_["x"] and float(fld["y"][r0]) == row_["y"]
    on_disk = gpd.read_parquet(os.path.join(res.folder, "top.parquet"))
    assert on_disk.crs == top.crs and len(on_disk) == 10
    gj = gpd.read_file(os.path.join(res.folder, "top.geojson"))
    assert gj.crs.to_epsg() == 4326 and len(gj) == 10
    back = gj.to_crs(top.crs)
    np.testing.assert_allclose(back.geometry.x, top.geometry.x, atol=1e-3)
    # maps: real PNGs of a readable size
    from PIL import Image

    assert len(res.maps) == 2
    for p in res.maps:
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) >= 600
    summary = json.loads(open(os.path.join(res.folder, "query.json")).read())
    assert summary["text_encoder"]["verified"] is True
    assert summary["valid_pixels"] == int(np.isfinite(fld.values).all(axis=2).sum())
    # the same phrases again: the finished raster is reused, the answer is the same
    again = query(demo_ws, phrases, top_k=5, min_distance_m=200, maps=False, progress=False)
    assert again.folder == res.folder and again.summary["chunks_computed"] == 0
    assert again.top[["row", "col"]].equals(top[["row", "col"]])


def test_query_refuses_bad_requests(demo_ws, tmp_path):
    with pytest.raises(QueryError, match="empty"):
        query(demo_ws, ["cafes", " "], progress=False)
    with pytest.raises(QueryError, match="text.normalize|normalize"):
        query(demo_ws, ["cafes"], overrides=["text.normalize=false"], progress=False)
    with pytest.raises(QueryError, match="no workspace"):
        query(tmp_path / "nowhere", ["cafes"], progress=False)
    partial = tmp_path / "ws"
    partial.mkdir()
    with pytest.raises(QueryError, match="aether-scale train"):
        query(partial, ["cafes"], progress=False)
    shutil.copytree(demo_ws / "model", partial / "model")
    with pytest.raises(QueryError, match="aether-scale infer"):
        query(partial, ["cafes"], progress=False)
    with pytest.raises(QueryError, match="variant 'nope'"):
        query(demo_ws, ["cafes"], variant="nope", progress=False)


def test_query_cli(demo_ws):
    env = {**os.environ, "AETHER_SCALE_NO_BAR": "1"}
    p = subprocess.run([sys.executable, "-m", "aether_scale", "query", "-w", str(demo_ws),
                        "a place of pubs", "--top-k", "3", "--no-maps", "--name", "pubs"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "a place of pubs" in p.stdout and "queries/pubs" in p.stdout
    top = gpd.read_parquet(demo_ws / "queries" / "pubs" / "top.parquet")
    assert len(top) == 3
    bad = subprocess.run([sys.executable, "-m", "aether_scale", "query", "-w", str(demo_ws), ""],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "empty" in bad.stderr


# --------------------------------------------------------------------------- retrieval
def test_text_queries_beat_the_non_text_baseline(tmp_path):
    """On a small synthetic city (fixed seed) the subcategory queries find cells dense in
    independent held-out POIs better than the mean AE of the training POIs does: more
    subcategories won than lost at P@20, by a margin, and a higher mean P@20."""
    from aether_scale.demo import run_demo

    ov = ["cluster.kind=threads", "synth.size_px=256", "synth.n_pois=3000",
          "synth.n_luc_points=400", "synth.n_regions=120", "train.epochs=15"]
    out = run_demo(str(tmp_path / "ws"), overrides=ov,
                   stages=["ingest", "pois", "text", "pool", "train", "infer"])
    r = out["retrieval"]
    s, n = r["summary"], r["n_subcategories"]
    assert n >= 30 and len(r["rows"]) == n
    losses = n - s["p_wins"] - s["p_ties"]
    assert s["p_wins"] >= losses + 8, s
    assert s["p_aether"] > s["p_baseline"] + 0.02, s
    for row in r["rows"]:  # every score is a real measurement on enough cells
        assert 0.0 <= row["auc_aether"] <= 1.0 and 0.0 <= row["auc_baseline"] <= 1.0
        assert row["positive_cells"] >= 1 and row["cells"] > 200
    md = (tmp_path / "ws" / "queries" / "retrieval-eval" / "retrieval.md").read_text()
    assert "| AETHER text query |" in md and md.count("\n| ") >= n + 4
    assert "Text retrieval" in out["summary"]
    # a rerun on the unchanged workspace reuses the evaluation
    again = run_demo(str(tmp_path / "ws"), overrides=ov,
                     stages=["ingest", "pois", "text", "pool", "train", "infer"])
    assert again["retrieval"]["key"] == r["key"] and again["retrieval"]["rows"] == r["rows"]


# --------------------------------------------------------------------------- export
def test_exports_open_in_gis_tools(demo_ws, tmp_path):
    """A query's top location lands on the same pixel and value in similarity.zarr and
    in the exported COG read through rasterio; the field, RGB and bbox exports are valid
    COGs with the field's grid; the model bundle's ONNX gives the field's values."""
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    from aether_scale.export import ExportError, export

    res = query(demo_ws, ["a place of parks"], name="parks", maps=False, progress=False)
    best = res.top.iloc[0]
    out = export(demo_ws, "similarity", tmp_path / "sim.tif", query="parks")
    assert cog_validate(out["path"], quiet=True)[0]
    with rasterio.open(out["path"]) as src:
        assert src.count == 1 and src.descriptions[0] == "a place of parks"
        assert src.crs.to_epsg() == res.top.crs.to_epsg()
        row, col = src.index(best["x"], best["y"])
        assert (row, col) == (best["row"], best["col"])
        assert src.read(1)[row, col] == pytest.approx(best["similarity"], abs=0)
        assert np.isnan(src.nodata)
    fld = open_field(demo_ws / "field.zarr")["embedding"]
    x0, y0 = float(fld["x"][100]), float(fld["y"][60])
    box = (x0 - 5, y0 - 395, x0 + 595, y0 + 5)  # pixel edges: 60 px wide, 40 px tall
    part = export(demo_ws, "field", tmp_path / "part.tif", bbox=box)
    with rasterio.open(part["path"]) as src:
        assert (src.width, src.height, src.count) == (60, 40, 128)
        assert src.xy(0, 0) == pytest.approx((x0, y0))
        np.testing.assert_array_equal(src.read()[:, 5, 7],
                                      fld.values[65, 107].astype(np.float32))
    rgb = export(demo_ws, "rgb", tmp_path / "rgb.tif")
    with rasterio.open(rgb["path"]) as src:
        assert src.count == 3 and src.dtypes[0] == "uint8" and src.nodata == 0
    with pytest.raises(ExportError, match="does not intersect"):
        export(demo_ws, "field", tmp_path / "no.tif", bbox=(0, 0, 10, 10))
    with pytest.raises(ExportError, match="--overwrite"):
        export(demo_ws, "field", tmp_path / "part.tif", bbox=box)
    with pytest.raises(ExportError, match="no query 'nope'"):
        export(demo_ws, "similarity", tmp_path / "s.tif", query="nope")
    with pytest.raises(ExportError, match="aether-scale infer"):
        export(tmp_path, "field")
    # the model bundle from the command line; its ONNX projector computes the field
    env = {**os.environ, "AETHER_SCALE_NO_BAR": "1"}
    p = subprocess.run([sys.executable, "-m", "aether_scale", "export", "model", "-w",
                        str(demo_ws), "-o", str(tmp_path / "bundle")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    import onnxruntime as ort

    from aether_scale.stores.ae import open_ae

    codes = open_ae(demo_ws / "ae.zarr")["embedding"].values[60:62, 100:110].reshape(-1, 64)
    sess = ort.InferenceSession(str(tmp_path / "bundle" / "ae_projector.onnx"),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"ae": aef.decode(codes).astype(np.float32)})[0]
    want = fld.values[60:62, 100:110].reshape(-1, 128).astype(np.float32)
    np.testing.assert_allclose(got, want, atol=2e-3)  # the field is float16
    card = json.loads((tmp_path / "bundle" / "model_card.json").read_text())
    assert card["text_encoder"]["model_key"]
