"""The training loop: the AETHER projector on a triplets store (AdamW, cosine LR,
best-on-train, resumable, DDP-ready).

One step: base and augmented views go through :class:`~aether_scale.model.AEProj`
in a single forward (concatenated, then split — one GEMM chain instead of two;
``train.kernels``, see :mod:`.heads`: eager autograd, or ``torch.compile`` of the
modules — the default on CPU for full-size epochs), the POI text through
:class:`~aether_scale.model.TextProj`, and
:class:`~aether_scale.loss.AetherLoss` gives λ·L_AE + (1−λ)·L_AP. AdamW
(``fused=True`` where the device supports it) with a per-step cosine schedule
from ``lr`` to ``lr_final_frac·lr`` over all steps, like the reference's
``CosineAnnealingLR(T_max=epochs·steps, eta_min=0.01·lr)``.

Files in ``out_dir`` (rank 0 writes; all atomically):

- ``checkpoint.pt`` — best-on-train: the epoch with the lowest mean
  cross-modal loss L_AP (the paper's selection rule).
- ``last.pt`` — after every epoch: weights, optimizer state, RNG state and the
  metric history; ``train_model(..., resume=True)`` continues from it and ends
  bit-identical to an uninterrupted run on CPU (batch order is a pure function
  of ``(seed, epoch)``).
- ``metrics.json`` — per-epoch ``loss``/``L_AE``/``L_AP``/``lr``/``seconds``,
  the best epoch, config, row counts, device, loader path.

Several GPUs: launch with ``torchrun --nproc-per-node N -m aether_scale.cli
train …``; ``WORLD_SIZE>1`` in the environment makes every rank join a
process group (NCCL on CUDA, gloo on CPU), wraps the heads in DDP, shards the
data (see :mod:`.loader`) and gathers negatives across ranks in the loss.
``train.batch_size`` stays the *global* batch, so the loss and the gradients
equal the single-process ones (the loss is scaled by ``world_size`` before
``backward`` to undo DDP's gradient averaging).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import gemm
from ..config import TrainSection
from ..config.sections import TRAIN_LEGACY_DEFAULTS
from ..devices import choose_threads, resolve_device
from ..heap import retained_heap
from ..loss import AetherLoss
from ..model import (
    CHECKPOINT_NAME,
    LAST_NAME,
    AEProj,
    CheckpointError,
    TextProj,
    _safe_load,
    save_checkpoint,
)
from ..stores.triplets import TripletStore
from .distributed import _init_distributed, rank_seed
from .heads import Heads, choose_kernels, validate
from .loader import InMemoryBatches, Shard, StreamingBatches, split_rows
from .runtime import (
    choose_cpu_gemm,
    compute_dtype,
    make_optimizer,
    rng_state,
    set_rng_state,
    write_json,
)

__all__ = ["cosine_lr", "train_model"]

METRICS_NAME = "metrics.json"
# Config keys that do not change what is learned (may differ on resume).
_RUNTIME_KEYS = frozenset({"device", "threads", "prefetch", "in_memory", "save_every", "kernels"})
_LEGACY_DEFAULTS = TRAIN_LEGACY_DEFAULTS


def cosine_lr(step: int, total: int, lr: float, final_frac: float) -> float:
    """Learning rate at ``step`` of ``total``: cosine from ``lr`` down to ``final_frac·lr``."""
    t = min(max(step, 0), total) / max(total, 1)
    return lr * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * t)))


def _learned_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items()
            if k not in _RUNTIME_KEYS and not (k in _LEGACY_DEFAULTS and v == _LEGACY_DEFAULTS[k])}


def train_model(
    triplets_uri: str,
    cfg: TrainSection,
    out_dir: str,
    *,
    log: Callable[[str], None] | None = print,
    resume: bool = False,
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """Train the projectors on a triplets store; write ``out_dir/{checkpoint.pt,last.pt,metrics.json}``.

    ``cfg`` is the ``train`` config section (epochs, batch_size, lr, weight_decay,
    lr_final_frac, tau_ae, tau_poi, lam, use_aug, train_fraction, seed, device,
    in_memory, …). With ``resume=True`` and an ``out_dir/last.pt`` from the
    same learned config, training continues after its epoch (a finished run
    returns at once); a ``last.pt`` from another config raises
    :class:`~aether_scale.model.CheckpointError`. ``log`` gets one line per
    epoch (after ``last.pt`` is written). Returns a summary dict (best epoch
    and L_AP, epochs run, rows, device, loader path, paths).
    Raises :class:`~aether_scale.stores.triplets.TripletStoreError` for a malformed store.
    """
    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    device = resolve_device(cfg.device, key="train.device")
    shard = _init_distributed(device)
    threads_before = torch.get_num_threads()
    n_threads, why = choose_threads(cfg.threads, key="train.threads")
    if device.type == "cpu":
        torch.set_num_threads(n_threads)
        say(f"[train] torch threads: {why}")
    try:
        with retained_heap(device.type == "cpu"):
            return _train(triplets_uri, cfg, out_dir, say=say, resume=resume,
                          storage_options=storage_options, device=device, shard=shard, t_start=t_start)
    finally:
        torch.set_num_threads(threads_before)
        gemm.backend(refresh=True)  # a path measured for this run is not the process's


def _train(triplets_uri: str, cfg: TrainSection, out_dir: str, *, say: Callable[[str], None],
           resume: bool, storage_options: dict | None, device: torch.device, shard: Shard,
           t_start: float) -> dict[str, Any]:
    """The body of :func:`train_model` (thread count already set)."""
    is_main = shard.rank == 0
    os.makedirs(out_dir, exist_ok=True)
    last_path = os.path.join(out_dir, LAST_NAME)
    best_path = os.path.join(out_dir, CHECKPOINT_NAME)
    metrics_path = os.path.join(out_dir, METRICS_NAME)
    cfg_dict = cfg.model_dump(mode="json")

    # ---- resume state: rank 0 reads last.pt and hands it to the other ranks
    state: dict[str, Any] | None = None
    if resume and is_main and os.path.exists(last_path):
        state = _safe_load(last_path)
        lacking = sorted({"ae_state_dict", "txt_state_dict", "optimizer", "rng", "loader",
                          "epoch", "metrics"} - set(state))
        if lacking:
            raise CheckpointError(
                f"{last_path} is not a resumable training state (it lacks {lacking}; train "
                "writes last.pt with weights, optimizer and RNG state after every epoch): "
                f"delete it to start over, or run the stage with --force")
    if shard.world_size > 1:
        import torch.distributed as dist

        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]

    # ---- data
    store = TripletStore(triplets_uri, storage_options=storage_options, need_aug=cfg.use_aug)
    rows, val_rows = split_rows(store.n, cfg.train_fraction, cfg.val_fraction, cfg.seed)
    n_rows = store.n if rows is None else len(rows)
    if state is not None:
        kind = state["loader"]
    elif cfg.in_memory == "always":
        kind = "in_memory"
    elif cfg.in_memory == "never":
        kind = "streaming"
    else:
        import psutil

        kind = "in_memory" if n_rows * store.row_bytes < 0.25 * psutil.virtual_memory().available else "streaming"
    if kind == "in_memory":
        batches: InMemoryBatches | StreamingBatches = InMemoryBatches(
            store, batch_size=cfg.batch_size, rows=rows, seed=cfg.seed, device=device, shard=shard)
    else:
        batches = StreamingBatches(
            store, batch_size=cfg.batch_size, rows=rows, seed=cfg.seed, device=device,
            shuffle_buffer_chunks=cfg.shuffle_buffer_chunks, prefetch=cfg.prefetch, shard=shard)
    steps = batches.steps_per_epoch()
    if steps < 1:
        raise ValueError(f"{triplets_uri}: {n_rows} rows give no batch of {cfg.batch_size} "
                         f"on {shard.world_size} rank(s); lower train.batch_size")
    total_steps = steps * cfg.epochs

    # ---- model, optimizer, loss
    torch.manual_seed(cfg.seed)
    ae = AEProj(store.in_dim, cfg.hidden_dim, cfg.out_dim, dropout=cfg.dropout,
                gate_init=cfg.gate_init, proj_dim=cfg.proj_dim, use_gate=cfg.use_gate)
    txt = TextProj(store.text_dim, cfg.out_dim)
    gemm_dtype = compute_dtype(cfg, device, say)
    kernels = choose_kernels(cfg, device, steps)
    # measured on copies run as the run runs them (compiled: each path's graph is then cached)
    gemm_cal = choose_cpu_gemm(cfg, device, gemm_dtype, (ae, txt), steps, say, kernels=kernels)
    if gemm_cal is not None:
        kernels = gemm_cal["kernels"]  # autograd where compiling the copies failed
    heads = Heads(ae, txt, kernels=kernels, compute_dtype=gemm_dtype).to(device)
    val = (InMemoryBatches(store, batch_size=min(cfg.batch_size, len(val_rows)), rows=val_rows,
                           seed=cfg.seed, device=device) if val_rows is not None else None)
    select = "val_L_AP" if val is not None else "L_AP"
    if shard.world_size > 1:  # same initial weights on every rank, but each its own dropout masks
        torch.manual_seed(rank_seed(cfg.seed, shard.rank))
    full_cfg = {**cfg_dict, "in_dim": store.in_dim, "text_dim": store.text_dim, "n_triplets": n_rows,
                "text_encoder": store.attrs.get("text_encoder")}
    if state is not None:
        old, new = _learned_config(state.get("config", {})), _learned_config(full_cfg)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise CheckpointError(
                f"{last_path} was written by a run with a different train config or input "
                f"(differs in {diff}); delete {out_dir} or train with resume=False to start over"
            )
    opt = make_optimizer(heads.parameters(), cfg, device)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    start_epoch = 0
    if state is not None:
        ae.load_state_dict(state["ae_state_dict"])
        txt.load_state_dict(state["txt_state_dict"])
        opt.load_state_dict(state["optimizer"])
        history = list(state["metrics"].get("epochs", []))
        best = state["metrics"].get("best")
        start_epoch = int(state["epoch"]) + 1
        ranks = state.get("rng_ranks")
        if shard.world_size > 1 and ranks is not None and len(ranks) == shard.world_size:
            set_rng_state(ranks[shard.rank], device)
        else:  # single process, or a different number of ranks than the run that saved it
            set_rng_state(state["rng"], device)
            if shard.world_size > 1:
                torch.manual_seed(rank_seed(int(torch.randint(2**62, (1,))), shard.rank))
        say(f"[train] resuming from {last_path} after epoch {start_epoch}/{cfg.epochs}")
    model: nn.Module = heads
    if shard.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(heads, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = AetherLoss(cfg.lam, cfg.tau_ae, cfg.tau_poi, use_aug=cfg.use_aug,
                         rank=shard.rank, world_size=shard.world_size, gemm_dtype=gemm_dtype)
    scale = float(shard.world_size)
    say(f"[train] {n_rows:,} triplets ({store.n:,} in store) · {kind} · {device} {cfg.precision} · "
        f"kernels {kernels} · "
        f"{shard.world_size} rank(s) · {steps} steps/epoch · epochs {start_epoch}→{cfg.epochs}")

    # What this run was: recorded in metrics.json and returned to the stage's manifest.
    run_info = {
        "n_triplets": n_rows,
        "n_triplets_val": 0 if val is None else val.n,
        "selected_on": select,
        "n_triplets_store": store.n,
        "device": str(device),
        "precision": cfg.precision,
        "world_size": shard.world_size,
        "loader": kind,
        "kernels": kernels,
        "gemm_dtype": str(gemm_dtype).removeprefix("torch."),
        # float32 CPU products: torch's BLAS path or oneDNN (aether_scale.gemm)
        "cpu_gemm": gemm.backend() if device.type == "cpu" else None,
        "cpu_gemm_ms": None if gemm_cal is None else gemm_cal["ms"],  # as measured (or not)
        "steps_per_epoch": steps,
    }

    def metrics_doc() -> dict[str, Any]:
        return {
            "epochs": history,
            "best": best,
            "best_epoch": best["epoch"] if best else None,
            "config": full_cfg,
            **run_info,
            "triplets": str(triplets_uri),
        }

    def forward_backward(base: torch.Tensor, aug: torch.Tensor | None, text: torch.Tensor):
        """One step's forward, loss and backward (the optimizer step is the caller's)."""
        if cfg.use_aug:
            z, z_p = model(torch.cat((base, aug)), text)
            z_b, z_a = z.split(base.shape[0])
        else:
            z_b, z_p = model(base, text)
            z_a = None
        out = loss_fn(z_b, z_a, z_p)
        (out.loss * scale if scale != 1.0 else out.loss).backward()
        return out

    backward_ok = False
    if isinstance(batches, StreamingBatches):
        batches.start(start_epoch, cfg.epochs)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            sums: list[torch.Tensor] = []
            step = epoch * steps
            for base, aug, text in batches.epoch(epoch):
                lr = cosine_lr(step, total_steps, cfg.lr, cfg.lr_final_frac)
                for g in opt.param_groups:
                    g["lr"] = lr
                if heads.kernels == "compile" and not backward_ok and shard.world_size == 1:
                    # the compiled graph's backward runs (and may first compile) here: an
                    # error in it falls back to the modules like one in the forward does
                    try:
                        out = forward_backward(base, aug, text)
                    except Exception as e:  # noqa: BLE001 - e.g. inductor failing to lower an op
                        heads.fall_back("the compiled backward", e)
                        run_info["kernels"] = heads.kernels
                        opt.zero_grad(set_to_none=True)
                        out = forward_backward(base, aug, text)
                    backward_ok = True
                else:
                    out = forward_backward(base, aug, text)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sums.append(torch.stack((out.loss.detach(),
                                         out.L_AE.detach() if out.L_AE is not None else out.L_AP.detach() * 0,
                                         out.L_AP.detach())))
                step += 1
            if len(sums) != steps:
                raise RuntimeError(f"epoch {epoch}: {len(sums)} steps, expected {steps}")
            run_info["kernels"] = heads.kernels  # "autograd" after a fall back from compile
            mean = torch.stack(sums).double().mean(0).cpu().tolist()
            rec = {
                "epoch": epoch,
                "loss": mean[0],
                "L_AE": mean[1] if cfg.use_aug else None,
                "L_AP": mean[2],
                "lr_end": cosine_lr(step, total_steps, cfg.lr, cfg.lr_final_frac),
                "seconds": round(time.perf_counter() - t0, 4),
            }
            if val is not None:
                rec.update(validate(heads, val, cfg, use_aug=cfg.use_aug))
            history.append(rec)
            improved = best is None or rec[select] < best[select]
            if improved:
                best = dict(rec)
            rng = rng_state(device)
            extra = {"optimizer": opt.state_dict(), "rng": rng, "loader": kind}
            if shard.world_size > 1:  # every rank's generator, so a resume redraws the same masks
                import torch.distributed as dist

                ranks_rng: list[Any] = [None] * shard.world_size
                dist.all_gather_object(ranks_rng, rng)
                extra["rng_ranks"] = ranks_rng
            if is_main:
                if improved:
                    save_checkpoint(best_path, ae, txt, config=full_cfg, epoch=epoch,
                                    metrics={"best": best, "epochs": history})
                save_checkpoint(last_path, ae, txt, config=full_cfg, epoch=epoch,
                                metrics={"best": best, "epochs": history}, extra=extra)
                if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
                    save_checkpoint(os.path.join(out_dir, f"epoch_{epoch + 1:04d}.pt"), ae, txt,
                                    config=full_cfg, epoch=epoch,
                                    metrics={"best": best, "epochs": history})
                write_json(metrics_path, metrics_doc())
            ae_s = f" L_AE {rec['L_AE']:.4f}" if rec["L_AE"] is not None else ""
            val_s = f" val L_AP {rec['val_L_AP']:.4f}" if val is not None else ""
            say(f"[train] epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f}{ae_s} "
                f"L_AP {rec['L_AP']:.4f}{val_s} lr {lr:.2e} {rec['seconds']:.2f} s"
                + (" *" if improved else ""))
    finally:
        batches.close()
    if is_main and not os.path.exists(metrics_path) and history:
        write_json(metrics_path, metrics_doc())
    return {
        "best_epoch": best["epoch"] if best else None,
        "best_L_AP": best["L_AP"] if best else None,
        "best_val_L_AP": best.get("val_L_AP") if best else None,
        "epochs_run": cfg.epochs - start_epoch,
        "resumed_from_epoch": start_epoch if state is not None else None,
        **run_info,
        "seconds": round(time.perf_counter() - t_start, 3),
        "mean_epoch_seconds": (
            round(float(np.mean([h["seconds"] for h in history[start_epoch:]])), 4)
            if cfg.epochs > start_epoch else None
        ),
        "checkpoint": best_path,
        "metrics": metrics_path,
    }
