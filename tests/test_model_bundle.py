"""The portable model bundle: safetensors weights, ONNX projectors, the model card."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from fixtures import projector
from safetensors.torch import load_file, save_file

from aether_scale import aef
from aether_scale.export.bundle import (
    AE_ONNX,
    CARD_JSON,
    CARD_MD,
    TEXT_ONNX,
    BundleError,
    _export_onnx,
    export_model,
)
from aether_scale.model import (
    BUNDLE_WEIGHTS,
    CheckpointError,
    TextProj,
    export_reference,
    load_checkpoint,
    load_projector,
    load_text_projector,
    save_checkpoint,
)

ENCODER = {"model": "all-MiniLM-L6-v2", "model_key": "0123456789abcdef0123", "dim": 384,
           "normalize": True}
HISTORY = [{"epoch": 0, "loss": 6.0, "L_AE": 5.0, "L_AP": 6.2, "lr_end": 5e-4, "seconds": 0.1},
           {"epoch": 1, "loss": 5.5, "L_AE": 3.0, "L_AP": 6.1, "lr_end": 1e-5, "seconds": 0.1}]


@pytest.fixture
def model_dir(tmp_path) -> str:
    """A ``model/`` folder as train leaves it: checkpoint.pt (with its text encoder) and
    metrics.json."""
    d = tmp_path / "model"
    d.mkdir()
    torch.manual_seed(3)
    cfg = {"epochs": 2, "lr": 1e-3, "dropout": 0.1, "in_dim": 64, "text_dim": 384,
           "n_triplets": 1234, "text_encoder": ENCODER}
    save_checkpoint(d / "checkpoint.pt", projector(), TextProj().eval(), config=cfg, epoch=1,
                    metrics={"best": HISTORY[1], "epochs": HISTORY})
    (d / "metrics.json").write_text(json.dumps({"epochs": HISTORY, "best": HISTORY[1]}))
    return str(d)


def _codes(n: int, seed: int) -> np.ndarray:
    """Random valid int8 AE codes (no nodata)."""
    return np.random.default_rng(seed).integers(-127, 128, size=(n, 64), dtype=np.int8)


def test_safetensors_round_trip_and_loading_a_bundle_like_a_model_folder(model_dir, tmp_path):
    out = tmp_path / "bundle"
    card = export_model(model_dir, out, onnx=False)
    assert sorted(os.listdir(out)) == sorted([CARD_JSON, CARD_MD, BUNDLE_WEIGHTS])
    ck = load_checkpoint(model_dir)
    weights = load_file(out / BUNDLE_WEIGHTS)
    assert sorted(weights) == sorted([f"ae.{k}" for k in ck["ae_state_dict"]]
                                     + [f"txt.{k}" for k in ck["txt_state_dict"]])
    for head in ("ae", "txt"):
        for k, v in ck[f"{head}_state_dict"].items():
            assert weights[f"{head}.{k}"].dtype == torch.float32
            assert torch.equal(weights[f"{head}.{k}"], v)
    from safetensors import safe_open

    with safe_open(out / BUNDLE_WEIGHTS, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "aether_scale/bundle" and meta["format_version"] == "1"
    assert (meta["in_dim"], meta["hidden_dim"], meta["out_dim"], meta["text_dim"]) == (
        "64", "256", "128", "384")
    assert json.loads(meta["text_encoder"]) == ENCODER and float(meta["dropout"]) == 0.1
    assert card["files"][BUNDLE_WEIGHTS]["bytes"] == os.path.getsize(out / BUNDLE_WEIGHTS)

    # the bundle folder and its .safetensors load wherever a model folder does
    x = F.normalize(torch.from_numpy(aef.decode(_codes(300, 0))), dim=1)
    t = F.normalize(torch.randn(50, 384), dim=1)
    with torch.no_grad():
        want, want_t = load_projector(model_dir)(x), load_text_projector(model_dir)(t)
        for src in (out, out / BUNDLE_WEIGHTS, str(out)):
            assert torch.equal(load_projector(src)(x), want)
            assert torch.equal(load_text_projector(src)(t), want_t)
    b = load_checkpoint(out)
    assert b["source_format"] == "safetensors" and b["epoch"] == 1
    assert b["config"]["text_encoder"] == ENCODER and b["config"]["n_triplets"] == 1234
    assert b["metrics"]["best"] == HISTORY[1]
    assert export_reference(out)["train_metrics"]["L_xt"] == HISTORY[1]["L_AP"]


def test_onnx_matches_torch_at_any_batch_size_and_normalises_inside(model_dir, tmp_path):
    out = tmp_path / "bundle"
    card = export_model(model_dir, out)
    m = onnx.load(out / AE_ONNX)
    assert [i.name for i in m.graph.input] == ["ae"]
    assert [o.name for o in m.graph.output] == ["embedding"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["text_encoder"])["model_key"] == ENCODER["model_key"]
    sess = ort.InferenceSession(str(out / AE_ONNX), providers=["CPUExecutionProvider"])
    ae = load_projector(model_dir)
    for n, seed in ((1, 1), (1000, 2), (37, 3)):
        x = aef.decode(_codes(n, seed))  # de-quantised, NOT normalised
        got = sess.run(["embedding"], {"ae": x})[0]
        with torch.no_grad():
            want = ae(F.normalize(torch.from_numpy(x), dim=1)).numpy()
        assert got.shape == (n, 128) and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-5
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        # the graph normalises: any positive scale of the input gives the same output
        np.testing.assert_allclose(sess.run(["embedding"], {"ae": 7.5 * x})[0], got, atol=1e-6)
    x = aef.decode(_codes(4, 4))
    x[2] = np.nan  # nodata passed as NaN comes back NaN, as in field.zarr
    got = sess.run(["embedding"], {"ae": x})[0]
    assert np.isnan(got[2]).all() and np.isfinite(got[[0, 1, 3]]).all()
    assert 0 <= card["onnx"]["ae_projector"]["max_abs_diff"] <= 1e-5

    tsess = ort.InferenceSession(str(out / TEXT_ONNX), providers=["CPUExecutionProvider"])
    t = F.normalize(torch.randn(1000, 384), dim=1)
    with torch.no_grad():
        want_t = load_text_projector(model_dir)(t).numpy()
    assert np.abs(tsess.run(["embedding"], {"text": t.numpy()})[0] - want_t).max() <= 1e-5
    assert np.abs(tsess.run(["embedding"], {"text": t[:1].numpy()})[0] - want_t[:1]).max() <= 1e-5

    # the recorded hashes are those of the files
    import hashlib

    for name, f in card["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == f["sha256"]


def test_an_export_that_does_not_match_torch_is_refused(tmp_path):
    ae = projector()
    x = aef.decode(_codes(20, 5))
    with pytest.raises(BundleError, match=r"ae\.onnx: onnxruntime differs from torch"):
        _export_onnx(ae, str(tmp_path / "ae.onnx"), "ae", x, {},
                     reference=lambda t: ae(t) + 1e-3)


def test_card_records_encoder_losses_and_input_contract(model_dir, tmp_path):
    card = export_model(model_dir, tmp_path / "b", onnx=False, variant="noaug")
    assert card == json.loads((tmp_path / "b" / CARD_JSON).read_text())
    md = (tmp_path / "b" / CARD_MD).read_text()
    assert card["name"] == "AETHER_noaug" and card["variant"] == "noaug"
    assert card["text_encoder"] == {**ENCODER, "known": True}
    assert ENCODER["model_key"] in md and ENCODER["model"] in md
    assert card["training_data"]["n_triplets"] == 1234
    assert card["losses"]["epochs"] == HISTORY and card["losses"]["final"] == HISTORY[-1]
    assert card["losses"]["best"] == HISTORY[1]
    assert card["architecture"]["ae_projector"]["in_dim"] == 64
    assert "Linear(64,256)" in md and "sign(q)·(q/127.5)²" in md and "−128" in md
    assert card["evaluation"] is None and card["onnx"] == {}
    assert card["files"][BUNDLE_WEIGHTS]["sha256"] in md


def test_a_reference_checkpoint_says_its_text_encoder_is_unknown(model_dir, tmp_path):
    ref = tmp_path / "aether.pth"
    export_reference(model_dir, ref)
    card = export_model(str(ref), tmp_path / "b", onnx=False)
    assert card["text_encoder"]["known"] is False
    assert "Unknown" in (tmp_path / "b" / CARD_MD).read_text()
    assert load_checkpoint(tmp_path / "b")["config"]["text_encoder"] is None


def test_export_errors_name_the_folder_and_the_fix(model_dir, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty_model has no checkpoint\.pt: run "
                                              r"`aether-scale train` first"):
        export_model(str(empty), tmp_path / "b")
    with pytest.raises(CheckpointError, match="does not exist: run `aether-scale train` first"):
        export_model(str(tmp_path / "nope"), tmp_path / "b")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"busy exists and is not empty.*overwrite=True"):
        export_model(model_dir, busy)
    export_model(model_dir, busy, overwrite=True)
    assert (busy / AE_ONNX).exists() and (busy / "notes.txt").read_text() == "keep me"
    export_model(model_dir, busy, overwrite=True, onnx=False)  # stale ONNX files go
    assert not (busy / AE_ONNX).exists() and not (busy / TEXT_ONNX).exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    with pytest.raises(BundleError, match=r"workspace .*nows does not exist"):
        export_model(model_dir, tmp_path / "c", workspace=str(tmp_path / "nows"))
    with pytest.raises(CheckpointError, match="no checkpoint.pt .* and no model.safetensors"):
        load_projector(empty)


def test_a_safetensors_file_without_our_metadata_or_keys_is_refused(model_dir, tmp_path):
    ck = load_checkpoint(model_dir)
    tensors = {f"ae.{k}": v for k, v in ck["ae_state_dict"].items()}
    tensors.update({f"txt.{k}": v for k, v in ck["txt_state_dict"].items()})
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, plain)  # no metadata
    with pytest.raises(CheckpointError, match=r"plain\.safetensors: metadata format None.*"
                                              r"re-export the bundle"):
        load_checkpoint(plain)
    meta = {"format": "aether_scale/bundle", "format_version": "1"}
    part = tmp_path / "part.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "ae.proj.0.bias"}, part, metadata=meta)
    with pytest.raises(CheckpointError,
                       match=r"part\.safetensors: ae_state_dict lacks \['proj\.0\.bias'\]"):
        load_projector(part)
    odd = tmp_path / "odd.safetensors"
    save_file({**tensors, "head.w": torch.zeros(2)}, odd, metadata=meta)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: tensors \['head\.w'\]"):
        load_checkpoint(odd)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={**meta, "config": "{not json"})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: metadata .* malformed"):
        load_checkpoint(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors could not be read"):
        load_checkpoint(junk)
    minimal = tmp_path / "minimal.safetensors"  # format alone is enough: dims from the shapes
    save_file(tensors, minimal, metadata=meta)
    x = F.normalize(torch.randn(5, 64), dim=1)
    with torch.no_grad():
        assert torch.equal(load_projector(minimal)(x), load_projector(model_dir)(x))


def test_bundle_of_the_tiny_demo_records_its_workspace_and_reproduces_its_field(
        tiny_demo, tmp_path, model_dir):
    from aether_scale.stores.ae import open_ae
    from aether_scale.stores.field import open_field
    from aether_scale.workspace import Workspace

    ws_dir = tiny_demo["workspace"]
    ws = Workspace(ws_dir)
    card = export_model(str(ws_dir / "model"), tmp_path / "bundle", workspace=str(ws_dir))
    ck = load_checkpoint(ws_dir / "model")
    text, pois, pool = (ws.manifest(s)["stats"] for s in ("text", "pois", "pool"))
    assert card["name"] == "AETHER" and card["variant"] == ""
    te = card["text_encoder"]
    assert te["known"] and te["model_key"] == text["model_key"] == ck["config"]["text_encoder"][
        "model_key"]
    assert te["model"] == ck["config"]["text_encoder"]["model"] and te["dim"] == 384
    md = (tmp_path / "bundle" / CARD_MD).read_text()
    assert te["model_key"] in md and te["model"] in md
    td = card["training_data"]
    assert td["n_triplets"] == pool["n_triplets"] == td["triplets"]["n_triplets"]
    assert td["pois"]["rows_read"] == pois["rows_read"] and td["pois"]["kept"] == pois["kept"]
    assert td["pois"]["dropped"] == pois["dropped"]
    assert td["texts"] == {"rows": text["rows"], "unique": text["distinct_texts"]}
    history = json.loads((ws_dir / "model" / "metrics.json").read_text())["epochs"]
    assert card["losses"]["epochs"] == history and len(history) == 3
    assert card["losses"]["best"]["L_AP"] == min(e["L_AP"] for e in history)
    report = json.loads((ws_dir / "report" / "metrics.json").read_text())
    ev = card["evaluation"]
    f1 = ev["rows"]["luc"]["f1"]
    assert f1["mean"] == pytest.approx(np.mean(report["luc"]["AETHER"]["f1"]))
    assert f1["std"] == pytest.approx(np.std(report["luc"]["AETHER"]["f1"]))
    assert ev["rows"]["sdm"]["kl"]["n_seeds"] == 2 and "l1" in ev["rows"]["sdm"]
    assert ev["baseline_AE"]["luc"]["f1"]["mean"] == pytest.approx(
        np.mean(report["luc"]["AE"]["f1"]))
    assert "| luc | f1 |" in md

    # every pixel of the demo through the ONNX graph equals field.zarr to float16 precision
    codes = open_ae(ws_dir / "ae.zarr")["embedding"].values
    field = open_field(ws_dir / "field.zarr")["embedding"].values
    x = aef.decode(codes.reshape(-1, codes.shape[-1]))  # nodata → NaN
    sess = ort.InferenceSession(str(tmp_path / "bundle" / AE_ONNX),
                                providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {"ae": x})[0]
    want = field.reshape(-1, field.shape[-1]).astype(np.float32)
    valid = aef.valid_mask(codes).ravel()
    assert valid.sum() > 1000 and (~valid).any()
    assert np.isnan(got[~valid]).all() and np.isnan(want[~valid]).all()
    np.testing.assert_allclose(got[valid], want[valid], rtol=2**-10, atol=1e-6)

    # a variant's bundle is named after its folder and carries its own evaluation rows
    card2 = export_model(str(ws_dir / "model_noaug"), tmp_path / "noaug", workspace=ws,
                         onnx=False)
    assert card2["name"] == "AETHER_noaug" and card2["evaluation"]["method"] == "AETHER_noaug"
    assert card2["evaluation"]["rows"]["luc"]["f1"]["mean"] == pytest.approx(
        np.mean(report["luc"]["AETHER_noaug"]["f1"]))
    assert sorted(os.listdir(ws_dir / "model")) == ["checkpoint.pt", "last.pt", "metrics.json"]
    # a model trained on other texts is not described with this workspace's counts
    with pytest.raises(BundleError, match=r"text\.json: the workspace's texts were embedded by "
                                          r"encoder \w+, the model was trained on 0123456789"):
        export_model(model_dir, tmp_path / "other", workspace=ws, onnx=False)


def test_a_bundle_on_object_storage_loads_like_a_model_folder(model_dir, tmp_path):
    """stores.models.load_projector (what infer uses for URLs) finds model.safetensors in a
    remote folder that has no checkpoint.pt."""
    import fsspec

    from aether_scale.stores.models import load_projector as load_remote

    out = tmp_path / "bundle"
    export_model(model_dir, out, onnx=False)
    fs = fsspec.filesystem("memory")
    fs.put(str(out / BUNDLE_WEIGHTS), f"/bundles/b1/{BUNDLE_WEIGHTS}")
    x = F.normalize(torch.from_numpy(aef.decode(_codes(64, 1))), dim=1)
    with torch.no_grad():
        assert torch.equal(load_remote("memory://bundles/b1")(x), load_projector(model_dir)(x))
    with pytest.raises(CheckpointError, match="no checkpoint.pt.*no model.safetensors"):
        load_remote("memory://bundles/none")
