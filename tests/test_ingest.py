"""AlphaEarth tiles → ae.zarr: every tile case, read back exactly against the sources.

Tiles are tiny GeoTIFFs generated here (200 × 150 px, 64 bands). Expected codes
are computed independently of the ingest code: for aligned cases straight from
the arrays written; for reprojection cases by asking rasterio which source pixel
contains each target pixel centre (``DatasetReader.index``) and reading that
pixel with a 1 × 1 window, and cross-checked against GDAL's own nearest warp.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from pyproj import Transformer
from rasterio.transform import Affine, from_origin
from rasterio.windows import Window

from aether_scale import aef
from aether_scale.config import load_config
from aether_scale.ingest import IngestError, ingest_tiles, resolve_tiles
from aether_scale.pipeline import run_stage
from aether_scale.stores.ae import open_ae
from aether_scale.workspace import Workspace

H, W = 150, 200  # rows, cols of a test tile
RES = 10.0


# --------------------------------------------------------------------------- helpers
def codes(seed: int, h: int = H, w: int = W, *, nodata_frac: float = 0.0) -> np.ndarray:
    """AEF codes of random unit vectors (h, w, 64), optionally with whole pixels masked."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((h, w, aef.N_BANDS))
    q = aef.encode(v / np.linalg.norm(v, axis=-1, keepdims=True))
    if nodata_frac:
        q[rng.random((h, w)) < nodata_frac] = aef.NODATA
    return q


def write_tile(path: Path, q: np.ndarray, transform: Affine, *, crs: str | None = "EPSG:32630",
               dtype: str = "int8", nodata: float | None = aef.NODATA, count: int | None = None,
               descriptions: tuple[str, ...] | None = None) -> Path:
    """Write (h, w, bands) ``q`` as a GeoTIFF, rows in storage order as given."""
    h, w, b = q.shape
    profile = dict(driver="GTiff", height=h, width=w, count=count or b, dtype=dtype,
                   transform=transform, nodata=nodata, tiled=True, blockxsize=64, blockysize=64)
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(q.transpose(2, 0, 1)[: profile["count"]].astype(dtype))
        if descriptions:
            for i, d in enumerate(descriptions, 1):
                dst.set_band_description(i, d)
    return path


def read_zarr(path: str) -> xr.Dataset:
    return xr.open_zarr(path, mask_and_scale=False)


