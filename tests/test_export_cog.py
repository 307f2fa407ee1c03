"""COG export: fields (float16, int8), similarity rasters and PCA RGB as Cloud Optimized GeoTIFFs.

Every store is a real workspace store (template, chunk commits and index through
``RasterBuild``), every COG a real file read back with rasterio and validated by rio-cogeo.
"""

from __future__ import annotations

import json
import os
import re
import tracemalloc

import dask.array as dsa
import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
from fixtures import LEFT, RES, TOP, grid
from pyproj import Transformer
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from aether_scale import aef
from aether_scale.export.cog import PCA_MAX_BLOCKS, export_cog, pca_rgb, validate_cog
from aether_scale.stores import field as field_store
from aether_scale.stores import similarity as sim_store
from aether_scale.stores.ae import template as ae_template
from aether_scale.stores.raster import RasterBuild

H, W, DIM, CHUNK, BLOCK = 600, 700, 6, 128, 256  # 5 × 6 chunks, ragged at the far edges
CODES = np.array([-90, -20, 35, 110], dtype=np.int8)  # few codes: an average is not one of them
PHRASES = ["a place of cafes", "quiet parks"]
CALLS: list[tuple[int, int]] = []  # blocks computed by the counting dask arrays below


def _mask() -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[:CHUNK, :CHUNK] = True  # a whole chunk of nodata (never stored)
    m[300, 400:410] = True  # a few pixels across no chunk edge
    m[255:258, 127:130] = True  # and a few across one
    return m


def _write(path: str, ds: xr.Dataset, values: np.ndarray, variable: str, fill, ledger: str) -> None:
    build = RasterBuild.at(path, ledger, variable=variable).create(ds, fill_value=fill,
                                                                   token="test")
    for i, j in build.grid():
        r0, r1, c0, c1 = build.window(i, j)
        block = values[r0:r1, c0:c1]
        empty = np.isnan(block).all() if block.dtype.kind == "f" else (block == aef.NODATA).all()
        build.commit(i, j, None if empty else block, {})
    build.finish()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    mask = _mask()
    ae = ae_template(grid(H, W), CHUNK)
    v = rng.normal(size=(H, W, DIM))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    v[mask] = np.nan
    q = rng.choice(CODES, size=(H, W, DIM))
    q[mask] = aef.NODATA
    out = {}
    for dtype, vals in (("float16", v.astype(np.float16)), ("int8", q)):
        p = str(root / f"field_{dtype}.zarr")
        ds = field_store.template(ae, DIM, (CHUNK, CHUNK), dtype, {"model": "test"})
        _write(p, ds, vals, "embedding", field_store.fill_value(dtype), str(root / f"l{dtype}"))
        out[dtype] = (p, vals)
    sim = rng.uniform(-1, 1, size=(H, W, len(PHRASES))).astype(np.float32)
    sim[mask] = np.nan
    f = field_store.open_field(out["float16"][0])["embedding"]
    p = str(root / "similarity.zarr")
    _write(p, sim_store.template(f, PHRASES, (CHUNK, CHUNK), {"model": "test"}), sim,
           sim_store.VARIABLE, np.float32(np.nan), str(root / "lsim"))
    out["similarity"] = (p, sim)
    return out


def _field(stores, dtype: str) -> tuple[xr.DataArray, np.ndarray]:
    p, vals = stores[dtype]
    return field_store.open_field(p)["embedding"], vals


def _band_last(path) -> np.ndarray:
    with rasterio.open(path) as src:
        return np.moveaxis(src.read(), 0, -1)


