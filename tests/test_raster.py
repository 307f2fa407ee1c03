"""The shared raster contract: one pixel rule for the POI stage and pooling, one checked opener."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from fixtures import grid

from aether_scale import aef
from aether_scale.pois import raster_grid
from aether_scale.pool.grid import grid_of
from aether_scale.stores.ae import open_ae, write_ae
from aether_scale.stores.raster import locate_pixels, open_embedding

# An ingest-written grid (GeoTransform + pixel-centre coords, as the ingest stage writes them):
# EPSG:27700, 10 m pixels, 130 × 70 px in 64-px chunks (ragged last chunk on both axes).
LEFT, TOP, RES, W, H, CHUNK = 530_000.0, 181_000.0, 10.0, 130, 70, 64


def write_store(path: str) -> None:
    codes = np.zeros((H, W, aef.N_BANDS), dtype=np.int8)
    write_ae(path, codes, grid(H, W, crs="EPSG:27700", left=LEFT, top=TOP, res=RES),
             chunk_px=CHUNK)


@pytest.fixture
def store(tmp_path) -> str:
    p = str(tmp_path / "ae.zarr")
    write_store(p)
    return p


def edge_points() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every combination of pixel edges, corners and centres near the raster's borders
    and chunk seams, points one ulp either side of the outer edges, and NaNs; with the
    (row, col) each must land on under half-open cells (−1: off the raster)."""
    ks_x = [-1, 0, 1, 63, 64, 65, 128, 129, 130, 131]
    ks_y = [-1, 0, 1, 63, 64, 65, 68, 69, 70, 71]
    fx = [LEFT + k * RES for k in ks_x] + [LEFT + (k + 0.5) * RES for k in ks_x]
    fy = [TOP - k * RES for k in ks_y] + [TOP - (k + 0.5) * RES for k in ks_y]
    right, bottom = LEFT + W * RES, TOP - H * RES
    fx += [np.nextafter(LEFT, -np.inf), np.nextafter(right, -np.inf), np.nextafter(right, np.inf),
           np.nan]
    fy += [np.nextafter(TOP, np.inf), np.nextafter(bottom, np.inf), np.nextafter(bottom, -np.inf),
           np.nan]
    x, y = (a.ravel() for a in np.meshgrid(np.array(fx), np.array(fy)))
    # the expectation, written independently of the code: floor of the offset in pixels,
    # left/top edges in, right/bottom edges out
    with np.errstate(invalid="ignore"):
        col = np.floor((x - LEFT) / RES)
        row = np.floor((TOP - y) / RES)
        inside = (x >= LEFT) & (x < right) & (y <= TOP) & (y > bottom)
    col = np.where(inside, col, -1).astype(np.int64)
    row = np.where(inside, row, -1).astype(np.int64)
    return x, y, row, col


def test_poi_grid_and_pooling_grid_locate_identically(store):
    """The POI stage keeps a POI and partitions it by chunk with RasterGrid.locate; pooling
    finds its pixel with Grid.locate. Both must use the same half-open cells, or a POI on a
    pixel edge is kept by one and pooled around another pixel (or dropped) by the other."""
    rg = raster_grid(store)
    g = grid_of(open_embedding(store))
    assert rg.transform == g.transform  # same geometry in, so any difference is the rule
    x, y, row_want, col_want = edge_points()
    inside_want = row_want >= 0
    assert 0 < inside_want.sum() < inside_want.size

    row_r, col_r, inside_r, chunk_r = rg.locate(x, y)
    row_g, col_g, inside_g = g.locate(x, y)

    np.testing.assert_array_equal(inside_r, inside_want)
    np.testing.assert_array_equal(inside_g, inside_want)
    np.testing.assert_array_equal(row_r, row_want)
    np.testing.assert_array_equal(col_r, col_want)
    np.testing.assert_array_equal(row_g[inside_want], row_want[inside_want])
    np.testing.assert_array_equal(col_g[inside_want], col_want[inside_want])
    # off the raster: RasterGrid says −1, Grid clips to a usable index
    assert (row_g >= 0).all() and (row_g < H).all() and (col_g >= 0).all() and (col_g < W).all()
    # the chunk the POI stage files a point under is the chunk pooling reads its pixel from
    bi, bj = g.chunk_of(row_g, col_g)
    np.testing.assert_array_equal(chunk_r[0][inside_want], bi[inside_want])
    np.testing.assert_array_equal(chunk_r[1][inside_want], bj[inside_want])
    assert (chunk_r[:, ~inside_want] == -1).all()


