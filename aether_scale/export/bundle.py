"""A portable model bundle: the trained projectors without torch pickles, with a model card.

:func:`export_model` turns a ``train`` output (``model/`` or ``model_<variant>/``) into a
folder that can be shared and used without this package's checkpoint format:

- ``model.safetensors`` — both heads (``ae.<param>``, ``txt.<param>``, float32) and string
  metadata (format, dims, dropout, text encoder, train config, metrics; see
  :mod:`aether_scale.model`, whose :func:`~aether_scale.model.load_checkpoint` reads it back);
- ``ae_projector.onnx`` — de-quantised AE ``ae`` (n, 64) → ``embedding`` (n, 128): the L2
  normalisation of :func:`~aether_scale.infer.kernel.project_pixels` included, checked with
  onnxruntime against torch; ``text_projector.onnx`` — ``text`` (n, 384) → ``embedding``;
- ``model_card.json`` / ``model_card.md`` — what the model is, how to feed it, what it was
  trained on (text encoder, counts from the workspace manifests), its losses and evaluation,
  and the SHA-256 of the weight files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__, aef
from ..model import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    BUNDLE_WEIGHTS,
    CHECKPOINT_NAME,
    CheckpointError,
    ae_layout,
    load_checkpoint,
    load_projector,
    load_text_projector,
)
from ..workspace import Workspace

__all__ = ["AE_ONNX", "BundleError", "CARD_JSON", "CARD_MD", "TEXT_ONNX", "export_model"]

AE_ONNX, TEXT_ONNX = "ae_projector.onnx", "text_projector.onnx"
CARD_JSON, CARD_MD = "model_card.json", "model_card.md"
FILES = (BUNDLE_WEIGHTS, AE_ONNX, TEXT_ONNX, CARD_JSON, CARD_MD)
OPSET = 17
TOLERANCE = 1e-5  # max |onnxruntime − torch| accepted on the verification sample
EPS = 1e-12  # the L2 normalisation's floor, as in infer.kernel and F.normalize


class BundleError(ValueError):
    """A bundle that cannot be written; the message names the file and the fix."""


class _NormalisedAE(torch.nn.Module):
    """Raw de-quantised AE → AEProj: rows scaled by 1/max(‖x‖₂, 1e-12) first (the kernel's step)."""

    def __init__(self, ae: torch.nn.Module) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae(x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(EPS))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ae_sample(in_dim: int) -> np.ndarray:
    """A fixed sample of de-quantised AE pixels: uniform codes, then real-looking unit vectors."""
    rng = np.random.default_rng(0)
    uniform = rng.integers(-127, 128, size=(512, in_dim), dtype=np.int8)
    unit = rng.standard_normal((513, in_dim))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    return aef.decode(np.concatenate([uniform, aef.encode(unit)]))


def _export_onnx(module: torch.nn.Module, path: str, name: str, sample: np.ndarray,
                 props: Mapping[str, str], reference: Callable | None = None) -> dict[str, Any]:
    """Export ``module`` (input ``name``, output ``embedding``, dynamic batch), tag it with
    ``props``, and check onnxruntime against ``reference`` (default: ``module``) on
    ``sample`` at batch sizes 1 and all."""
    import onnx
    import onnxruntime as ort

    module = module.eval()
    with warnings.catch_warnings():  # the legacy (TorchScript) exporter: no onnxscript needed
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (torch.from_numpy(sample[:2]),), path, input_names=[name],
                          output_names=["embedding"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={name: {0: "n"}, "embedding": {0: "n"}})
    model = onnx.load(path)
    onnx.helper.set_model_props(model, dict(props))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        want = (reference or module)(torch.from_numpy(sample)).numpy()
    got = sess.run(["embedding"], {name: sample})[0]
    one = sess.run(["embedding"], {name: sample[:1]})[0]
    diff = float(max(np.abs(got - want).max(), np.abs(one - want[:1]).max()))
    if not diff <= TOLERANCE:
        raise BundleError(f"{path}: onnxruntime differs from torch by {diff:.3g} (> {TOLERANCE:g})"
                          f" on {len(sample)} rows; the export is wrong — report it, or export "
                          "with onnx=False")
    return {"file": os.path.basename(path), "opset": OPSET, "input": f"{name} float32 (n, "
            f"{sample.shape[1]})", "output": f"embedding float32 (n, {want.shape[1]})",
            "dynamic_axes": "n (batch)", "verified_with": f"onnxruntime {ort.__version__}",
            "verified_rows": int(len(sample)), "verified_batch_sizes": [1, int(len(sample))],
            "max_abs_diff": diff}


def _model_source(model_dir: str) -> tuple[str, str | None]:
    """``(checkpoint file, metrics.json or None)`` of a model folder or checkpoint file."""
    if os.path.isdir(model_dir):
        ck = os.path.join(model_dir, CHECKPOINT_NAME)
        if not os.path.isfile(ck):
            raise CheckpointError(f"model folder {model_dir} has no {CHECKPOINT_NAME}: run "
                                  "`aether-scale train` first (or point at a model/ folder)")
        metrics = os.path.join(model_dir, "metrics.json")
        return ck, metrics if os.path.isfile(metrics) else None
    if not os.path.isfile(model_dir):
        raise CheckpointError(f"model folder {model_dir} does not exist: run `aether-scale "
                              "train` first (or point at a model/ folder or a checkpoint file)")
    return model_dir, None


def _evaluation(ws: Workspace, method: str) -> dict[str, Any] | None:
    """This method's rows of the workspace's ``report/metrics.json`` (mean, std over seeds),
    with the AlphaEarth baseline beside them; None when evaluate has not run."""
    path = ws.path("report/metrics.json")
    if not ws.fs.exists(path):
        return None
    metrics = json.loads(ws.fs.cat_file(path).decode("utf-8"))

    def rows(m: str) -> dict[str, Any]:
        return {task: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n_seeds": len(v)}
                       for k, v in per[m].items() if v}
                for task, per in metrics.items() if m in per}

    done = (ws.manifest("evaluate") or {}).get("completed_at")
    return {"method": method, "source": path, "completed_at": done, "rows": rows(method),
            "baseline_AE": rows("AE"), "std": "over seeds (ddof 0), as in report.md"}


