"""POI stage: real OS / OSM files end to end, every bad-row rule in every format, templates."""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from fixtures import grid
from shapely.geometry import Point, Polygon

from aether_scale.config import load_config
from aether_scale.pipeline import run_stage
from aether_scale.pois import PoiInputError, build_descriptions, clean_text, raster_grid
from aether_scale.stores.ae import write_ae
from aether_scale.workspace import Workspace

# Synthetic AE grid used throughout: EPSG:27700, 100 m pixels, 400 × 400 px, chunks of 64 px,
# x 510 000 … 550 000, y 160 000 … 200 000 — cuts through Greater London so that real POIs
# fall on both sides of its edges.
X0, Y1, RES, W, H, CHUNK = 510_000.0, 200_000.0, 100.0, 400, 400, 64
OUT_COLS = ["poi_id", "description", "name", "category", "subcategory", "source", "x", "y",
            "chunk_y", "chunk_x"]


def write_ae_zarr(path: str, *, x0=X0, y1=Y1, res=RES, w=W, h=H, chunk=CHUNK, crs="EPSG:27700"):
    """A finished AE store (all-zero codes) written by the real writer; tiny on disk."""
    write_ae(path, np.zeros((h, w, 64), dtype=np.int8),
             grid(h, w, crs=crs, left=x0, top=y1, res=res), chunk_px=chunk)


