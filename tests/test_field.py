"""Field inference: the projector over every AE pixel, on threads and on a LocalCluster."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import torch
import xarray as xr
from fixtures import CHUNK, NX, NY, projector, random_codes, write_tiny_ae

from aether_scale import aef
from aether_scale.config import InferSection, load_config
from aether_scale.infer import (
    field_chunk,
    infer_field,
    model_load_count,
    project_pixels,
)
from aether_scale.model import TextProj, save_checkpoint
from aether_scale.pipeline import run_stage
from aether_scale.stores.raster import open_embedding
from aether_scale.workspace import Workspace


def direct(q: np.ndarray, model: torch.nn.Module) -> np.ndarray:
    """Independent per-pixel reference: decode, L2-normalise, project (float64 numpy → torch)."""
    flat = q.reshape(-1, 64)
    valid = ~np.any(flat == aef.NODATA, axis=1)
    v = aef.decode(flat[valid]).astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    with torch.no_grad():
        z = model(torch.from_numpy(v.astype(np.float32))).numpy()
    out = np.full((flat.shape[0], z.shape[1]), np.nan, dtype=np.float32)
    out[valid] = z
    return out.reshape(q.shape[0], q.shape[1], -1)


@pytest.fixture(scope="module")
def ae_zarr(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    p = str(tmp_path_factory.mktemp("ae") / "ae.zarr")
    return p, write_tiny_ae(p)


def test_field_equals_direct_projection(ae_zarr, tmp_path):
    path, q = ae_zarr
    model = projector()
    out = str(tmp_path / "field.zarr")
    stats = infer_field(path, model, out, InferSection(batch_pixels=1024))
    got = open_embedding(out).values
    want = direct(q, model)
    assert got.dtype == np.float16 and got.shape == (NY, NX, 128)
    mask = np.any(q == aef.NODATA, axis=-1)
    assert np.array_equal(np.isnan(got).all(-1), mask)
    assert not np.isnan(got[~mask]).any()
    np.testing.assert_allclose(got[~mask].astype(np.float32), want[~mask], atol=1e-3, rtol=0)
    assert stats["valid_pixels"] == int((~mask).sum())
    assert stats["nodata_pixels"] == int(mask.sum())
    # unit vectors (the projector L2-normalises its output)
    np.testing.assert_allclose(np.linalg.norm(got[~mask].astype(np.float32), axis=-1), 1, atol=3e-3)


def test_bfloat16_precision_is_close(ae_zarr, tmp_path):
    path, q = ae_zarr
    model = projector()
    out = str(tmp_path / "bf16.zarr")
    stats = infer_field(path, model, out, InferSection(precision="bfloat16"))
    got = open_embedding(out).values
    mask = np.any(q == aef.NODATA, axis=-1)
    assert np.array_equal(np.isnan(got).all(-1), mask) and stats["precision"] == "bfloat16"
    want = direct(q, model)[~mask]
    g = got[~mask].astype(np.float32)
    assert np.abs(g - want).max() < 5e-3
    assert (np.sum(g * want, axis=1) > 0.999).all()  # cosine to the float32 projection


def test_field_keeps_grid_crs_and_chunks(ae_zarr, tmp_path):
    path, _ = ae_zarr
    out = str(tmp_path / "field.zarr")
    infer_field(path, projector(), out, InferSection())
    ae, f = open_embedding(path), open_embedding(out)
    assert f.dims == ("y", "x", "dim")
    np.testing.assert_array_equal(ae["x"].values, f["x"].values)
    np.testing.assert_array_equal(ae["y"].values, f["y"].values)
    assert f.rio.crs == ae.rio.crs and f.rio.crs.to_epsg() == 32630
    assert f.rio.transform() == ae.rio.transform()
    # default field chunk: the largest divisor ≤ 512 of the 32-px AE chunk, i.e. the same
    assert f.data.chunksize[:2] == ae.data.chunksize[:2] == (CHUNK, CHUNK)
    assert os.path.exists(os.path.join(out, "aether_chunks.json"))  # the store's chunk index


def test_int8_codec(ae_zarr, tmp_path):
    path, q = ae_zarr
    model = projector()
    out = str(tmp_path / "field8.zarr")
    infer_field(path, model, out, InferSection(dtype="int8"))
    f = open_embedding(out)
    assert f.attrs["codec"] == "aef-sqrt" and f.attrs["scale"] == 127.5 and f.attrs["nodata"] == -128
    codes = f.values
    assert codes.dtype == np.int8
    mask = np.any(q == aef.NODATA, axis=-1)
    assert (codes[mask] == -128).all() and not (codes[~mask] == -128).any()
    want = direct(q, model)[~mask]
    dec = aef.decode(codes[~mask])
    # sqrt codec: |error| ≤ half a step of sqrt(|v|)·127.5, i.e. ≤ (|v|^½/127.5 + 1/(4·127.5²))
    bound = np.sqrt(np.abs(want)) / 127.5 + 1 / (4 * 127.5**2) + 1e-6
    assert (np.abs(dec - want) <= bound).all()
    # exactly the documented encode of the float32 projection
    np.testing.assert_array_equal(np.abs(codes[~mask].astype(int) - aef.encode(want)).max() <= 1, True)


def test_project_pixels_float_input_and_empty():
    model = projector()
    x = np.random.default_rng(3).normal(size=(50, 64)).astype(np.float32)
    x[7] = np.nan
    out = project_pixels(x, model, batch_pixels=16)
    assert np.isnan(out[7]).all() and not np.isnan(np.delete(out, 7, axis=0)).any()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    with torch.no_grad():
        want = model(torch.from_numpy(np.delete(xn, 7, axis=0))).numpy()
    np.testing.assert_allclose(np.delete(out, 7, axis=0).astype(np.float32), want, atol=1e-3)
    # any other module (no fused path) gives the same as calling it directly
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    codes = aef.encode(xn)
    got = project_pixels(codes, seq, batch_pixels=7)
    with torch.no_grad():
        v = aef.decode(codes[[0, 1, 2]]).astype(np.float32)
        want = seq(torch.nn.functional.normalize(torch.from_numpy(v), dim=1)).numpy()
    np.testing.assert_allclose(got[:3].astype(np.float32), want, atol=2e-3)
    empty = project_pixels(np.full((5, 64), -128, np.int8), model)
    assert np.isnan(empty).all() and empty.shape == (5, 128)


def test_bad_input_is_refused(tmp_path, ae_zarr):
    path, _ = ae_zarr
    ds = xr.open_zarr(path, mask_and_scale=False)
    with pytest.raises(ValueError, match="dims"):
        infer_field(ds["embedding"].transpose("band", "y", "x"), projector(), str(tmp_path / "f"))
    with pytest.raises(ValueError, match="no variable 'embedding'"):
        infer_field(ds.rename({"embedding": "codes"}), projector(), str(tmp_path / "f"))
    small = torch.nn.Sequential(torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match="expects 32 inputs"):
        infer_field(path, small, str(tmp_path / "f"))


def _loads_on_worker(key: str) -> int:
    from aether_scale.infer import model_load_count as count

    return count(key)


def test_local_cluster_matches_threads_and_ships_model_once(ae_zarr, tmp_path):
    from distributed import Client, LocalCluster

    path, _ = ae_zarr
    model = projector(seed=5)
    a, b = str(tmp_path / "threads.zarr"), str(tmp_path / "cluster.zarr")
    with pytest.MonkeyPatch.context():
        st_a = infer_field(path, model, a, InferSection(batch_pixels=2048))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        st_b = infer_field(path, model, b, InferSection(batch_pixels=2048))
        loads = client.run(_loads_on_worker, st_b["model_hash"])
        # every worker that ran tasks unpickled the model exactly once (9 chunks, 2 workers)
        assert sorted(loads.values()) == [1, 1], loads
        # a second inference with the same model reuses the workers' cached copy
        infer_field(path, model, str(tmp_path / "again.zarr"), InferSection())
        assert set(client.run(_loads_on_worker, st_b["model_hash"]).values()) == {1}
    assert st_a["model_hash"] == st_b["model_hash"]
    np.testing.assert_array_equal(open_embedding(a).values, open_embedding(b).values)
    # the in-process scheduler used the driver's cache: nothing was unpickled here
    assert model_load_count(st_a["model_hash"]) == 0


def test_field_chunks_default_and_all_nodata_chunks_not_stored(tmp_path, caplog):
    """Field chunks: the largest divisor ≤ 512 of the AE chunk edge (so 32 px here) or
    infer.chunk_px; an all-nodata chunk is not stored (the fill value stands for it) and
    the chunk index lists exactly the stored chunks."""
    assert field_chunk(CHUNK) == CHUNK
    assert field_chunk(1024) == 512 and field_chunk(768) == 384 and field_chunk(640) == 320
    assert field_chunk(1024, 256) == 256
    with pytest.raises(ValueError, match="must divide"):
        field_chunk(CHUNK, 24)
    q = random_codes(seed=6)
    q[:CHUNK, :CHUNK] = aef.NODATA  # chunk (0, 0) holds no valid pixel
    ae = str(tmp_path / "ae_hole.zarr")
    write_tiny_ae(ae, codes=q)
    model = projector()
    caplog.set_level("INFO")
    for dtype in ("float16", "int8"):
        out = str(tmp_path / f"field_{dtype}.zarr")
        stats = infer_field(ae, model, out, InferSection(dtype=dtype))
        assert stats["chunks"] == [CHUNK, CHUNK] and stats["n_chunks"] == 9
        assert "9 chunks of 32×32" in caplog.text
        index = json.load(open(os.path.join(out, "aether_chunks.json")))
        stored = set(index["arrays"]["embedding"]["stored"])
        assert index["arrays"]["embedding"]["chunks"] == [CHUNK, CHUNK, 128]
        assert stored == {f"c/{i}/{j}/0" for i in range(3) for j in range(3)} - {"c/0/0/0"}
        assert not os.path.exists(os.path.join(out, "embedding", "c", "0", "0"))
        f = open_embedding(out)
        got = f.values
        mask = np.any(q == aef.NODATA, axis=-1)
        if dtype == "int8":
            assert (got[:CHUNK, :CHUNK] == aef.NODATA).all()
            assert (got[mask] == aef.NODATA).all() and not (got[~mask] == aef.NODATA).any()
        else:
            assert np.isnan(got[:CHUNK, :CHUNK]).all()
            assert np.array_equal(np.isnan(got).all(-1), mask)
            np.testing.assert_allclose(got[~mask].astype(np.float32), direct(q, model)[~mask],
                                       atol=1e-3, rtol=0)
        assert stats["valid_pixels"] == int((~mask).sum())
    # infer.chunk_px: 16-px field chunks inside the 32-px AE chunks, same values
    out16 = str(tmp_path / "field16.zarr")
    st16 = infer_field(ae, model, out16, InferSection(chunk_px=16))
    assert st16["chunks"] == [16, 16] and st16["n_chunks"] == 5 * 6
    f16 = open_embedding(out16)
    assert f16.data.chunksize[:2] == (16, 16)
    np.testing.assert_array_equal(f16.values, open_embedding(str(tmp_path / "field_float16.zarr")).values)
    with pytest.raises(ValueError, match="must divide"):
        infer_field(ae, model, str(tmp_path / "bad.zarr"), InferSection(chunk_px=24))


def _put_model(ws: Workspace, name: str, seed: int) -> None:
    os.makedirs(ws.path(name))
    save_checkpoint(os.path.join(ws.path(name), "checkpoint.pt"), projector(seed), TextProj(),
                    config={"in_dim": 64, "text_dim": 384}, epoch=1)


def test_run_infer_stage_with_noaug_and_resume(tmp_path, caplog):
    ws = Workspace(str(tmp_path / "ws"))
    q = write_tiny_ae(ws.path("ae.zarr"))
    for name, seed in (("model", 1), ("model_noaug", 2)):
        _put_model(ws, name, seed)
    cfg = load_config(data={"cluster": {"kind": "threads"}})
    res = run_stage("infer", ws, cfg)
    assert not res.skipped
    assert set(res.outputs) == {"field.zarr", "field_noaug.zarr"}
    f = open_embedding(ws.path("field.zarr")).values
    g = open_embedding(ws.path("field_noaug.zarr")).values
    mask = np.any(q == aef.NODATA, axis=-1)
    np.testing.assert_allclose(f[~mask].astype(np.float32), direct(q, projector(1))[~mask],
                               atol=1e-3)
    np.testing.assert_allclose(g[~mask].astype(np.float32), direct(q, projector(2))[~mask],
                               atol=1e-3)
    for name in ("field.zarr", "field_noaug.zarr"):
        assert os.path.exists(os.path.join(ws.path(name), "aether_chunks.json"))
    manifest = json.load(open(ws.manifest_path("infer")))
    assert manifest["stats"]["field.zarr"]["nodata_pixels"] == int(mask.sum())
    caplog.clear()
    caplog.set_level("INFO")
    assert run_stage("infer", ws, cfg).skipped
    assert "up to date (manifest matches) — skipped" in caplog.text
    # infer follows the models that exist: without model_noaug/, only the main field
    shutil.rmtree(ws.path("model_noaug"))
    res2 = run_stage("infer", ws, cfg)
    assert not res2.skipped and list(res2.outputs) == ["field.zarr"]
    np.testing.assert_array_equal(open_embedding(ws.path("field.zarr")).values, f)


def test_run_infer_needs_inputs(tmp_path):
    ws = Workspace(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="ingest"):
        run_stage("infer", ws, load_config())
    # with ae.zarr but no model: the error names the train stage
    write_tiny_ae(ws.path("ae.zarr"))
    with pytest.raises(FileNotFoundError, match="aether-scale train"):
        run_stage("infer", ws, load_config())


@pytest.mark.gpu
def test_cuda_matches_cpu(ae_zarr, tmp_path):
    """On a CUDA machine the projector runs on the GPU (device auto) with the CPU's results."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    path, q = ae_zarr
    model = projector()
    cpu, gpu = str(tmp_path / "cpu.zarr"), str(tmp_path / "gpu.zarr")
    infer_field(path, model, cpu, InferSection(device="cpu"))
    infer_field(path, model, gpu, InferSection(device="auto"))
    a, b = open_embedding(cpu).values, open_embedding(gpu).values
    assert np.array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3, equal_nan=True)