def _training_data(ws: Workspace, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Counts from the pois / text / pool manifests (what the triplets came from)."""
    p, t, pool = ((ws.manifest(s) or {}).get("stats", {}) for s in ("pois", "text", "pool"))
    te = cfg.get("text_encoder") or {}
    if t.get("model_key") and te.get("model_key") and t["model_key"] != te["model_key"]:
        raise BundleError(f"{ws.manifest_path('text')}: the workspace's texts were embedded by "
                          f"encoder {t['model_key']}, the model was trained on {te['model_key']}: "
                          "pass the workspace the model was trained in, or none")
    return {"workspace": ws.root,
            "pois": {k: p.get(k) for k in ("rows_read", "kept", "dropped")},
            "texts": {"rows": t.get("rows"), "unique": t.get("distinct_texts")},
            "triplets": {k: pool.get(k) for k in ("n_pois", "n_triplets", "n_no_geometry",
                                                  "n_outside_raster", "n_dropped_no_ae",
                                                  "n_dropped_no_text")}}


def _card(ck: Mapping[str, Any], hist: list, src: str, name: str, variant: str,
          ws: Workspace | None) -> dict[str, Any]:
    cfg = dict(ck.get("config") or {})
    ae, txt = ck["ae_state_dict"], ck["txt_state_dict"]
    lay = ae_layout(ae)
    i, f, h, o = lay["in_dim"], lay["proj_dim"], lay["hidden_dim"], lay["out_dim"]
    td = int(txt["proj.weight"].shape[1])
    p = float(cfg.get("dropout", 0.0))
    gate = "sigmoid(gate)·shortcut(x)" if lay["use_gate"] else "shortcut(x)"
    short = f"Linear({i},{o})" if lay["shortcut"] == "linear" else "identity"
    te = cfg.get("text_encoder")
    m = ck.get("metrics") or {}
    best = m.get("best") if isinstance(m.get("best"), Mapping) else (m or None)
    return {
        "card_format": f"{BUNDLE_FORMAT}/{BUNDLE_VERSION}", "name": name, "variant": variant,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "aether_scale_version": __version__,
        "source": {"checkpoint": os.path.abspath(src), "source_format": ck.get("source_format"),
                   "epoch": ck.get("epoch"), "checkpoint_created_at": ck.get("created_at")},
        "architecture": {
            "ae_projector": {"class": "AEProj", **lay, "dropout": p,
                             "sigmoid_gate": (float(torch.sigmoid(ae["gate"]))
                                              if lay["use_gate"] else None),
                             "formula": [f"h = proj(x) + {gate}; proj = Linear("
                                         f"{i},{f})-ReLU-Linear({f},{o}), shortcut = {short}",
                                         "h = h / ‖h‖",
                                         f"out = post_mlp(h) / ‖post_mlp(h)‖; post_mlp = Linear({o},"
                                         f"{h})-GELU-Dropout({p})-Linear({h},{o})"]},
            "text_projector": {"class": "TextProj", "in_dim": td, "out_dim": o,
                               "formula": [f"out = Linear({td},{o})(t) / ‖Linear({td},{o})(t)‖"]}},
        "text_encoder": dict(te, known=True) if te else {
            "known": False, "note": "the checkpoint does not record its text encoder (a reference "
            "AETHER checkpoint, or one from before aether_scale recorded it): the text projector "
            f"expects the {td}-d embeddings of the encoder it was trained with — find out which"},
        "input_contract": {
            "ae_projector": {
                "input": f"(n, {i}) float32 de-quantised AlphaEarth values: v = sign(q)·(q/127.5)² "
                         "of the int8 codes q (aether_scale.aef.decode)",
                "normalisation": f"each row x becomes x / max(‖x‖₂, {EPS:g}) before AEProj: inside "
                                 f"{AE_ONNX}; with the safetensors weights apply it yourself "
                                 "(F.normalize(x, dim=1), as infer.kernel.project_pixels does)",
                "nodata": "a pixel with any code −128 is nodata (AlphaEarth masks whole pixels): "
                          "leave it out, or pass NaN — its output row is NaN, as in field.zarr",
                "output": f"(n, {o}) float32 unit vectors (field.zarr stores them as float16, or "
                          "int8 with the same sqrt codec)"},
            "text_projector": {"input": f"(n, {td}) float32 sentence embeddings from the text "
                                        "encoder above (normalised as it records)",
                               "output": f"(n, {o}) float32 unit vectors"}},
        "training_data": {"n_triplets": cfg.get("n_triplets"),
                          "train_fraction": cfg.get("train_fraction"),
                          **(_training_data(ws, cfg) if ws is not None else {})},
        "train_config": {k: v for k, v in cfg.items() if k != "text_encoder"},
        "losses": {"selection": "best-on-train: the epoch with the lowest L_AP", "best": best,
                   "final": hist[-1] if hist else None, "epochs": hist},
    }


def _cell(r: Mapping[str, Any] | None) -> str:
    return f"{r['mean']:.4f} ± {r['std']:.4f}" if r else "–"


def _markdown(c: Mapping[str, Any]) -> str:
    def kv(d: Mapping[str, Any]) -> list[str]:
        return [f"- {k}: `{json.dumps(v, default=str)}`" for k, v in d.items()]

    a, te, ev = c["architecture"], c["text_encoder"], c.get("evaluation")
    md = [f"# {c['name']} — AETHER projectors ({c['variant'] or 'main'} variant)", "",
          f"Created {c['created_at']} by aether_scale {c['aether_scale_version']} from "
          f"`{c['source']['checkpoint']}` (epoch {c['source']['epoch']}).", "", "## Text encoder",
          "", *(kv({k: te.get(k) for k in ("model", "model_key", "dim", "normalize")})
                if te["known"] else [f"**Unknown**: {te['note']}."]),
          "", "## Architecture", ""]
    for head in a.values():
        md += [f"- {head['class']} ({head['in_dim']} → {head['out_dim']}):"]
        md += [f"  - `{f}`" for f in head["formula"]]
    md += ["", "## Input contract", ""]
    for head, d in c["input_contract"].items():
        md += [f"- **{head}**"] + [f"  - {k}: {v}" for k, v in d.items()]
    md += ["", "## Training data", "", *kv(c["training_data"]), "", "## Train config", "",
           *kv(c["train_config"]), "", "## Losses", "", f"Selection: {c['losses']['selection']}.",
           "", "| epoch | loss | L_AE | L_AP |", "|---:|---:|---:|---:|"]
    for e in c["losses"]["epochs"]:
        md.append("| " + " | ".join("–" if e.get(k) is None else f"{e[k]:.4g}"
                                    for k in ("epoch", "loss", "L_AE", "L_AP")) + " |")
    md += ["", *kv({"best": c["losses"]["best"]}), "", "## Evaluation", ""]
    if not ev:
        md.append("Not recorded (no workspace with an evaluate report was given).")
    else:
        md += [f"From `{ev['source']}` ({ev['completed_at']}); mean ± std {ev['std']}.", "",
               "| task | metric | " + ev["method"] + " | AE baseline |", "|---|---|---:|---:|"]
        for task, mets in (ev["rows"] or {}).items():
            for k, r in mets.items():
                b = ev["baseline_AE"].get(task, {}).get(k)
                md.append(f"| {task} | {k} | {_cell(r)} | {_cell(b)} |")
    md += ["", "## ONNX", ""] + [
        f"- `{o['file']}`: {o['input']} → {o['output']}, opset {o['opset']}, dynamic batch; "
        f"{o['verified_with']} matches torch to {o['max_abs_diff']:.2g} (max |Δ| on "
        f"{o['verified_rows']:,} rows, batch sizes 1 and {o['verified_rows']:,})"
        for o in c["onnx"].values()] or ["Not exported."]
    md += ["", "## Files (SHA-256)", "", *[f"- `{n}`: {f['sha256']} ({f['bytes']:,} bytes)"
                                          for n, f in c["files"].items()]]
    return "\n".join(md) + "\n"


def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 workspace: Workspace | str | os.PathLike | None = None,
                 variant: str | None = None, onnx: bool = True, overwrite: bool = False,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the bundle of ``model_dir`` (a ``train`` output folder or checkpoint) into ``out_dir``.

    ``workspace`` (the one the model was trained in) adds its POI/text/triplet counts and
    the evaluate report's rows for this model; ``variant`` names it (default: from the
    folder name, ``model_noaug`` → ``noaug``). ``onnx`` also writes and verifies the ONNX
    projectors. ``out_dir`` must be empty or absent unless ``overwrite`` (then the bundle's
    files are replaced, other files left alone). Returns the card (``model_card.json``).
    Raises :class:`~aether_scale.model.CheckpointError` for a missing or broken model,
    ``FileExistsError`` for a non-empty ``out_dir``, :class:`BundleError` otherwise.
    """
    from ..pipeline import ARTIFACTS

    say = log or (lambda _m: None)
    model_dir, out_dir = os.fspath(model_dir), os.path.abspath(os.fspath(out_dir))
    src, metrics_path = _model_source(model_dir)
    if os.path.isfile(out_dir) or (os.path.isdir(out_dir) and os.listdir(out_dir)
                                   and not overwrite):
        raise FileExistsError(f"{out_dir} exists and is not empty: pick a new folder, or pass "
                              "overwrite=True to replace the bundle in it")
    if isinstance(workspace, (str, os.PathLike)):
        if "://" not in str(workspace) and not os.path.isdir(workspace):
            raise BundleError(f"workspace {workspace} does not exist: pass the folder the model "
                              "was trained in (`aether-scale run -w …`), or none")
        workspace = Workspace(workspace)
    if variant is None:
        variant = ARTIFACTS["model"].variant_of(os.path.basename(model_dir.rstrip("/"))) or ""
    name = f"AETHER_{variant}" if variant else "AETHER"
    ck = load_checkpoint(src)
    ae, txt = load_projector(src), load_text_projector(src)
    hist = list((ck.get("metrics") or {}).get("epochs") or [])
    if metrics_path:
        with open(metrics_path, encoding="utf-8") as f:
            hist = list(json.load(f).get("epochs") or hist)
    card = _card(ck, hist, src, name, variant, workspace)
    card["evaluation"] = _evaluation(workspace, name) if workspace is not None else None
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        from safetensors.torch import save

        a, td = card["architecture"]["ae_projector"], card["architecture"]["text_projector"]
        meta = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "name": name,
                "in_dim": str(a["in_dim"]), "proj_dim": str(a["proj_dim"]),
                "hidden_dim": str(a["hidden_dim"]), "use_gate": str(a["use_gate"]).lower(),
                "out_dim": str(a["out_dim"]), "dropout": str(a["dropout"]),
                "text_dim": str(td["in_dim"]),
                "text_encoder": json.dumps(ck["config"].get("text_encoder")),
                "config": json.dumps(card["train_config"], default=str),
                "metrics": json.dumps({"best": card["losses"]["best"], "epochs": hist}),
                "epoch": str(ck.get("epoch", -1)), "created_at": card["created_at"]}
        tensors = {f"{head}.{k}": v.detach().to(torch.float32).contiguous()
                   for head, m in (("ae", ae), ("txt", txt)) for k, v in m.state_dict().items()}
        with open(os.path.join(tmp, BUNDLE_WEIGHTS), "wb") as f:  # (save_file makes it 0600)
            f.write(save(tensors, metadata=meta))
        card["onnx"] = {}
        if onnx:
            props = {k: meta[k] for k in ("format", "name", "text_encoder")}
            card["onnx"]["ae_projector"] = _export_onnx(
                _NormalisedAE(ae), os.path.join(tmp, AE_ONNX), "ae", _ae_sample(a["in_dim"]),
                {**props, "input": "de-quantised AE values (not normalised; nodata: NaN)"},
                reference=lambda x: ae(F.normalize(x, dim=1)))  # what infer.kernel computes
            t = torch.from_numpy(np.random.default_rng(1).standard_normal((1025, td["in_dim"])))
            card["onnx"]["text_projector"] = _export_onnx(
                txt, os.path.join(tmp, TEXT_ONNX), "text", F.normalize(t.float(), dim=1).numpy(),
                {**props, "input": f"(n, {td['in_dim']}) text encoder embeddings"})
            say(f"[export] ONNX verified with onnxruntime: max |Δ| "
                f"{max(v['max_abs_diff'] for v in card['onnx'].values()):.2g}")
        card["files"] = {n: {"sha256": _sha256(os.path.join(tmp, n)),
                             "bytes": os.path.getsize(os.path.join(tmp, n))}
                         for n in FILES if os.path.exists(os.path.join(tmp, n))}
        with open(os.path.join(tmp, CARD_JSON), "w", encoding="utf-8") as f:
            json.dump(card, f, indent=2, default=str)
        with open(os.path.join(tmp, CARD_MD), "w", encoding="utf-8") as f:
            f.write(_markdown(card))
        os.makedirs(out_dir, exist_ok=True)
        for n in FILES:  # stale files of an earlier bundle go (e.g. ONNX when onnx=False now)
            if os.path.exists(os.path.join(tmp, n)):
                os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
            elif os.path.exists(os.path.join(out_dir, n)):
                os.remove(os.path.join(out_dir, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"[export] {name} → {out_dir} ({', '.join(card['files'])}, {CARD_JSON}, {CARD_MD})")
    return card
