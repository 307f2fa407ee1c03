"""``report/``: the Table-1-shaped table (report.md) and the plots a person wants to look at.

- ``report.md``: mean ± std over seeds per method, scaled like the paper's
  Table 1 (LUC F1/P/R ×10²; SDM KL ×10³, L1 ×10², Chebyshev ×10³), the
  paper's London numbers for reference, unit counts and the protocol.
- ``metrics.png``: one bar chart per metric, methods side by side, error
  bars = std over seeds.
- ``fields.png``: AE and AETHER fields side by side, first three principal
  components as RGB on a coarsened grid (nodata grey).
- ``loss_<model>.png``: the training loss curves from each ``model*/metrics.json``.

Every file is read and written through fsspec (plots are rendered to PNG bytes
in memory, then written), so ``out_dir`` and the workspace may be URLs such as
``s3://bucket/run/report``; local paths behave as plain files.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
from fsspec import AbstractFileSystem

__all__ = ["format_table", "write_report", "plot_metrics", "plot_fields", "plot_loss",
           "PAPER_TABLE1", "SCALE", "METHOD_ORDER", "format_paired", "paired"]

# metric → (scale, column title)
SCALE: dict[str, tuple[float, str]] = {
    "f1": (1e2, "F1"), "precision": (1e2, "Precision"), "recall": (1e2, "Recall"),
    "kl": (1e3, "KL"), "l1": (1e2, "L1"), "chebyshev": (1e3, "Chebyshev"),
}
COLUMNS = [("luc", "f1"), ("luc", "precision"), ("luc", "recall"),
           ("sdm", "kl"), ("sdm", "l1"), ("sdm", "chebyshev")]
METHOD_ORDER = ["TF-IDF", "LDA", "Space2Vec", "Place2Vec", "Doc2Vec", "CaLLiPer+", "AE",
                "AETHER", "AETHER_noaug"]
METHOD_LABEL = {"AE": "AlphaEarth (AE)", "AETHER": "AETHER", "AETHER_noaug": "AETHER (w/o aug)"}


def method_label(m: str) -> str:
    """How a method is named in the table (``AETHER_<variant>`` → ``AETHER (<variant>)``)."""
    if m in METHOD_LABEL:
        return METHOD_LABEL[m]
    if m.startswith("AETHER_"):
        return f"AETHER ({m[7:]})"
    return m

# The paper's Table 1 (London), already scaled: F1, P, R, KL, L1, Chebyshev.
PAPER_TABLE1: dict[str, tuple[float, ...]] = {
    "TF-IDF": (31.7, 31.8, 33.3, 52.0, 24.4, 72.8),
    "LDA": (29.2, 31.5, 30.4, 58.0, 25.9, 77.7),
    "Space2Vec": (27.8, 29.6, 28.9, 50.0, 23.6, 71.2),
    "Place2Vec": (32.4, 35.1, 32.7, 46.1, 22.8, 68.1),
    "Doc2Vec": (32.7, 34.9, 33.8, 47.5, 23.1, 68.9),
    "CaLLiPer+": (37.6, 41.3, 37.8, 37.4, 19.4, 58.3),
    "AE": (56.6, 58.3, 57.3, 43.2, 21.7, 65.9),
    "AETHER": (60.7, 61.4, 60.7, 33.0, 18.8, 56.2),
    "AETHER_noaug": (60.5, 60.5, 60.1, 34.1, 19.1, 57.2),
}


def _methods(metrics: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for task in metrics.values():
        for m in task:
            if m not in seen:
                seen.append(m)
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


def _cell(vals: Sequence[float] | None, scale: float) -> str:
    if not vals:
        return "–"
    a = np.asarray(vals, dtype=np.float64) * scale
    return f"{a.mean():.1f} ± {a.std(ddof=0):.1f}"


def format_table(metrics: dict[str, Any]) -> str:
    """Markdown table: one row per method, Table 1's columns, mean ± std over seeds (scaled)."""
    head = "| Model | LUC F1 ↑ | Precision ↑ | Recall ↑ | SDM KL ↓ | L1 ↓ | Chebyshev ↓ |"
    lines = [head, "|---|" + "---:|" * 6]
    for m in _methods(metrics):
        cells = [_cell(metrics.get(t, {}).get(m, {}).get(k), SCALE[k][0]) for t, k in COLUMNS]
        lines.append(f"| {method_label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(metrics: dict[str, Any], task: str, method: str, base: str = "AE"
           ) -> dict[str, Any] | None:
    """Per-seed paired difference of ``method`` against ``base`` on ``task``'s main metric
    (same split in each seed): LUC F1 in points (method − base), SDM KL as the relative
    gain in % ((base − method) / base; positive = better). Mean, std, the 95 % t
    interval of the mean, and whether it excludes 0. None without both methods."""
    from scipy import stats

    key = "f1" if task == "luc" else "kl"
    a = metrics.get(task, {}).get(method, {}).get(key)
    b = metrics.get(task, {}).get(base, {}).get(key)
    if not a or not b or len(a) != len(b):
        return None
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a - b) * 100 if task == "luc" else (b - a) / b * 100
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    lo, hi = float(d.mean()) - half, float(d.mean()) + half
    return {"mean": float(d.mean()), "std": sd, "ci95": [lo, hi], "seeds": n,
            "per_seed": [float(v) for v in d], "beyond_noise": bool(n > 1 and (lo > 0 or hi < 0))}


