"""A sweep's results: ``sweep.json``, ``sweep.md`` and plots in the form of the paper's
Figure 3 (metric vs λ), Figure 4 (metric vs training fraction) and Table 2 (radii grid).

Every number is AETHER's at that point over the configured seeds (mean ± std, LUC F1
×10², SDM KL ×10³), with AE — the same in every point, it does not depend on the
projector — as the reference line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config import RunConfig
from .points import Point

__all__ = ["write_sweep_report"]

METRICS = (("luc", "f1", 1e2, "LUC F1 ↑"), ("sdm", "kl", 1e3, "SDM KL ↓"))
#: the paper's Section 4.6 findings (London), for the report's comparison
PAPER = {"lam": "Figure 3: best near λ = 0.2 on both tasks",
         "radii": "Table 2: best at r_b = 50 m, r_a = 100 m",
         "train_fraction": "Figure 4: SDM improves with more data; LUC is nearly flat"}


def _stat(metrics: Mapping[str, Any] | None, task: str, key: str, method: str = "AETHER"
          ) -> tuple[float, float] | None:
    v = ((metrics or {}).get(task, {}).get(method, {}) or {}).get(key)
    if not v:
        return None
    a = np.asarray(v, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=0))


def _cell(s: tuple[float, float] | None, scale: float) -> str:
    return "–" if s is None else f"{s[0] * scale:.1f} ± {s[1] * scale:.1f}"


def _rows(points: Sequence[Point], results: Mapping[str, Any], study: str) -> list[Point]:
    return [p for p in points if p.study == study and p.id in results]


def _curve(points: list[Point], results: Mapping[str, Any], ae: dict, path: str,
           xlabel: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = [p.value for p in points]
    for ax, (task, key, scale, label) in zip(axes, METRICS, strict=True):
        st = [_stat(results[p.id]["metrics"], task, key) for p in points]
        ok = [i for i, s in enumerate(st) if s is not None]
        if ok:
            ax.errorbar([xs[i] for i in ok], [st[i][0] * scale for i in ok],
                        yerr=[st[i][1] * scale for i in ok], marker="o", capsize=3,
                        label="AETHER")
        if ae.get(task) is not None:
            m, s = ae[task]
            ax.axhline(m * scale, ls="--", color="grey", label="AE")
            ax.axhspan((m - s) * scale, (m + s) * scale, color="grey", alpha=0.15)
        ax.set_xlabel(xlabel)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.path.basename(path)


def write_sweep_report(root: str, cfg: RunConfig, points: Sequence[Point],
                       results: Mapping[str, Any], failed: Mapping[str, str], *,
                       seconds: float, seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Write ``root/sweep.json``, ``root/sweep.md`` and the plots; return the summary.
    ``seeds``: the evaluation seeds of the points (``sweep.overrides`` may change them)."""
    seeds = list(seeds if seeds is not None else cfg.evaluate.seeds)
    os.makedirs(root, exist_ok=True)
    ae: dict[str, tuple[float, float] | None] = {}
    for task, key, _s, _l in METRICS:
        ae[task] = next((s for p in points if p.id in results
                         if (s := _stat(results[p.id]["metrics"], task, key, "AE"))), None)
    doc = {"name": cfg.sweep.name, "seeds": seeds, "seconds": round(seconds, 1),
           "ae": {t: ({"mean": s[0], "std": s[1]} if s else None) for t, s in ae.items()},
           "points": [{"id": p.id, "study": p.study, "value": p.value, "overrides": p.overrides,
                       "state": ("failed" if p.id in failed else
                                 "reused" if p.id in results and not results[p.id]["ran"]
                                 else "ran" if p.id in results else "missing"),
                       "error": failed.get(p.id),
                       "ran": results.get(p.id, {}).get("ran"),
                       "seconds": results.get(p.id, {}).get("seconds"),
                       "metrics": {t: results[p.id]["metrics"].get(t, {}).get("AETHER")
                                   for t, _k, _s, _l in METRICS} if p.id in results else None}
                      for p in points]}
    md = [f"# Sweep `{cfg.sweep.name}`", "",
          f"AETHER at each point, mean ± std over seeds {seeds}; LUC F1 ×10², "
          "SDM KL ×10³. AE does not depend on the projector: "
          f"LUC F1 {_cell(ae['luc'], 1e2)}, SDM KL {_cell(ae['sdm'], 1e3)}.", ""]
    figs = []
    for study, xlabel, title in (("lam", "λ (weight of the AE↔AE term)", "Metric vs λ"),
                                 ("train_fraction", "training fraction",
                                  "Metric vs training fraction")):
        rows = _rows(points, results, study)
        if not rows:
            continue
        md += [f"## {title} ({PAPER[study]} in the paper)", "",
               f"| {study} | LUC F1 ↑ | SDM KL ↓ |", "|---:|---:|---:|"]
        md += [f"| {p.value:g} | {_cell(_stat(results[p.id]['metrics'], 'luc', 'f1'), 1e2)} | "
               f"{_cell(_stat(results[p.id]['metrics'], 'sdm', 'kl'), 1e3)} |" for p in rows]
        figs.append(_curve(rows, results, ae, os.path.join(root, f"{study}.png"), xlabel, title))
        md += ["", f"![{title}]({figs[-1]})", ""]
    rows = _rows(points, results, "radii")
    if rows:
        rbs = sorted({p.value[0] for p in rows})
        ras = sorted({p.value[1] for p in rows})
        by = {tuple(p.value): p for p in rows}
        md += [f"## Radii grid ({PAPER['radii']} in the paper)", ""]
        for task, key, scale, label in METRICS:
            md += [f"{label}:", "", "| r_b \\ r_a | " + " | ".join(f"{a:g} m" for a in ras) + " |",
                   "|---|" + "---:|" * len(ras)]
            for b in rbs:
                cells = [_cell(_stat(results[by[(b, a)].id]["metrics"], task, key), scale)
                         if (b, a) in by else "–" for a in ras]
                md.append(f"| {b:g} m | " + " | ".join(cells) + " |")
            md.append("")
    other = _rows(points, results, "points")
    if other:
        md += ["## Other points", "", "| point | overrides | LUC F1 ↑ | SDM KL ↓ |",
               "|---|---|---:|---:|"]
        md += [f"| {p.value} | `{json.dumps(p.overrides)}` | "
               f"{_cell(_stat(results[p.id]['metrics'], 'luc', 'f1'), 1e2)} | "
               f"{_cell(_stat(results[p.id]['metrics'], 'sdm', 'kl'), 1e3)} |" for p in other]
        md.append("")
    if failed:
        md += ["## Failed points (rerun the sweep to resume them)", ""]
        md += [f"- `{pid}`: {err} — log `{pid}/sweep.log`" for pid, err in sorted(failed.items())]
        md.append("")
    with open(os.path.join(root, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
    with open(os.path.join(root, "sweep.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    doc["markdown"] = "\n".join(md)
    doc["plots"] = [os.path.join(root, p) for p in figs]
    return doc
