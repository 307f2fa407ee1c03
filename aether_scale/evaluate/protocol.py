"""The paper's Table 1 protocol: task heads on region features, five seeds, mean ± std.

Protocol (AETHER §3.4 / §4, applied identically to every method):

- **Splits**: per seed, one random permutation of a task's units gives
  test (``evaluate.test_fraction``), validation (``val_fraction``) and train
  (the rest). The split depends only on the seed and the number of units, so
  every method sees exactly the same units in each part.
- **Features** are standardised with the train part's mean and std.
- **Heads** (torch, CPU, deterministic per seed): ``mlp`` = Linear-ReLU-Linear
  with ``hidden_dim`` units, or ``linear``. Adam (``lr``, ``weight_decay``),
  full batch (or ``batch_size`` minibatches), early stopping on the
  validation loss with ``patience``; the best-validation weights are kept.
- **LUC**: cross-entropy; macro precision / recall / F1 on test
  (``sklearn.metrics.precision_recall_fscore_support(average="macro")``).
- **SDM**: softmax head trained with the soft cross-entropy
  −Σ q log p (≡ KL(q‖p) + const); on test, averaged over units:
  KL(q‖p) = Σ q log(q / max(p, ε)) (terms with q = 0 contribute 0),
  L1 = Σ |q − p|, Chebyshev = max |q − p|.
- **Methods**: AE, AETHER and every variant (whatever ``regions/`` holds) and the
  POI-only baselines TF-IDF / LDA (:mod:`.baselines`).

``report/metrics.json`` holds ``{task: {method: {metric: [per-seed values]}}}``
in raw units (the table scales them as the paper does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import precision_recall_fscore_support

from ..config import EvaluateSection

__all__ = [
    "Split",
    "make_split",
    "standardize",
    "train_head",
    "luc_metrics",
    "sdm_metrics",
    "evaluate_task",
    "METRICS",
    "KL_EPS",
]

METRICS = {"luc": ("f1", "precision", "recall"), "sdm": ("kl", "l1", "chebyshev")}
KL_EPS = 1e-8  # floor on predicted probabilities in KL(q‖p)
#: units × heads below which heads are fitted in this process even with workers > 1 (a
#: worker process pays ~2 s to import torch; tiny heads are done sooner than that)
PARALLEL_MIN_WORK = 50_000


@dataclass(frozen=True)
class Split:
    """Indices of one seed's train / validation / test units."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_split(n: int, seed: int, test_fraction: float = 0.2, val_fraction: float = 0.1) -> Split:
    """Random train/val/test split of ``n`` units for ``seed`` (same for every method).

    Raises ValueError when a part would be empty.
    """
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if min(n_test, n_val, n - n_test - n_val) < 1:
        raise ValueError(f"{n} units cannot be split into non-empty train/val/test parts "
                         f"(evaluate.test_fraction={test_fraction}, val_fraction={val_fraction})")
    perm = np.random.default_rng(seed).permutation(n)
    return Split(train=np.sort(perm[n_test + n_val:]), val=np.sort(perm[n_test:n_test + n_val]),
                 test=np.sort(perm[:n_test]))


