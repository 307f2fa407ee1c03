"""aether_scale.gemm: float32 CPU products through oneDNN, the same numbers as torch's own."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aether_scale import gemm
from aether_scale.config import TrainSection
from aether_scale.model import AEProj


@pytest.fixture
def gemm_env(monkeypatch):
    """Set AETHER_CPU_GEMM for one test; the process's answer is read again after it."""
    def use(value: str | None) -> str:
        if value is None:
            monkeypatch.delenv(gemm.ENV, raising=False)
        else:
            monkeypatch.setenv(gemm.ENV, value)
        return gemm.backend(refresh=True)
    yield use
    monkeypatch.delenv(gemm.ENV, raising=False)
    gemm.backend(refresh=True)


def test_this_machine_takes_the_onednn_path(gemm_env) -> None:
    # x86 CPU builds of torch carry oneDNN; the one-time check must pass on them
    assert gemm_env(None) == "onednn"
    assert gemm_env("blas") == "blas"
    assert not gemm.use_onednn(torch.ones(2, 2))
    assert gemm_env("onednn") == "onednn"
    assert gemm.use_onednn(torch.ones(2, 2))


def test_a_bad_setting_names_the_variable(gemm_env) -> None:
    with pytest.raises(ValueError, match="AETHER_CPU_GEMM='mkl'"):
        gemm_env("mkl")


def test_linear_matches_nn_linear_forward_and_backward(gemm_env) -> None:
    assert gemm_env(None) == "onednn"
    torch.manual_seed(0)
    ours = gemm.Linear(300, 160)
    ref = nn.Linear(300, 160)
    ref.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == {"weight", "bias"}
    x = torch.randn(1000, 300, requires_grad=True)
    g = torch.randn(1000, 160)
    y, y_ref = ours(x), ref(x)
    assert y.dtype == torch.float32 and y.shape == (1000, 160)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y, (x, ours.weight, ours.bias), g)
    want = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the input needs no gradient (data): only the weight's and the bias's are formed
    xd = x.detach()
    gw, gb = torch.autograd.grad(ours(xd), (ours.weight, ours.bias), g)
    torch.testing.assert_close(gw, want[1], rtol=1e-4, atol=1e-4)


def test_mm_nt_reads_transposed_views(gemm_env) -> None:
    assert gemm_env(None) == "onednn"
    g = torch.Generator().manual_seed(3)
    a = torch.randn(128, 257, generator=g)
    b = torch.randn(96, 257, generator=g)
    for aa, bb in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):
        torch.testing.assert_close(gemm.mm_nt(aa, bb), a @ b.t(), rtol=1e-4, atol=1e-4)
    big = torch.randn(257, 128, generator=g)  # (k, m): its .t() is a strided (m, k) view
    torch.testing.assert_close(gemm.mm_nt(big.t(), b), big.t() @ b.t(), rtol=1e-4, atol=1e-4)