def test_float16_field_is_a_band_first_cog_on_the_source_grid(stores, tmp_path):
    da, vals = _field(stores, "float16")
    out = tmp_path / "field.tif"
    st = export_cog(da, out, blocksize=BLOCK)
    assert st["cog_valid"] and validate_cog(out)[0] and st["overviews"] == [2, 4]
    assert (st["width"], st["height"], st["bands"], st["dtype"]) == (W, H, DIM, "float32")
    assert sorted(os.listdir(tmp_path)) == ["field.tif"]  # no temporary left
    with rasterio.open(out) as src:
        assert src.dtypes == ("float32",) * DIM and np.isnan(src.nodata)
        assert src.block_shapes[0] == (BLOCK, BLOCK) and src.overviews(1) == [2, 4]
        assert src.crs == da.rio.crs and src.crs.to_epsg() == 32630
        assert src.transform == da.rio.transform()
        assert (src.transform.c, src.transform.f, src.transform.a) == (LEFT, TOP, RES)
        assert src.descriptions == tuple(f"dim_{i:03d}" for i in range(DIM))
        assert src.tags()["model"] == "test" and src.tags()["source_dtype"] == "float16"
        # a known point: the map coordinate of pixel (345, 567) is that pixel, same values
        r, c = 345, 567
        x, y = float(da["x"][c]), float(da["y"][r])
        assert src.index(x, y) == (r, c) and src.xy(r, c) == (x, y)
        px = src.read(window=Window(c, r, 1, 1))[:, 0, 0]
        np.testing.assert_array_equal(px, vals[r, c].astype(np.float32))
        # overviews average: overview pixel = mean of its 2 × 2 source pixels
        with rasterio.open(out, overview_level=0) as ov:
            o = ov.read(1, window=Window(250, 200, 1, 1))[0, 0]
        want = vals[400:402, 500:502, 0].astype(np.float64).mean()
        assert abs(o - want) < 1e-6
    got = _band_last(out)
    # float16 → float32 exactly, NaN where the field is nodata
    np.testing.assert_array_equal(got, vals.astype(np.float32))
    assert np.array_equal(np.isnan(got).all(-1), _mask())


def test_int8_field_keeps_codes_or_decodes(stores, tmp_path):
    da, q = _field(stores, "int8")
    st = export_cog(da, tmp_path / "codes.tif", dtype="int8", blocksize=BLOCK)
    assert st["cog_valid"] and st["overview_resampling"] == "nearest"
    with rasterio.open(tmp_path / "codes.tif") as src:
        assert src.dtypes[0] == "int8" and src.nodata == aef.NODATA
        tags = src.tags()
        assert tags["codec"] == "aef-sqrt" and tags["scale"] == "127.5"
        assert "sign(q) * (q / scale) ** 2" in tags["decode"]
        assert src.transform == da.rio.transform() and src.crs == da.rio.crs
    np.testing.assert_array_equal(_band_last(tmp_path / "codes.tif"), q)
    # nearest overviews: only codes of the source (an average of sqrt codes would be wrong)
    with rasterio.open(tmp_path / "codes.tif", overview_level=0) as ov:
        assert set(np.unique(ov.read())) <= {*CODES.tolist(), aef.NODATA}
    st = export_cog(da, tmp_path / "decoded.tif", blocksize=BLOCK)
    assert st["dtype"] == "float32" and st["overview_resampling"] == "average"
    got = _band_last(tmp_path / "decoded.tif")
    np.testing.assert_array_equal(got, aef.decode(q))
    assert np.array_equal(np.isnan(got).all(-1), _mask())
    with rasterio.open(tmp_path / "decoded.tif") as src:
        assert "codec" not in src.tags() and "aef-sqrt" in src.tags()["decoded_from"]


