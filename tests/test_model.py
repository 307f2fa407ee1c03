"""Projectors and checkpoints: the reference architecture, formats, safe loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aether_scale.model import (
    FORMAT,
    AEProj,
    CheckpointError,
    TextProj,
    export_reference,
    load_checkpoint,
    load_projector,
    load_text_projector,
    save_checkpoint,
)

REFERENCE_AE_SHAPES = {
    "gate": (1,),
    "proj.0.weight": (256, 64),
    "proj.0.bias": (256,),
    "proj.2.weight": (128, 256),
    "proj.2.bias": (128,),
    "shortcut.weight": (128, 64),
    "shortcut.bias": (128,),
    "post_mlp.0.weight": (256, 128),
    "post_mlp.0.bias": (256,),
    "post_mlp.3.weight": (128, 256),
    "post_mlp.3.bias": (128,),
}


def _x(n: int = 32, d: int = 64, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_aeproj_has_the_reference_parameters_and_unit_outputs() -> None:
    ae = AEProj()
    assert {k: tuple(v.shape) for k, v in ae.state_dict().items()} == REFERENCE_AE_SHAPES
    assert float(ae.gate.detach()) == -4.0
    ae.eval()
    z = ae(_x())
    assert z.shape == (32, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(32))
    txt = TextProj()
    assert {k: tuple(v.shape) for k, v in txt.state_dict().items()} == {
        "proj.weight": (128, 384), "proj.bias": (128,)}
    torch.testing.assert_close(txt(_x(5, 384)).norm(dim=1), torch.ones(5))


def test_aeproj_forward_is_the_documented_formula() -> None:
    torch.manual_seed(1)
    ae = AEProj(dropout=0.0).eval()
    x = _x()
    h = ae.proj(x) + torch.sigmoid(ae.gate) * ae.shortcut(x)
    h = h / h.norm(dim=1, keepdim=True)
    post = ae.post_mlp[3](F.gelu(ae.post_mlp[0](h)))
    torch.testing.assert_close(ae(x), post / post.norm(dim=1, keepdim=True))


def _trained_like(seed: int = 0) -> tuple[AEProj, TextProj]:
    torch.manual_seed(seed)
    ae, txt = AEProj(), TextProj()
    with torch.no_grad():  # move away from the init so a wrong load would show
        for p in [*ae.parameters(), *txt.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return ae.eval(), txt.eval()


def test_our_checkpoint_round_trips_through_the_reference_format(tmp_path) -> None:
    ae, txt = _trained_like()
    cfg = {"lam": 0.3, "tau_ae": 0.05, "tau_poi": 0.07, "lr": 1e-3, "epochs": 7, "batch_size": 256,
           "in_dim": 64, "text_dim": 384}
    ours = tmp_path / "checkpoint.pt"
    save_checkpoint(ours, ae, txt, config=cfg, epoch=4,
                    metrics={"best": {"epoch": 4, "loss": 1.5, "L_AE": 0.5, "L_AP": 1.75}})
    ck = load_checkpoint(ours)
    assert ck["format"] == FORMAT and ck["source_format"] == FORMAT and ck["epoch"] == 4
    ref_path = tmp_path / "exported.pth"
    ref = export_reference(ours, ref_path)
    assert set(REFERENCE_AE_SHAPES) == set(ref["ae_state_dict"])
    assert ref["temps"] == {"tau_xt": 0.07, "tau_ii": 0.05}
    assert ref["hyper_parameters"]["model"]["lambda"] == 0.3
    assert ref["train_metrics"]["L_xt"] == 1.75
    # the exported file is plain: it loads with weights_only=True
    raw = torch.load(ref_path, weights_only=True)
    assert "format" not in raw and "ae_state_dict" in raw
    back = load_checkpoint(ref_path)
    assert back["source_format"] == "reference"
    assert back["config"]["tau_ae"] == 0.05 and back["config"]["text_dim"] == 384
    x, t = _x(), _x(8, 384)
    with torch.no_grad():
        torch.testing.assert_close(load_projector(ref_path)(x), ae(x), rtol=0, atol=0)
        torch.testing.assert_close(load_projector(ours)(x), ae(x), rtol=0, atol=0)
        torch.testing.assert_close(load_projector(tmp_path)(x), ae(x), rtol=0, atol=0)
        torch.testing.assert_close(load_text_projector(ref_path)(t), txt(t), rtol=0, atol=0)


def test_published_reference_checkpoint_loads_strictly(shared_data) -> None:
    path = shared_data / "aether_reference" / "london_last.pth"
    if not path.exists():
        pytest.skip(f"{path} not present")
    ae = load_projector(path)
    assert not ae.training
    raw = torch.load(path, weights_only=True, map_location="cpu")
    fresh = AEProj()
    fresh.load_state_dict(raw["ae_state_dict"], strict=True)
    fresh.eval()
    x = _x(100)
    with torch.no_grad():
        z = ae(x)
        torch.testing.assert_close(z, fresh(x))
    assert z.shape == (100, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(100))
    assert float(ae.gate.detach()) != -4.0  # trained, not the init
    ck = load_checkpoint(path)
    assert ck["config"]["hidden_dim"] == 256 and ck["config"]["out_dim"] == 128
    assert ck["epoch"] == raw["epoch"]
    # and it re-exports to the same layout and weights
    ref = export_reference(ck)
    for k, v in raw["ae_state_dict"].items():
        assert torch.equal(ref["ae_state_dict"][k], v.cpu())


class _Payload:
    """An arbitrary object whose unpickling would run code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_checkpoint_is_refused_without_running_code(tmp_path) -> None:
    marker = tmp_path / "pwned"
    ae, txt = _trained_like()
    bad = tmp_path / "bad.pt"
    torch.save({"ae_state_dict": ae.state_dict(), "txt_state_dict": txt.state_dict(),
                "payload": _Payload(str(marker))}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_projector(bad)
    assert not marker.exists()


def test_malformed_checkpoints_get_clear_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        load_checkpoint(tmp_path)
    p = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="ae_state_dict"):
        load_checkpoint(p)
    ae, txt = _trained_like()
    sd = dict(ae.state_dict())
    sd.pop("post_mlp.3.weight")  # (a missing gate is a layout: the reference's use_gate=False)
    torch.save({"ae_state_dict": sd, "txt_state_dict": txt.state_dict()}, p)
    with pytest.raises(CheckpointError, match="post_mlp.3.weight"):
        load_projector(p)
    sd = dict(ae.state_dict())
    sd.pop("shortcut.bias")  # half a shortcut fits no layout
    torch.save({"ae_state_dict": sd, "txt_state_dict": txt.state_dict()}, p)
    with pytest.raises(CheckpointError, match="shortcut"):
        load_projector(p)