def expected_by_footprint(src_path: str, xs: np.ndarray, ys: np.ndarray, target_crs: str,
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes of the source pixel whose footprint contains each (x, y) target centre.

    Returns (codes (n, 64) with −128 outside the tile, inside mask, near_edge mask):
    ``near_edge`` marks centres within 1e-3 px of a source pixel edge, where
    floating-point rounding may legitimately pick either neighbour.
    """
    with rasterio.open(src_path) as src:
        tf = Transformer.from_crs(target_crs, src.crs, always_xy=True)
        sx, sy = tf.transform(xs, ys)
        colf, rowf = ~src.transform @ (np.asarray(sx), np.asarray(sy))
        near = (np.abs(colf - np.round(colf)) < 1e-3) | (np.abs(rowf - np.round(rowf)) < 1e-3)
        out = np.full((len(xs), aef.N_BANDS), aef.NODATA, np.int8)
        inside = np.zeros(len(xs), bool)
        for i, (x, y) in enumerate(zip(sx, sy, strict=True)):
            r, c = src.index(x, y)
            if 0 <= r < src.height and 0 <= c < src.width:
                v = src.read(window=Window(c, r, 1, 1))[:, 0, 0]
                out[i] = v if src.dtypes[0] == "int8" else aef.encode(v)
                inside[i] = True
        if src.nodata is not None and src.dtypes[0] == "int8":
            out[(out == np.int8(src.nodata)).any(axis=1)] = aef.NODATA
        out[(out == aef.NODATA).any(axis=1)] = aef.NODATA
    return out, inside, near


@pytest.fixture
def mosaic(tmp_path: Path) -> tuple[list[str], np.ndarray]:
    """Two adjacent int8 tiles (west, east) and the expected (150, 400, 64) mosaic."""
    a, b = codes(1, nodata_frac=0.05), codes(2)
    p1 = write_tile(tmp_path / "west.tif", a, from_origin(500000, 5700000, RES, RES))
    p2 = write_tile(tmp_path / "east.tif", b, from_origin(500000 + W * RES, 5700000, RES, RES))
    return [str(p1), str(p2)], np.concatenate([a, b], axis=1)


# ------------------------------------------------------------------------- int8 mosaic
def test_int8_mosaic_exact_codes_and_contract(tmp_path: Path, mosaic) -> None:
    paths, expected = mosaic
    out = str(tmp_path / "ae.zarr")
    stats = ingest_tiles(paths, out, chunk_px=64)
    ds = read_zarr(out)
    emb = ds["embedding"]
    assert emb.dims == ("y", "x", "band")
    assert emb.dtype == np.int8
    assert emb.shape == (H, 2 * W, 64)
    assert emb.data.chunksize == (64, 64, 64)
    assert list(ds["band"].values) == list(aef.BAND_NAMES)
    np.testing.assert_array_equal(emb.values, expected)
    # random pixels, addressed by coordinates (the way downstream stages read)
    rng = np.random.default_rng(0)
    rr, cc = rng.integers(0, H, 200), rng.integers(0, 2 * W, 200)
    xs, ys = 500000 + (cc + 0.5) * RES, 5700000 - (rr + 0.5) * RES
    got = emb.sel(x=xr.DataArray(xs), y=xr.DataArray(ys)).values
    np.testing.assert_array_equal(got, expected[rr, cc])
    # pixel-centre coords, north-up, CRS + transform on spatial_ref as rioxarray writes them
    assert ds["x"].values[0] == 500005.0 and ds["y"].values[0] == 5699995.0
    assert np.all(np.diff(ds["y"].values) < 0)
    assert "spatial_ref" in ds.coords
    assert ds.rio.crs.to_epsg() == 32630
    assert tuple(ds.rio.transform())[:6] == (10.0, 0.0, 500000.0, 0.0, -10.0, 5700000.0)
    assert ds["spatial_ref"].attrs["GeoTransform"].split()[0] == "500000.0"
    assert emb.rio.nodata == aef.NODATA
    # stats: every pixel counted, the masked ones as nodata
    n_nodata = int((expected == aef.NODATA).all(axis=-1).sum())
    assert stats["valid_pixels"] + stats["nodata_pixels"] == H * 2 * W
    assert stats["nodata_pixels"] == n_nodata > 0
    assert stats["tiles_aligned"] == 2 and stats["tiles_reprojected"] == 0


# ------------------------------------------------------------------- read paths
def _chunk_files(store: str) -> dict[str, bytes]:
    root = Path(store) / "embedding" / "c"
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file()}


def test_every_tile_layout_gives_the_same_chunk_bytes(tmp_path: Path) -> None:
    """Uncompressed pixel-interleaved tiles (read by GDAL straight into pixel order),
    compressed and band-interleaved ones (band-first reads re-interleaved here) and
    windows that cut the files' blocks: the same codes, the same chunk files."""
    from aether_scale.ingest import inspect_tile

    a, b = codes(11, nodata_frac=0.05), codes(12)
    layouts = {"plain": {}, "deflate": {"compress": "deflate"},
               "band": {"interleave": "band"}, "zstd-band": {"compress": "zstd",
                                                              "interleave": "band"}}
    stores = {}
    for name, extra in layouts.items():
        d = tmp_path / name
        d.mkdir()
        paths = []
        for q, x0, tag in ((a, 500000, "w"), (b, 500000 + W * RES, "e")):
            profile = dict(driver="GTiff", height=H, width=W, count=64, dtype="int8",
                           nodata=aef.NODATA, crs="EPSG:32630",
                           transform=from_origin(x0, 5700000, RES, RES), tiled=True,
                           blockxsize=32, blockysize=32, **extra)
            with rasterio.open(d / f"{tag}.tif", "w", **profile) as dst:
                dst.write(q.transpose(2, 0, 1))
            paths.append(str(d / f"{tag}.tif"))
        assert inspect_tile(paths[0]).direct_io is (name == "plain")
        out = str(tmp_path / f"{name}.zarr")
        ingest_tiles(paths, out, chunk_px=48)  # chunks cut the tiles' 32 px blocks
        np.testing.assert_array_equal(read_zarr(out)["embedding"].values,
                                      np.concatenate([a, b], axis=1))
        stores[name] = _chunk_files(out)
    assert len(stores["plain"]) == -(-H // 48) * -(-2 * W // 48)
    for name in layouts:
        assert stores[name] == stores["plain"], name


def test_interleave_equals_numpy_transpose() -> None:
    from aether_scale.ingest.reads import _interleave

    rng = np.random.default_rng(5)
    planes = rng.integers(-128, 128, (64, 7, 37), dtype=np.int8)
    want = planes.transpose(1, 2, 0)
    out = np.zeros((7, 37, 64), np.int8)
    _interleave(planes, out)
    np.testing.assert_array_equal(out, want)
    big = np.zeros((12, 50, 64), np.int8)  # a window of a larger block, and row-reversed
    _interleave(planes, big[3:10, 5:42])
    np.testing.assert_array_equal(big[3:10, 5:42], want)
    assert not big[:3].any() and not big[10:].any() and not big[:, :5].any()
    _interleave(planes, big[9:2:-1, 5:42])
    np.testing.assert_array_equal(big[9:2:-1, 5:42], want)
    f = rng.standard_normal((64, 3, 4)).astype(np.float32)  # other dtypes: numpy's copy
    fo = np.empty((3, 4, 64), np.float32)
    _interleave(f, fo)
    np.testing.assert_array_equal(fo, f.transpose(1, 2, 0))


def test_default_open_also_returns_raw_codes(tmp_path: Path, mosaic) -> None:
    paths, expected = mosaic
    out = str(tmp_path / "ae.zarr")
    ingest_tiles(paths, out)
    ds = xr.open_zarr(out)  # no mask_and_scale=False: still int8, nodata not turned into NaN
    assert ds["embedding"].dtype == np.int8
    np.testing.assert_array_equal(ds["embedding"].values, expected)
    assert open_ae(out)["embedding"].data.chunksize == (H, 2 * W, 64)  # one 1024-px chunk


# ------------------------------------------------------------------------------- float
def test_float32_earth_engine_tiles_are_requantised(tmp_path: Path) -> None:
    q = codes(3, nodata_frac=0.1)
    v = aef.decode(q)  # float32, NaN where masked: what an Earth Engine export holds
    v[5, 7, 10] = np.nan  # one band missing → whole pixel masked
    q_exp = q.copy()
    q_exp[5, 7] = aef.NODATA
    p = write_tile(tmp_path / "ee.tif", v, from_origin(400000, 5600000, RES, RES),
                   dtype="float32", nodata=None)
    out = str(tmp_path / "ae.zarr")
    stats = ingest_tiles([str(p)], out, chunk_px=100)
    np.testing.assert_array_equal(read_zarr(out)["embedding"].values, q_exp)
    assert stats["tiles_float"] == 1
    assert stats["nodata_pixels"] == int((q_exp == aef.NODATA).all(axis=-1).sum())


def test_float_tile_with_declared_nodata_value(tmp_path: Path) -> None:
    q = codes(4, nodata_frac=0.1)
    v = aef.decode(q, nodata_value=-9999.0)
    p = write_tile(tmp_path / "ee.tif", v, from_origin(0, 1500, RES, RES), dtype="float32",
                   nodata=-9999.0)
    out = str(tmp_path / "ae.zarr")
    ingest_tiles([str(p)], out)
    np.testing.assert_array_equal(read_zarr(out)["embedding"].values, q)


# ---------------------------------------------------------------------------- bottom-up
def test_bottom_up_tile_is_flipped_to_north_up(tmp_path: Path) -> None:
    q = codes(5)  # north-up truth
    west = write_tile(tmp_path / "west.tif", codes(6), from_origin(500000, 5700000, RES, RES))
    # east tile stored bottom-up: row 0 is the southern edge, positive y pixel size
    x0, top = 500000 + W * RES, 5700000
    up = write_tile(tmp_path / "east_up.tif", q[::-1], Affine(RES, 0, x0, 0, RES, top - H * RES))
    with rasterio.open(up) as src:
        assert src.transform.e > 0
    out = str(tmp_path / "ae.zarr")
    stats = ingest_tiles([str(west), str(up)], out, chunk_px=64)
    ds = read_zarr(out)
    np.testing.assert_array_equal(ds["embedding"].values[:, W:], q)
    np.testing.assert_array_equal(ds["embedding"].values[:, :W], codes(6))
    assert ds.rio.transform().e < 0 and np.all(np.diff(ds["y"].values) < 0)
    assert stats["tiles_bottom_up"] == 1


# ---------------------------------------------------------------------------- gaps
@pytest.mark.parametrize("chunk", [64, 32])
def test_gaps_between_tiles_are_nodata(tmp_path: Path, chunk: int) -> None:
    a, b = codes(7), codes(8)
    p1 = write_tile(tmp_path / "a.tif", a, from_origin(500000, 5700000, RES, RES))
    # 30 px east of a and 40 px further south: gap column band + empty corners
    p2 = write_tile(tmp_path / "b.tif", b, from_origin(500000 + (W + 30) * RES,
                                                       5700000 - 40 * RES, RES, RES))
    out = str(tmp_path / "ae.zarr")
    stats = ingest_tiles([str(p1), str(p2)], out, chunk_px=chunk)
    e = read_zarr(out)["embedding"].values
    assert e.shape == (H + 40, 2 * W + 30, 64)
    np.testing.assert_array_equal(e[:H, :W], a)
    np.testing.assert_array_equal(e[40:, W + 30:], b)
    assert (e[:, W:W + 30] == aef.NODATA).all()
    assert (e[H:, :W] == aef.NODATA).all() and (e[:40, W + 30:] == aef.NODATA).all()
    assert stats["valid_pixels"] == 2 * H * W
    # chunks entirely inside the gap hold nothing on disk (fill value −128): the chunk
    # files are exactly the chunks holding a valid pixel, the others are counted as empty
    ny, nx = -(-e.shape[0] // chunk), -(-e.shape[1] // chunk)
    valid = (e != aef.NODATA).all(-1)
    want = {(i, j) for i in range(ny) for j in range(nx)
            if valid[i * chunk:(i + 1) * chunk, j * chunk:(j + 1) * chunk].any()}
    stored = {tuple(int(v) for v in m.groups()) for p in Path(out, "embedding").rglob("*")
              if p.is_file() and (m := re.search(r"/c/(\d+)/(\d+)/0$", p.as_posix()))}
    assert stored == want
    assert stats["chunks"] == ny * nx and stats["chunks_computed"] == ny * nx
    assert stats["chunks_empty"] == ny * nx - len(want) and stats["chunks_resumed"] == 0
    if chunk == 32:  # the south-west corner holds whole empty chunks at this size
        assert stats["chunks_empty"] > 0


# ----------------------------------------------------------------------- reprojection
def _utm_pair(tmp_path: Path) -> tuple[list[str], list[np.ndarray]]:
    """Two tiles either side of the UTM 30N / 31N boundary near London."""
    a, b = codes(9, nodata_frac=0.02), codes(10)
    p1 = write_tile(tmp_path / "z30.tif", a, from_origin(699000, 5711000, RES, RES),
                    crs="EPSG:32630")
    p2 = write_tile(tmp_path / "z31.tif", b, from_origin(290000, 5711000, RES, RES),
                    crs="EPSG:32631")
    return [str(p1), str(p2)], [a, b]


def test_utm_zones_onto_bng_nearest_neighbour_exact(tmp_path: Path) -> None:
    paths, _ = _utm_pair(tmp_path)
    out = str(tmp_path / "ae.zarr")
    stats = ingest_tiles(paths, out, crs="EPSG:27700", chunk_px=64)
    ds = read_zarr(out)
    assert ds.rio.crs.to_epsg() == 27700
    assert stats["tiles_reprojected"] == 2
    e = ds["embedding"].values
    xs, ys = ds["x"].values, ds["y"].values
    assert xs[0] % RES == 5.0 and ys[0] % RES == 5.0  # grid snapped to whole 10 m
    rng = np.random.default_rng(1)
    rr, cc = rng.integers(0, e.shape[0], 400), rng.integers(0, e.shape[1], 400)
    tx, ty = xs[cc], ys[rr]
    exp = np.full((400, 64), aef.NODATA, np.int8)
    near = np.zeros(400, bool)
    hits = 0
    for p in paths:  # tiles do not overlap: each target pixel comes from at most one
        codes_p, inside, near_p = expected_by_footprint(p, tx, ty, "EPSG:27700")
        exp[inside] = codes_p[inside]
        near |= near_p & inside
        hits += int(inside.sum())
    assert hits > 150  # the sample really hits both tiles, not only gaps
    keep = ~near
    np.testing.assert_array_equal(e[rr[keep], cc[keep]], exp[keep])
    # GDAL's own nearest warp agrees except at centres within a hair of a pixel edge
    from rasterio.warp import Resampling, reproject

    with rasterio.open(paths[0]) as src:
        dst = np.full((64, *e.shape[:2]), aef.NODATA, np.int8)
        reproject(rasterio.band(src, list(range(1, 65))), dst, dst_transform=ds.rio.transform(),
                  dst_crs="EPSG:27700", resampling=Resampling.nearest, dst_nodata=aef.NODATA)
    g = dst.transpose(1, 2, 0)
    both = (g != aef.NODATA).all(-1) & (e != aef.NODATA).all(-1)
    agree = (g[both] == e[both]).all(-1)
    assert both.sum() > 20000 and agree.mean() > 0.999


def test_reprojection_does_not_depend_on_chunking(tmp_path: Path) -> None:
    paths, _ = _utm_pair(tmp_path)
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    ingest_tiles(paths, a, crs="EPSG:27700", chunk_px=48)
    ingest_tiles(paths, b, crs="EPSG:27700", chunk_px=1024)
    np.testing.assert_array_equal(read_zarr(a)["embedding"].values,
                                  read_zarr(b)["embedding"].values)


def test_unaligned_grid_same_crs_uses_nearest(tmp_path: Path) -> None:
    # tile origin 5 m off the target's 10 m grid: every target centre lies on a source
    # pixel edge in x, so shift by 3 m instead (unambiguous nearest) and check exactly
    q = codes(11)
    p = write_tile(tmp_path / "off.tif", q, from_origin(500003, 5700000, RES, RES))
    out = str(tmp_path / "ae.zarr")
    anchor = write_tile(tmp_path / "anchor.tif", codes(12, 10, 10),
                        from_origin(499000, 5700000, RES, RES))
    stats = ingest_tiles([str(anchor), str(p)], out)  # grid phase follows the first tile
    assert stats["tiles_aligned"] == 1 and stats["tiles_reprojected"] == 1
    ds = read_zarr(out)
    col0 = int(round((500010 - ds.rio.transform().c) / RES))  # first target col inside tile
    # target centre x = 500015 lies in source col 1 (500013–500023); col 0 of the target
    # window (centre 500005) is in source col 0 (500003–500013)
    np.testing.assert_array_equal(ds["embedding"].values[:H, col0 - 1], q[:, 0])
    np.testing.assert_array_equal(ds["embedding"].values[:H, col0:col0 + W - 1], q[:, 1:])


def test_float_bottom_up_other_zone_matches_int8_north_up(tmp_path: Path) -> None:
    # the same codes stored three ways must land identically on the target grid
    q = codes(21, nodata_frac=0.05)
    T = from_origin(290000, 5711000, RES, RES)
    plain = write_tile(tmp_path / "plain.tif", q, T, crs="EPSG:32631")
    v = aef.decode(q)
    flipped = write_tile(tmp_path / "float_up.tif", v[::-1],
                         Affine(RES, 0, T.c, 0, RES, T.f - H * RES), crs="EPSG:32631",
                         dtype="float32", nodata=None)
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    ingest_tiles([str(plain)], a, crs="EPSG:27700", chunk_px=80)
    sb = ingest_tiles([str(flipped)], b, crs="EPSG:27700", chunk_px=80)
    assert sb["tiles_float"] == 1 and sb["tiles_bottom_up"] == 1 and sb["tiles_reprojected"] == 1
    np.testing.assert_array_equal(read_zarr(a)["embedding"].values,
                                  read_zarr(b)["embedding"].values)


def test_read_strip_size_does_not_change_output(tmp_path: Path, mosaic, monkeypatch) -> None:
    # tiny strips force many partial reads per block (block rows, float sub-strips)
    from aether_scale.ingest import reads as ingest_mod

    paths, expected = mosaic
    v = aef.decode(codes(22))
    fl = write_tile(tmp_path / "f.tif", v, from_origin(500000, 5700000 - H * RES, RES, RES),
                    dtype="float32", nodata=None)
    big = str(tmp_path / "big.zarr")
    ingest_tiles([*paths, str(fl)], big, crs="EPSG:32631", chunk_px=128)
    monkeypatch.setattr(ingest_mod, "_STRIP_VALUES", 8 * 128 * 64)  # 8-row strips
    small = str(tmp_path / "small.zarr")
    ingest_tiles([*paths, str(fl)], small, crs="EPSG:32631", chunk_px=128)
    e = read_zarr(small)["embedding"].values
    np.testing.assert_array_equal(e, read_zarr(big)["embedding"].values)
    assert (e != aef.NODATA).all(-1).sum() > 2.5 * H * W


# ---------------------------------------------------------------------------------- VRT
def _vrt(tmp_path: Path, paths: list[str], name: str = "mosaic.vrt") -> Path:
    """A gdalbuildvrt-style VRT mosaic of same-size tiles laid side by side."""
    with rasterio.open(paths[0]) as s0:
        T, crs = s0.transform, s0.crs.to_wkt()
    bands = []
    for b in range(1, 65):
        srcs = "".join(
            f"<SimpleSource><SourceFilename relativeToVRT=\"0\">{p}</SourceFilename>"
            f"<SourceBand>{b}</SourceBand>"
            f"<SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{W}\" ySize=\"{H}\"/>"
            f"<DstRect xOff=\"{i * W}\" yOff=\"0\" xSize=\"{W}\" ySize=\"{H}\"/></SimpleSource>"
            for i, p in enumerate(paths)
        )
        bands.append(f"<VRTRasterBand dataType=\"Int8\" band=\"{b}\">"
                     f"<NoDataValue>-128</NoDataValue>{srcs}</VRTRasterBand>")
    gt = ", ".join(str(v) for v in (T.c, T.a, T.b, T.f, T.d, T.e))
    srs = html.escape(crs)
    xml = (f"<VRTDataset rasterXSize=\"{W * len(paths)}\" rasterYSize=\"{H}\">"
           f"<SRS>{srs}</SRS>"
           f"<GeoTransform>{gt}</GeoTransform>{''.join(bands)}</VRTDataset>")
    out = tmp_path / name
    out.write_text(xml)
    return out


def test_vrt_input(tmp_path: Path, mosaic) -> None:
    paths, expected = mosaic
    vrt = _vrt(tmp_path, paths)
    out = str(tmp_path / "ae.zarr")
    ingest_tiles([str(vrt)], out, chunk_px=64)
    np.testing.assert_array_equal(read_zarr(out)["embedding"].values, expected)


# ------------------------------------------------------------------------------ overlap
def _overlapping(tmp_path: Path, *, agree: bool, first_masked: bool = False):
    """Two tiles overlapping by 20 columns; the second's overlap agrees or not."""
    a, b = codes(13), codes(14)
    if agree:
        b[:, :20] = a[:, W - 20:]
    if first_masked:
        a[:, W - 20:] = aef.NODATA
    p1 = write_tile(tmp_path / "first.tif", a, from_origin(500000, 5700000, RES, RES))
    p2 = write_tile(tmp_path / "second.tif", b,
                    from_origin(500000 + (W - 20) * RES, 5700000, RES, RES))
    return [str(p1), str(p2)], a, b


def test_overlap_identical_codes_are_accepted(tmp_path: Path) -> None:
    paths, a, b = _overlapping(tmp_path, agree=True)
    out = str(tmp_path / "ae.zarr")
    ingest_tiles(paths, out, overlap="error", chunk_px=64)
    e = read_zarr(out)["embedding"].values
    np.testing.assert_array_equal(e[:, :W], a)
    np.testing.assert_array_equal(e[:, W - 20:], b)


def test_overlap_disagreement_raises_naming_both_files(tmp_path: Path) -> None:
    paths, _, _ = _overlapping(tmp_path, agree=False)
    with pytest.raises(IngestError) as ei:
        ingest_tiles(paths, str(tmp_path / "ae.zarr"), overlap="error", chunk_px=64)
    msg = str(ei.value)
    assert "first.tif" in msg and "second.tif" in msg and "ingest.overlap" in msg


@pytest.mark.parametrize("rule", ["first", "last"])
def test_overlap_precedence_by_input_order(tmp_path: Path, rule: str) -> None:
    paths, a, b = _overlapping(tmp_path, agree=False)
    out = str(tmp_path / "ae.zarr")
    ingest_tiles(paths, out, overlap=rule, chunk_px=64)
    e = read_zarr(out)["embedding"].values
    if rule == "first":
        np.testing.assert_array_equal(e[:, :W], a)
        np.testing.assert_array_equal(e[:, W:], b[:, 20:])
    else:
        np.testing.assert_array_equal(e[:, :W - 20], a[:, :W - 20])
        np.testing.assert_array_equal(e[:, W - 20:], b)


@pytest.mark.parametrize("rule", ["error", "first"])
def test_overlap_valid_pixel_beats_nodata(tmp_path: Path, rule: str) -> None:
    # the first tile is masked over the overlap: the second's valid codes win in every mode
    paths, a, b = _overlapping(tmp_path, agree=False, first_masked=True)
    out = str(tmp_path / "ae.zarr")
    ingest_tiles(paths, out, overlap=rule, chunk_px=64)
    e = read_zarr(out)["embedding"].values
    np.testing.assert_array_equal(e[:, W - 20:], b)
    np.testing.assert_array_equal(e[:, :W - 20], a[:, :W - 20])


# ----------------------------------------------------------------------- bad inputs
def test_empty_input_and_unmatched_glob(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no AlphaEarth tiles given.*ingest.tiles"):
        ingest_tiles([], str(tmp_path / "ae.zarr"))
    with pytest.raises(IngestError, match=r"nothing\*\.tif.*matched no files"):
        ingest_tiles([str(tmp_path / "nothing*.tif")], str(tmp_path / "ae.zarr"))
    with pytest.raises(IngestError, match="does not exist"):
        resolve_tiles([str(tmp_path / "missing.tif")])
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(IngestError, match="holds no .tif"):
        resolve_tiles([str(empty)])


def test_folder_and_glob_expand_sorted(tmp_path: Path, mosaic) -> None:
    paths, _ = mosaic
    assert resolve_tiles([str(tmp_path)]) == sorted(paths)
    assert resolve_tiles([str(tmp_path / "*.tif"), paths[0]]) == sorted(paths)  # deduplicated


def test_wrong_band_count(tmp_path: Path) -> None:
    p = write_tile(tmp_path / "rgb.tif", codes(15, 20, 20)[..., :3], from_origin(0, 200, 10, 10))
    with pytest.raises(IngestError) as ei:
        ingest_tiles([str(p)], str(tmp_path / "ae.zarr"))
    assert "rgb.tif" in str(ei.value) and "3 band" in str(ei.value) and "64" in str(ei.value)


def test_no_crs(tmp_path: Path) -> None:
    p = write_tile(tmp_path / "nocrs.tif", codes(16, 20, 20), from_origin(0, 200, 10, 10),
                   crs=None)
    with pytest.raises(IngestError, match=r"nocrs\.tif: has no CRS.*gdal_edit"):
        ingest_tiles([str(p)], str(tmp_path / "ae.zarr"))


def test_not_a_raster(tmp_path: Path) -> None:
    p = tmp_path / "notes.tif"
    p.write_text("this is not a GeoTIFF\n")
    with pytest.raises(IngestError, match=r"notes\.tif: cannot be read as a raster"):
        ingest_tiles([str(p)], str(tmp_path / "ae.zarr"))


def test_truncated_tile_fails_naming_the_file(tmp_path: Path) -> None:
    p = write_tile(tmp_path / "cut.tif", codes(17), from_origin(0, 1500, 10, 10))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut off
    with pytest.raises(IngestError, match=r"cut\.tif: .*(truncated|cannot be read)"):
        ingest_tiles([str(p)], str(tmp_path / "ae.zarr"))


@pytest.mark.parametrize("dtype", ["uint8", "int16"])
def test_unsupported_dtype(tmp_path: Path, dtype: str) -> None:
    q = np.abs(codes(18, 20, 20)).astype(dtype)
    p = write_tile(tmp_path / f"{dtype}.tif", q, from_origin(0, 200, 10, 10), dtype=dtype,
                   nodata=None)
    with pytest.raises(IngestError, match=rf"{dtype}\.tif: dtype {dtype} is not"):
        ingest_tiles([str(p)], str(tmp_path / "ae.zarr"))


def test_bands_named_out_of_order_are_reordered(tmp_path: Path) -> None:
    q = codes(19, 30, 40)
    perm = np.random.default_rng(0).permutation(64)
    names = tuple(aef.BAND_NAMES[i] for i in perm)
    p = write_tile(tmp_path / "perm.tif", q[..., perm], from_origin(0, 300, 10, 10),
                   descriptions=names)
    out = str(tmp_path / "ae.zarr")
    ingest_tiles([str(p)], out)
    np.testing.assert_array_equal(read_zarr(out)["embedding"].values, q)


# ------------------------------------------------------------------ stage + resume
def _work_dirs(ws: Workspace) -> list[str]:
    """The stage's work folders left under ``<ws>/.work`` (temporaries of a run)."""
    wdir = Path(ws.root, ".work")
    return sorted(p.name for p in wdir.iterdir() if p.name.startswith("ingest-")) \
        if wdir.is_dir() else []


def test_run_ingest_resume_skip_and_redo(tmp_path: Path, mosaic, caplog) -> None:
    caplog.set_level("INFO", logger="aether_scale")
    paths, expected = mosaic
    ws = Workspace(tmp_path / "ws")
    cfg = load_config(data={"ingest": {"tiles": [str(tmp_path / "*.tif")], "chunk_px": 64},
                            "cluster": {"kind": "threads"}})
    r1 = run_stage("ingest", ws, cfg)
    assert not r1.skipped and r1.stats["valid_pixels"] > 0
    assert r1.stats["chunks_computed"] == r1.stats["chunks"] == 3 * 7
    assert r1.stats["chunks_resumed"] == 0 and r1.stats["chunks_empty"] == 0
    np.testing.assert_array_equal(read_zarr(ws.path("ae.zarr"))["embedding"].values, expected)
    manifest = json.loads(Path(ws.manifest_path("ingest")).read_text())
    assert {"stage", "key", "outputs", "inputs", "config", "runtime", "stats", "seconds",
            "completed_at", "key_format", "stage_version"} <= set(manifest)
    assert manifest["stage"] == "ingest" and manifest["outputs"] == ["ae.zarr"]
    # one input, the ordered tile list (the glob expanded, sorted), with one fingerprint
    assert set(manifest["inputs"]) == {"tiles"}
    assert manifest["inputs"]["tiles"]["ref"] == sorted(paths)
    fp1 = manifest["inputs"]["tiles"]["fingerprint"]
    # the learned config holds the settings, not the tile paths (those are the input)
    assert manifest["config"]["chunk_px"] == 64 and "tiles" not in manifest["config"]
    assert manifest["stats"] == r1.stats
    caplog.clear()
    r2 = run_stage("ingest", ws, cfg)
    assert r2.skipped
    assert "up to date (manifest matches) — skipped" in caplog.text
    # a changed tile → redone, and the output reflects the change
    changed = codes(20)
    time.sleep(0.01)
    write_tile(Path(paths[1]), changed, from_origin(500000 + W * RES, 5700000, RES, RES))
    r3 = run_stage("ingest", ws, cfg)
    assert not r3.skipped
    assert ws.manifest("ingest")["inputs"]["tiles"]["fingerprint"] != fp1
    np.testing.assert_array_equal(read_zarr(ws.path("ae.zarr"))["embedding"].values[:, W:],
                                  changed)
    # a changed config → redone
    cfg2 = load_config(data={"ingest": {"tiles": [str(tmp_path / "*.tif")], "chunk_px": 100}})
    r4 = run_stage("ingest", ws, cfg2)
    assert not r4.skipped
    assert read_zarr(ws.path("ae.zarr"))["embedding"].data.chunksize == (100, 100, 64)
    # temporaries (the work folders under .work/) are removed on success
    assert not _work_dirs(ws)
    assert not [p for p in os.listdir(ws.root) if p.startswith(".tmp")]


def test_killed_ingest_resumes_with_the_missing_chunks(tmp_path: Path, mosaic, monkeypatch,
                                                       caplog) -> None:
    """A run that dies part-way keeps its finished chunks in the work folder; the rerun
    computes only the missing ones and the store is the same as an uninterrupted run's."""
    import dask

    from aether_scale.ingest import stage as ingest_stage

    caplog.set_level("INFO", logger="aether_scale")
    paths, expected = mosaic
    ws = Workspace(tmp_path / "ws")
    cfg = load_config(data={"ingest": {"tiles": paths, "chunk_px": 64}})
    real = ingest_stage._chunk
    calls: list[tuple[int, int]] = []
    die_at = [3 * 7]  # the call that fails (the run's last chunk), none once reset

    def counted(placements, grid, r0, r1, c0, c1, overlap):
        calls.append((r0, c0))
        if len(calls) == die_at[0]:
            raise RuntimeError("worker killed")
        return real(placements, grid, r0, r1, c0, c1, overlap)

    monkeypatch.setattr(ingest_stage, "_chunk", counted)
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="killed"):
        run_stage("ingest", ws, cfg)
    assert not ws.exists("ae.zarr") and ws.manifest("ingest") is None
    assert len(_work_dirs(ws)) == 1  # the killed run's work (ledger included) is kept
    assert len(calls) == 3 * 7
    died = calls[-1]
    calls.clear()
    die_at[0] = -1
    caplog.clear()
    r = run_stage("ingest", ws, cfg)
    assert not r.skipped
    assert calls == [died]  # only the chunk the killed run never wrote
    assert r.stats["chunks_resumed"] == 3 * 7 - 1 and r.stats["chunks_computed"] == 1
    assert f"resuming: {3 * 7 - 1} of {3 * 7} chunks already written" in caplog.text
    np.testing.assert_array_equal(read_zarr(ws.path("ae.zarr"))["embedding"].values, expected)
    assert r.stats["valid_pixels"] == int((expected != aef.NODATA).all(-1).sum())
    assert not _work_dirs(ws)


def test_failed_ingest_leaves_no_output(tmp_path: Path) -> None:
    paths, _, _ = _overlapping(tmp_path, agree=False)
    ws = Workspace(tmp_path / "ws")
    cfg = load_config(data={"ingest": {"tiles": paths, "chunk_px": 64}})
    with pytest.raises(IngestError):
        run_stage("ingest", ws, cfg)
    assert not ws.exists("ae.zarr") and ws.manifest("ingest") is None
    # nothing half-written is published: partial work stays inside the run's work folder
    assert not [p for p in os.listdir(ws.root) if p.startswith(".tmp")]
    assert not [p for p in os.listdir(ws.root) if p.endswith(".zarr")]


# ------------------------------------------------------------------ real LocalCluster
def test_local_cluster_output_identical_to_threads(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    paths, _ = _utm_pair(tmp_path)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad_paths, _, _ = _overlapping(bad_dir, agree=False)
    threads = str(tmp_path / "threads.zarr")
    dist = str(tmp_path / "dist.zarr")
    s1 = ingest_tiles(paths, threads, crs="EPSG:27700", chunk_px=64)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      memory_limit="768MiB", dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        with get_task_stream(client) as ts:
            s2 = ingest_tiles(paths, dist, crs="EPSG:27700", chunk_px=64)
        # the blocks really were read in the worker processes (keys: label-token-order-i-j)
        block_tasks = [t for t in ts.data
                       if re.fullmatch(r"ingest-[0-9a-f]+-\d+-\d+-\d+", str(t["key"]))]
        assert len(block_tasks) == s2["chunks"] == s2["chunks_computed"]
        assert {t["worker"] for t in block_tasks} <= set(client.scheduler_info()["workers"])
        # an overlap conflict raised on a worker reaches the caller as IngestError
        with pytest.raises(IngestError, match="first.tif"):
            ingest_tiles(bad_paths, str(tmp_path / "bad.zarr"), chunk_px=64)
    np.testing.assert_array_equal(read_zarr(threads)["embedding"].values,
                                  read_zarr(dist)["embedding"].values)
    assert s1["valid_pixels"] == s2["valid_pixels"] > 0
