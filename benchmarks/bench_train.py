"""Training speed: seconds per epoch at the paper's scale (340k triplets), vs the reference loop.

Measured in one run, on the same ``triplets.zarr`` of random unit vectors
(timing does not depend on the values):

- ``ours_in_memory``: :func:`aether_scale.train.train_model` with
  ``in_memory=always`` (store loaded once, one permutation per epoch,
  single forward for both AE views, fused AdamW);
- ``ours_streaming``: the same with ``in_memory=never`` (chunk-shuffled
  contiguous reads from Zarr, in-buffer shuffle, background prefetch);
- ``…_bf16``: the same two with ``train.precision=bfloat16`` (bf16 GEMM
  operands, float32 accumulation, normalisation, loss, weights and optimizer);
  the plain names are float32 (``--precision`` picks which are run);
- ``reference``: the reference training loop — a per-sample ``Dataset``
  (``__getitem__`` returns one triplet) in a ``DataLoader(num_workers=4,
  batch_size=512, shuffle=True)``, the projector run separately for each view,
  default ``AdamW``, the same loss written as the reference writes it (two
  cross-entropies through autograd), ``nn.Dropout``, and the per-step cosine schedule.

Per variant: wall seconds per epoch (the target), CPU seconds per epoch
(process + DataLoader workers; less sensitive to other jobs on shared cores),
peak RSS. ``--steps N`` times N steps per variant and extrapolates to a full
epoch (our trainer runs whole epochs over a store of N·512 rows with the same
chunking — its real code path — scaled to 340k rows; the reference times its
steady-state steps); the default times whole epochs.

    python benchmarks/bench_train.py                 # 340k, 2 epochs ours, 1 epoch reference
    python benchmarks/bench_train.py --quick         # 128 steps each, extrapolated to 340k
    python benchmarks/bench_train.py --device cuda   # GPU run (target ≤ 0.25 s/epoch)
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

# OpenMP's wait policy matters on 2 cores: on an otherwise idle machine the default
# (spinning) is faster for the small GEMMs of a training step; on cores shared with other
# jobs, spinning threads stall at every parallel region and OMP_WAIT_POLICY=PASSIVE is far
# faster (705 vs 45 ms/step measured while other jobs ran). The benchmark leaves the
# environment as the user set it, applies it to every variant alike and records it.
import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import PeakRSS, machine_info, write_result  # noqa: E402

from aether_scale.config import TrainSection  # noqa: E402
from aether_scale.loss import symmetric_info_nce_reference  # noqa: E402
from aether_scale.model import AEProj, TextProj  # noqa: E402
from aether_scale.stores.triplets import write_triplets  # noqa: E402
from aether_scale.train import cosine_lr, train_model  # noqa: E402

SCRATCH = HERE / "scratch"
PAPER_GPU_S_PER_EPOCH = 502 / 100  # paper: 502 s for 100 epochs on a TITAN


def _cpu_seconds() -> float:
    """User+system CPU of this process and its reaped children (DataLoader workers)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def make_store(n: int, text_dim: int, chunk_rows: int, seed: int = 0) -> str:
    """Random unit-vector triplets as ``benchmarks/scratch/triplets-<n>.zarr`` (reused)."""
    path = SCRATCH / f"triplets-{n}-{text_dim}.zarr"
    # aether_chunks.json is written last: a store without it is unfinished, or one from
    # before chunk indexes (rewritten)
    if (path / "aether_chunks.json").exists():
        return str(path)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def unit(shape: tuple[int, int]) -> np.ndarray:
        a = rng.standard_normal(shape, dtype=np.float32)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        return a

    tmp = str(path) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    write_triplets(tmp, base=unit((n, 64)), aug=unit((n, 64)), text=unit((n, text_dim)),
                   chunk_rows=chunk_rows)
    os.replace(tmp, path)
    return str(path)


# ----------------------------------------------------------------------------- reference loop
class PerSampleTriplets(torch.utils.data.Dataset):
    """The reference's data path: one triplet per ``__getitem__``."""

    def __init__(self, base: np.ndarray, aug: np.ndarray, text: np.ndarray) -> None:
        self.base = torch.from_numpy(base)
        self.aug = torch.from_numpy(aug)
        self.text = torch.from_numpy(text)

    def __len__(self) -> int:
        return self.base.shape[0]

    def __getitem__(self, i: int):
        return self.base[i], self.aug[i], self.text[i]


class AetherLossOut:
    """The reference loop only needs ``.loss``."""

    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


