"""The AETHER projectors and their checkpoints (our format and the reference one).

:class:`AEProj` is the reference AETHER AE projector, parameter for parameter
(so the published checkpoints load with ``strict=True``)::

    h   = proj(x) + sigmoid(gate) * shortcut(x)      proj = Linear(64,256)-ReLU-Linear(256,128)
    h   = h / ||h||                                  shortcut = Linear(64,128), gate init −4
    out = post_mlp(h) / ||post_mlp(h)||              post_mlp = Linear(128,H)-GELU-Dropout-Linear(H,128)

with the reference's options: the post-MLP width ``H`` (``hidden``), no gate, an
identity shortcut when the output is 64-d.

:class:`TextProj` is one ``Linear(384,128)`` followed by L2 normalisation.

Checkpoints
-----------
Ours (``checkpoint.pt``, ``last.pt``) is a ``torch.save`` dict of plain tensors
and Python builtins::

    {"format": "aether_scale/1", "ae_state_dict", "txt_state_dict",
     "config": {train section + in_dim/text_dim}, "epoch", "metrics", ...}

The reference layout (``ae_state_dict``, ``txt_state_dict``, ``epoch``,
``hyper_parameters``, ``temps``, ``model_types``, …) is read by
:func:`load_checkpoint` and written by :func:`export_reference`. Every load goes
through ``torch.load(weights_only=True)``: a file holding an arbitrary pickled
object is refused (:class:`CheckpointError`), never executed.

A model bundle (:mod:`aether_scale.export.bundle`) holds ``model.safetensors``:
``ae.<param>`` / ``txt.<param>`` float32 tensors and string metadata (``format``
``aether_scale/bundle``, ``format_version``, dims, ``dropout``, and JSON strings
``text_encoder``, ``config``, ``metrics``). :func:`load_checkpoint` reads a bundle
folder or that file into the same layout, so a bundle works wherever a model folder does.

The module is longer than the project's ~400-line guide: the projectors and the two
checkpoint layouts are kept together because every layout function maps parameter
names of these exact modules (``proj.0``, ``shortcut``, ``gate``, ``post_mlp.3`` …) in
both directions; splitting the formats from the modules would put each name mapping
away from the layer it names. The seam, should it grow, is "modules" vs "formats".
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gemm import Linear

FORMAT = "aether_scale/1"
CHECKPOINT_NAME = "checkpoint.pt"
LAST_NAME = "last.pt"
BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_FORMAT = "aether_scale/bundle"
BUNDLE_VERSION = "1"
#: the reference AEProj's first-layer width (fixed in its code; ``hidden`` is the post-MLP's)
REFERENCE_PROJ_DIM = 256

__all__ = [
    "AEProj",
    "TextProj",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_projector",
    "load_text_projector",
    "export_reference",
    "ae_layout",
    "projector_from",
    "FORMAT",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask on CPU: same semantics, 1/4 of the random draws.

    On CPU, drawing one Bernoulli per element dominates the post-MLP (≈2 ms of a
    ≈15 ms training step on 2 cores). Here each element's keep/drop decision comes
    from 16 random bits (``torch.randint`` int64 draws viewed as int16), so ``p`` is
    honoured to 1/65,536; the kept values are scaled by 1/(1−p) as usual. The draws
    come from torch's generator, so seeding, determinism and resume behave exactly
    like ``nn.Dropout``. On other devices it is ``nn.Dropout``. No parameters: state
    dicts are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p == 1.0:
            return torch.zeros_like(x)
        return x.masked_fill(drop_mask(x.shape, self.p), 0.0).mul_(1.0 / (1.0 - self.p))


def drop_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """The CPU dropout decision for a tensor of ``shape``: True = drop (probability ``p``).

    16 random bits per element from torch's global generator (int64 draws viewed
    as int16). Shared by :class:`Dropout` and the fused training kernels, so both
    drop the same elements for the same RNG state.
    """
    n = math.prod(shape)
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    return bits.view(torch.int16)[:n].view(shape) < (round(p * 65536) - 32768)


class AEProj(nn.Module):
    """AlphaEarth projector f_θ: (n, 64) pooled, L2-normalised AE → (n, 128) unit vectors.

    Exactly the reference ``AEProj`` (same parameter names and shapes), so every
    reference checkpoint layout loads with ``strict=True``: ``proj_dim`` is the first
    layer's width (always 256 in the reference), ``hidden_dim`` the post-MLP's (the
    reference's ``hidden``), ``use_gate=False`` drops the gate (``h = proj(x) +
    shortcut(x)``), and the shortcut is the identity when ``in_dim == out_dim``. The
    reference trains with no dropout (``p_drop=0.0``), the default here too. Its
    layers are :class:`aether_scale.gemm.Linear` (``nn.Linear`` with its float32 CPU
    products through oneDNN).
    """

    def __init__(
        self,
        in_dim: int = 64,
        hidden_dim: int = 256,
        out_dim: int = 128,
        dropout: float = 0.0,
        gate_init: float = -4.0,
        *,
        proj_dim: int = 256,
        use_gate: bool = True,
    ) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.proj_dim, self.use_gate = proj_dim, bool(use_gate)
        self.proj = nn.Sequential(
            Linear(in_dim, proj_dim), nn.ReLU(), Linear(proj_dim, out_dim)
        )
        self.shortcut: nn.Module = (Linear(in_dim, out_dim) if in_dim != out_dim
                                    else nn.Identity())
        if self.use_gate:
            self.gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.post_mlp = nn.Sequential(
            Linear(out_dim, hidden_dim),
            nn.GELU(),
            Dropout(dropout),
            Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` (n, in_dim) to L2-normalised (n, out_dim)."""
        res = self.shortcut(x)
        h = self.proj(x) + (torch.sigmoid(self.gate) * res if self.use_gate else res)
        h = F.normalize(h, dim=-1)
        return F.normalize(self.post_mlp(h), dim=-1)

    def layout(self) -> dict[str, Any]:
        """The architecture's free choices (what a checkpoint needs to rebuild it)."""
        return {"in_dim": self.in_dim, "proj_dim": self.proj_dim, "hidden_dim": self.hidden_dim,
                "out_dim": self.out_dim, "use_gate": self.use_gate,
                "shortcut": "linear" if isinstance(self.shortcut, nn.Linear) else "identity"}


