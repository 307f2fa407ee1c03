"""The AETHER loss: hand computation, gradients, and gathering negatives across ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from aether_scale.loss import (
    AetherLoss,
    gather_features,
    symmetric_info_nce,
    symmetric_info_nce_reference,
)
from aether_scale.model import AEProj, TextProj


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _hand_info_nce(x: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """Paper eq. 5/6 with explicit loops and a hand-written log-sum-exp."""
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        for a, b in ((x, y), (y, x)):
            s = [float(a[i] @ b[j]) / tau for j in range(n)]
            m = max(s)
            lse = m + math.log(sum(math.exp(v - m) for v in s))
            total += -(s[i] - lse)
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_symmetric_info_nce_matches_hand_computation(tau: float) -> None:
    x, y = _unit(6, 5, 0), _unit(6, 5, 1)
    assert float(symmetric_info_nce(x, y, tau)) == pytest.approx(_hand_info_nce(x, y, tau), rel=1e-10)


def test_fused_info_nce_matches_autograd_of_the_plain_formula() -> None:
    x, y = _unit(9, 5, 3).requires_grad_(), _unit(9, 5, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: symmetric_info_nce(a, b, 0.2), (x, y))
    fused = symmetric_info_nce(x, y, 0.07)
    plain = symmetric_info_nce_reference(x, y, 0.07)
    assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)
    g1 = torch.autograd.grad(fused, (x, y))
    g2 = torch.autograd.grad(plain, (x, y))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # float32 with large logits (τ small, aligned pairs) stays finite and close
    z = _unit(256, 16, 5).float().requires_grad_()
    f32 = symmetric_info_nce(z, z, 0.01)
    assert torch.isfinite(f32) and float(f32.detach()) == pytest.approx(
        float(symmetric_info_nce_reference(z.double(), z.double(), 0.01).detach()), abs=1e-4)


def test_aether_loss_combines_terms_like_the_paper() -> None:
    zb, za, zp = _unit(7, 4, 0), _unit(7, 4, 1), _unit(7, 4, 2)
    lam, t_ae, t_poi = 0.3, 0.1, 0.07
    out = AetherLoss(lam, t_ae, t_poi)(zb, za, zp)
    l_ae, l_ap = _hand_info_nce(zb, za, t_ae), _hand_info_nce(zb, zp, t_poi)
    assert float(out.L_AE) == pytest.approx(l_ae, rel=1e-10)
    assert float(out.L_AP) == pytest.approx(l_ap, rel=1e-10)
    assert float(out.loss) == pytest.approx(lam * l_ae + (1 - lam) * l_ap, rel=1e-10)
    # w/o aug: only the cross-modal term, the augmented view is not needed
    noaug = AetherLoss(lam, t_ae, t_poi, use_aug=False)(zb, None, zp)
    assert noaug.L_AE is None
    assert float(noaug.loss) == pytest.approx(l_ap, rel=1e-10)


def test_perfect_alignment_gives_low_loss_and_shuffled_pairs_high() -> None:
    z = _unit(64, 32, 0)
    good = float(symmetric_info_nce(z, z, 0.07))
    bad = float(symmetric_info_nce(z, z[torch.randperm(64)], 0.07))
    assert good < 0.5 < math.log(64) < bad


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="lam"):
        AetherLoss(lam=1.5)
    with pytest.raises(ValueError, match="temperatures"):
        AetherLoss(tau_ae=0.0)
    with pytest.raises(ValueError, match="z_a"):
        AetherLoss()(_unit(3, 4, 0), None, _unit(3, 4, 1))
    with pytest.raises(ValueError, match="shapes differ"):
        symmetric_info_nce(_unit(3, 4, 0), _unit(4, 4, 1), 0.1)


def test_gradients_reach_both_heads_including_the_gate() -> None:
    torch.manual_seed(0)
    ae, txt = AEProj(), TextProj()
    base = F.normalize(torch.randn(16, 64), dim=1)
    aug = F.normalize(base + 0.1 * torch.randn(16, 64), dim=1)
    text = F.normalize(torch.randn(16, 384), dim=1)
    z = ae(torch.cat([base, aug]))
    out = AetherLoss()(z[:16], z[16:], txt(text))
    out.loss.backward()
    for name, p in [*ae.named_parameters(), *(("txt." + n, q) for n, q in txt.named_parameters())]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_faked_two_rank_gather_equals_single_process_loss_and_gradients() -> None:
    """Two ranks simulated in one process: each gets the other's shard via a fake all_gather."""
    zb, za, zp = (_unit(8, 6, s).requires_grad_() for s in (0, 1, 2))
    full = AetherLoss(0.2, 0.07, 0.07)(zb, za, zp)
    full.loss.backward()
    g_full = [t.grad.clone() for t in (zb, za, zp)]

    shards = [[t.detach()[r * 4 : (r + 1) * 4] for t in (zb, za, zp)] for r in range(2)]
    grads_sum = [torch.zeros_like(t) for t in (zb, za, zp)]
    for rank in range(2):
        local = [s.clone().requires_grad_() for s in shards[rank]]
        # the fake collective returns every rank's shard of the tensor being gathered
        which = {}

        def fake_gather(x: torch.Tensor, which=which, local=local) -> list[torch.Tensor]:
            k = next(i for i, t in enumerate(local) if t is x)
            which[k] = True
            return [shards[r][k] for r in range(2)]

        loss = AetherLoss(0.2, 0.07, 0.07, rank=rank, world_size=2, gather_fn=fake_gather)
        out = loss(*local)
        assert sorted(which) == [0, 1, 2]
        assert float(out.loss.detach()) == pytest.approx(float(full.loss.detach()), rel=1e-12)
        assert float(out.L_AE.detach()) == pytest.approx(float(full.L_AE.detach()), rel=1e-12)
        out.loss.backward()
        for k in range(3):
            grads_sum[k][rank * 4 : (rank + 1) * 4] += local[k].grad
    # gradient flows to the local shard only; summed over ranks it is the full gradient
    for k in range(3):
        torch.testing.assert_close(grads_sum[k], g_full[k], rtol=1e-10, atol=1e-12)


def test_gather_features_single_rank_is_identity_and_checks_shard_count() -> None:
    x = _unit(3, 2, 0)
    assert gather_features(x, rank=0, world_size=1) is x
    with pytest.raises(RuntimeError, match="expected world_size=2"):
        gather_features(x, rank=0, world_size=2, gather_fn=lambda t: [t])


# ----------------------------------------------------------------- real gloo process group
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        zb, za, zp = (_unit(8, 6, s) for s in (0, 1, 2))
        local = [t[rank * 4 : (rank + 1) * 4].clone().requires_grad_() for t in (zb, za, zp)]
        out = AetherLoss(0.2, 0.07, 0.07, rank=rank, world_size=world)(*local)
        out.loss.backward()
        torch.save({"loss": out.loss.detach(), "grads": [t.grad for t in local]},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_real_gloo_group_of_two_matches_single_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    zb, za, zp = (_unit(8, 6, s).requires_grad_() for s in (0, 1, 2))
    full = AetherLoss(0.2, 0.07, 0.07)(zb, za, zp)
    full.loss.backward()
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert float(r["loss"]) == pytest.approx(float(full.loss.detach()), rel=1e-12)
        for k, t in enumerate((zb, za, zp)):
            torch.testing.assert_close(r["grads"][k], t.grad[rank * 4 : (rank + 1) * 4])