def format_paired(metrics: dict[str, Any]) -> str:
    """Markdown table of :func:`paired` for every method against AE (both tasks)."""
    head = ("| Model vs AE (same split per seed) | LUC F1 − AE, points [95 % CI] | "
            "SDM KL gain over AE, % [95 % CI] |")
    lines = [head, "|---|---:|---:|"]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "–"
        lo, hi = r["ci95"]
        tag = "" if r["beyond_noise"] else " (within noise)"
        return f"{r['mean']:+.1f} ± {r['std']:.1f} [{lo:+.1f}, {hi:+.1f}]{tag}"

    for m in _methods(metrics):
        if m == "AE":
            continue
        lines.append(f"| {method_label(m)} | {cell(paired(metrics, 'luc', m))} | "
                     f"{cell(paired(metrics, 'sdm', m))} |")
    return "\n".join(lines)


def _paper_table() -> str:
    lines = ["| Model (paper, London) | F1 | Precision | Recall | KL | L1 | Chebyshev |",
             "|---|" + "---:|" * 6]
    for m, row in PAPER_TABLE1.items():
        lines.append(f"| {method_label(m)} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines)


def _findings(metrics: dict[str, Any]) -> list[str]:
    """The paper's qualitative claims, checked on these numbers (means over seeds)."""
    out = []

    def mean(t: str, m: str, k: str) -> float | None:
        v = metrics.get(t, {}).get(m, {}).get(k)
        return float(np.mean(v)) if v else None

    ae_kl, ath_kl = mean("sdm", "AE", "kl"), mean("sdm", "AETHER", "kl")
    if ae_kl is not None and ath_kl is not None:
        out.append(f"- SDM KL: AETHER {ath_kl * 1e3:.1f} vs AE {ae_kl * 1e3:.1f} "
                   f"({(ath_kl - ae_kl) / ae_kl * 100:+.1f} %; paper −23.6 %)")
    ae_f1, ath_f1 = mean("luc", "AE", "f1"), mean("luc", "AETHER", "f1")
    if ae_f1 is not None and ath_f1 is not None:
        out.append(f"- LUC F1: AETHER {ath_f1 * 1e2:.1f} vs AE {ae_f1 * 1e2:.1f} "
                   f"({(ath_f1 - ae_f1) * 1e2:+.1f} points; paper +4.1)")
    for b in ("TF-IDF", "LDA", "Space2Vec", "Place2Vec", "Doc2Vec", "CaLLiPer+"):
        bf = mean("luc", b, "f1")
        if ae_f1 is not None and bf is not None:
            out.append(f"- LUC F1: AE {ae_f1 * 1e2:.1f} vs {b} {bf * 1e2:.1f} "
                       f"({'AE ahead' if ae_f1 > bf else 'AE NOT ahead'})")
    cal_kl = mean("sdm", "CaLLiPer+", "kl")
    if cal_kl is not None and ae_kl is not None:
        out.append(f"- SDM KL: CaLLiPer+ {cal_kl * 1e3:.1f} vs AE {ae_kl * 1e3:.1f} "
                   f"({'CaLLiPer+ ahead' if cal_kl < ae_kl else 'CaLLiPer+ NOT ahead'}; paper: "
                   "CaLLiPer+ 37.4 ahead of AE 43.2)")
    if cal_kl is not None and ath_kl is not None:
        out.append(f"- SDM KL: AETHER {ath_kl * 1e3:.1f} vs CaLLiPer+ {cal_kl * 1e3:.1f} "
                   f"({(ath_kl - cal_kl) / cal_kl * 100:+.1f} %; paper −11.8 %)")
    return out


def _fs(path: str, fs: AbstractFileSystem | None) -> AbstractFileSystem:
    """``fs`` when given, else the filesystem ``path`` (a local path or fsspec URL) lives on."""
    return fs if fs is not None else fsspec.core.url_to_fs(str(path))[0]


def _join(d: str, name: str) -> str:
    """``d/name`` for local paths and URLs alike (URLs always use ``/``, whatever the OS)."""
    return f"{str(d).rstrip('/')}/{name}"


def write_report(out_dir: str, metrics: dict[str, Any], run_info: dict[str, Any], *,
                 fs: AbstractFileSystem | None = None, plots: bool = True,
                 fields: tuple[str, str] | None = None, models: dict[str, str] | None = None,
                 storage_options: dict | None = None) -> str:
    """Write ``report.md`` (+ plots) into ``out_dir``; returns the table as printed text.

    ``out_dir`` may be a local path or fsspec URL (``fs``: its filesystem). ``fields``:
    ``(ae.zarr, field.zarr)`` for the PCA maps; ``models``: ``{name: model folder}``
    for the loss curves; ``storage_options`` open them when they are URLs. The folder
    is created when missing.
    """
    fs = _fs(out_dir, fs)
    fs.makedirs(out_dir, exist_ok=True)
    table = format_table(metrics)
    figs: list[str] = []
    if plots:
        figs += plot_metrics(metrics, _join(out_dir, "metrics.png"), fs=fs)
        if fields is not None:
            figs += plot_fields(fields[0], fields[1], _join(out_dir, "fields.png"), fs=fs,
                                storage_options=storage_options)
        for name, mdir in sorted((models or {}).items()):
            figs += plot_loss(mdir, _join(out_dir, f"loss_{name}.png"), fs=fs,
                              storage_options=storage_options)
    cfg = run_info.get("config", {})
    tasks = run_info.get("tasks", {})
    units = ", ".join(f"{t}: {v['units']:,} units" + (f", {v['classes']} classes"
                                                     if "classes" in v else "")
                      for t, v in tasks.items())
    md = [
        "# AETHER evaluation (Table 1 protocol)",
        "",
        f"Mean ± std over seeds {cfg.get('seeds')}. LUC metrics ×10² (higher is better); "
        "SDM KL and Chebyshev ×10³, L1 ×10² (lower is better).",
        "",
        table,
        "",
        "## Paired differences against AE",
        "",
        "Per seed, each method and AE are scored on the same test units; the difference is "
        "taken per seed, then summarised: mean ± std over seeds and the 95 % t interval of "
        "the mean. \"Within noise\": the interval includes 0 — the seeds cannot tell the "
        "method from AE.",
        "",
        format_paired(metrics),
        "",
        "## Findings checked",
        "",
        *(_findings(metrics) or ["- (not enough methods to compare)"]),
        "",
        "## Protocol",
        "",
        f"- Units: {units}.",
        f"- Splits: random per seed, test {cfg.get('test_fraction')}, validation "
        f"{cfg.get('val_fraction')}, rest train — identical for every method.",
        f"- Head: {cfg.get('head')} (hidden {cfg.get('hidden_dim')}), Adam lr {cfg.get('lr')}, "
        f"{'full batch' if not cfg.get('batch_size') else 'minibatches of ' + str(cfg.get('batch_size'))}, "
        f"early stopping on validation loss (patience {cfg.get('patience')}, "
        f"≤ {cfg.get('max_epochs')} epochs); features standardised on train.",
        "- LUC: cross-entropy, macro P/R/F1. SDM: softmax head, soft cross-entropy; "
        "KL(q‖p), L1, Chebyshev averaged over test units.",
        "- TF-IDF / LDA: bags of POI categories/subcategories within each unit's buffer.",
        "- CaLLiPer+ / Space2Vec: a multi-scale sinusoidal location encoder + MLP, trained on "
        "the POIs (CaLLiPer+: InfoNCE against the POI texts with names; Space2Vec: the POI-type "
        "mix around each POI, no text); a unit's feature is the encoder's mean over 13 points "
        "in its buffer (`baselines/`).",
        "- Place2Vec: skip-gram type vectors from nearest-neighbour POI pairs, averaged over the "
        "unit's POIs; Doc2Vec: PV-DBOW vectors of the unit's POI-token documents (gensim).",
        "",
        "## Paper (London) for reference",
        "",
        _paper_table(),
        "",
    ]
    if figs:
        md += ["## Plots", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figs]
    fs.pipe_file(_join(out_dir, "report.md"), ("\n".join(md) + "\n").encode("utf-8"))
    return table + "\n\n" + format_paired(metrics) + "\n" + "\n".join(_findings(metrics))


# --------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str, fs: AbstractFileSystem | None) -> list[str]:
    """Lay out ``fig``, render it to PNG bytes in memory, write them to ``path`` through
    fsspec and close the figure (also on failure); returns ``[path]``.

    matplotlib can only save to local files or file objects; rendering to bytes
    first lets the same code write to ``s3://`` (one PUT, no partial object).
    """
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        _fs(path, fs).pipe_file(path, buf.getvalue())
    finally:
        _plt().close(fig)
    return [path]


def plot_metrics(metrics: dict[str, Any], path: str, *,
                 fs: AbstractFileSystem | None = None) -> list[str]:
    """Bar chart per metric (methods side by side, std error bars) → ``path`` (on ``fs``)."""
    plt = _plt()
    cols = [(t, k) for t, k in COLUMNS if t in metrics]
    if not cols:
        return []
    methods = _methods(metrics)
    tasks = [t for t in ("luc", "sdm") if t in metrics]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(10, 3.4 * len(tasks)), squeeze=False)
    colors = plt.get_cmap("tab10")
    flat_axes = [axes[tasks.index(t)][i % 3] for i, (t, _k) in enumerate(cols)]
    for ax, (t, k) in zip(flat_axes, cols, strict=True):
        sc, title = SCALE[k]
        means, stds = [], []
        for m in methods:
            v = np.asarray(metrics[t].get(m, {}).get(k, []), dtype=float) * sc
            means.append(v.mean() if v.size else np.nan)
            stds.append(v.std() if v.size else 0.0)
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3,
               color=[colors(i) for i in range(len(methods))])
        ax.set_xticks(range(len(methods)), [method_label(m).replace(" (", "\n(")
                                            for m in methods], rotation=45, ha="right", fontsize=7)
        arrow = "↑" if t == "luc" else "↓"
        ax.set_title(f"{t.upper()} {title} {arrow} (×{sc:g})", fontsize=9)
        finite = [m for m in means if np.isfinite(m)]
        if finite:
            lo = min(finite) - 2 * max(stds + [1e-9])
            ax.set_ylim(bottom=max(0.0, lo * 0.9))
    return _save(fig, path, fs)


