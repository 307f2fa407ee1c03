"""Field inference: the projector over every AE pixel, on threads and on a LocalCluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import torch
import xarray as xr
from fixtures import (
    CHUNK,
    NX,
    NY,
    count_chunk_reads,
    projector,
    random_codes,
    unit,
    write_tiny_ae,
)

from aether_scale import aef
from aether_scale.config import InferSection, load_config
from aether_scale.infer import (
    field_chunk,
    infer_field,
    model_load_count,
    project_pixels,
)
from aether_scale.infer.kernel import project_chunk
from aether_scale.model import TextProj, save_checkpoint
from aether_scale.pipeline import run_stage
from aether_scale.stores import field as field_store
from aether_scale.stores.chunks import CorruptStoreError
from aether_scale.stores.field import int8_cosine_bound, open_field
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


def _adversarial(rng: np.random.Generator) -> np.ndarray:
    """Unit 128-d vectors chosen to hurt the sqrt codec: one-hot (±), all components
    equal, very peaky, k-hot, and vectors whose components sit just past rounding
    midpoints of sqrt(|v|)·127.5 in two levels (the construction nearest the bound)."""
    d, s = 128, aef.SCALE
    rows = [np.eye(d), -np.eye(d), np.sign(rng.normal(size=(5000, d))) / np.sqrt(d)]
    pk = rng.normal(size=(5000, d)) * 10.0 ** rng.uniform(-5, -1, (5000, 1))
    pk[np.arange(5000), rng.integers(0, d, 5000)] = 1.0
    rows.append(pk)
    for k in (2, 3, 8, 32):
        a = np.zeros((2000, d))
        idx = np.argsort(rng.random((2000, d)), axis=1)[:, :k]
        np.put_along_axis(a, idx, rng.normal(size=(2000, k)), axis=1)
        rows.append(a)
    two = []
    for lvl in range(20, 60):
        for na in range(1, d):
            a = ((lvl + 0.5 + 1e-6) / s) ** 4 * na
            if a >= 1:
                break
            m = ((1 - a) / (d - na)) ** 0.25
            two.append([((lvl + 0.5 + 1e-6) / s) ** 2] * na + [m**2] * (d - na))
    rows.append(np.array(two) * np.sign(rng.normal(size=(len(two), d))))
    return unit(np.concatenate(rows))


def test_int8_error_bound_holds_for_every_pixel():
    """The documented bound: every decoded int8 pixel has cosine ≥ 0.999 (proved ≥ 0.99964
    for dim 128) to the float32 projector output — projector outputs on 120k random AE
    pixels and ~25k adversarial unit vectors, through the kernel's own encoder."""
    bound = int8_cosine_bound(128)
    assert 0.99964 < bound < 0.99966 and int8_cosine_bound(64) > bound
    model = projector()
    q = random_codes(400, 300, seed=11).reshape(-1, 64)
    q = q[np.all(q != aef.NODATA, axis=1)]
    want = direct(q.reshape(-1, 1, 64), model).reshape(-1, 128).astype(np.float64)
    codes = project_pixels(q, model, out_dtype="int8")
    # the same encoder on arbitrary unit vectors: a linear identity "projector"
    eye = torch.nn.Linear(128, 128, bias=False)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(128))
    adv = _adversarial(np.random.default_rng(0))
    adv_codes = project_pixels(adv, eye, out_dtype="int8", batch_pixels=4096)
    np.testing.assert_array_equal(np.abs(adv_codes.astype(int) - aef.encode(adv)).max() <= 1, True)
    for got, ref in ((codes, want), (adv_codes, adv.astype(np.float64))):
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        dec = field_store.decode(got)  # what open_field(decode=True) gives
        np.testing.assert_allclose(np.linalg.norm(dec, axis=1), 1, atol=1e-6)
        cos = np.sum(dec.astype(np.float64) * ref, axis=1)
        assert cos.min() >= bound - 1e-6 and cos.min() >= 0.999, cos.min()
    assert len(codes) + len(adv_codes) >= 100_000
    # not vacuous: the two-level vectors come within 2e-5 of the bound, and a coarser
    # codec (scale 64) breaks it on the same pixels
    cos_adv = np.sum(field_store.decode(adv_codes).astype(np.float64) * adv, axis=1)
    assert cos_adv.min() < bound + 2e-5
    coarse = np.rint(np.sign(adv) * np.sqrt(np.abs(adv)) * 20)
    coarse = unit(np.sign(coarse) * coarse**2)
    assert np.sum(coarse * adv, axis=1).min() < 0.999