def test_cpu_dropout_matches_dropout_semantics():
    """The cheaper CPU dropout drops a fraction p, scales kept values by 1/(1-p),
    back-propagates through the same mask, is the identity in eval, and is seeded by torch."""
    import torch

    from aether_scale.model import Dropout

    d = Dropout(0.1)
    x = torch.ones(800, 500, requires_grad=True)
    torch.manual_seed(3)
    y = d(x)
    frac = float((y == 0).float().mean())
    assert abs(frac - 0.1) < 0.003
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)
    torch.manual_seed(3)
    assert torch.equal(d(x), y)  # same seed, same mask
    assert not torch.equal(d(x), y)  # the stream moves on
    d.eval()
    assert torch.equal(d(x), x)
    # no parameters: the reference state-dict layout is unchanged
    assert list(Dropout(0.5).state_dict()) == []


# --------------------------------------------------------------------------- reference layouts
def _reference_state(hidden: int, gate: bool, out: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An AE state dict as the reference's AEProj(d_out=out, hidden=hidden, use_gate=gate)
    names and shapes it: a 256-wide first layer whatever ``hidden``, no shortcut weights
    when the output is 64-d (an identity), no gate when use_gate=False."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"proj.0.weight": (256, 64), "proj.0.bias": (256,), "proj.2.weight": (out, 256),
              "proj.2.bias": (out,), "post_mlp.0.weight": (hidden, out),
              "post_mlp.0.bias": (hidden,), "post_mlp.3.weight": (out, hidden),
              "post_mlp.3.bias": (out,)}
    if out != 64:
        shapes |= {"shortcut.weight": (out, 64), "shortcut.bias": (out,)}
    if gate:
        shapes["gate"] = (1,)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}


