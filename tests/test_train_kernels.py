"""``train.kernels``: the compiled training forward is the modules' function; how ``auto``
resolves; ``precision: bfloat16`` only where bf16 GEMMs are native."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aether_scale.config import TrainSection
from aether_scale.loss import AetherLoss, symmetric_info_nce_reference
from aether_scale.model import AEProj, TextProj
from aether_scale.train import loop, runtime
from aether_scale.train.heads import COMPILE_MIN_STEPS, Heads, choose_kernels


def _step(kernels: str, x: torch.Tensor, t: torch.Tensor):
    torch.manual_seed(0)
    ae, txt = AEProj(64, 256, 128), TextProj(384, 128)
    with torch.no_grad():
        ae.gate.fill_(0.4)
    heads = Heads(ae, txt, kernels=kernels).train()
    z, zt = heads(x, t)
    n = t.shape[0]
    out = AetherLoss()(z[:n], z[n:], zt)
    out.loss.backward()
    # the reference's formula on the same features
    ref = (0.2 * symmetric_info_nce_reference(z[:n].detach(), z[n:].detach(), 0.07)
           + 0.8 * symmetric_info_nce_reference(z[:n].detach(), zt.detach(), 0.07))
    assert heads.kernels == kernels  # no silent fall back to the modules
    return float(out.loss.detach()), float(ref), {k: p.grad.clone() for k, p in heads.named_parameters()}


def test_compiled_forward_gives_the_modules_loss_and_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    # a training step's own shapes (batch 512: both AE views, the text): inductor's
    # lowering of the oneDNN product failed on the text head's transposed (384, 512) view
    x = F.normalize(torch.randn(1024, 64, generator=g), dim=1)
    t = F.normalize(torch.randn(512, 384, generator=g), dim=1)
    loss_a, ref_a, grads_a = _step("autograd", x, t)
    loss_c, ref_c, grads_c = _step("compile", x, t)
    assert loss_a == pytest.approx(ref_a, rel=1e-5)
    assert loss_c == pytest.approx(ref_c, rel=1e-5)
    assert loss_c == pytest.approx(loss_a, rel=1e-5)
    for k, ga in grads_a.items():
        torch.testing.assert_close(grads_c[k], ga, rtol=1e-3, atol=1e-6, msg=k)


def test_a_failing_compile_falls_back_to_the_modules(monkeypatch) -> None:
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    x = F.normalize(torch.randn(16, 64), dim=1)
    t = F.normalize(torch.randn(8, 384), dim=1)
    heads = Heads(AEProj(), TextProj(384), kernels="compile").train()
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        z, zt = heads(x, t)
    assert heads.kernels == "autograd" and z.shape == (16, 128) and zt.shape == (8, 128)


def test_auto_kernels_compile_long_cpu_epochs_only() -> None:
    cpu = torch.device("cpu")
    cfg = TrainSection()
    assert choose_kernels(cfg, cpu, COMPILE_MIN_STEPS) == "compile"
    assert choose_kernels(cfg, cpu, COMPILE_MIN_STEPS - 1) == "autograd"
    assert choose_kernels(cfg, torch.device("cuda"), 10_000) == "autograd"
    assert choose_kernels(TrainSection(kernels="autograd"), cpu, 10_000) == "autograd"
    assert "kernels" in loop._RUNTIME_KEYS  # how the forward runs is not what is learned


def test_bfloat16_runs_float32_gemms_where_bf16_is_emulated(monkeypatch) -> None:
    said: list[str] = []
    cfg = TrainSection(precision="bfloat16")
    monkeypatch.setattr(runtime, "bf16_problem", lambda device, key: ("slow", "no native bf16"))
    assert runtime.compute_dtype(cfg, torch.device("cpu"), said.append) == torch.float32
    assert said and "float32" in said[0]
    monkeypatch.setattr(runtime, "bf16_problem", lambda device, key: None)
    assert runtime.compute_dtype(cfg, torch.device("cpu"), said.append) == torch.bfloat16
    monkeypatch.setattr(runtime, "bf16_problem", lambda device, key: ("unsupported", "old GPU"))
    with pytest.raises(ValueError, match="old GPU"):
        runtime.compute_dtype(cfg, torch.device("cpu"), said.append)
    assert runtime.compute_dtype(TrainSection(), torch.device("cpu"), said.append) == torch.float32


def test_a_failing_compiled_backward_falls_back_and_training_goes_on(monkeypatch, tmp_path) -> None:
    """An error raised in the compiled graph's backward (inductor failing to lower an op,
    2026-12-02) must not stop the run: the step is redone with the modules, with a warning."""
    from fixtures import make_problem, small_cfg

    from aether_scale.stores.triplets import write_triplets
    from aether_scale.train import train_model

    class _FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            return z.view_as(z)

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("LoweringException: lowering failed")

    calls = {"compiled": 0}

    def fake_compile(fn, **kw):
        def run(x, t):
            calls["compiled"] += 1
            z, zt = fn(x, t)
            return _FailingBackward.apply(z), zt
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    src = write_triplets(str(tmp_path / "t.zarr"), **make_problem(600, seed=4), chunk_rows=256)
    with pytest.warns(RuntimeWarning, match="compiled backward failed"):
        s = train_model(src, small_cfg(epochs=2, batch_size=128, kernels="compile"),
                        str(tmp_path / "m"), log=None)
    assert calls["compiled"] == 1            # tried once, then the modules
    assert s["kernels"] == "autograd" and s["epochs_run"] == 2
    m = __import__("json").loads((tmp_path / "m" / "metrics.json").read_text())
    assert m["kernels"] == "autograd" and len(m["epochs"]) == 2
    assert all(np.isfinite(e["loss"]) for e in m["epochs"])