def test_int8_codec_is_documented_for_third_parties(ae_zarr, tmp_path):
    """The attrs name the codec, its formulas, scale, nodata and error bound, and a plain
    ``xr.open_zarr`` user decoding with them gets what ``open_field(decode=True)`` gives."""
    path, q = ae_zarr
    out = str(tmp_path / "f8.zarr")
    infer_field(path, projector(), out, InferSection(dtype="int8"), progress=False)
    plain = xr.open_zarr(out)["embedding"]
    a = plain.attrs
    assert (a["codec"], a["scale"], a["nodata"], a["dtype"]) == ("aef-sqrt", 127.5, -128, "int8")
    assert "sqrt(abs(v)) * scale" in a["encode"] and "sign(q) * (q / scale) ** 2" in a["decode"]
    assert a["cosine_min"] == 0.99964 and "0.99964" in a["error_bound"]
    assert "0.99964" in field_store.__doc__  # the module says the same
    assert plain.dtype == np.int8 and plain.encoding["chunks"] == (CHUNK, CHUNK, 128)
    c = plain.values.astype(np.float64)
    v = np.sign(c) * (c / a["scale"]) ** 2
    v[np.any(plain.values == a["nodata"], axis=-1)] = np.nan
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    got = open_field(out, decode=True)["embedding"]
    assert got.dtype == np.float32 and got.attrs["dtype"] == "float32"
    assert "codec" not in got.attrs and "aef-sqrt" in got.attrs["decoded_from"]
    np.testing.assert_allclose(got.values, v, atol=1e-6)
    mask = np.any(q == aef.NODATA, axis=-1)
    assert np.array_equal(np.isnan(got.values).all(-1), mask)
    assert not np.isnan(got.values[~mask]).any()
    # float16: documented too, and decode=True widens and renormalises
    out16 = str(tmp_path / "f16.zarr")
    infer_field(path, projector(), out16, InferSection(), progress=False)
    f16 = xr.open_zarr(out16)["embedding"]
    assert f16.attrs["codec"] == "none" and f16.attrs["nodata"] == "NaN"
    g = open_field(out16, decode=True)["embedding"].values
    h = f16.values.astype(np.float32)
    np.testing.assert_allclose(g, h / np.linalg.norm(h, axis=-1, keepdims=True), atol=1e-6)
    # decoded int8 vs float16 field of the same model: cosine ≥ the bound − float16 error
    cos = np.sum(got.values[~mask] * g[~mask], axis=-1)
    assert cos.min() > 0.9995


def test_open_field_reader_selections(ae_zarr, tmp_path):
    """open_field(decode=…): the same values as the raw store for any selection (windows,
    integers, steps, index lists), raw or decoded, and an encoding that cannot re-quantise."""
    path, q = ae_zarr
    out = str(tmp_path / "f8.zarr")
    infer_field(path, projector(), out, InferSection(dtype="int8"), progress=False)
    raw = open_embedding(out).values
    f = open_field(out)["embedding"]
    d = open_field(out, decode=True)["embedding"]
    assert f.dtype == np.int8 and f.attrs["codec"] == "aef-sqrt"
    np.testing.assert_array_equal(f.values, raw)
    dec = field_store.decode(raw)
    np.testing.assert_array_equal(d.values, dec)
    assert d.encoding == {}  # to_zarr of decoded values must not cast them back to int8
    sels = [dict(y=slice(5, 45), x=slice(20, 75)), dict(y=33, x=slice(None, None, 7)),
            dict(y=[1, 40, 69], x=slice(30, 40)), dict(y=slice(60, 10, -3), x=3),
            dict(y=slice(0, 12), x=slice(0, 9))]
    for sel in sels:
        for da, full in ((f, raw), (d, dec)):
            want = full[sel["y"]][:, sel["x"]] if isinstance(sel["y"], list) else \
                full[sel["y"], sel["x"]]
            np.testing.assert_array_equal(da.isel(sel).values, want)
    np.testing.assert_array_equal(d.isel(dim=[0, 5]).values, dec[..., [0, 5]])  # norm: all dims
    assert np.isnan(d.values[:12, :9]).all()  # the masked corner
    with pytest.raises(ValueError, match="chunks="):
        open_field(out, chunks="big")


