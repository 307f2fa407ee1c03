"""The ``baselines`` stage: the trained baselines of Table 1 → ``baselines/``.

Reads ``pois.parquet``, ``text.zarr`` (CaLLiPer+ only) and ``regions/`` (the units
and their POI bags), and writes one folder per method::

    baselines/<method>/<task>.npy    features (n_units, d) float32, rows = regions/<task>
    baselines/<method>/meta.json     its key, the unit ids' hash per task, losses, timings
    baselines/<method>/encoder.pt    the trained location encoder (calliper, space2vec)

Each method has its own key (its settings and the fingerprints of the inputs it uses;
of ``regions/`` only the units and POI bags, not the AE/AETHER features): when the
stage reruns because one method's settings or the model changed, the others are copied
from the previous ``baselines/`` instead of trained again (``--force`` trains all). ``evaluate`` puts
every method here beside AE, AETHER, TF-IDF and LDA, on the same splits and seeds.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np

from ..logs import get_logger
from ..stores.regions import RegionTable
from ..workspace.fingerprints import stable_hash

__all__ = ["LABELS", "build", "read_features", "unit_hash"]

log = get_logger("baselines")

#: method → its name in the report (the paper's row names)
LABELS = {"calliper": "CaLLiPer+", "space2vec": "Space2Vec", "place2vec": "Place2Vec",
          "doc2vec": "Doc2Vec"}
_ENCODER = ("dim", "n_scales", "min_scale_m", "max_scale_m", "hidden", "layers", "epochs",
            "batch_size", "lr", "seed")
_SETTINGS = {"calliper": (*_ENCODER, "tau"),
             "space2vec": (*_ENCODER, "context_m", "type_column"),
             "place2vec": ("word_dim", "neighbours", "word_epochs", "type_column", "seed"),
             "doc2vec": ("word_dim", "doc_epochs", "seed")}
_INPUTS = {"calliper": ("pois.parquet", "text.zarr", "regions"),
           "space2vec": ("pois.parquet", "regions"), "place2vec": ("pois.parquet", "regions"),
           "doc2vec": ("regions",)}
_FIX = "rerun `aether-scale baselines -w WS` (it rebuilds baselines/ from regions/)"


def unit_hash(units: Any) -> str:
    """Identity of a task's unit rows (ids in order): features must match it."""
    return stable_hash([str(u) for u in units["unit_id"].tolist()])


def units_key(tasks: dict[str, tuple[Any, Any, dict[str, Any]]]) -> str:
    """What the baselines use of ``regions/``: each task's units (ids, geometry, buffer)
    and POI bags — not the AE/AETHER features, so a new model does not retrain them."""
    import hashlib

    out = {}
    for task, (units, _feats, meta) in sorted(tasks.items()):
        h = hashlib.sha256()
        h.update(unit_hash(units).encode())
        h.update(b"".join(units.geometry.to_wkb().tolist()))
        for col in ("poi_tokens", "poi_counts"):
            if col in units.columns:
                h.update(repr([list(map(str, v)) for v in units[col]]).encode())
        out[task] = [h.hexdigest()[:16], meta.get("buffer_m")]
    return stable_hash(out)


def method_key(method: str, section: dict[str, Any], fingerprints: dict[str, str]) -> str:
    return stable_hash({"method": method, "version": 1,
                        "settings": {k: section[k] for k in _SETTINGS[method]},
                        "inputs": {k: fingerprints.get(k) for k in _INPUTS[method]}})


def _save_npy(fs: Any, path: str, a: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32))
    fs.pipe_file(path, buf.getvalue())


def read_features(uri: str, task: str, units: Any, fs: Any) -> dict[str, np.ndarray]:
    """``{report name: (n, d) float32}`` of every method in ``baselines/`` with features
    for ``task``; raises ``ValueError`` naming the fix when they are of other units."""
    out: dict[str, np.ndarray] = {}
    want = unit_hash(units)
    for method, label in LABELS.items():
        meta_p = f"{uri}/{method}/meta.json"
        if not fs.exists(meta_p) or not fs.exists(f"{uri}/{method}/{task}.npy"):
            continue
        meta = json.loads(fs.cat_file(meta_p))
        if meta.get("units", {}).get(task) != want:
            raise ValueError(f"{uri}/{method}/{task}.npy holds features of other {task} units "
                             f"than regions/{task}.parquet; {_FIX}")
        a = np.load(io.BytesIO(fs.cat_file(f"{uri}/{method}/{task}.npy")))
        if a.shape[0] != len(units) or not np.isfinite(a).all():
            raise ValueError(f"{uri}/{method}/{task}.npy: shape {a.shape} or non-finite values "
                             f"for {len(units)} units; {_FIX}")
        out[label] = a
    return out