def test_other_dtypes_and_autocast_take_torchs_own_path(gemm_env) -> None:
    assert gemm_env(None) == "onednn"
    lin = gemm.Linear(64, 32)
    x = torch.randn(16, 64)
    assert not gemm.use_onednn(x.double())
    assert not gemm.use_onednn(x[None])           # batched: nn.Linear's own forward
    assert lin(x[None]).shape == (1, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.use_onednn(x)
        assert lin(x).dtype == torch.bfloat16       # autocast still applies to the layer


def test_blas_setting_gives_the_same_projector_output(gemm_env) -> None:
    torch.manual_seed(1)
    model = AEProj(64, 256, 128).eval()
    x = F.normalize(torch.randn(4096, 64), dim=1)
    outs = {}
    for setting in ("blas", None):
        gemm_env(setting)
        with torch.no_grad():
            outs[setting] = model(x)
    torch.testing.assert_close(outs[None], outs["blas"], rtol=0, atol=2e-6)


def test_compile_keeps_the_onednn_product(gemm_env) -> None:
    assert gemm_env(None) == "onednn"
    torch.manual_seed(2)
    lin = gemm.Linear(48, 24)
    ref = nn.Linear(48, 24)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(256, 48, requires_grad=True)

    def f(m, x):
        return torch.relu(m(x)).square().sum()

    got = torch.compile(f)(lin, x)
    (gx,) = torch.autograd.grad(got, (x,))
    want = f(ref, x)
    (gx_ref,) = torch.autograd.grad(want, (x,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)


def test_a_torchscript_trace_records_torchs_own_linear(gemm_env) -> None:
    assert gemm_env(None) == "onednn"
    model = AEProj(64, 256, 128).eval()
    x = F.normalize(torch.randn(8, 64), dim=1)
    traced = torch.jit.trace(model, (x,))
    assert "aether::linear" not in str(traced.graph)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
    assert gemm.backend() == "onednn"  # the trace did not turn the fast path off


def test_the_eager_path_does_not_import_the_compiler(tmp_path) -> None:
    """A custom op's first call imports torch._dynamo (~1.1 s a process): the eager forward
    and backward, which the infer command and every worker run, must not pay it."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from aether_scale.model import AEProj\n"
            "m = AEProj()\n"
            "m(torch.randn(32, 64)).sum().backward()\n"
            "with torch.inference_mode():\n"
            "    m(torch.randn(32, 64))\n"
            "from aether_scale import gemm\n"
            "assert gemm.backend() == 'onednn', gemm.backend()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={k: v for k, v in __import__("os").environ.items()
                                          if k != gemm.ENV})
    assert out.stdout.strip() == "False", out.stderr


def test_calibrate_keeps_the_faster_path_of_its_own_measurement(gemm_env) -> None:
    """``auto``: both paths timed on one step of the workload (which runs through each
    path in turn); the choice follows the measurement (BLAS only when ≥ 5 % faster) and
    becomes this process's path; a set AETHER_CPU_GEMM is obeyed without measuring."""
    assert gemm_env(None) == "onednn"
    net = torch.nn.Sequential(gemm.Linear(64, 256), torch.nn.ReLU(), gemm.Linear(256, 128))
    x = torch.randn(384, 64)
    paths: list[bool] = []

    def step() -> None:
        paths.append(gemm.use_onednn(x, x))
        net(x).square().sum().backward()

    gemm._CALIBRATED.clear()
    cal = gemm.calibrate(step, key="mlp", repeats=2)
    assert cal["measured"] and set(cal["ms"]) == {"onednn", "blas"}
    # warm-up once each, then 2 rounds × 3 steps per path, alternating
    assert paths.count(True) == paths.count(False) == 7 and paths[:2] == [True, False]
    assert all(v > 0 for v in cal["ms"].values())
    faster = ("blas" if cal["ms"]["blas"] < gemm.CALIBRATION_MARGIN * cal["ms"]["onednn"]
              else "onednn")
    assert cal["backend"] == faster == gemm.backend()
    assert gemm.use_onednn(torch.ones(2, 2)) == (faster == "onednn")
    # measured once per process and workload: the same answer, from the first measurement
    assert gemm.calibrate(step, key="mlp") == cal and len(gemm._CALIBRATED) == 1
    assert len(paths) == 14
    for forced in ("blas", "onednn"):
        gemm_env(forced)
        got = gemm.calibrate(step, key="mlp")
        assert got == {"backend": forced, "measured": False, "ms": None}
        assert gemm.backend() == forced
    gemm._CALIBRATED.clear()


def test_training_records_the_path_it_measured(tmp_path, gemm_env) -> None:
    """A float32 CPU run of ≥ 256 steps per epoch measures its own step before the
    first one and records the path and both timings; a small run measures nothing."""
    from fixtures import make_problem, small_cfg

    from aether_scale.stores.triplets import write_triplets
    from aether_scale.train import train_model
    from aether_scale.train.runtime import CALIBRATE_MIN_STEPS

    assert gemm_env(None) == "onednn"
    gemm._CALIBRATED.clear()
    store = write_triplets(str(tmp_path / "t.zarr"), **make_problem(8 * CALIBRATE_MIN_STEPS),
                           chunk_rows=512)
    lines: list[str] = []
    big = train_model(store, small_cfg(epochs=1, batch_size=8, kernels="autograd"),
                      str(tmp_path / "big"), log=lines.append)
    small = train_model(store, small_cfg(epochs=1, batch_size=64, kernels="autograd"),
                        str(tmp_path / "small"), log=lines.append)
    runs = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("big", "small")]
    ms = runs[0]["cpu_gemm_ms"]
    assert set(ms) == {"onednn", "blas"}
    assert runs[0]["cpu_gemm"] == ("blas" if ms["blas"] < gemm.CALIBRATION_MARGIN * ms["onednn"]
                                   else "onednn")
    assert sum("float32 CPU products:" in line for line in lines) == 1
    # the small run measured nothing and took the default path: the big run's choice
    # ended with it (a later stage in the same process, e.g. infer, starts from auto)
    assert runs[1]["cpu_gemm_ms"] is None and runs[1]["cpu_gemm"] == "onednn"
    assert gemm.backend() == "onednn"
    assert big["best_epoch"] == 0 and small["best_epoch"] == 0
    gemm._CALIBRATED.clear()


def test_a_compiling_run_measures_its_compiled_step_and_reuses_the_graphs(gemm_env) -> None:
    """train.kernels=compile: the path is measured on compiled copies of the projectors
    (both paths compiled, in turn), and the run's own Heads then runs the chosen path's
    graph without compiling again; the measured path is this process's."""
    from torch._dynamo.utils import counters

    from aether_scale.model import AEProj, TextProj
    from aether_scale.train.heads import Heads
    from aether_scale.train.runtime import CALIBRATE_MIN_STEPS, choose_cpu_gemm

    assert gemm_env(None) == "onednn"
    gemm._CALIBRATED.clear()
    torch.manual_seed(0)
    ae, txt = AEProj(), TextProj(384)
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    said: list[str] = []
    cfg = TrainSection(batch_size=64)
    graphs0 = counters["stats"]["unique_graphs"]
    cal = choose_cpu_gemm(cfg, torch.device("cpu"), torch.float32, (ae, txt), CALIBRATE_MIN_STEPS,
                          said.append, kernels="compile")
    assert cal is not None and cal["measured"] and cal["kernels"] == "compile"
    assert counters["stats"]["unique_graphs"] - graphs0 == 2  # one forward graph per path
    assert len(said) == 1 and "compiled step" in said[0] and cal["backend"] in said[0]
    assert gemm.backend() == cal["backend"]
    for k, v in ae.state_dict().items():  # copies were measured: the run's weights untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    heads = Heads(ae, txt, kernels="compile").train()
    graphs1 = counters["stats"]["unique_graphs"]
    z, z_t = heads(torch.randn(128, 64), torch.randn(64, 384))
    (z.sum() + z_t.sum()).backward()
    assert counters["stats"]["unique_graphs"] == graphs1 and heads.kernels == "compile"
    gemm._CALIBRATED.clear()


def test_a_run_whose_compiled_copies_fail_calibrates_eagerly_and_does_not_compile(
        gemm_env, monkeypatch) -> None:
    """Where torch.compile fails (e.g. no C++ compiler for inductor), the copies fall back
    to eager modules with one warning, the measurement is of the eager step, and the
    returned kernels tell the run not to try compiling again."""
    from aether_scale.model import AEProj, TextProj
    from aether_scale.train.runtime import CALIBRATE_MIN_STEPS, choose_cpu_gemm

    def broken(fn, **_kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    assert gemm_env(None) == "onednn"
    gemm._CALIBRATED.clear()
    said: list[str] = []
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        cal = choose_cpu_gemm(TrainSection(batch_size=32), torch.device("cpu"), torch.float32,
                              (AEProj(), TextProj(384)), CALIBRATE_MIN_STEPS, said.append,
                              kernels="compile")
    assert cal["measured"] and cal["kernels"] == "autograd"
    assert "eager step" in said[0]
    gemm._CALIBRATED.clear()
