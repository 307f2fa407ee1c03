"""How well text queries find places, where the truth is known (the synthetic city).

For each POI subcategory with enough POIs, the query is its description without a
name (``pois.template_no_name``, e.g. "A place of cafes, a type of Eating and
drinking."), answered by :func:`~aether_scale.query.query` over the field. The truth is
an *independent* POI survey of the same city (``pois_heldout.parquet``: same generator,
another seed — no held-out POI was seen in training). The city is cut into square
cells; a cell is positive for a subcategory when it holds a held-out POI of it.

Scores per cell: the mean similarity of its pixels. Metrics per subcategory: ROC AUC
of the cell scores against positive cells, and precision@k of the k best cells.

The baseline cannot use text: the mean pooled AE vector of the *training* POIs of the
subcategory (from ``triplets.zarr``), matched by cosine to every L2-normalised AE pixel
(nearest neighbours in AE space), scored and measured the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..logs import get_logger

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..workspace import Workspace

__all__ = ["evaluate_retrieval", "retrieval_markdown"]

log = get_logger("query")
NAME = "retrieval-eval"


def _cell_px(chunk: int, want: int) -> int:
    """The divisor of the chunk edge nearest ``want`` (cells never straddle chunks)."""
    divs = [d for d in range(1, chunk + 1) if chunk % d == 0]
    return min(divs, key=lambda d: (abs(d - want), d))


def _cell_mean(b: np.ndarray, c: int) -> np.ndarray:
    """Mean of finite values over ``c × c`` cells of a block ``(h, w, k)``; NaN for a cell
    with fewer than half of its pixels valid."""
    h, w, k = b.shape
    hh, ww = -(-h // c) * c, -(-w // c) * c
    pad = np.full((hh, ww, k), np.nan, dtype=np.float32)
    pad[:h, :w] = b
    pad = pad.reshape(hh // c, c, ww // c, c, k)
    ok = np.isfinite(pad)
    n = ok.sum(axis=(1, 3))
    s = np.where(ok, pad, 0).sum(axis=(1, 3))
    out = np.full(n.shape, np.nan, dtype=np.float32)
    good = n >= (c * c) / 2
    out[good] = s[good] / n[good]
    return out


def _ae_scores(b: np.ndarray, protos: np.ndarray, c: int) -> np.ndarray:
    from .. import aef

    h, w, d = b.shape
    flat = b.reshape(-1, d)
    v = aef.decode_fast(flat)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    s = v @ protos.T
    s[np.any(flat == aef.NODATA, axis=1)] = np.nan
    return _cell_mean(s.reshape(h, w, -1).astype(np.float32), c)


def _cells(arr: Any, c: int, fn: Any, k: int, *args: Any) -> np.ndarray:
    chunks = (tuple(-(-n // c) for n in arr.chunks[0]), tuple(-(-n // c) for n in arr.chunks[1]),
              (k,))
    return np.asarray(arr.map_blocks(fn, *args, c, dtype=np.float32, chunks=chunks).compute())


def _auc(score: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(pos, score)) if 0 < pos.sum() < pos.size else float("nan")


def _precision_at(score: np.ndarray, pos: np.ndarray, k: int) -> float:
    top = np.argsort(-score, kind="stable")[:k]
    return float(pos[top].mean())


def evaluate_retrieval(ws: Workspace, cfg: RunConfig, train_pois: str, heldout_pois: str, *,
                       cell_m: float = 160.0, k: int = 20, min_pois: int = 20,
                       variant: str = "") -> dict[str, Any]:
    """Score text queries against the mean-AE baseline per subcategory (see the module
    docstring); writes ``queries/retrieval-eval/retrieval.{json,md}`` and returns the
    result (``rows`` per subcategory, ``summary`` macro means and wins)."""
    from .. import storage
    from ..pipeline import ARTIFACTS
    from ..stores.ae import open_ae
    from ..stores.raster import locate_pixels
    from ..stores.triplets import TripletStore
    from ..workspace import fingerprint_path, stable_hash
    from .run import query

    t0 = time.perf_counter()
    folder = ws.path(f"queries/{NAME}")
    fld = ARTIFACTS["field.zarr"].variant(variant)
    key = stable_hash([ws.fingerprint(fld), ws.fingerprint("triplets.zarr"),
                       fingerprint_path(train_pois), fingerprint_path(heldout_pois),
                       cfg.pois.template_no_name, cfg.section("text"), cell_m, k, min_pois])
    if ws.fs.exists(f"{folder}/retrieval.json"):
        old = json.loads(ws.fs.cat_file(f"{folder}/retrieval.json"))
        if old.get("key") == key:
            log.info(f"[query] retrieval evaluation: current ({folder}/retrieval.md)")
            return old
    train = storage.read_vector(train_pois)
    held = storage.read_vector(heldout_pois)
    store = TripletStore(ws.path("triplets.zarr"), need_aug=False,
                         storage_options=ws.storage_options or None)
    ids = store.ids()
    base, _, _ = store.read(0, store.n)
    sub_of = dict(zip(train["poi_id"].astype("int64"), train["subcategory"], strict=True))
    cat_of = dict(zip(train["subcategory"], train["category"], strict=True))
    trained_sub = np.asarray([sub_of.get(int(i)) for i in ids], dtype=object)
    subs = [s for s in sorted(cat_of)
            if (trained_sub == s).sum() >= min_pois and (held["subcategory"] == s).sum() >= min_pois]
    if not subs:
        raise ValueError(f"no subcategory has ≥ {min_pois} training and held-out POIs; "
                         "use a larger city (synth.n_pois)")
    phrases = [cfg.pois.template_no_name.format(subcategory=s, category=cat_of[s]) for s in subs]
    res = query(ws, phrases, config=cfg, name=NAME, variant=variant, maps=False,
                top_k=k, min_distance_m=cell_m, progress=False)
    sim = res.similarity
    chunk = int(sim.data.chunks[0][0])
    xs, ys = sim["x"].values, sim["y"].values
    pix = float(abs(xs[1] - xs[0]))
    c = _cell_px(chunk, max(1, round(cell_m / pix)))
    aether = _cells(sim.data, c, _cell_mean, len(subs))
    protos = np.stack([base[trained_sub == s].mean(axis=0) for s in subs]).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    ae = open_ae(ws.path("ae.zarr"), storage_options=ws.storage_options or None)["embedding"]
    if ae.shape[:2] != sim.shape[:2]:
        raise ValueError("ae.zarr and the field have different grids; rerun `aether-scale infer`")
    arr = ae.data.rechunk({0: chunk, 1: int(sim.data.chunks[1][0]), 2: -1})
    baseline = _cells(arr, c, _ae_scores, len(subs), protos)
    transform = (xs[1] - xs[0], 0.0, xs[0] - (xs[1] - xs[0]) / 2,
                 0.0, ys[1] - ys[0], ys[0] - (ys[1] - ys[0]) / 2)
    row, col, inside = locate_pixels(transform, sim.shape[0], sim.shape[1],
                                     held.geometry.x.to_numpy(), held.geometry.y.to_numpy())
    gy, gx = aether.shape[:2]
    cell = (row // c) * gx + col // c
    rows = []
    for q, s in enumerate(subs):
        m = inside & (held["subcategory"].to_numpy() == s)
        pos = np.bincount(cell[m], minlength=gy * gx) > 0
        a, b = aether[:, :, q].ravel(), baseline[:, :, q].ravel()
        ok = np.isfinite(a) & np.isfinite(b)
        rows.append({
            "subcategory": s, "category": cat_of[s], "phrase": phrases[q],
            "train_pois": int((trained_sub == s).sum()), "heldout_pois": int(m.sum()),
            "positive_cells": int(pos[ok].sum()), "cells": int(ok.sum()),
            "auc_aether": _auc(a[ok], pos[ok]), "auc_baseline": _auc(b[ok], pos[ok]),
            f"p@{k}_aether": _precision_at(a[ok], pos[ok], k),
            f"p@{k}_baseline": _precision_at(b[ok], pos[ok], k),
        })
    summary = _summary(rows, k)
    out = {"key": key, "cell_m": c * pix, "cell_px": c, "k": k, "min_pois": min_pois, "variant": variant,
           "model": res.summary["model"], "n_subcategories": len(subs), "summary": summary,
           "rows": rows, "query": res.summary["name"],
           "baseline": "cosine of each L2-normalised AE pixel with the mean pooled AE vector "
                       "(triplets.zarr base) of the subcategory's training POIs",
           "seconds": round(time.perf_counter() - t0, 2)}
    ws.fs.pipe_file(f"{folder}/retrieval.json", json.dumps(out, indent=2).encode())
    ws.fs.pipe_file(f"{folder}/retrieval.md", retrieval_markdown(out).encode())
    log.info(f"[query] retrieval on {len(subs)} subcategories: AUC {summary['auc_aether']:.3f} "
             f"(AE baseline {summary['auc_baseline']:.3f}), text wins {summary['auc_wins']} of "
             f"{len(subs)}; P@{k} {summary['p_aether']:.3f} vs {summary['p_baseline']:.3f} "
             f"({out['seconds']:.0f} s)")
    return out


def _summary(rows: list[Mapping[str, Any]], k: int) -> dict[str, Any]:
    def mean(key: str) -> float:
        v = np.asarray([r[key] for r in rows], dtype=float)
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    return {"auc_aether": mean("auc_aether"), "auc_baseline": mean("auc_baseline"),
            "p_aether": mean(f"p@{k}_aether"), "p_baseline": mean(f"p@{k}_baseline"),
            "auc_wins": int(sum(r["auc_aether"] > r["auc_baseline"] for r in rows)),
            "p_wins": int(sum(r[f"p@{k}_aether"] > r[f"p@{k}_baseline"] for r in rows)),
            "p_ties": int(sum(r[f"p@{k}_aether"] == r[f"p@{k}_baseline"] for r in rows))}


def retrieval_markdown(out: Mapping[str, Any]) -> str:
    """The retrieval section of the demo report (summary table, then per subcategory)."""
    k, s, n = out["k"], out["summary"], out["n_subcategories"]
    lines = [
        "## Text retrieval (synthetic city, held-out POIs)", "",
        f"{n} subcategories with ≥ {out['min_pois']} training and held-out POIs; cells of "
        f"{out['cell_m']:g} m; a cell is positive when an independent held-out POI of the "
        "subcategory lies in it. Query: the subcategory's description without a name.", "",
        f"| method | ROC AUC (mean) | P@{k} (mean) | subcategories won: AUC | P@{k} |",
        "|---|---|---|---|---|",
        f"| AETHER text query | {s['auc_aether']:.3f} | {s['p_aether']:.3f} | "
        f"{s['auc_wins']} of {n} | {s['p_wins']} of {n} |",
        f"| mean AE of training POIs (no text) | {s['auc_baseline']:.3f} | "
        f"{s['p_baseline']:.3f} | {n - s['auc_wins']} of {n} | "
        f"{n - s['p_wins'] - s['p_ties']} of {n} ({s['p_ties']} tied) |", "",
        f"| subcategory | train / held-out POIs | AUC text | AUC AE | P@{k} text | P@{k} AE |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(f"| {r['subcategory']} | {r['train_pois']} / {r['heldout_pois']} | "
                     f"{r['auc_aether']:.3f} | {r['auc_baseline']:.3f} | "
                     f"{r[f'p@{k}_aether']:.2f} | {r[f'p@{k}_baseline']:.2f} |")
    return "\n".join(lines) + "\n"