def standardize(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``x`` standardised with the mean/std of its ``train`` rows (constant columns: std 1)."""
    mu = x[train].mean(axis=0)
    sd = x[train].std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return ((x - mu) / sd).astype(np.float32)


def luc_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Macro precision, recall and F1 (classes absent from both count as 0, sklearn's rule)."""
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {"f1": float(f), "precision": float(p), "recall": float(r)}


def sdm_metrics(q: np.ndarray, p: np.ndarray, eps: float = KL_EPS) -> dict[str, float]:
    """Mean over units of KL(q‖p), L1 = Σ|q−p| and Chebyshev = max|q−p| (q true, p predicted)."""
    q = np.asarray(q, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * (np.log(np.where(q > 0, q, 1.0)) - np.log(np.maximum(p, eps))),
                         0.0)
    diff = np.abs(q - p)
    return {"kl": float(terms.sum(axis=1).mean()), "l1": float(diff.sum(axis=1).mean()),
            "chebyshev": float(diff.max(axis=1).mean())}


def _head(d_in: int, d_out: int, cfg: EvaluateSection) -> torch.nn.Module:
    if cfg.head == "linear":
        return torch.nn.Linear(d_in, d_out)
    return torch.nn.Sequential(torch.nn.Linear(d_in, cfg.hidden_dim), torch.nn.ReLU(),
                               torch.nn.Linear(cfg.hidden_dim, d_out))


def _loss(task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "luc":
        return torch.nn.functional.cross_entropy(logits, target)
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def train_head(
    task: str,
    x: np.ndarray,
    y: np.ndarray,
    split: Split,
    cfg: EvaluateSection,
    seed: int,
) -> np.ndarray:
    """Fit a head on ``split.train`` with early stopping on ``split.val``; predict ``split.test``.

    ``task='luc'``: ``y`` are class indices 0…C−1, returns predicted classes.
    ``task='sdm'``: ``y`` are (n, B) distributions, returns (n_test, B) softmax
    probabilities. Deterministic for a given seed.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if task == "luc":
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
        n_out = int(y.max()) + 1
    else:
        yt = torch.from_numpy(np.asarray(y, dtype=np.float32))
        n_out = y.shape[1]
    head = _head(x.shape[1], n_out, cfg)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr, va = torch.from_numpy(split.train), torch.from_numpy(split.val)
    best, best_state, bad = float("inf"), None, 0
    bs = cfg.batch_size or len(tr)
    for _epoch in range(cfg.max_epochs):
        head.train()
        order = tr[torch.randperm(len(tr), generator=gen)] if bs < len(tr) else tr
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            opt.zero_grad(set_to_none=True)
            _loss(task, head(xt[idx]), yt[idx]).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            v = float(_loss(task, head(xt[va]), yt[va]))
        if v < best - 1e-6:
            best, bad = v, 0
            best_state = {k: t.clone() for k, t in head.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        out = head(xt[torch.from_numpy(split.test)])
    if task == "luc":
        return out.argmax(dim=1).numpy()
    return torch.softmax(out, dim=1).numpy().astype(np.float64)


def _one(task: str, x: np.ndarray, y: np.ndarray, split: Split, cfg: EvaluateSection,
         seed: int) -> dict[str, float]:
    """One method on one seed's split: standardise on train, fit the head, score test."""
    xs = standardize(np.asarray(x, dtype=np.float64), split.train)
    pred = train_head(task, xs, y, split, cfg, seed)
    return luc_metrics(y[split.test], pred) if task == "luc" else sdm_metrics(y[split.test], pred)


def _one_threaded(*args: object) -> dict[str, float]:
    torch.set_num_threads(1)  # tiny heads: one thread is fastest and makes runs reproducible
    return _one(*args)  # type: ignore[arg-type]


def evaluate_task(
    task: str,
    features: dict[str, np.ndarray | Callable[[int], np.ndarray]],
    y: np.ndarray,
    cfg: EvaluateSection,
    *,
    log: Callable[[str], None] | None = None,
    workers: int = 1,
) -> dict[str, dict[str, list[float]]]:
    """Run the protocol for one task: ``{method: {metric: [value per seed]}}``.

    ``features`` maps a method to its (n, d) array, or to a function of the
    seed returning it (seed-dependent features such as LDA). ``y``: LUC class
    labels (any integers; mapped to 0…C−1) or SDM (n, B) distributions.
    ``workers`` > 1 fits the (method, seed) heads in that many processes (when units ×
    heads ≥ :data:`PARALLEL_MIN_WORK`); every head runs on one thread from its own seed,
    so the numbers are the same either way.
    """
    n = len(y)
    if task == "luc":
        _, y = np.unique(np.asarray(y), return_inverse=True)
    else:
        y = np.asarray(y, dtype=np.float64)
    out: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS[task]} for m in features}
    jobs = []
    for seed in cfg.seeds:
        split = make_split(n, seed, cfg.test_fraction, cfg.val_fraction)
        for method, feat in features.items():
            x = feat(seed) if callable(feat) else feat
            if x.shape[0] != n:
                raise ValueError(f"{task}/{method}: {x.shape[0]} feature rows for {n} units")
            jobs.append((seed, method, (task, x, y, split, cfg, seed)))
    import multiprocessing as mp

    # a daemonic process (a dask worker under its nanny, e.g. a sweep point) may not
    # start children: its heads are fitted here
    if (workers > 1 and len(jobs) > 1 and n * len(jobs) >= PARALLEL_MIN_WORK
            and not mp.current_process().daemon):
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(_one_threaded, *args) for _s, _m, args in jobs]
            results = []
            for i, f in enumerate(futs):
                results.append(f.result())
                if log and (i + 1) % len(features) == 0:
                    log(f"[evaluate] {task}: seed {jobs[i][0]} done")
    else:
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = []
            for i, (_s, _m, args) in enumerate(jobs):
                results.append(_one(*args))
                if log and (i + 1) % len(features) == 0:
                    log(f"[evaluate] {task}: seed {jobs[i][0]} done")
        finally:
            torch.set_num_threads(torch_threads)
    for (_seed, method, _args), m in zip(jobs, results, strict=True):
        for k, v in m.items():
            out[method][k].append(v)
    return out