def test_read_chunks_inside_write_chunks(tmp_path):
    """infer.read_chunk_px: one task and ledger record per 64-px write chunk, stored as
    16-px Zarr chunks (an all-nodata one not stored); the values equal the one-chunk
    layout's; open_field's dask chunks are the write chunks, plain xarray sees the Zarr
    chunks; a window reads only the chunks it touches (a damaged chunk elsewhere does not
    stop it) and a damaged chunk fails naming it."""
    q = random_codes(seed=4)
    q[16:32, 16:32] = aef.NODATA  # exactly Zarr chunk (1, 1)
    ae = str(tmp_path / "ae.zarr")
    write_tiny_ae(ae, codes=q, chunk=64)
    model = projector()
    assert field_store.read_chunk(512) == 128 and field_store.read_chunk(500) == 125
    assert field_store.read_chunk(64, 512) == 64 and field_store.read_chunk(32) == 32
    with pytest.raises(ValueError, match="read_chunk_px 24 must divide"):
        field_store.read_chunk(64, 24)
    one = str(tmp_path / "one.zarr")
    st1 = infer_field(ae, model, one, InferSection(dtype="int8", read_chunk_px=64), progress=False)
    out = str(tmp_path / "f.zarr")
    st = infer_field(ae, model, out, InferSection(dtype="int8", read_chunk_px=16), progress=False)
    assert st1["read_chunks"] == [64, 64] and st["read_chunks"] == [16, 16]
    assert st["chunks"] == [64, 64] and st["n_chunks"] == 4 == st1["n_chunks"]
    index = json.load(open(os.path.join(out, "aether_chunks.json")))["arrays"]["embedding"]
    assert index["chunks"] == [16, 16, 128]
    want = {f"c/{i}/{j}/0" for i in range(5) for j in range(6)} - {"c/1/1/0"}
    assert set(index["stored"]) == want
    np.testing.assert_array_equal(open_embedding(out).values, open_embedding(one).values)
    f = open_field(out)["embedding"]
    assert f.data.chunks[0] == (64, 6) and f.data.chunks[1] == (64, 26)
    assert open_field(out, chunks="read")["embedding"].data.chunksize[:2] == (16, 16)
    plain = xr.open_zarr(out)["embedding"]
    assert plain.encoding["chunks"] == (16, 16, 128)
    np.testing.assert_array_equal(plain[40:60, 50:80].values, f[40:60, 50:80].values)
    # a flipped byte in chunk (4, 5) (same size: found by its checksum, when read)
    chunk = Path(out, "embedding", "c", "4", "5", "0")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    f = open_field(out)["embedding"]
    ref = open_embedding(one).values
    np.testing.assert_array_equal(f[:60, :80].values, ref[:60, :80])
    # the same write chunk (1, 1) as the damaged Zarr chunk: only chunk (4, 4) is read
    np.testing.assert_array_equal(f[64:70, 64:80].values, ref[64:70, 64:80])
    for da in (f, open_field(out, decode=True)["embedding"]):
        with pytest.raises(CorruptStoreError, match=r"f\.zarr: chunk embedding/c/4/5/0 .*damaged"):
            da[64:70, 64:90].load()
    with pytest.raises(CorruptStoreError, match=r"c/4/5/0"):
        open_embedding(out).load()
    # a truncated chunk fails when the store is opened
    chunk.write_bytes(bytes(raw[:-3]))
    with pytest.raises(CorruptStoreError, match=r"embedding/c/4/5/0 has .* bytes.*infer --force"):
        open_field(out)


_KILLED_RUN = """
import sys
sys.path.insert(0, sys.argv[4])
from fixtures import projector
from aether_scale.config import InferSection
from aether_scale.infer import infer_field
infer_field(sys.argv[1], projector(), sys.argv[2], InferSection(dtype="int8", read_chunk_px=16),
            ledger=sys.argv[3], progress=False)
"""


def test_killed_infer_resumes_per_write_chunk(tmp_path):
    """A process killed (SIGKILL) after its 2nd write chunk record: the rerun computes only
    the write chunks without a record, and the store is byte-identical to a clean run's."""
    q = random_codes(130, 140, seed=8)
    ae = str(tmp_path / "ae.zarr")
    write_tiny_ae(ae, codes=q, chunk=64)  # 3 × 3 write chunks of 64 px, 16-px Zarr chunks
    out, led = str(tmp_path / "killed.zarr"), str(tmp_path / "ledger")
    env = {**os.environ, "AETHER_SCALE_KILL_AFTER": "2", "AETHER_SCALE_NO_BAR": "1"}
    tests = str(Path(__file__).resolve().parent)
    res = subprocess.run([sys.executable, "-c", _KILLED_RUN, ae, out, led, tests], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    done = len(list(Path(led).glob("*.json")))
    assert 2 <= done < 9 and not os.path.exists(os.path.join(out, "aether_chunks.json"))
    st = infer_field(ae, projector(), out, InferSection(dtype="int8", read_chunk_px=16),
                     ledger=led, progress=False)
    assert st["chunks_resumed"] == done and st["chunks_computed"] == 9 - done
    clean = str(tmp_path / "clean.zarr")
    infer_field(ae, projector(), clean, InferSection(dtype="int8", read_chunk_px=16),
                progress=False)

    def files(root: str) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
                if p.is_file()}

    got, want = files(out), files(clean)
    assert got == want and sum("embedding/c/" in k for k in got) == 81


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