def run_reference(store: str, *, epochs: int, max_steps: int | None, device: torch.device,
                  workers: int) -> dict:
    import zarr

    g = zarr.open_group(store, mode="r")
    base, aug, text = (np.asarray(g[k][:], dtype=np.float32) for k in ("base", "aug", "text"))
    n = base.shape[0]
    ds = PerSampleTriplets(base, aug, text)
    dl = torch.utils.data.DataLoader(ds, batch_size=512, shuffle=True, num_workers=workers,
                                     pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    ae, txt = AEProj().to(device), TextProj(text.shape[1]).to(device)
    # The reference's own building blocks, not this project's faster ones: torch's
    # nn.Dropout in the post-MLP, and the loss as two cross-entropies through autograd.
    ae.post_mlp[2] = torch.nn.Dropout(ae.post_mlp[2].p)
    opt = torch.optim.AdamW([*ae.parameters(), *txt.parameters()], lr=1e-3, weight_decay=1e-4)

    def loss_fn(z_b, z_a, z_p):
        l_ae = symmetric_info_nce_reference(z_b, z_a, 0.07)
        l_ap = symmetric_info_nce_reference(z_b, z_p, 0.07)
        return AetherLossOut(0.2 * l_ae + 0.8 * l_ap)
    steps_epoch = math.ceil(n / 512)
    total = steps_epoch * epochs
    per_epoch, cpu_per_epoch, steps_timed = [], [], []
    step = 0
    warm = 10 if max_steps and max_steps < steps_epoch else 0
    for _ in range(epochs):
        ae.train()
        txt.train()
        t0, c0, k = time.perf_counter(), _cpu_seconds(), 0
        it = iter(dl)  # non-persistent workers: started here, shut down below (as in the reference)
        for b, a, t in it:
            b, a, t = (x.to(device, non_blocking=True) for x in (b, a, t))
            for grp in opt.param_groups:
                grp["lr"] = cosine_lr(step, total, 1e-3, 0.01)
            out = loss_fn(ae(b), ae(a), txt(t))          # projector run separately per view
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            step += 1
            k += 1
            if k == warm:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t_warm = time.perf_counter()
            if max_steps and k >= max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_end = time.perf_counter()
        del it  # joins the workers, so their CPU time is reaped into RUSAGE_CHILDREN
        if warm:  # steady-state steps only, extrapolated to a whole epoch
            per_epoch.append((t_end - t_warm) * steps_epoch / (k - warm))
        else:
            per_epoch.append(time.perf_counter() - t0)
        cpu_per_epoch.append((_cpu_seconds() - c0) * steps_epoch / k)
        steps_timed.append(k)
    return {"s_per_epoch": per_epoch, "cpu_s_per_epoch": cpu_per_epoch, "steps_timed": steps_timed,
            "steps_per_epoch": steps_epoch, "extrapolated": bool(max_steps and max_steps < steps_epoch),
            "num_workers": workers}


# ----------------------------------------------------------------------------- GEMM floor
def gemm_floor(device: torch.device, steps_per_epoch: int, rounds: int = 7, reps: int = 50) -> dict:
    """Seconds per epoch spent in the matrix products of one step alone, per precision.

    Times exactly the GEMMs of a training step at batch 512 (both AE views through
    the projector, the text head, the loss's logits and its two backward products;
    forward, input- and weight-gradients) back to back on hot caches — a lower
    bound for any implementation of the same model on this device. ``bfloat16``
    runs the projector GEMMs and the loss's backward GEMMs in bf16 and the logits
    in float32, as ``train.precision: bfloat16`` does.
    """
    n, b = 1024, 512

    def mats(dt: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        r = lambda *shape: torch.randn(*shape, dtype=dt, device=device)  # noqa: E731
        return [
            (r(n, 64), r(64, 384)), (r(n, 256), r(256, 128)), (r(n, 128), r(128, 256)),
            (r(n, 256), r(256, 128)), (r(b, 384), r(384, 128)),             # forward
            (r(n, 128), r(128, 256)), (r(n, 256), r(256, 128)), (r(n, 128), r(128, 256)),  # input grads
            (r(128, n), r(n, 256)), (r(256, n), r(n, 128)), (r(128, n), r(n, 256)),
            (r(384, n), r(n, 64)), (r(128, b), r(b, 384)),                  # weight grads
        ]

    def loss_mats(dt: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        r = lambda *shape, d=dt: torch.randn(*shape, dtype=d, device=device)  # noqa: E731
        return [(r(b, 128, d=torch.float32), r(128, 2 * b, d=torch.float32)),  # logits, float32
                (r(b, 2 * b), r(2 * b, 128)), (r(128, b), r(b, 2 * b))]         # backward

    out = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        pairs = mats(dt) + loss_mats(dt)
        best = math.inf
        for _ in range(rounds):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                for a, m in pairs:
                    torch.mm(a, m)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / reps)
        flops = sum(2 * a.shape[0] * a.shape[1] * m.shape[1] for a, m in pairs)
        out[name] = {"ms_per_step": round(best * 1e3, 3), "s_per_epoch": round(best * steps_per_epoch, 3),
                     "gflop_per_step": round(flops / 1e9, 3), "gflop_per_s": round(flops / best / 1e9, 1)}
    return out


# ----------------------------------------------------------------------------- ours
def run_ours(store: str, n: int, *, in_memory: str, epochs: int, device: str,
             threads: int | None, precision: str = "float32") -> dict:
    """Our trainer on ``store``; per-epoch numbers scaled to ``n`` rows when the store is smaller."""
    steps_full = math.ceil(n / 512)
    cfg = TrainSection(epochs=epochs, in_memory=in_memory, device=device, threads=threads,
                       precision=precision)
    out = SCRATCH / f"model-{in_memory}-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    c0 = _cpu_seconds()
    summary = train_model(store, cfg, str(out), log=print)
    cpu = _cpu_seconds() - c0
    import json

    m = json.loads((out / "metrics.json").read_text())
    secs = [e["seconds"] for e in m["epochs"]]
    scale = n / summary["n_triplets"]
    return {
        "s_per_epoch": [s * scale for s in secs],
        "cpu_s_per_epoch_incl_setup": cpu * scale / epochs,
        "setup_s": round(summary["seconds"] - sum(secs), 3),
        "steps_timed": summary["steps_per_epoch"],
        "steps_per_epoch": steps_full,
        "extrapolated": summary["n_triplets"] < n,
        "loader": summary["loader"],
        "device": summary["device"],
        "precision": summary["precision"],
        "final_loss": m["epochs"][-1]["loss"],
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="time 128 steps per variant, extrapolate")
    ap.add_argument("--n", type=int, default=340_000, help="triplets (paper: ~340k)")
    ap.add_argument("--steps", type=int, default=None, help="steps timed per epoch (extrapolated)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of our trainer per path")
    ap.add_argument("--ref-epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=4, help="reference DataLoader workers")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--chunk-rows", type=int, default=65_536)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--precision", default="float32,bfloat16",
                    help="comma-separated train.precision values to time (float32, bfloat16)")
    args = ap.parse_args()
    steps = args.steps or (128 if args.quick else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    store = make_store(args.n, 384, args.chunk_rows)
    # --steps: our trainer runs whole epochs over a store of steps·512 rows (same chunking),
    # scaled to n rows; the reference times its steady-state steps on the full store
    ours_store = make_store(steps * 512, 384, args.chunk_rows) if steps else store
    print(f"stores ready in {time.perf_counter() - t:.1f} s")

    res: dict = {}
    ours: list[str] = []
    for precision in args.precision.split(","):
        suffix = {"float32": "", "bfloat16": "_bf16"}[precision]
        for base, kind in (("ours_in_memory", "always"), ("ours_streaming", "never")):
            name = base + suffix
            print(f"--- {name}")
            with PeakRSS() as rss:
                r = run_ours(ours_store, args.n, in_memory=kind, epochs=args.epochs,
                             device=args.device, threads=args.threads, precision=precision)
            r.update(rss.as_dict())
            res[name] = r
            ours.append(name)
            print(f"{name}: {[round(s, 2) for s in r['s_per_epoch']]} s/epoch")
    if not args.skip_reference:
        print("--- reference")
        with PeakRSS() as rss:
            r = run_reference(store, epochs=args.ref_epochs, max_steps=steps, device=dev,
                              workers=args.workers)
        r.update(rss.as_dict())
        res["reference"] = r
        print(f"reference: {[round(s, 2) for s in r['s_per_epoch']]} s/epoch")

    floor = gemm_floor(dev, math.ceil(args.n / 512))
    print(f"GEMM floor (matrix products of one step alone, s/epoch): {floor}")

    def best(name: str) -> float:
        return min(res[name]["s_per_epoch"])

    summary: dict = {
        name: {"s_per_epoch_best": round(best(name), 3),
               "s_per_epoch_mean": round(float(np.mean(res[name]["s_per_epoch"])), 3)}
        for name in res
    }
    target = 0.25 if dev.type == "cuda" else PAPER_GPU_S_PER_EPOCH
    for name in ours:
        summary[name]["meets_target_s_per_epoch"] = best(name) <= target
        if "reference" in res:
            sp = best("reference") / best(name)
            summary[name]["speedup_vs_reference"] = round(sp, 2)
            summary[name]["meets_2x"] = sp >= 2.0
            cpu_ref = float(np.mean(res["reference"]["cpu_s_per_epoch"]))
            summary[name]["cpu_speedup_vs_reference"] = round(
                cpu_ref / res[name]["cpu_s_per_epoch_incl_setup"], 2)
    out = {
        "benchmark": "train",
        "n_triplets": args.n,
        "text_dim": 384,
        "batch_size": 512,
        "device": args.device,
        "steps_timed_per_epoch": steps,
        "extrapolated_from_steps": steps is not None,
        "targets": {"s_per_epoch": target, "speedup_vs_reference": 2.0,
                    "paper_gpu_s_per_epoch": PAPER_GPU_S_PER_EPOCH},
        "summary": summary,
        "results": res,
        "gemm_floor": floor,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "load_avg_1m_start": load0,
        "load_avg_1m_end": os.getloadavg()[0],
        "note": "wall times on shared cores are noisy; ratios within this run are what count. "
                "cpu_s_per_epoch counts process + DataLoader-worker CPU (less load-sensitive).",
        "machine": machine_info(),
    }
    path = write_result("train" if dev.type == "cpu" else f"train_{dev.type}", out)
    print(f"summary: {summary}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