def ae_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """An ``AEProj`` state dict's layout (as :meth:`AEProj.layout`), read off its shapes."""
    return {"in_dim": int(sd["proj.0.weight"].shape[1]),
            "proj_dim": int(sd["proj.0.weight"].shape[0]),
            "hidden_dim": int(sd["post_mlp.0.weight"].shape[0]),
            "out_dim": int(sd["proj.2.weight"].shape[0]),
            "use_gate": "gate" in sd,
            "shortcut": "linear" if "shortcut.weight" in sd else "identity"}


class TextProj(nn.Module):
    """POI text projector: (n, 384) sentence embeddings → (n, 128) unit vectors."""

    def __init__(self, in_dim: int = 384, out_dim: int = 128) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = Linear(in_dim, out_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Project ``t`` (n, in_dim) to L2-normalised (n, out_dim)."""
        return F.normalize(self.proj(t), dim=-1)


# --------------------------------------------------------------------------- state dicts
def _plain_state(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of detached, contiguous CPU tensors (safe to pickle, device-free)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def _unwrap(m: nn.Module) -> nn.Module:
    """The module under a DDP / torch.compile wrapper (state dict keys without prefixes)."""
    while True:
        if hasattr(m, "module") and isinstance(m.module, nn.Module):
            m = m.module
        elif hasattr(m, "_orig_mod") and isinstance(m._orig_mod, nn.Module):
            m = m._orig_mod
        else:
            return m


def save_checkpoint(
    path: str | os.PathLike,
    ae: nn.Module,
    txt: nn.Module,
    *,
    config: Mapping[str, Any],
    epoch: int,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write our checkpoint format atomically (temporary file, then rename).

    ``config`` must hold only builtins (the train section plus ``in_dim`` and
    ``text_dim``); ``extra`` adds keys (e.g. optimizer state for ``last.pt``),
    which must also be tensors/builtins so the file loads with
    ``weights_only=True``.
    """
    ae, txt = _unwrap(ae), _unwrap(txt)
    obj: dict[str, Any] = {
        "format": FORMAT,
        "ae_state_dict": _plain_state(ae.state_dict()),
        "txt_state_dict": _plain_state(txt.state_dict()),
        "config": dict(config),
        "epoch": int(epoch),
        "metrics": dict(metrics or {}),
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if extra:
        obj.update(extra)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _safe_load(path: str) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that say what went wrong."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and Python builtins and "
            f"was refused (safe loading, weights_only=True). Only load files you trust; "
            f"re-save it as plain state dicts. Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} could not be read as a torch file: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj


def _resolve(path: str | os.PathLike) -> str:
    """A model folder → its checkpoint.pt (a bundle folder → its model.safetensors); a file
    path is returned as is."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (CHECKPOINT_NAME, BUNDLE_WEIGHTS):
            if os.path.exists(p := os.path.join(path, name)):
                return p
        raise CheckpointError(
            f"model folder {path} has no {CHECKPOINT_NAME} (is it a finished 'train' output?) "
            f"and no {BUNDLE_WEIGHTS} (a model bundle)")
    return path


def _load_safetensors(path: str) -> dict[str, Any]:
    """A bundle's ``model.safetensors`` → our layout (``source_format`` ``"safetensors"``)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    fix = ("re-export the bundle from its model folder "
           "(aether_scale.export.bundle.export_model), or point at the model folder itself")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} could not be read as a safetensors file: "
                              f"{e}; {fix}") from None
    if meta.get("format") != BUNDLE_FORMAT or meta.get("format_version") != BUNDLE_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: metadata format {meta.get('format')!r} version "
            f"{meta.get('format_version')!r}, expected {BUNDLE_FORMAT!r} version "
            f"{BUNDLE_VERSION!r} (not an aether_scale model bundle, its metadata was stripped, "
            f"or a newer version wrote it); {fix}")
    try:
        cfg, metrics = json.loads(meta.get("config", "{}")), json.loads(meta.get("metrics", "{}"))
        cfg["text_encoder"] = json.loads(meta.get("text_encoder", "null"))
        cfg["dropout"] = float(meta.get("dropout", cfg.get("dropout", 0.0)))
        epoch = int(meta.get("epoch", -1))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: metadata config/metrics/text_encoder/dropout/"
                              f"epoch is malformed ({e}); {fix}") from None
    other = sorted(k for k in tensors if not k.startswith(("ae.", "txt.")))
    if other:
        raise CheckpointError(f"checkpoint {path}: tensors {other[:5]} are neither ae.<param> nor "
                              f"txt.<param>; {fix}")
    obj = {"format": FORMAT, "source_format": "safetensors",
           "ae_state_dict": {k[3:]: v for k, v in tensors.items() if k.startswith("ae.")},
           "txt_state_dict": {k[4:]: v for k, v in tensors.items() if k.startswith("txt.")},
           "config": cfg, "epoch": epoch, "metrics": metrics,
           "created_at": meta.get("created_at"), "bundle_metadata": meta}
    _check_states(path, obj)
    return obj