def _reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The reference projector's arithmetic, written out from its documented formula."""
    main = F.linear(F.relu(F.linear(x, sd["proj.0.weight"], sd["proj.0.bias"])),
                    sd["proj.2.weight"], sd["proj.2.bias"])
    res = F.linear(x, sd["shortcut.weight"], sd["shortcut.bias"]) if "shortcut.weight" in sd else x
    h = main + (torch.sigmoid(sd["gate"]) * res if "gate" in sd else res)
    h = F.normalize(h, dim=-1)
    post = F.linear(F.gelu(F.linear(h, sd["post_mlp.0.weight"], sd["post_mlp.0.bias"])),
                    sd["post_mlp.3.weight"], sd["post_mlp.3.bias"])
    return F.normalize(post, dim=-1)


@pytest.mark.parametrize("hidden,gate,out", [(256, True, 128), (512, True, 128), (512, False, 128),
                                             (128, False, 128), (256, True, 64)])
def test_every_reference_layout_loads_and_exports_back(tmp_path, hidden, gate, out) -> None:
    """Reference checkpoints of any hidden width, with or without the gate (and with the
    identity shortcut of a 64-d output) load strictly and give the reference's outputs;
    export_reference writes them back as the reference's load_head reads them (it takes
    out_dim from proj.2, hidden from post_mlp.0 and the gate from the key's presence)."""
    sd = _reference_state(hidden, gate, out)
    txt = {"proj.weight": 0.1 * torch.randn(out, 384), "proj.bias": torch.zeros(out)}
    src = tmp_path / "ref.pth"
    torch.save({"ae_state_dict": sd, "txt_state_dict": txt, "epoch": 9,
                "hyper_parameters": {"model": {"hidden_dim": hidden, "out_dim": out}}}, src)
    ae = load_projector(src)
    assert ae.layout() == {"in_dim": 64, "proj_dim": 256, "hidden_dim": hidden, "out_dim": out,
                           "use_gate": gate, "shortcut": "identity" if out == 64 else "linear"}
    x = _x()
    torch.testing.assert_close(ae(x), _reference_forward(sd, x), rtol=1e-6, atol=1e-6)
    back = tmp_path / "back.pth"
    export_reference(load_checkpoint(src), back)
    raw = torch.load(back, weights_only=True)
    assert raw["ae_state_dict"].keys() == sd.keys()
    assert all(torch.equal(raw["ae_state_dict"][k], sd[k]) for k in sd)
    r = raw["ae_state_dict"]
    assert (r["proj.2.weight"].shape[0], r["post_mlp.0.weight"].shape[0], "gate" in r) == \
        (out, hidden, gate)
    assert raw["hyper_parameters"]["model"]["hidden_dim"] == hidden


def test_a_first_layer_the_reference_cannot_build_is_not_exported(tmp_path) -> None:
    ae, txt = AEProj(proj_dim=128), TextProj()
    p = tmp_path / "ck.pt"
    save_checkpoint(p, ae, txt, config={"in_dim": 64, "text_dim": 384, "proj_dim": 128},
                    epoch=0)
    assert load_projector(p).layout()["proj_dim"] == 128  # ours loads it
    with pytest.raises(CheckpointError, match="train.proj_dim=256"):
        export_reference(p)


def test_the_defaults_are_the_reference_training_config() -> None:
    from aether_scale.config import TrainSection

    t = TrainSection()
    assert (t.dropout, t.proj_dim, t.hidden_dim, t.use_gate, t.val_fraction) == \
        (0.0, 256, 256, True, 0.0)
    assert AEProj().post_mlp[2].p == 0.0