def test_infer_scheduler_follows_the_cluster_kind():
    from aether_scale.pipeline.registry import infer_in_process, stage

    def cfg(kind, mode="auto", **cl):
        extra = {"address": "tcp://127.0.0.1:1"} if kind == "address" else {}
        return load_config(data={"cluster": {"kind": kind, **extra, **cl},
                                 "infer": {"scheduler": mode}})

    assert infer_in_process(cfg("local")) == 2  # the defaults: 2 workers × 1 thread
    assert infer_in_process(cfg("local", n_workers=3, threads_per_worker=2)) == 6
    for kind in ("address", "gateway", "cuda", "threads", "synchronous"):
        assert infer_in_process(cfg(kind)) is None, kind  # the run's own scheduler
    assert infer_in_process(cfg("local", "cluster")) is None
    assert infer_in_process(cfg("address", "threads")) == 2
    st = stage("infer")
    assert not st.needs_cluster(cfg("local")) and st.needs_cluster(cfg("local", "cluster"))
    assert st.needs_cluster(cfg("gateway"))


_FAULTS = """
import json, resource, torch
from aether_scale.heap import keep_freed_memory
def faults():
    x, w = torch.randn(2048, 64), torch.randn(64, 384)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        (x @ w).relu_()  # a 3 MiB activation, freed at once, as in each projector batch
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
a = faults()
tuned = keep_freed_memory()
faults(); faults()  # the heap settles within a few activations (up to 11 seen), then faults none
print(json.dumps({"before": a, "after": faults(), "tuned": tuned}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_worker_processes_reuse_activations_instead_of_faulting_them_in():
    """dask's nanny sets MALLOC_TRIM_THRESHOLD_ for its workers, which turns each freed
    activation into an munmap and each new one into fresh page faults; infer's tasks
    raise glibc's thresholds there (and leave other processes alone)."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                         text=True, check=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    every_time = 50 * 768  # 768 pages per 3 MiB activation
    assert got["before"] > 0.6 * every_time
    # after: the heap is reused; measured once it has settled (on a Zen 4 host the
    # activations after the change faulted 3-11 times, then never: a single window of 50
    # right after it caught up to 6 of them, 4,608 faults, in 4 of 8 runs)
    assert got["after"] < 0.1 * every_time and got["tuned"] == [8 * 2**20, 32 * 2**20]
    env.pop("MALLOC_TRIM_THRESHOLD_")
    run = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                         text=True, check=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["tuned"] is None and got["after"] < 0.1 * every_time  # glibc adapts itself


def test_local_kind_infers_in_process_and_on_workers_alike(tmp_path, caplog):
    """cluster.kind local: infer's tasks run on threads in this process (no cluster is
    started for it); infer.scheduler cluster sends them to the LocalCluster's worker
    processes instead. The field is the same bytes either way."""
    from aether_scale.pipeline import run_stages

    ws = Workspace(str(tmp_path / "ws"))
    write_tiny_ae(ws.path("ae.zarr"))
    _put_model(ws, "model", 3)
    local = {"kind": "local", "n_workers": 2, "memory_limit": "1GiB"}
    caplog.set_level("INFO")
    run_stages(["infer"], ws, load_config(data={"cluster": local}))
    assert "[infer] tasks on 2 threads in this process (cluster.kind local" in caplog.text
    assert "dask: local cluster" not in caplog.text  # none was started
    threads_run = Path(ws.path("field.zarr"))
    files = {str(p.relative_to(threads_run)): p.read_bytes()
             for p in sorted(threads_run.rglob("*")) if p.is_file()}
    assert "dask_workers" not in json.load(open(ws.manifest_path("infer")))["stats"]
    caplog.clear()
    cfg = load_config(data={"cluster": local, "infer": {"scheduler": "cluster"}})
    res = run_stages(["infer"], ws, cfg, force=True)
    assert not res[0].skipped
    assert "dask: local cluster, 2 workers" in caplog.text
    assert "in this process" not in caplog.text
    stats = json.load(open(ws.manifest_path("infer")))["stats"]
    assert stats["dask_workers"]["workers"] == 2  # measured on the worker processes
    again = {str(p.relative_to(threads_run)): p.read_bytes()
             for p in sorted(threads_run.rglob("*")) if p.is_file()}
    assert again.keys() == files.keys()
    assert [k for k in files if files[k] != again[k]] == []


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


