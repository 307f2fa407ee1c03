"""The fused CPU training kernels and mixed precision: same function as the modules, same training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from fixtures import make_problem, small_cfg

from aether_scale.loss import AetherLoss, info_nce_terms, symmetric_info_nce
from aether_scale.model import AEProj, TextProj
from aether_scale.stores.triplets import write_triplets
from aether_scale.train import train_model
from aether_scale.train.fused import (
    _AEProjTrain,
    _TextProjTrain,
    fused_ae_forward,
    fused_text_forward,
)
from aether_scale.train.runtime import retained_heap as _retained_heap

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


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dims", [(256, 128), (96, 40)])
def test_fused_ae_kernel_is_the_module_in_float64(train: bool, dims) -> None:
    ae, _ = _heads(*dims)
    ae.train(train)
    x = torch.randn(53, 64, dtype=torch.float64)
    w = torch.randn(53, dims[1], dtype=torch.float64)
    torch.manual_seed(11)
    ref = ae(x)
    (ref * w).sum().backward()
    g_ref = _grads(ae)
    torch.manual_seed(11)  # same RNG state: the same dropout mask
    out = fused_ae_forward(ae, x)
    (out * w).sum().backward()
    g = _grads(ae)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    assert g.keys() == g_ref.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)
    if train:  # dropout really acted: without it the output differs
        ae.eval()
        assert (fused_ae_forward(ae, x) - out).abs().max() > 1e-3


def test_fused_kernels_pass_gradcheck() -> None:
    ae, txt = _heads(24, 12)
    x = torch.randn(9, 64, dtype=torch.float64)
    t = torch.randn(9, 384, dtype=torch.float64)

    def ae_kernel(*ps):
        torch.manual_seed(3)  # the same dropout mask at every evaluation
        return _AEProjTrain.apply(x, *ps, 0.1, torch.float64)

    order = [ae.proj[0].weight, ae.proj[0].bias, ae.proj[2].weight, ae.proj[2].bias,
             ae.shortcut.weight, ae.shortcut.bias, ae.gate, ae.post_mlp[0].weight,
             ae.post_mlp[0].bias, ae.post_mlp[3].weight, ae.post_mlp[3].bias]
    # fast_mode: checks the analytic Jacobian against finite differences along random
    # directions (torch's documented fast gradcheck) — the 64→256 first layer has 16k
    # weights, and the element-wise check took over a minute of the default test run
    assert torch.autograd.gradcheck(ae_kernel, tuple(p.detach().clone().requires_grad_()
                                                     for p in order), fast_mode=True)
    tw = tuple(p.detach().clone().requires_grad_() for p in (txt.proj.weight, txt.proj.bias))
    assert torch.autograd.gradcheck(lambda w, b: _TextProjTrain.apply(t, w, b, torch.float64), tw,
                                    fast_mode=True)


def test_fused_text_kernel_is_the_module() -> None:
    _, txt = _heads()
    t = torch.randn(31, 384, dtype=torch.float64)
    w = torch.randn(31, 128, dtype=torch.float64)
    (txt(t) * w).sum().backward()
    g_ref = _grads(txt)
    out = fused_text_forward(txt, t)
    (out * w).sum().backward()
    torch.testing.assert_close(out, txt(t))
    for name, g in _grads(txt).items():
        torch.testing.assert_close(g, g_ref[name], rtol=1e-10, atol=1e-12)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_bf16_kernels_stay_close_to_float32() -> None:
    ae, txt = _heads(dtype=torch.float32)
    ae.train()
    x = F.normalize(torch.randn(256, 64), dim=1)
    t = torch.randn(256, 384)
    w = torch.randn(256, 128)
    grads = {}
    outs = {}
    for dt in (torch.float32, torch.bfloat16):
        torch.manual_seed(5)
        z = fused_ae_forward(ae, x, dt)
        zt = fused_text_forward(txt, t, dt)
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


def test_bf16_loss_backward_stays_close_to_float32() -> None:
    g = torch.Generator().manual_seed(1)
    zs = [F.normalize(torch.randn(512, 128, generator=g), dim=1).requires_grad_() for _ in range(3)]
    out32 = AetherLoss()(*zs)
    g32 = torch.autograd.grad(out32.loss, zs)
    out16 = AetherLoss(grad_dtype=torch.bfloat16)(*zs)
    g16 = torch.autograd.grad(out16.loss, zs)
    assert float(out16.loss.detach()) == float(out32.loss.detach())  # the forward stays float32
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


def test_fused_kernels_refuse_inputs_that_need_a_gradient() -> None:
    ae, txt = _heads()
    with pytest.raises(ValueError, match="no gradient for its input"):
        fused_ae_forward(ae, torch.randn(4, 64, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="no gradient for its input"):
        fused_text_forward(txt, torch.randn(4, 384, dtype=torch.float64, requires_grad=True))


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


def test_module_path_and_fused_path_of_the_trainer_agree() -> None:
    """The trainer runs the fused kernels on CPU and the modules elsewhere (CUDA): same math."""
    from aether_scale.train.loop import _Heads

    ae, txt = _heads(dtype=torch.float32)
    x = F.normalize(torch.randn(64, 64), dim=1)   # base and augmented views, 32 each
    t = F.normalize(torch.randn(32, 384), dim=1)
    grads = []
    for kernels in ("fused", "autograd"):
        heads = _Heads(ae, txt, kernels=kernels).train()
        torch.manual_seed(9)
        z, zt = heads(x, t)
        AetherLoss()(z[:32], z[32:], zt).loss.backward()
        grads.append({n: p.grad.clone() for n, p in heads.named_parameters()})
        heads.zero_grad(set_to_none=True)
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    # the module path under bf16 autocast (what CUDA runs with train.precision: bfloat16)
    heads = _Heads(ae, txt, kernels="autograd", compute_dtype=torch.bfloat16).train()
    torch.manual_seed(9)
    z, zt = heads(x, t)
    assert z.dtype == zt.dtype == torch.float32
    AetherLoss(grad_dtype=torch.bfloat16)(z[:32], z[32:], zt).loss.backward()
    for name, p in heads.named_parameters():
        assert torch.isfinite(p.grad).all() and _cos(p.grad, grads[0][name]) > 0.98, name


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
