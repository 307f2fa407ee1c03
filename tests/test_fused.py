"""Mixed precision in training (the module path under bf16 autocast, the loss's bf16
backward), the loss kernel, and the trainer's heap setting."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from fixtures import make_problem, small_cfg

from aether_scale.heap import retained_heap as _retained_heap
from aether_scale.loss import AetherLoss, info_nce_terms, symmetric_info_nce
from aether_scale.model import AEProj, TextProj
from aether_scale.stores.triplets import write_triplets
from aether_scale.train import train_model

BF16_NATIVE = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _heads(hidden: int = 256, out: int = 128, dropout: float = 0.1, dtype=torch.float64):
    torch.manual_seed(0)
    ae = AEProj(64, hidden, out, dropout=dropout).to(dtype)
    txt = TextProj(384, out).to(dtype)
    with torch.no_grad():  # a gate away from its init, so the shortcut matters
        ae.gate.fill_(0.4)
    return ae, txt


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return g


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_bf16_module_path_stays_close_to_float32() -> None:
    from aether_scale.train.heads import Heads

    ae, txt = _heads(dtype=torch.float32)
    x = F.normalize(torch.randn(256, 64), dim=1)
    t = torch.randn(256, 384)
    w = torch.randn(256, 128)
    grads = {}
    outs = {}
    for dt in (torch.float32, torch.bfloat16):
        heads = Heads(ae, txt, kernels="autograd", compute_dtype=dt).train()
        torch.manual_seed(5)
        z, zt = heads(x, t)
        assert z.dtype == zt.dtype == torch.float32  # outputs in the weights' dtype
        ((z + zt) * w).sum().backward()
        outs[dt] = (z.detach(), zt.detach())
        grads[dt] = {**_grads(ae), **{"txt." + k: v for k, v in _grads(txt).items()}}
    for a, b in zip(outs[torch.float32], outs[torch.bfloat16], strict=True):
        assert (a - b).abs().max() < 0.02
    for name, g in grads[torch.float32].items():
        assert _cos(g, grads[torch.bfloat16][name]) > 0.99, name


def test_info_nce_terms_is_the_weighted_sum_of_separate_terms() -> None:
    g = torch.Generator().manual_seed(0)
    zb, za, zp = (F.normalize(torch.randn(12, 6, generator=g, dtype=torch.float64), dim=1).requires_grad_()
                  for _ in range(3))
    for taus in ((0.1, 0.07), (0.01, 0.02)):  # the second takes the per-row/column-shift path
        total, terms = info_nce_terms(zb, (za, zp), taus, (0.3, 0.7))
        sep = [symmetric_info_nce(zb, za, taus[0]), symmetric_info_nce(zb, zp, taus[1])]
        assert not terms.requires_grad
        torch.testing.assert_close(terms, torch.stack(sep).detach(), rtol=1e-12, atol=0)
        grads = torch.autograd.grad(total, (zb, za, zp))
        ref = torch.autograd.grad(0.3 * sep[0] + 0.7 * sep[1], (zb, za, zp))
        for a, b in zip(grads, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        info_nce_terms(zb, (za[:5],), (0.1,), (1.0,))


def test_bf16_loss_and_its_backward_stay_close_to_float32() -> None:
    g = torch.Generator().manual_seed(1)
    zs = [F.normalize(torch.randn(512, 128, generator=g), dim=1).requires_grad_() for _ in range(3)]
    out32 = AetherLoss()(*zs)
    g32 = torch.autograd.grad(out32.loss, zs)
    out16 = AetherLoss(gemm_dtype=torch.bfloat16)(*zs)
    g16 = torch.autograd.grad(out16.loss, zs)
    assert out16.loss.dtype == torch.float32
    # bf16-rounded logits; the exp, the sums and the loss in float32
    assert float(out16.loss) != float(out32.loss)
    assert abs(float(out16.loss) - float(out32.loss)) < 1e-4 * float(out32.loss)
    for a, b in zip(out16[1:], out32[1:], strict=True):
        assert abs(float(a) - float(b)) < 1e-4 * float(b)
    for a, b in zip(g32, g16, strict=True):
        assert b.dtype == torch.float32 and _cos(a, b) > 0.995


@pytest.mark.skipif(not BF16_NATIVE, reason="bf16 training is only worth testing where it is native")
def test_bf16_training_learns_like_float32_and_is_deterministic(tmp_path) -> None:
    data = make_problem(2000, seed=2)
    src = write_triplets(str(tmp_path / "t.zarr"), **data, chunk_rows=512)
    runs = {}
    for name, precision in (("f32", "float32"), ("bf16", "bfloat16"), ("bf16b", "bfloat16")):
        s = train_model(src, small_cfg(epochs=5, batch_size=256, precision=precision),
                        str(tmp_path / name), log=None)
        assert s["precision"] == precision
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())["epochs"]
    l32 = [e["L_AP"] for e in runs["f32"]]
    l16 = [e["L_AP"] for e in runs["bf16"]]
    assert l16[-1] < 0.75 * l16[0]                     # it learns
    assert abs(l16[-1] - l32[-1]) < 0.05 * l32[-1]      # about as well as float32
    assert [e["loss"] for e in runs["bf16"]] == [e["loss"] for e in runs["bf16b"]]


def test_retained_heap_is_scoped_and_can_be_switched_off(monkeypatch) -> None:
    import platform

    monkeypatch.setenv("AETHER_KEEP_MALLOC", "1")
    with _retained_heap() as on:
        assert on is False
    monkeypatch.delenv("AETHER_KEEP_MALLOC")
    with _retained_heap(enabled=False) as on:
        assert on is False
    with _retained_heap() as on:
        assert on is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_to_the_loss_are_computed_in_float32(dtype) -> None:
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(64, 16, generator=g), dim=1)
    y = F.normalize(x + 0.1 * torch.randn(64, 16, generator=g), dim=1)
    ref = float(symmetric_info_nce(x.to(dtype).float(), y.to(dtype).float(), 0.07))
    xh = x.to(dtype).requires_grad_()
    val = symmetric_info_nce(xh, y.to(dtype), 0.07)  # logits up to 14.3: exp overflows fp16
    val.backward()
    assert float(val.detach()) == pytest.approx(ref, rel=1e-5)
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad.float()).all()


def test_precision_is_part_of_the_learned_config(tmp_path) -> None:
    from aether_scale.model import CheckpointError
    from aether_scale.train.loop import _learned_config

    # float32 is the behaviour before the key existed: configs without it still match
    assert _learned_config({"lr": 1e-3}) == _learned_config({"lr": 1e-3, "precision": "float32"})
    assert _learned_config({"lr": 1e-3}) != _learned_config({"lr": 1e-3, "precision": "bfloat16"})
    src = write_triplets(str(tmp_path / "t.zarr"), **make_problem(600, seed=4), chunk_rows=256)
    out = str(tmp_path / "m")
    train_model(src, small_cfg(epochs=1), out, log=None)
    with pytest.raises(CheckpointError, match="precision"):
        train_model(src, small_cfg(epochs=2, precision="bfloat16"), out, log=None, resume=True)