def test_infer_from_a_store_reads_each_window_itself_and_checks_it(tmp_path):
    """From an ae.zarr path every task reads its own window through verified chunk reads
    (no slice of the whole array's dask graph): the field equals the one computed from
    the same codes held in memory, and a flipped byte in an AE chunk is an error naming
    the chunk."""
    path = str(tmp_path / "ae.zarr")
    q = write_tiny_ae(path)
    model = projector()
    a, b = str(tmp_path / "from_store.zarr"), str(tmp_path / "from_memory.zarr")
    infer_field(path, model, a, InferSection())
    from aether_scale.stores.raster import open_embedding

    da_mem = open_embedding(path).load()
    assert np.array_equal(da_mem.values, q)
    infer_field(da_mem, model, b, InferSection())
    fa, fb = xr.open_zarr(a, mask_and_scale=False), xr.open_zarr(b, mask_and_scale=False)
    np.testing.assert_array_equal(fa["embedding"].values, fb["embedding"].values)

    index = json.loads((tmp_path / "ae.zarr" / "aether_chunks.json").read_text())
    key = sorted(index["arrays"]["embedding"]["stored"])[0]
    chunk = tmp_path / "ae.zarr" / "embedding" / key
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x20
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match=f"embedding/{key}"):
        infer_field(path, model, str(tmp_path / "damaged.zarr"), InferSection())


def test_windows_of_one_pass_read_each_chunk_once(tmp_path, monkeypatch):
    """CheckedWindow.reuse: windows of one pass (one token) that lie in the same chunk
    read and verify it once (per process) and give the same pixels as fresh reads; another
    pass (another token) reads it again, so a store changed between runs is re-checked."""
    from aether_scale.stores import chunks as ch
    from aether_scale.stores.reads import CheckedWindow

    path = str(tmp_path / "ae.zarr")
    write_tiny_ae(path)
    ref = ch.StoreRef.of(path, None)
    index = ch.read_index(ref)
    reads = count_chunk_reads(monkeypatch)
    half = CHUNK // 2
    wins = [(0, half, 0, half), (0, half, half, CHUNK), (half, CHUNK, 0, half)]
    fresh = [np.asarray(CheckedWindow.of(ref, "embedding", index, w, fix="-")) for w in wins]
    assert len(reads) == 3
    reads.clear()
    got = [np.asarray(CheckedWindow.of(ref, "embedding", index, w, fix="-", reuse="pass-1"))
           for w in wins]
    assert reads == [(0, 0, 0)]
    for a, b in zip(fresh, got, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.flags.writeable and b.flags.writeable  # the caller's copy, not the cache
    np.asarray(CheckedWindow.of(ref, "embedding", index, wins[0], fix="-", reuse="pass-2"))
    assert reads == [(0, 0, 0), (0, 0, 0)]


class _Poisoned(torch.nn.Module):
    """A projector whose output is +inf, -inf or NaN in one element of chosen rows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(64, 16)

    def forward(self, x):
        y = self.lin(x).clone()
        y[:, 0] = torch.where(x[:, 0] > 0.25, float("inf"), y[:, 0])
        y[:, 5] = torch.where(x[:, 1] < -0.25, float("nan"), y[:, 5])
        y[:, 15] = torch.where(x[:, 2] > 0.25, float("-inf"), y[:, 15])
        y[:, 9] = torch.where(x[:, 3] > 0.25, 1e30, y[:, 9])  # huge but finite
        return y


def test_every_non_finite_row_is_counted_and_nothing_else():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(3000, 64)).astype(np.float32)
    codes = aef.encode(x / np.linalg.norm(x, axis=1, keepdims=True))
    codes[rng.choice(3000, 200, replace=False), 4] = -128  # nodata rows: not counted
    valid = ~(codes == -128).any(axis=1)
    v = aef.decode(codes).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    poisoned = (v[:, 0] > 0.25) | (v[:, 1] < -0.25) | (v[:, 2] > 0.25)
    want = int(np.count_nonzero(poisoned & valid))
    assert 0 < want < valid.sum() and np.count_nonzero((v[:, 3] > 0.25) & valid & ~poisoned)
    for batch in (97, 2048):
        out, m, non_finite = project_chunk(codes, _Poisoned(), batch_pixels=batch,
                                           out_dtype="float16")
        assert (m, non_finite) == (int(valid.sum()), want)