def _config_from_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    hp = obj.get("hyper_parameters") or {}
    model = hp.get("model") or {}
    train = hp.get("train") or {}
    ae = obj["ae_state_dict"]
    txt = obj["txt_state_dict"]
    temps = obj.get("temps") or {}
    lay = ae_layout(ae)
    cfg: dict[str, Any] = {
        "in_dim": lay["in_dim"],
        "proj_dim": lay["proj_dim"],
        "hidden_dim": lay["hidden_dim"],
        "out_dim": lay["out_dim"],
        "use_gate": lay["use_gate"],
        "dropout": 0.0,  # the reference never sets p_drop
        "text_dim": int(txt["proj.weight"].shape[1]),
        "tau_poi": temps.get("tau_xt", model.get("tau_xt")),
        "tau_ae": temps.get("tau_ii", model.get("tau_img")),
        "lam": model.get("lambda"),
        "lr": model.get("lr"),
        "weight_decay": model.get("weight_decay"),
        "batch_size": train.get("batch_size"),
        "epochs": train.get("epochs"),
        "lr_final_frac": train.get("eta_min_ratio"),
    }
    return {k: v for k, v in cfg.items() if v is not None}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load our checkpoint or a reference AETHER checkpoint, safely, on CPU.

    ``path`` may be a model folder (its ``checkpoint.pt``), one of our ``.pt``
    files, a reference ``.pth``, or a model bundle (its folder or ``model.safetensors``).
    Returns our layout: ``format``, ``ae_state_dict``, ``txt_state_dict``, ``config``
    (with ``in_dim``, ``hidden_dim``, ``out_dim``, ``text_dim``), ``epoch``, ``metrics``,
    plus ``source_format`` (``"aether_scale/1"``, ``"reference"`` or ``"safetensors"``).
    Raises :class:`CheckpointError` for missing files, unsafe pickles or unknown layouts.
    """
    p = _resolve(path)
    if p.endswith(".safetensors"):
        return _load_safetensors(p)
    obj = _safe_load(p)
    fmt = obj.get("format")
    if fmt is not None and fmt != FORMAT:
        raise CheckpointError(
            f"checkpoint {p}: format {fmt!r} is not supported by this version (expects {FORMAT!r})"
        )
    for key in ("ae_state_dict", "txt_state_dict"):
        if not isinstance(obj.get(key), Mapping):
            raise CheckpointError(
                f"checkpoint {p} has no {key!r}; expected an aether_scale checkpoint or the "
                f"reference AETHER layout (keys ae_state_dict, txt_state_dict)"
            )
    _check_states(p, obj)
    if fmt == FORMAT:
        out = dict(obj)
        out["source_format"] = FORMAT
        return out
    tm = obj.get("train_metrics") or {}
    return {
        "format": FORMAT,
        "source_format": "reference",
        "ae_state_dict": dict(obj["ae_state_dict"]),
        "txt_state_dict": dict(obj["txt_state_dict"]),
        "config": _config_from_reference(obj),
        "epoch": int(obj.get("epoch", -1)),
        "metrics": {
            k: v for k, v in {"loss": tm.get("loss"), "L_AP": tm.get("L_xt"),
                              "L_AE": tm.get("L_ii")}.items() if v is not None
        },
        "reference_extra": {
            k: obj[k] for k in ("hyper_parameters", "model_types", "temps", "created_at")
            if k in obj
        },
    }


#: the parameters every AE / text projector state dict must hold (AEProj / TextProj); the
#: gate and a linear shortcut are optional (the reference's use_gate=False, 64-d output)
_AE_KEYS = ("proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias",
            "post_mlp.0.weight", "post_mlp.0.bias", "post_mlp.3.weight", "post_mlp.3.bias")
_TXT_KEYS = ("proj.weight", "proj.bias")


def _check_states(path: str, obj: Mapping[str, Any]) -> None:
    """Both state dicts hold every projector parameter, as finite tensors; else a
    :class:`CheckpointError` naming the file, what is missing or broken, and the fix."""
    for name, keys in (("ae_state_dict", _AE_KEYS), ("txt_state_dict", _TXT_KEYS)):
        sd = obj[name]
        missing = [k for k in keys if k not in sd]
        if missing:
            raise CheckpointError(
                f"checkpoint {path}: {name} lacks {missing} (it has {sorted(sd)}); this is not "
                "an AETHER AEProj/TextProj checkpoint, or it is truncated: retrain, or point at "
                "the right file")
        bad = {k: int((~torch.isfinite(v)).sum()) for k, v in sd.items()
               if isinstance(v, torch.Tensor) and v.is_floating_point()
               and not bool(torch.isfinite(v).all())}
        if bad:
            raise CheckpointError(
                f"checkpoint {path}: {name} holds non-finite weights ({', '.join(f'{k}: {n}' for k, n in bad.items())} "
                "NaN/inf values): training diverged or the file is damaged; retrain (e.g. with "
                "a lower train.lr) — a field from these weights would be all NaN")


def _dims(ck: Mapping[str, Any]) -> dict[str, Any]:
    return {**ae_layout(ck["ae_state_dict"]),
            "text_dim": int(ck["txt_state_dict"]["proj.weight"].shape[1])}


def projector_from(ck: Mapping[str, Any], path: str | os.PathLike = "") -> AEProj:
    """The ``AEProj`` of a loaded checkpoint (its layout from the weights, strict load)."""
    d = _dims(ck)
    cfg = ck.get("config") or {}
    ae = AEProj(d["in_dim"], d["hidden_dim"], d["out_dim"], dropout=float(cfg.get("dropout", 0.0)),
                proj_dim=d["proj_dim"], use_gate=d["use_gate"])
    if (d["shortcut"] == "identity") != (d["in_dim"] == d["out_dim"]):
        raise CheckpointError(f"checkpoint {path}: a {d['shortcut']} shortcut with in_dim "
                              f"{d['in_dim']} and out_dim {d['out_dim']} is no AEProj layout")
    try:
        ae.load_state_dict(ck["ae_state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: ae_state_dict does not fit AEProj: {e}") from None
    return ae


def load_projector(path: str | os.PathLike) -> AEProj:
    """The trained AE projector from a model folder / checkpoint, in eval mode on CPU.

    Works for our ``model/`` folder or ``checkpoint.pt`` and for reference
    ``.pth`` files; loads with ``strict=True`` (a missing or unexpected
    parameter is an error, not a silent partial load).
    """
    return projector_from(load_checkpoint(path), path).eval()


def load_text_projector(path: str | os.PathLike) -> TextProj:
    """The text projector of a checkpoint, in eval mode on CPU (strict load)."""
    ck = load_checkpoint(path)
    d = _dims(ck)
    txt = TextProj(d["text_dim"], d["out_dim"])
    try:
        txt.load_state_dict(ck["txt_state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: txt_state_dict does not fit TextProj: {e}") from None
    return txt.eval()


def export_reference(
    checkpoint: str | os.PathLike | Mapping[str, Any], path: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Our checkpoint (path or loaded dict) → the reference AETHER checkpoint layout.

    The result has ``ae_state_dict``, ``txt_state_dict``, ``epoch``,
    ``train_metrics`` (``loss``, ``L_xt``, ``L_ii``), ``val_metrics``,
    ``temps`` (``tau_xt``, ``tau_ii``), ``model_types``, ``hyper_parameters``
    (``model`` / ``train`` / ``text`` sections with the reference key names)
    and ``created_at``. With ``path`` it is also saved there (plain tensors and
    builtins, loadable with ``weights_only=True``).
    """
    ck = (
        load_checkpoint(checkpoint)
        if isinstance(checkpoint, (str, os.PathLike))
        else checkpoint
    )
    cfg = dict(ck.get("config") or {})
    d = _dims(ck)
    if d["proj_dim"] != REFERENCE_PROJ_DIM:
        raise CheckpointError(
            f"export_reference: this model's first layer is {d['proj_dim']} wide; the reference "
            f"AEProj always builds a {REFERENCE_PROJ_DIM}-wide one (its load_head would fail): "
            f"retrain with train.proj_dim={REFERENCE_PROJ_DIM} to export for the reference code")
    m = ck.get("metrics") or {}
    best = m.get("best") if isinstance(m.get("best"), Mapping) else m
    ref: dict[str, Any] = {
        "ae_state_dict": _plain_state(ck["ae_state_dict"]),
        "txt_state_dict": _plain_state(ck["txt_state_dict"]),
        "epoch": int(ck.get("epoch", -1)),
        "train_metrics": {
            k: float(best[src]) for k, src in (("loss", "loss"), ("L_xt", "L_AP"), ("L_ii", "L_AE"))
            if isinstance(best.get(src), (int, float))
        },
        "val_metrics": {},
        "temps": {"tau_xt": float(cfg.get("tau_poi", 0.07)), "tau_ii": float(cfg.get("tau_ae", 0.07))},
        "model_types": {"ae_type": "AEProj", "text_type": "TextProj"},
        "hyper_parameters": {
            "model": {
                "ae_type": "AEProj",
                "text_type": "TextProj",
                "hidden_dim": d["hidden_dim"],
                "out_dim": d["out_dim"],
                "lambda": float(cfg.get("lam", 0.2)),
                "tau_img": float(cfg.get("tau_ae", 0.07)),
                "tau_xt": float(cfg.get("tau_poi", 0.07)),
                "lr": float(cfg.get("lr", 1e-3)),
                "weight_decay": float(cfg.get("weight_decay", 1e-4)),
                "betas": [0.9, 0.999],
            },
            "train": {
                "batch_size": int(cfg.get("batch_size", 512)),
                "epochs": int(cfg.get("epochs", 100)),
                "eta_min_ratio": float(cfg.get("lr_final_frac", 0.01)),
            },
            "text": {"emb_dim": d["text_dim"]},
            "exported_by": FORMAT,
        },
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if path is not None:
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(ref, tmp)
        os.replace(tmp, path)
    return ref