def inside_expected(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Independent coverage rule: pixel bounds, left/top edges in, right/bottom out."""
    return (x >= X0) & (x < X0 + W * RES) & (y <= Y1) & (y > Y1 - H * RES)


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


@pytest.fixture
def ws(tmp_path) -> Workspace:
    w = Workspace(tmp_path / "ws")
    write_ae_zarr(w.path("ae.zarr"))
    return w


def cfg_for(*sources: dict, **pois) -> object:
    return load_config(data={"pois": {"sources": list(sources), **pois}})


def read_out(ws: Workspace) -> gpd.GeoDataFrame:
    return gpd.read_parquet(ws.path("pois.parquet"))


# ----------------------------------------------------------------------------- real data
@pytest.mark.shared_data
def test_os_csv_end_to_end(ws, shared_data, caplog):
    caplog.set_level("INFO", logger="aether_scale")
    path = shared_data / "london" / "poi_desc_sampled.csv"
    src = pd.read_csv(path)
    ins = inside_expected(src.feature_easting.to_numpy(), src.feature_northing.to_numpy())
    assert 0 < ins.sum() < len(src)  # the grid really cuts the data

    cfg = cfg_for({"path": str(path), "x": "feature_easting", "y": "feature_northing",
                   "crs": "EPSG:27700",
                   "columns": {"id": "ref_no", "name": "name", "description": "description"}},
                  keep_columns=["pointx_class"], partition_rows=1000)
    res = run_stage("pois", ws, cfg)
    st = res.stats
    assert st["rows_read"] == 1000
    assert st["kept"] == int(ins.sum())
    assert f"[pois] kept {int(ins.sum()):,} of 1,000 POIs" in caplog.text
    assert st["dropped"] == {"no_geometry": 0, "nan_coords": 0, "bad_id": 0, "empty_text": 0,
                             "outside_coverage": int((~ins).sum()), "duplicate_id": 0}

    out = read_out(ws)
    assert list(out.columns[: len(OUT_COLS)]) == OUT_COLS and "pointx_class" in out.columns
    assert out.crs.to_epsg() == 27700 and out.poi_id.is_unique and out.poi_id.dtype == np.int64
    exp = src[ins].set_index("ref_no")
    got = out.set_index("poi_id").loc[exp.index]
    want = exp.description.str.rstrip(" .") + ", named " + exp.name + "."
    assert (got.description == want).all()
    assert got.description.iloc[0].startswith("A place of ")
    np.testing.assert_allclose(got.x, exp.feature_easting)
    np.testing.assert_allclose(got.geometry.y, exp.feature_northing)
    assert (got.pointx_class == exp.pointx_class.astype(str)).all()
    # chunk tags, computed independently
    cy = np.floor((Y1 - got.y) / RES) // CHUNK
    cx = np.floor((got.x - X0) / RES) // CHUNK
    assert (got.chunk_y == cy).all() and (got.chunk_x == cx).all()
    # rerun: manifest matches → skipped
    caplog.clear()
    assert run_stage("pois", ws, cfg).skipped
    assert "[pois] up to date (manifest matches) — skipped" in caplog.text


@pytest.mark.shared_data
def test_osm_geojson_end_to_end(ws, shared_data):
    path = shared_data / "london_osm_pois" / "london_pois.geojson"
    src = gpd.read_file(path).to_crs(27700)
    ins = inside_expected(src.geometry.x.to_numpy(), src.geometry.y.to_numpy())
    assert 0 < (~ins).sum() < len(src)

    cfg = cfg_for({"path": str(path),
                   "columns": {"name": "name", "category": "category",
                               "subcategory": "subcategory"}},
                  partition_rows=2000)
    st = run_stage("pois", ws, cfg).stats
    assert st["rows_read"] == 10352
    assert st["kept"] == int(ins.sum())
    assert st["dropped"]["outside_coverage"] == int((~ins).sum())
    assert sum(st["dropped"].values()) == int((~ins).sum())
    assert st["files"] >= 4  # about partition_rows rows per file

    out = read_out(ws)
    assert len(out) == int(ins.sum()) and out.poi_id.is_unique
    # generated ids: source 0 → the row number in the file
    exp = src[ins]
    got = out.set_index("poi_id").loc[exp.index.to_numpy()]
    # the file holds one name in decomposed Unicode ('Cafe' + U+0301): NFC-normalised here
    nfc = exp.name.map(lambda v: unicodedata.normalize("NFC", v))
    assert (nfc != exp.name).sum() == 1
    want = "A place of " + exp.subcategory + ", a type of " + exp.category + ", named " + nfc + "."
    assert (got.description.to_numpy() == want.to_numpy()).all()
    np.testing.assert_allclose(got.x.to_numpy(), exp.geometry.x.to_numpy(), atol=1e-6)
    # spatial sort: (chunk_y, chunk_x, poi_id) ascending, and a chunk never spans two files
    key = out.chunk_y.to_numpy() * 100 + out.chunk_x.to_numpy()
    assert np.all(np.diff(key) >= 0)
    parts = [gpd.read_parquet(p) for p in sorted(Path(ws.path("pois.parquet")).glob("*.parquet"))]
    seen: set = set()
    for p in parts:
        ks = set((p.chunk_y * 100 + p.chunk_x).tolist())
        assert not (ks & seen)
        seen |= ks


@pytest.mark.shared_data
def test_both_real_sources_together(ws, shared_data):
    os_path = shared_data / "london" / "poi_desc_sampled.csv"
    osm_path = shared_data / "london_osm_pois" / "london_pois.geojson"
    cfg = cfg_for(
        {"path": str(os_path), "x": "feature_easting", "y": "feature_northing",
         "crs": "EPSG:27700", "columns": {"name": "name", "description": "description"}},
        {"path": str(osm_path),
         "columns": {"name": "name", "category": "category", "subcategory": "subcategory"}},
    )
    st = run_stage("pois", ws, cfg).stats
    assert [s["rows_read"] for s in st["sources"]] == [1000, 10352]
    out = read_out(ws)
    assert len(out) == st["kept"] == sum(s["kept"] for s in st["sources"])
    assert set(out.source.unique()) == {0, 1}
    # generated ids are source-qualified: source * 2**40 + row
    assert (out.poi_id[out.source == 1] >= 2**40).all() and (out.poi_id[out.source == 0] < 2**40).all()


# ----------------------------------------------------------------------------- bad rows
def _bad_rows() -> tuple[gpd.GeoDataFrame, dict]:
    """One row per rule (plus good rows); 'only' marks rows some formats cannot store."""
    ok = (520_050.0, 180_050.0)
    rows = [
        # id, name, category, subcategory, geometry, expected fate, formats-that-can't-store
        (1, "Café Nero", "coffee", "Cafe", Point(ok), "kept", ()),
        (2, "Bar", "nightlife", "Pub", None, "no_geometry", ()),
        (3, "Bar", "nightlife", "Pub", Point(), "no_geometry", ("shp", "geojson")),
        # POINT (NaN NaN) is the WKB encoding of an empty point, so use one NaN ordinate
        (4, "Nan", "nightlife", "Pub", Point(520_000, float("nan")), "nan_coords", ("geojson", "shp")),
        (10, "Inf", "nightlife", "Pub", Point(float("inf"), 180_000), "nan_coords", ("geojson", "shp")),
        (5, "Far", "nightlife", "Pub", Point(600_000, 180_000), "outside_coverage", ()),
        (6, "Blank", "  ", None, Point(ok), "empty_text", ()),
        (1, "Dup", "coffee", "Cafe", Point(521_000, 181_000), "duplicate_id", ()),
        (7, "Poly", "culture", "Museum",
         Polygon([(530_000, 170_000), (530_400, 170_000), (530_400, 170_400), (530_000, 170_400)]),
         "kept_non_point", ("shp",)),
        (8, "Cafe\u0301\x07   Nero\u200b", "coffee", "Cafe", Point(ok), "kept", ()),
        (9, None, "coffee", "Cafe", Point(ok), "kept", ()),
    ]
    df = pd.DataFrame(rows, columns=["pid", "name", "cat", "sub", "geometry", "fate", "skip"])
    gdf = gpd.GeoDataFrame(df, geometry="geometry", crs=27700)
    return gdf, {}


def _write(gdf: gpd.GeoDataFrame, fmt: str, tmp_path) -> str:
    g = gdf.drop(columns=["fate", "skip"])
    if fmt == "gpkg":
        p = tmp_path / "p.gpkg"
        g.to_file(p, driver="GPKG", engine="pyogrio")
    elif fmt == "geojson":
        p = tmp_path / "p.geojson"
        g.to_crs(4326).to_file(p, driver="GeoJSON", engine="pyogrio")
    elif fmt == "shp":
        p = tmp_path / "p.shp"
        g.to_file(p, driver="ESRI Shapefile", engine="pyogrio")
    elif fmt == "parquet":
        p = tmp_path / "p.parquet"
        g.to_parquet(p)
    elif fmt == "parquet_dir":
        p = tmp_path / "pdir"
        p.mkdir()
        for i, part in enumerate(np.array_split(np.arange(len(g)), 3)):
            g.iloc[part].to_parquet(p / f"part-{i}.parquet")
    else:  # pragma: no cover
        raise AssertionError(fmt)
    return str(p)


@pytest.mark.parametrize("fmt", ["gpkg", "geojson", "shp", "parquet", "parquet_dir"])
def test_bad_row_rules_in_every_format(ws, tmp_path, fmt):
    gdf, _ = _bad_rows()
    gdf = gdf[[fmt not in s for s in gdf.skip]].reset_index(drop=True)
    path = _write(gdf, fmt, tmp_path)
    cfg = cfg_for({"path": path, "columns": {"id": "pid", "name": "name", "category": "cat",
                                             "subcategory": "sub"}})
    st = run_stage("pois", ws, cfg).stats
    fates = gdf.fate.value_counts().to_dict()
    expect_dropped = {k: fates.get(k, 0) for k in
                      ("no_geometry", "nan_coords", "bad_id", "empty_text", "outside_coverage",
                       "duplicate_id")}
    assert st["dropped"] == expect_dropped
    n_kept = fates.get("kept", 0) + fates.get("kept_non_point", 0)
    assert st["kept"] == n_kept
    assert st["repaired"]["non_point"] == fates.get("kept_non_point", 0)
    assert st["rows_read"] == len(gdf)

    out = read_out(ws).set_index("poi_id")
    assert sorted(out.index) == sorted(gdf.pid[gdf.fate.str.startswith("kept")])
    assert out.loc[1, "description"] == "A place of Cafe, a type of coffee, named Café Nero."
    # NFC (e + combining acute → é), control and zero-width characters gone, spaces collapsed
    assert out.loc[8, "name"] == "Café Nero"
    assert out.loc[8, "description"] == out.loc[1, "description"]
    # no name → the template without the "named" clause
    assert out.loc[9, "description"] == "A place of Cafe, a type of coffee."
    if "kept_non_point" in fates:
        poly = gdf.geometry[gdf.pid == 7].iloc[0]
        pt = out.loc[7, "geometry"]
        assert pt.geom_type == "Point" and poly.contains(pt)
    assert set(out.geometry.geom_type) == {"Point"}


def test_missing_id_is_bad_id_and_string_ids_hash_stably(ws, tmp_path):
    df = pd.DataFrame({"ident": ["7", None, "node/42", "node/42", "12.0"],
                       "nm": ["a", "b", "c", "d", "e"],
                       "E": [520_000.5] * 5, "N": [180_000.5] * 5})
    p = tmp_path / "p.csv"
    df.to_csv(p, index=False)
    cfg = cfg_for({"path": str(p), "x": "E", "y": "N", "crs": "EPSG:27700",
                   "columns": {"id": "ident", "name": "nm", "category": "nm", "subcategory": "nm"}},
                  keep_columns=["ident"])
    st = run_stage("pois", ws, cfg).stats
    assert st["dropped"]["bad_id"] == 1 and st["dropped"]["duplicate_id"] == 1 and st["kept"] == 3
    out = read_out(ws).set_index("ident")
    assert out.loc["7", "poi_id"] == 7 and out.loc["12.0", "poi_id"] == 12
    h = out.loc["node/42", "poi_id"]
    assert h > 0 and h == pd.util.hash_array(np.array(["node/42"], dtype=object))[0] & (2**63 - 1)
    assert out.loc["node/42", "name"] == "c"  # first occurrence kept


def test_csv_encoding_nan_coords_lonlat_and_bom(ws, tmp_path):
    lines = [
        "\ufeffid;name;lon;lat;kind",
        "1;Caf\u00e9 One;-0.1;51.5;cafe",
        "2;Bad coords;abc;51.5;cafe",
        "3;Empty coords;;;cafe",
        "4;Inf;inf;51.5;cafe",
        "5;Caf\u00e9 Two;-0.11;51.51;cafe",
    ]
    raw = ("\n".join(lines) + "\n").encode("utf-8")
    raw = raw.replace("Caf\u00e9 Two".encode(), b"Caf\xe9 Two")  # one cp1252 byte in UTF-8
    p = tmp_path / "p.csv"
    p.write_bytes(raw)
    cfg = cfg_for({"path": str(p), "lon": "lon", "lat": "lat",
                   "columns": {"id": "id", "name": "name", "category": "kind",
                               "subcategory": "kind"}})
    st = run_stage("pois", ws, cfg).stats
    assert st["dropped"]["nan_coords"] == 3 and st["kept"] == 2
    assert st["repaired"]["encoding"] == 1
    out = read_out(ws).set_index("poi_id")
    assert out.loc[5, "name"] == "Café Two" and out.loc[1, "name"] == "Café One"
    assert out.loc[5, "description"] == "A place of cafe, a type of cafe, named Café Two."
    # lon/lat (EPSG:4326 by default) reprojected into the AE CRS
    from pyproj import Transformer

    ex, ey = Transformer.from_crs(4326, 27700, always_xy=True).transform(-0.1, 51.5)
    assert math.isclose(out.loc[1, "x"], ex, abs_tol=1e-6)
    assert math.isclose(out.loc[1, "y"], ey, abs_tol=1e-6)


def test_duplicates_across_sources_keep_the_first_source(ws, tmp_path):
    a = pd.DataFrame({"id": [1, 2], "n": ["a", "b"], "E": [520_000.0] * 2, "N": [180_000.0] * 2})
    b = pd.DataFrame({"id": [2, 3], "n": ["B", "c"], "E": [520_000.0] * 2, "N": [180_000.0] * 2})
    pa, pb = tmp_path / "a.csv", tmp_path / "b.csv"
    a.to_csv(pa, index=False)
    b.to_csv(pb, index=False)
    cols = {"id": "id", "name": "n", "category": "n", "subcategory": "n"}
    cfg = cfg_for(*[{"path": str(p), "x": "E", "y": "N", "crs": "EPSG:27700", "columns": cols}
                    for p in (pa, pb)])
    res = run_stage("pois", ws, cfg)
    st = res.stats
    assert [s["dropped"]["duplicate_id"] for s in st["sources"]] == [0, 1]
    # the manifest's inputs: the hand-placed AE store and one entry per source file
    inputs = res.manifest["inputs"]
    assert set(inputs) == {"ae.zarr", "sources.0.path", "sources.1.path"}
    assert inputs["sources.0.path"]["ref"] == str(pa) and inputs["sources.1.path"]["ref"] == str(pb)
    assert inputs["sources.0.path"]["fingerprint"] != inputs["sources.1.path"]["fingerprint"]
    out = read_out(ws).set_index("poi_id")
    assert out.loc[2, "name"] == "b" and out.loc[2, "source"] == 0


# ----------------------------------------------------------------------------- errors
def test_missing_column_error_lists_columns_and_key(ws, tmp_path):
    p = tmp_path / "p.csv"
    pd.DataFrame({"E": [1.0], "N": [2.0], "label": ["x"]}).to_csv(p, index=False)
    cfg = cfg_for({"path": str(p), "x": "E", "y": "N", "crs": "EPSG:27700",
                   "columns": {"name": "title", "description": "label"}})
    with pytest.raises(PoiInputError) as e:
        run_stage("pois", ws, cfg)
    msg = str(e.value)
    assert "'title'" in msg and "pois.sources[0].columns.name" in msg and "E, N, label" in msg
    assert str(p) in msg


def test_template_field_without_column_is_an_error(ws, tmp_path):
    p = tmp_path / "p.gpkg"
    gpd.GeoDataFrame({"nm": ["x"]}, geometry=[Point(520_000, 180_000)], crs=27700).to_file(p)
    cfg = cfg_for({"path": str(p), "columns": {"name": "nm"}})
    with pytest.raises(PoiInputError, match=r"needs \{subcategory\}|needs \{category\}"):
        run_stage("pois", ws, cfg)


def test_csv_without_coordinates_or_crs_is_an_error(ws, tmp_path):
    p = tmp_path / "p.csv"
    pd.DataFrame({"E": [1.0], "N": [2.0], "d": ["x"]}).to_csv(p, index=False)
    with pytest.raises(PoiInputError, match=r"pois.sources\[0\].x"):
        run_stage("pois", ws, cfg_for({"path": str(p), "columns": {"description": "d"}}))
    with pytest.raises(PoiInputError, match=r"set pois.sources\[0\].crs"):
        run_stage("pois", ws, cfg_for({"path": str(p), "x": "E", "y": "N",
                                       "columns": {"description": "d"}}))


def test_missing_ae_store_is_an_error(tmp_path):
    w = Workspace(tmp_path / "empty")
    p = tmp_path / "p.csv"
    pd.DataFrame({"E": [1.0], "N": [2.0], "d": ["x"]}).to_csv(p, index=False)
    cfg = cfg_for({"path": str(p), "x": "E", "y": "N", "crs": "EPSG:27700",
                   "columns": {"description": "d"}})
    with pytest.raises(FileNotFoundError,
                       match=rf"{re.escape(w.path('ae.zarr'))} does not exist .*"
                             rf"aether-scale ingest -w {re.escape(w.root)}"):
        run_stage("pois", w, cfg)
    assert w.manifest("pois") is None and not w.exists("pois.parquet")


# ----------------------------------------------------------------------------- units
def test_template_variants():
    idx = pd.RangeIndex(3)
    s = lambda *v: pd.Series(list(v), index=idx, dtype="string")  # noqa: E731
    cols = {"name": s("Costa", pd.NA, "X"), "category": s("coffee", "coffee", pd.NA),
            "subcategory": s("Cafe", "Cafe", "Pub"), "description": None}
    d = build_descriptions(cols, template="A place of {subcategory}, a type of {category}, "
                           "named {name}.", template_no_name="A place of {subcategory}, a type "
                           "of {category}.", index=idx)
    assert d[0] == "A place of Cafe, a type of coffee, named Costa."
    assert d[1] == "A place of Cafe, a type of coffee."
    assert pd.isna(d[2])  # category missing → no description (dropped as empty_text)
    ready = {"name": s("Boots", pd.NA, "Y"), "category": None, "subcategory": None,
             "description": s("A place of retail, a type of shops.", "A place of parks", pd.NA)}
    d = build_descriptions(ready, template="{name}", template_no_name="", index=idx)
    assert d[0] == "A place of retail, a type of shops, named Boots."  # period replaced
    assert d[1] == "A place of parks"  # no name → unchanged
    assert d[2] == "Y"  # no ready description → template
    d = build_descriptions(ready, template="{name}", template_no_name="", append_name=False,
                           index=idx)
    assert d[0] == "A place of retail, a type of shops."
    # descriptions that already hold the name (the reference's "…, named X." format, any
    # case) are not named twice, and are flagged for the stage's count
    named = {"name": s("Costa", "Boots", "Tesco"), "category": None, "subcategory": None,
             "description": s("A place of cafes, named Costa.", "A place of shops, named BOOTS.",
                              "A place of supermarkets.")}
    flags = np.zeros(3, dtype=bool)
    d = build_descriptions(named, template="{name}", template_no_name="", index=idx,
                           named=flags)
    assert list(d) == ["A place of cafes, named Costa.", "A place of shops, named BOOTS.",
                       "A place of supermarkets, named Tesco."]
    assert flags.tolist() == [True, True, False]


def test_clean_text_rules():
    s, rep = clean_text(pd.Series(["  a\tb\n\nc ", "\u00c5", "A\u030a", "\x00", None, "x\ue000é"]))
    assert s.tolist()[:3] == ["a b c", "Å", "Å"]
    assert pd.isna(s[3]) and pd.isna(s[4])
    assert s[5] == "xé" and rep.tolist() == [False] * 5 + [True]


def test_raster_grid_reads_chunks_and_transform(tmp_path):
    p = str(tmp_path / "ae.zarr")
    write_ae_zarr(p, w=130, h=70, chunk=64)
    g = raster_grid(p)
    assert g.n_chunks == (2, 3) and g.chunk_edges_x == (0, 64, 128, 130)
    _, _, inside, ch = g.locate(np.array([X0, X0 + 129.99 * RES, X0 + 130 * RES]),
                                np.array([Y1, Y1 - 69.99 * RES, Y1 - 1]))
    assert inside.tolist() == [True, True, False]
    assert ch[:, 1].tolist() == [1, 2] and ch[:, 0].tolist() == [0, 0]
    assert shapely.Point(0, 0).is_valid


def test_runs_on_a_local_cluster(ws, tmp_path):
    """Same result under a real distributed LocalCluster (worker processes)."""
    from distributed import Client, LocalCluster

    df = pd.DataFrame({"id": range(200), "n": [f"shop {i % 7}" for i in range(200)],
                       "E": np.linspace(505_000, 555_000, 200), "N": [180_000.0] * 200})
    p = tmp_path / "p.csv"
    df.to_csv(p, index=False)
    cfg = cfg_for({"path": str(p), "x": "E", "y": "N", "crs": "EPSG:27700",
                   "columns": {"id": "id", "name": "n", "category": "n", "subcategory": "n"}})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as lc, Client(lc):
        st = run_stage("pois", ws, cfg).stats
    exp = inside_expected(df.E.to_numpy(), df.N.to_numpy())
    assert st["kept"] == int(exp.sum()) and st["dropped"]["outside_coverage"] == int((~exp).sum())
    assert sorted(read_out(ws).poi_id) == df.id[exp].tolist()


def test_keep_column_missing_in_one_source_becomes_nullable(ws, tmp_path):
    pa = tmp_path / "a.gpkg"
    gpd.GeoDataFrame({"nm": ["a", "b"], "floors": np.array([3, 5], dtype=np.int64)},
                     geometry=[Point(520_000, 180_000), Point(521_000, 181_000)],
                     crs=27700).to_file(pa)
    pb = tmp_path / "b.csv"
    pd.DataFrame({"nm": ["c"], "E": [522_000.0], "N": [182_000.0]}).to_csv(pb, index=False)
    cols = {"name": "nm", "category": "nm", "subcategory": "nm"}
    cfg = cfg_for({"path": str(pa), "columns": cols},
                  {"path": str(pb), "x": "E", "y": "N", "crs": "EPSG:27700", "columns": cols},
                  keep_columns=["floors"])
    assert run_stage("pois", ws, cfg).stats["kept"] == 3
    out = read_out(ws).set_index("name")
    assert str(out.floors.dtype) == "Int64"
    assert out.loc["a", "floors"] == 3 and out.loc["b", "floors"] == 5 and pd.isna(out.loc["c", "floors"])
    with pytest.raises(PoiInputError, match="in none of the sources"):
        run_stage("pois", ws, cfg_for({"path": str(pa), "columns": cols}, keep_columns=["nope"]),
                  force=True)


# ----------------------------------------------------------------------------- CSV quoting
_QUOTED_ROWS = [
    '{i},"Two\nlines",520000,180000,plain',
    '{i},"Comma, inside",520100,180100,"say ""hi"""',
    '{i},"""Quoted"" start",520200,180200,"multi\nline\nnote with ""quotes"", a comma"',
    '{i},5" screen shop,520300,180300,"crlf\r\ninside"',  # unquoted field with a literal quote
    '{i},"",520400,180400,',
    '{i},"ends with a newline\n",520500,180500,"x"',
    '{i},Plain,520600,180600,"\n\n"',
]