def test_similarity_bands_are_the_phrases(stores, tmp_path):
    p, sim = stores["similarity"]
    da = sim_store.open_similarity(p)
    st = export_cog(da, tmp_path / "sim.tif", blocksize=BLOCK)
    assert st["cog_valid"] and st["bands"] == len(PHRASES)
    with rasterio.open(tmp_path / "sim.tif") as src:
        assert src.descriptions == tuple(PHRASES)
        assert json.loads(src.tags()["phrases"]) == PHRASES
        assert src.transform == da.rio.transform()
    np.testing.assert_array_equal(_band_last(tmp_path / "sim.tif"), sim)
    # a numeric nodata replaces NaN; tags add GDAL metadata
    st = export_cog(da, tmp_path / "sim9.tif", nodata=-9999, tags={"query": "demo"}, blocksize=BLOCK)
    assert st["nodata"] == -9999
    with rasterio.open(tmp_path / "sim9.tif") as src:
        assert src.nodata == -9999 and src.tags()["query"] == "demo"
    np.testing.assert_array_equal(_band_last(tmp_path / "sim9.tif"),
                                  np.where(np.isnan(sim), np.float32(-9999), sim))


def test_bbox_in_raster_crs_and_lonlat(stores, tmp_path):
    da, vals = _field(stores, "float16")
    want = vals.astype(np.float32)
    # outward to whole pixels: cols 10.3 … 50.2 → 10 … 50, rows 20.5 … 80.7 → 20 … 80
    bbox = (LEFT + 10.3 * RES, TOP - 80.7 * RES, LEFT + 50.2 * RES, TOP - 20.5 * RES)
    st = export_cog(da, tmp_path / "win.tif", bbox=bbox, blocksize=BLOCK)
    assert st["window"] == {"row_off": 20, "col_off": 10, "height": 61, "width": 41}
    assert st["bbox"] == (LEFT + 10 * RES, TOP - 81 * RES, LEFT + 51 * RES, TOP - 20 * RES)
    with rasterio.open(tmp_path / "win.tif") as src:
        assert (src.transform.c, src.transform.f) == (LEFT + 10 * RES, TOP - 20 * RES)
        assert src.index(float(da["x"][30]), float(da["y"][40])) == (20, 20)
    np.testing.assert_array_equal(_band_last(tmp_path / "win.tif"), want[20:81, 10:51])
    # a bbox on pixel edges takes exactly those pixels
    edges = (LEFT + 10 * RES, TOP - 80 * RES, LEFT + 50 * RES, TOP - 20 * RES)
    st = export_cog(da, tmp_path / "edges.tif", bbox=edges, blocksize=BLOCK)
    assert st["window"] == {"row_off": 20, "col_off": 10, "height": 60, "width": 40}
    # lon/lat: the window covers the box's densely sampled outline in UTM
    to_ll = Transformer.from_crs("EPSG:32630", "EPSG:4326", always_xy=True)
    lon, lat = to_ll.transform(LEFT + 300 * RES, TOP - 250 * RES)
    ll = (lon - 0.01, lat - 0.005, lon + 0.01, lat + 0.005)
    t = np.linspace(0, 1, 2001)
    olon = np.concatenate([ll[0] + t * (ll[2] - ll[0]), np.full_like(t, ll[2]),
                           ll[2] - t * (ll[2] - ll[0]), np.full_like(t, ll[0])])
    olat = np.concatenate([np.full_like(t, ll[1]), ll[1] + t * (ll[3] - ll[1]),
                           np.full_like(t, ll[3]), ll[3] - t * (ll[3] - ll[1])])
    ox, oy = Transformer.from_crs("EPSG:4326", "EPSG:32630", always_xy=True).transform(olon, olat)
    c0, c1 = int(np.floor((ox.min() - LEFT) / RES)), int(np.ceil((ox.max() - LEFT) / RES))
    r0, r1 = int(np.floor((TOP - oy.max()) / RES)), int(np.ceil((TOP - oy.min()) / RES))
    st = export_cog(da, tmp_path / "ll.tif", bbox=ll, bbox_crs="EPSG:4326", blocksize=BLOCK)
    assert st["window"] == {"row_off": r0, "col_off": c0, "height": r1 - r0, "width": c1 - c0}
    assert 100 < c1 - c0 < 200 and 80 < r1 - r0 < 140
    np.testing.assert_array_equal(_band_last(tmp_path / "ll.tif"), want[r0:r1, c0:c1])
    assert validate_cog(tmp_path / "ll.tif")[0]