class _Inputs:
    """What the methods share, read once and only when a method needs it."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.regions = RegionTable(ctx.reads["regions"], storage_options=ctx.storage_options)
        self.tasks = {t: self.regions.read(t) for t in self.regions.tasks()}
        self._pois: Any = None

    def pois(self) -> Any:
        if self._pois is None:
            from ..stores.pois import PoiTable

            col = self.ctx.cfg.baselines.type_column
            t = PoiTable(self.ctx.reads["pois.parquet"], storage_options=self.ctx.storage_options)
            if col not in t.columns:
                raise ValueError(f"{self.ctx.reads['pois.parquet']}: no column {col!r} (found "
                                 f"{t.columns}) — set baselines.type_column to the POI type "
                                 "column, or drop space2vec/place2vec from baselines.methods")
            pts = t.points()  # ids and coordinates (NaN where none), checked
            types = t.dataset.to_table(columns=[col]).column(col)  # same rows, same order
            self._pois = {"poi_id": pts["poi_id"], "xy": np.c_[pts["x"], pts["y"]],
                          "type": np.asarray(types.cast("string").to_pylist(), dtype=object)}
        return self._pois


def _device(cfg: Any) -> str:
    from ..devices import resolve_device

    return str(resolve_device(cfg.baselines.device, key="baselines.device"))


def _encoder_features(enc: Any, inp: _Inputs) -> dict[str, np.ndarray]:
    from .units import mean_by_unit, unit_samples

    out = {}
    for task, (units, _f, meta) in inp.tasks.items():
        xy, owner = unit_samples(units, meta.get("buffer_m"))
        out[task] = mean_by_unit(enc.embed(xy), owner, len(units))
    return out


def _calliper(inp: _Inputs, bc: Any, info: dict[str, Any]) -> dict[str, np.ndarray]:
    from ..stores.text import TextStore
    from .location import train_calliper

    ctx = inp.ctx
    if "text.zarr" not in ctx.reads:
        raise FileNotFoundError(f"{ctx.ws.path('text.zarr')} does not exist (baselines.methods "
                                "has calliper, which aligns locations with the POI texts); run "
                                "`aether-scale text` first, or drop calliper from the methods")
    text = TextStore(ctx.reads["text.zarr"], storage_options=ctx.storage_options)
    pois = inp.pois()
    order = np.argsort(pois["poi_id"], kind="stable")
    pos = np.clip(np.searchsorted(pois["poi_id"][order], text.poi_id), 0, len(order) - 1)
    found = pois["poi_id"][order][pos] == text.poi_id if len(order) else np.zeros(text.n, bool)
    xy = np.full((text.n, 2), np.nan)
    xy[found] = pois["xy"][order][pos[found]]
    info["texts_without_location"] = int((~found | ~np.isfinite(xy).all(1)).sum())
    res = train_calliper(xy, text.read, text.chunk_rows, text_dim=text.dim,
                         encoder=_enc_cfg(bc), epochs=bc.epochs, batch_size=bc.batch_size,
                         lr=bc.lr, tau=bc.tau, seed=bc.seed, device=_device(ctx.cfg),
                         log=log.info)
    info.update(losses=[round(v, 5) for v in res.losses], pois=int(text.n),
                train_seconds=round(res.seconds, 2), text_encoder=text.encoder())
    info["_encoder"] = res.encoder
    return _encoder_features(res.encoder, inp)


def _enc_cfg(bc: Any) -> dict[str, Any]:
    return {k: getattr(bc, k) for k in ("dim", "n_scales", "min_scale_m", "max_scale_m",
                                        "hidden", "layers")}


def _typed(pois: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    ok = np.isfinite(pois["xy"]).all(1) & np.asarray([t is not None for t in pois["type"]])
    return ok, pois["type"][ok], int((~ok).sum())


def _space2vec(inp: _Inputs, bc: Any, info: dict[str, Any]) -> dict[str, np.ndarray]:
    import pandas as pd

    from .location import category_targets, train_space2vec

    pois = inp.pois()
    ok, types, dropped = _typed(pois)
    codes, classes = pd.factorize(pd.Series(types, dtype=object), sort=True)
    xy = pois["xy"][ok]
    res = train_space2vec(xy, category_targets(xy, codes, len(classes), bc.context_m),
                          len(classes), 4096, encoder=_enc_cfg(bc), epochs=bc.epochs,
                          batch_size=bc.batch_size, lr=bc.lr, seed=bc.seed,
                          device=_device(inp.ctx.cfg), log=log.info)
    info.update(losses=[round(v, 5) for v in res.losses], pois=int(len(xy)),
                pois_without_type_or_location=dropped, classes=int(len(classes)),
                train_seconds=round(res.seconds, 2))
    info["_encoder"] = res.encoder
    return _encoder_features(res.encoder, inp)


def _place2vec(inp: _Inputs, bc: Any, info: dict[str, Any]) -> dict[str, np.ndarray]:
    from .cooccur import place2vec_features, place2vec_vectors

    pois = inp.pois()
    ok, types, dropped = _typed(pois)
    t0 = time.perf_counter()
    vecs = place2vec_vectors(pois["xy"][ok], types, neighbours=bc.neighbours, dim=bc.word_dim,
                             epochs=bc.word_epochs, seed=bc.seed)
    info.update(pois=int(ok.sum()), pois_without_type_or_location=dropped, types=len(vecs),
                train_seconds=round(time.perf_counter() - t0, 2))
    prefix = f"{bc.type_column}="
    out = {}
    for task, (units, _f, _m) in inp.tasks.items():
        if "poi_tokens" not in units.columns:
            raise ValueError(f"regions/{task}.parquet has no POI bags (regions ran without "
                             "pois.parquet); rerun `aether-scale regions` after `pois`")
        toks = list(units["poi_tokens"])
        if not any(t.startswith(prefix) for bag in toks for t in bag):
            raise ValueError(f"regions/{task}.parquet: no bag token starts with {prefix!r}; "
                             f"add {bc.type_column!r} to regions.poi_token_columns or set "
                             "baselines.type_column to one of them")
        out[task] = place2vec_features(toks, list(units["poi_counts"]), vecs, prefix)
    return out


def _doc2vec(inp: _Inputs, bc: Any, info: dict[str, Any]) -> dict[str, np.ndarray]:
    from .cooccur import doc2vec_features

    out = {}
    t0 = time.perf_counter()
    for task, (units, _f, _m) in inp.tasks.items():
        if "poi_tokens" not in units.columns:
            raise ValueError(f"regions/{task}.parquet has no POI bags (regions ran without "
                             "pois.parquet); rerun `aether-scale regions` after `pois`")
        out[task] = doc2vec_features(list(units["poi_tokens"]), list(units["poi_counts"]),
                                     dim=bc.word_dim, epochs=bc.doc_epochs, seed=bc.seed)
        info[f"{task}_units_without_pois"] = int((units["n_pois"] == 0).sum())
    info["train_seconds"] = round(time.perf_counter() - t0, 2)
    return out


_TRAIN = {"calliper": _calliper, "space2vec": _space2vec, "place2vec": _place2vec,
          "doc2vec": _doc2vec}


def build(ctx: Any) -> dict[str, Any]:
    """Train every configured baseline (reusing unchanged ones) and write ``baselines/``."""
    import torch

    from ..devices import choose_threads

    bc = ctx.cfg.baselines
    ws, fs = ctx.ws, ctx.ws.fs
    out = ctx.outputs["baselines"]
    prev = ws.path("baselines")
    fs.makedirs(out, exist_ok=True)
    section = ctx.cfg.section("baselines")
    inp = _Inputs(ctx)
    if not inp.tasks:
        raise ValueError(f"{ctx.reads['regions']} holds no task table; run `aether-scale "
                         "regions` with regions.luc_points and/or regions.sdm_units set")
    fps = {label: i.fingerprint for label, i in ctx.plan.inputs.items()}
    fps["regions"] = units_key(inp.tasks)
    n_threads, _why = choose_threads(bc.threads, key="baselines.threads")
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    stats: dict[str, Any] = {}
    try:
        for method in bc.methods:
            key = method_key(method, section, fps)
            old = f"{prev}/{method}/meta.json"
            if not ctx.force and fs.exists(old) and json.loads(fs.cat_file(old)).get("key") == key:
                fs.copy(f"{prev}/{method}", f"{out}/{method}", recursive=True)
                log.info(f"[baselines] {LABELS[method]}: unchanged (key {key}) — reused")
                stats[method] = "reused"
                continue
            t0 = time.perf_counter()
            info: dict[str, Any] = {}
            feats = _TRAIN[method](inp, bc, info)
            enc = info.pop("_encoder", None)
            fs.makedirs(f"{out}/{method}", exist_ok=True)
            for task, a in feats.items():
                _save_npy(fs, f"{out}/{method}/{task}.npy", a)
            if enc is not None:
                buf = io.BytesIO()
                torch.save({"config": enc.config, "state_dict": enc.state_dict()}, buf)
                fs.pipe_file(f"{out}/{method}/encoder.pt", buf.getvalue())
            meta = {"method": method, "label": LABELS[method], "key": key,
                    "settings": {k: section[k] for k in _SETTINGS[method]},
                    "units": {t: unit_hash(inp.tasks[t][0]) for t in feats},
                    "dims": {t: int(a.shape[1]) for t, a in feats.items()},
                    "seconds": round(time.perf_counter() - t0, 2), **info}
            fs.pipe_file(f"{out}/{method}/meta.json",
                         json.dumps(meta, indent=2, default=str).encode("utf-8"))
            counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in info.items()
                               if isinstance(v, int) and k != "pois")
            log.info(f"[baselines] {LABELS[method]}: {meta['seconds']} s, "
                     f"{', '.join(f'{t} {a.shape[0]}×{a.shape[1]}' for t, a in feats.items())}"
                     + (f"; {counts}" if counts else ""))
            stats[method] = "trained"
    finally:
        torch.set_num_threads(before)
    return {"methods": stats}