def test_locate_pixels_rotated_transform_matches_axis_aligned():
    """The general (rotated/sheared) branch applies the same cells as the axis-aligned one:
    a transform that swaps the axes locates the transposed pixel."""
    rng = np.random.default_rng(0)
    x = LEFT + rng.uniform(-2, W + 2, 500) * RES
    y = TOP - rng.uniform(-2, H + 2, 500) * RES
    x[:10] = LEFT + np.arange(10) * RES  # exact edges take the same side in both branches
    row, col, inside = locate_pixels((RES, 0.0, LEFT, 0.0, -RES, TOP), H, W, x, y)
    # swapped: x grows with the row index, y shrinks with the column index
    srow, scol, sinside = locate_pixels((0.0, RES, LEFT, -RES, 0.0, TOP), W, H, x, y)
    np.testing.assert_array_equal(inside, sinside)
    np.testing.assert_array_equal(row[inside], scol[inside])
    np.testing.assert_array_equal(col[inside], srow[inside])


# ----------------------------------------------------------------------------- opener
def test_open_ae_contract(store):
    from aether_scale.pois import grid as poi_grid

    assert poi_grid.open_ae is open_ae  # the POI stage reads through the one checked opener
    ds = open_ae(store)
    assert isinstance(ds, xr.Dataset) and "spatial_ref" in ds.coords
    assert ds["embedding"].dtype == np.int8 and ds["embedding"].rio.crs.to_epsg() == 27700
    da = open_embedding(store)
    assert da.dims == ("y", "x", "band") and da.rio.crs.to_epsg() == 27700
    assert open_embedding(ds) is not None and open_embedding(da) is da


def test_open_ae_through_an_fsspec_url(store, tmp_path):
    url = "file://" + store
    ds = open_ae(url, storage_options={"auto_mkdir": False})
    assert ds["embedding"].shape == (H, W, aef.N_BANDS)
    with pytest.raises(FileNotFoundError, match="aether-scale ingest"):
        open_ae("file://" + str(tmp_path / "nowhere" / "ae.zarr"), storage_options={})


def test_missing_store_names_path_and_stage(tmp_path):
    missing = str(tmp_path / "ws" / "ae.zarr")
    with pytest.raises(FileNotFoundError, match=r"ws/ae\.zarr.*run the ingest stage.*aether-scale ingest"):
        open_ae(missing)
    with pytest.raises(FileNotFoundError, match="aether-scale ingest"):
        raster_grid(missing)  # the POI stage's reader goes through the same opener
    field = str(tmp_path / "ws" / "field.zarr")
    with pytest.raises(FileNotFoundError, match=r"field\.zarr.*aether-scale infer"):
        open_embedding(field)


def test_store_without_embedding_names_variable_and_fix(store, tmp_path):
    # a foreign store (no aether_scale writer can leave one without 'embedding'): plain
    # xarray, so it also has no chunk index, which every opener warns about
    bad = str(tmp_path / "bad" / "ae.zarr")
    open_ae(store).rename({"embedding": "codes"}).to_zarr(bad)
    for opener in (open_ae, open_embedding, raster_grid):
        with pytest.raises(ValueError, match=r"bad/ae\.zarr: no variable 'embedding'.*"
                                             r"codes.*aether-scale ingest"), \
                pytest.warns(UserWarning, match="has no chunk index"):
            opener(bad)


def test_in_memory_inputs_are_checked_too(store):
    ds = open_ae(store)
    with pytest.raises(ValueError, match="no variable 'embedding'"):
        open_embedding(ds.rename({"embedding": "codes"}))
    with pytest.raises(ValueError, match=r"dims \('band', 'y', 'x'\)"):
        open_embedding(ds["embedding"].transpose("band", "y", "x"))


def test_damaged_chunks_fail_naming_store_and_chunk(store, tmp_path):
    import shutil
    from pathlib import Path

    from aether_scale.stores.chunks import CorruptStoreError

    assert issubclass(CorruptStoreError, ValueError)
    # a chunk whose bytes changed (same size): its checksum fails when it is read
    flipped = str(tmp_path / "flipped" / "ae.zarr")
    shutil.copytree(store, flipped)
    chunk = Path(flipped, "embedding", "c", "1", "1", "0")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    ds = open_ae(flipped)  # opening reads no chunk data
    np.testing.assert_array_equal(ds["embedding"][:CHUNK, :CHUNK].values, 0)  # others still read
    with pytest.raises(CorruptStoreError,
                       match=r"flipped/ae\.zarr: chunk embedding/c/1/1/0 .*damaged"):
        ds["embedding"].load()
    # a truncated chunk: found when the store is opened, before any read
    cut = str(tmp_path / "cut" / "ae.zarr")
    shutil.copytree(store, cut)
    chunk = Path(cut, "embedding", "c", "0", "1", "0")
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with pytest.raises(CorruptStoreError, match=r"cut/ae\.zarr.*embedding/c/0/1/0.*aether-scale "
                                                r"ingest"):
        open_ae(cut)
    # a deleted chunk cannot pass for fill values
    gone = str(tmp_path / "gone" / "ae.zarr")
    shutil.copytree(store, gone)
    Path(gone, "embedding", "c", "0", "0", "0").unlink()
    with pytest.raises(CorruptStoreError, match=r"0/0/0 is missing"):
        open_ae(gone)