def test_bad_bbox_names_the_bounds(stores, tmp_path):
    da, _ = _field(stores, "float16")
    bounds = "(500000, 5694000, 507000, 5700000) in EPSG:32630"
    with pytest.raises(ValueError, match=r"does not intersect.*" + re.escape(bounds)):
        export_cog(da, tmp_path / "x.tif", bbox=(LEFT - 1000, TOP - 500, LEFT - 10, TOP - 100))
    with pytest.raises(ValueError, match="does not intersect"):  # touching the left edge only
        export_cog(da, tmp_path / "x.tif", bbox=(LEFT - 100, TOP - 500, LEFT, TOP - 100))
    with pytest.raises(ValueError, match=r"EPSG:4326.*EPSG:32630 = \(-3.*in EPSG:4326"):
        export_cog(da, tmp_path / "x.tif", bbox=(10, 10, 11, 11), bbox_crs="EPSG:4326")
    for bad in ((1, 0, 0, 1), (0, 1, 1, 0), (0, 0, float("nan"), 1), (0, 0, 1)):
        with pytest.raises(ValueError, match="minx < maxx"):
            export_cog(da, tmp_path / "x.tif", bbox=bad)
    assert os.listdir(tmp_path) == []


def test_bad_input_is_refused(stores, tmp_path):
    da, _ = _field(stores, "float16")
    with pytest.raises(ValueError, match=r"band-last \(y, x, C\).*transpose"):
        export_cog(da.transpose("dim", "y", "x"), tmp_path / "x.tif")
    with pytest.raises(ValueError, match="has no CRS"):
        export_cog(da.drop_vars("spatial_ref"), tmp_path / "x.tif")
    with pytest.raises(ValueError, match=r"float16.*dtype='int8'.*use dtype='float32'"):
        export_cog(da, tmp_path / "x.tif", dtype="int8")
    with pytest.raises(ValueError, match="use dtype='uint8'"):
        export_cog(pca_rgb(da, sample=1000), tmp_path / "x.tif")
    with pytest.raises(ValueError, match="does not exist; create it first"):
        export_cog(da, tmp_path / "missing" / "x.tif")
    with pytest.raises(ValueError, match="multiple of 16"):
        export_cog(da, tmp_path / "x.tif", blocksize=100)
    with pytest.raises(ValueError, match="2 descriptions for 6 bands"):
        export_cog(da, tmp_path / "x.tif", descriptions=["a", "b"])
    assert os.listdir(tmp_path) == []


def test_pca_rgb(stores, tmp_path):
    da, vals = _field(stores, "float16")
    rgb = pca_rgb(da, sample=20_000, seed=3)
    assert isinstance(rgb.data, dsa.Array) and rgb.dims == ("y", "x", "band")
    got = rgb.values
    mask = _mask()
    assert got.dtype == np.uint8 and got.shape == (H, W, 3)
    assert (got[mask] == 0).all() and (got[~mask] >= 1).all()
    assert got[~mask].min() == 1 and got[~mask].max() == 255  # 2–98 % stretch saturates
    np.testing.assert_array_equal(pca_rgb(da, sample=20_000, seed=3).values, got)  # deterministic
    assert rgb.attrs["pca_sample_pixels"] == 20_000
    # reproducible from the attrs alone
    a = rgb.attrs
    v = vals[~mask].astype(np.float64)
    s = (v - np.array(a["pca_mean"])) @ np.array(a["pca_components"]).T
    lo, hi = np.array(a["pca_p2"]), np.array(a["pca_p98"])
    ref = np.clip(np.rint(1 + 254 * (s - lo) / (hi - lo)), 1, 255)
    assert np.abs(ref - got[~mask]).max() <= 1
    st = export_cog(rgb, tmp_path / "rgb.tif", dtype="uint8", blocksize=BLOCK)
    assert st["cog_valid"] and st["nodata"] == 0
    with rasterio.open(tmp_path / "rgb.tif") as src:
        assert src.colorinterp == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        assert src.descriptions == ("PC1", "PC2", "PC3") and src.nodata == 0
        assert src.transform == da.rio.transform() and src.crs == da.rio.crs
        assert len(json.loads(src.tags()["pca_components"])) == 3
    np.testing.assert_array_equal(_band_last(tmp_path / "rgb.tif"), got)
    # an int8 field is decoded first; nodata stays exactly 0
    g8 = pca_rgb(_field(stores, "int8")[0], sample=5_000).values
    assert (g8[mask] == 0).all() and (g8[~mask] >= 1).all()


