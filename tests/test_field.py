"""Field inference: the projector over every AE pixel, on threads and on a LocalCluster."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import torch
import xarray as xr

from aether_scale import aef
from aether_scale.config import InferSection, load_config
from aether_scale.field import (
    infer_field,
    model_load_count,
    project_pixels,
    run_infer,
)
from aether_scale.model import AEProj, TextProj, save_checkpoint
from aether_scale.raster import open_embedding
from aether_scale.workspace import Workspace

NY, NX, CHUNK = 70, 90, 32  # 3 × 3 chunks, ragged at the far edges


def write_ae(path: str, *, seed: int = 0, crs: str = "EPSG:32630") -> np.ndarray:
    """A tiny ae.zarr (workspace contract) with a nodata block and scattered nodata pixels."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(NY, NX, 64))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    q = aef.encode(v)
    q[:12, :9] = aef.NODATA  # a masked corner spanning no chunk edge
    q[40, 31:34] = aef.NODATA  # masked pixels across a chunk edge
    x = 500_000 + 10 * np.arange(NX) + 5.0
    y = 5_700_000 - 10 * np.arange(NY) - 5.0
    da = xr.DataArray(q, dims=("y", "x", "band"),
                      coords={"y": y, "x": x, "band": list(aef.BAND_NAMES)})
    ds = xr.Dataset({"embedding": da}).rio.write_crs(crs)
    ds.chunk({"y": CHUNK, "x": CHUNK, "band": -1}).to_zarr(path, mode="w", consolidated=False)
    return q


def projector(seed: int = 1) -> AEProj:
    torch.manual_seed(seed)
    m = AEProj()
    with torch.no_grad():
        m.gate.fill_(0.5)  # make the shortcut matter
    return m.eval()


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
    return p, write_ae(p)


def test_field_equals_direct_projection(ae_zarr, tmp_path):
    path, q = ae_zarr
    model = projector()
    out = str(tmp_path / "field.zarr")
    stats = infer_field(path, model, out, InferSection(batch_pixels=1024), log=None)
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
    stats = infer_field(path, model, out, InferSection(precision="bfloat16"), log=None)
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
    infer_field(path, projector(), out, InferSection(), log=None)
    ae, f = open_embedding(path), open_embedding(out)
    assert f.dims == ("y", "x", "dim")
    np.testing.assert_array_equal(ae["x"].values, f["x"].values)
    np.testing.assert_array_equal(ae["y"].values, f["y"].values)
    assert f.rio.crs == ae.rio.crs and f.rio.crs.to_epsg() == 32630
    assert f.rio.transform() == ae.rio.transform()
    assert f.data.chunksize[:2] == ae.data.chunksize[:2]


def test_int8_codec(ae_zarr, tmp_path):
    path, q = ae_zarr
    model = projector()
    out = str(tmp_path / "field8.zarr")
    infer_field(path, model, out, InferSection(dtype="int8"), log=None)
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
        infer_field(ds["embedding"].transpose("band", "y", "x"), projector(), str(tmp_path / "f"),
                    log=None)
    with pytest.raises(ValueError, match="no variable 'embedding'"):
        infer_field(ds.rename({"embedding": "codes"}), projector(), str(tmp_path / "f"), log=None)
    small = torch.nn.Sequential(torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match="expects 32 inputs"):
        infer_field(path, small, str(tmp_path / "f"), log=None)


def _loads_on_worker(key: str) -> int:
    from aether_scale.field import model_load_count as count

    return count(key)


def test_local_cluster_matches_threads_and_ships_model_once(ae_zarr, tmp_path):
    from distributed import Client, LocalCluster

    path, _ = ae_zarr
    model = projector(seed=5)
    a, b = str(tmp_path / "threads.zarr"), str(tmp_path / "cluster.zarr")
    with pytest.MonkeyPatch.context():
        st_a = infer_field(path, model, a, InferSection(batch_pixels=2048), log=None)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        st_b = infer_field(path, model, b, InferSection(batch_pixels=2048), log=None)
        loads = client.run(_loads_on_worker, st_b["model_hash"])
        # every worker that ran tasks unpickled the model exactly once (9 chunks, 2 workers)
        assert sorted(loads.values()) == [1, 1], loads
        # a second inference with the same model reuses the workers' cached copy
        infer_field(path, model, str(tmp_path / "again.zarr"), InferSection(), log=None)
        assert set(client.run(_loads_on_worker, st_b["model_hash"]).values()) == {1}
    assert st_a["model_hash"] == st_b["model_hash"]
    np.testing.assert_array_equal(open_embedding(a).values, open_embedding(b).values)
    # the in-process scheduler used the driver's cache: nothing was unpickled here
    assert model_load_count(st_a["model_hash"]) == 0


def test_run_infer_stage_with_noaug_and_resume(ae_zarr, tmp_path):
    path, q = ae_zarr
    ws = Workspace(str(tmp_path / "ws"))
    xr.open_zarr(path, mask_and_scale=False).to_zarr(ws.path("ae.zarr"), consolidated=False)
    for name, seed in (("model", 1), ("model_noaug", 2)):
        os.makedirs(ws.path(name))
        save_checkpoint(os.path.join(ws.path(name), "checkpoint.pt"), projector(seed), TextProj(),
                        config={"in_dim": 64, "text_dim": 384}, epoch=1)
    cfg = load_config(data={"cluster": {"kind": "threads"}})
    res = run_infer(ws, cfg)
    assert not res.skipped
    assert set(res.outputs) == {"field.zarr", "field_noaug.zarr"}
    f = open_embedding(ws.path("field.zarr")).values
    g = open_embedding(ws.path("field_noaug.zarr")).values
    mask = np.any(q == aef.NODATA, axis=-1)
    np.testing.assert_allclose(f[~mask].astype(np.float32), direct(q, projector(1))[~mask],
                               atol=1e-3)
    np.testing.assert_allclose(g[~mask].astype(np.float32), direct(q, projector(2))[~mask],
                               atol=1e-3)
    manifest = json.load(open(ws.manifest_path("infer")))
    assert manifest["stats"]["field.zarr"]["nodata_pixels"] == int(mask.sum())
    assert run_infer(ws, cfg).skipped
    # without noaug, only the main field
    cfg2 = load_config(data={"evaluate": {"noaug": False}})
    assert list(run_infer(ws, cfg2).outputs) == ["field.zarr"]


def test_run_infer_needs_inputs(tmp_path):
    ws = Workspace(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="ingest"):
        run_infer(ws, load_config())


@pytest.mark.gpu
def test_cuda_matches_cpu(ae_zarr, tmp_path):
    """On a CUDA machine the projector runs on the GPU (device auto) with the CPU's results."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    path, q = ae_zarr
    model = projector()
    cpu, gpu = str(tmp_path / "cpu.zarr"), str(tmp_path / "gpu.zarr")
    infer_field(path, model, cpu, InferSection(device="cpu"), log=None)
    infer_field(path, model, gpu, InferSection(device="auto"), log=None)
    a, b = open_embedding(cpu).values, open_embedding(gpu).values
    assert np.array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3, equal_nan=True)