def _quoted_csv(tmp_path: Path, repeat: int = 4) -> tuple[Path, bytes]:
    """A CSV with quoted newlines (LF and CRLF), quoted separators, doubled quotes, an
    empty quoted field and a stray literal quote in an unquoted field."""
    rows = [r.format(i=k * len(_QUOTED_ROWS) + j + 1)
            for k in range(repeat) for j, r in enumerate(_QUOTED_ROWS)]
    raw = ("id,name,x,y,note\n" + "\n".join(rows) + "\n").encode()
    p = tmp_path / "quoted.csv"
    p.write_bytes(raw)
    return p, raw


def _csv_source(p: Path):
    return cfg_for({"path": str(p), "x": "x", "y": "y", "crs": "EPSG:27700",
                    "columns": {"id": "id", "name": "name", "category": "note",
                                "subcategory": "note"}}).pois.sources[0]


def test_csv_quoted_newlines_survive_any_block_boundary(tmp_path):
    from aether_scale.pois.readers import read_source

    p, raw = _quoted_csv(tmp_path)
    want = pd.read_csv(p, dtype=str, keep_default_na=True)
    n_records = len(want)
    assert n_records == 4 * len(_QUOTED_ROWS) and raw.count(b"\n") > n_records + 10
    # a nominal block start just before the newline inside "Two\nlines": the block after it
    # then starts inside that quoted field
    inside_field = raw.index(b"Two\nlines") + 3
    for bs in (1, 5, 64, inside_field, 1 << 20):
        parts, dtypes, crs, kind = read_source(_csv_source(p), 0, partition_rows=1000,
                                               keep_columns=("note",), blocksize=bs)
        assert kind == "xy" and crs is None and list(dtypes) == list(want.columns)
        if bs <= 5:
            assert len(parts) > n_records  # boundaries inside records, and blocks within one
        got = pd.concat(dask.compute(*parts), ignore_index=True)
        pd.testing.assert_frame_equal(got, want[list(got.columns)], obj=f"blocksize={bs}")
        assert got.id.is_unique
    assert want.loc[0, "name"] == "Two\nlines" and want.loc[1, "note"] == 'say "hi"'
    assert want.loc[3, "note"] == "crlf\r\ninside" and want.loc[3, "name"] == '5" screen shop'