def _coarse(path: str, max_px: int = 400, *, storage_options: dict | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """A strided view of a field (≤ ``max_px`` on the long side) as float32 + valid mask.

    ``path`` may be an fsspec URL; ``storage_options`` go to the Zarr opener.
    """
    from .. import aef
    from ..stores.raster import open_embedding

    da = open_embedding(path, storage_options=storage_options or None)
    step = max(1, int(np.ceil(max(da.sizes["y"], da.sizes["x"]) / max_px)))
    sub = da.isel(y=slice(None, None, step), x=slice(None, None, step)).values
    if np.issubdtype(sub.dtype, np.integer):
        valid = aef.valid_mask(sub)
        arr = aef.decode_fast(sub.astype(np.int8))
    else:
        arr = sub.astype(np.float32)
        valid = np.all(np.isfinite(arr), axis=-1)
    return arr, valid


def _pca_rgb(arr: np.ndarray, valid: np.ndarray) -> np.ndarray:
    rgb = np.full(valid.shape + (3,), 0.6, dtype=np.float32)
    if valid.sum() < 4:
        return rgb
    x = arr[valid].astype(np.float64)
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x[:: max(1, len(x) // 20000)], full_matrices=False)
    pcs = x @ vt[:3].T
    lo, hi = np.percentile(pcs, 2, axis=0), np.percentile(pcs, 98, axis=0)
    rgb[valid] = np.clip((pcs - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1)
    return rgb


def plot_fields(ae_path: str, field_path: str, path: str, *,
                fs: AbstractFileSystem | None = None,
                storage_options: dict | None = None) -> list[str]:
    """AE and AETHER side by side: first 3 principal components as RGB → ``path`` (on ``fs``).

    ``storage_options`` are for opening the two Zarr stores when they are URLs.
    """
    # read both stores before making a figure, so a bad store leaves no open figure behind
    rgbs = [_pca_rgb(*_coarse(p, storage_options=storage_options)) for p in (ae_path, field_path)]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, rgb, title in zip(axes, rgbs, ["AlphaEarth (AE), PC1–3", "AETHER field, PC1–3"],
                              strict=True):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    return _save(fig, path, fs)


def plot_loss(model_dir: str, path: str, *, fs: AbstractFileSystem | None = None,
              storage_options: dict | None = None) -> list[str]:
    """Per-epoch training losses from a model folder's ``metrics.json`` → ``path`` (on
    ``fs``); no plot when it has none. ``model_dir`` may be an fsspec URL."""
    from ..stores.models import read_metrics

    m = read_metrics(model_dir, storage_options=storage_options)
    epochs = m.get("epochs") if isinstance(m, dict) else None
    if not isinstance(epochs, list) or not epochs or not isinstance(epochs[0], dict):
        return []
    keys = [k for k in epochs[0] if ("loss" in k.lower() or k.startswith("L_"))
            and isinstance(epochs[0][k], (int, float))]
    if not keys:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [e.get("epoch", i + 1) for i, e in enumerate(epochs)]
    for k in keys:
        ax.plot(xs, [e.get(k, np.nan) for e in epochs], label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss ({os.path.basename(str(model_dir).rstrip('/'))})")
    ax.legend()
    return _save(fig, path, fs)