def _counted(x: np.ndarray, block_info=None) -> np.ndarray:
    (r0, r1), (c0, c1), (b0, b1) = block_info[None]["array-location"]
    CALLS.append((r0, c0))
    r, c, b = np.ogrid[r0:r1, c0:c1, b0:b1]
    return (r * 1000.0 + c + b / 100.0).astype(np.float32)


def _lazy(ny: int, nx: int, bands: int, chunk: int) -> xr.DataArray:
    """A (y, x, band) raster whose every block is computed by :func:`_counted`."""
    data = dsa.zeros((ny, nx, bands), dtype=np.float32, chunks=(chunk, chunk, bands))
    data = data.map_blocks(_counted, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    g = grid(ny, nx)
    da = xr.DataArray(data, dims=("y", "x", "band"),
                      coords={"y": g.y_centres(), "x": g.x_centres()}, name="lazy")
    return da.rio.write_crs(g.crs_wkt).rio.write_transform(g.transform())


def test_pca_rgb_reads_only_its_sample():
    CALLS.clear()
    da = _lazy(640, 640, 4, 32)  # 400 chunks
    rgb = pca_rgb(da, sample=2_000)
    assert 0 < len(CALLS) <= PCA_MAX_BLOCKS
    assert len(set(CALLS)) == len(CALLS)  # each sampled chunk read once
    CALLS.clear()
    part = rgb.isel(y=slice(0, 32), x=slice(0, 32)).values  # lazy: one block on demand
    assert part.shape == (32, 32, 3) and (part >= 1).all()
    assert CALLS == [(0, 0)]


def test_export_is_out_of_core(tmp_path):
    """A 64 MiB lazy raster is written window by window: each chunk computed once, and
    Python/numpy memory peaks far below the raster's size."""
    CALLS.clear()
    ny = nx = 1024
    da = _lazy(ny, nx, 16, 128)
    size = ny * nx * 16 * 4
    tracemalloc.start()
    try:
        st = export_cog(da, tmp_path / "big.tif", blocksize=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert st["cog_valid"] and st["overviews"]
    assert peak < size / 8, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB raster"
    assert sorted(CALLS) == sorted({(r, c) for r in range(0, ny, 128) for c in range(0, nx, 128)})
    with rasterio.open(tmp_path / "big.tif") as src:
        px = src.read(window=Window(700, 900, 1, 1))[:, 0, 0]
    np.testing.assert_array_equal(px, (900 * 1000.0 + 700 + np.arange(16) / 100).astype(np.float32))


def _failing(x: np.ndarray, block_info=None) -> np.ndarray:
    if block_info[None]["chunk-location"][:2] == (1, 1):
        raise OSError("chunk (1, 1) is unreadable")
    return np.ones(x.shape, np.float32)


def test_failure_leaves_nothing_behind(tmp_path):
    da = _lazy(256, 256, 2, 64)
    da = da.copy(data=da.data.map_blocks(_failing, dtype=np.float32))
    out = tmp_path / "fail.tif"
    with pytest.raises(OSError, match="unreadable"):
        export_cog(da, out, blocksize=64)
    assert os.listdir(tmp_path) == []