def test_csv_quoted_newlines_end_to_end_with_tiny_blocks(ws, tmp_path, monkeypatch):
    """The pois stage gives the same table and stats whether the CSV is one block or 30-byte
    blocks cut through its quoted fields."""
    from aether_scale.pois import readers

    p, _ = _quoted_csv(tmp_path)
    cfg = cfg_for({"path": str(p), "x": "x", "y": "y", "crs": "EPSG:27700",
                   "columns": {"id": "id", "name": "name", "category": "note",
                               "subcategory": "note"}}, keep_columns=["note"])
    one = run_stage("pois", ws, cfg).stats
    want = read_out(ws)
    monkeypatch.setattr(readers, "CSV_BLOCKSIZE", 30)
    ws2 = Workspace(tmp_path / "ws2")
    write_ae_zarr(ws2.path("ae.zarr"))
    many = run_stage("pois", ws2, cfg).stats
    got = read_out(ws2)
    assert one["rows_read"] == many["rows_read"] == 4 * len(_QUOTED_ROWS)
    assert one["dropped"] == many["dropped"] and one["kept"] == many["kept"] > 0
    pd.testing.assert_frame_equal(got, want)
    assert (got.note.dropna().str.contains("\n")).any()  # kept columns keep their newlines


def test_csv_unterminated_quote_is_a_clear_error(ws, tmp_path, monkeypatch):
    from aether_scale.pois import readers

    rows = ["id,name,x,y"] + [f"{i},shop {i},520000,180000" for i in range(60)]
    rows[31] = '30,"broken shop,520000,180000'
    raw = ("\n".join(rows) + "\n").encode()
    p = tmp_path / "bad.csv"
    p.write_bytes(raw)
    at = raw.index(b'"broken')
    line = raw[:at].count(b"\n") + 1
    assert line == 32
    for bs in (16, 200, 1 << 20):  # the quote in the first block, a middle one, the last one
        parts, *_ = readers.read_source(_csv_source(p), 0, partition_rows=1000, blocksize=bs)
        with pytest.raises(PoiInputError) as e:
            dask.compute(*parts)
        msg = str(e.value)
        assert str(p) in msg and f"byte {at} " in msg and f"line {line}:" in msg
        assert "never closed" in msg and '"broken shop' in msg and 'doubled ("")' in msg
    with pytest.raises(PoiInputError, match=f"byte {at} .line {line}"):
        run_stage("pois", ws, cfg_for({"path": str(p), "x": "x", "y": "y", "crs": "EPSG:27700",
                                       "columns": {"id": "id", "name": "name",
                                                   "category": "name", "subcategory": "name"}}))
    # a quote that runs on far past its block fails early instead of reading on
    from aether_scale.pois import csv as csv_reader

    monkeypatch.setattr(csv_reader, "MAX_RECORD_BYTES", 100)
    parts, *_ = readers.read_source(_csv_source(p), 0, partition_rows=1000, blocksize=16)
    with pytest.raises(PoiInputError, match=f"byte {at} .*more than 100 B without closing"):
        dask.compute(*parts)
