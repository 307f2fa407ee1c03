"""Typed run configuration: one section per stage, YAML in, dotted overrides.

A run config is a YAML mapping whose top-level keys are the sections below
(``cluster``, ``synth``, ``ingest``, ``pois``, ``text``, ``pool``, ``train``,
``infer``, ``regions``, ``evaluate``). Every section has defaults, so an empty
file is a valid config. Unknown keys, wrong types and input paths that do not
exist are refused with a :class:`ConfigError` that names the file, the field
and the fix.

Relative paths inside a config file are resolved against the directory of
that file, so ``configs/london.yaml`` can say ``../../shared/data/...``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from . import sections
from .sections import (
    BaselinesSection,
    BufferSpec,
    ClusterSection,
    EvaluateSection,
    GatewaySection,
    InferSection,
    IngestSection,
    PoiColumns,
    PoiSource,
    PoisSection,
    PoolSection,
    QuerySection,
    RegionsSection,
    RunConfig,
    Section,
    SweepSection,
    SynthSection,
    TextSection,
    TrainSection,
)

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "config_yaml",
    "deep_merge",
    "load_config",
    "packaged_configs",
    "parse_override",
    "resolve_config_path",
    "saved_config",
    "workspace_config",
    *sections.__all__,
]


class ConfigError(ValueError):
    """A run config that cannot be used; the message says where and how to fix it."""


def _is_url(path: str) -> bool:
    return "://" in str(path)


# Fields holding input paths that must exist (checked at load; URLs are left to fsspec).
_INPUT_PATHS: tuple[tuple[str, ...], ...] = (
    ("regions", "luc_points"),
    ("regions", "sdm_units"),
    ("regions", "sdm_table"),
)

# Keys that older versions accepted, with where their meaning went.
_MOVED = {
    "evaluate.noaug": "the variants a run trains are train.variants (default "
                      "{noaug: {use_aug: false}}; {} trains AETHER only); infer, regions and "
                      "evaluate follow the models that exist",
}


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden" and loc in _MOVED:
            lines.append(f"  {loc}: this key moved — {_MOVED[loc]}")
        elif kind == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            hint = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
            lines.append(f"  {loc}: {hint} (remove it or fix its spelling)")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        model = _model_of(ann)
    return sorted(model.model_fields) if model is not None else []


def _model_of(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative input paths in ``data`` relative to the config file's folder."""

    def fix(p: str) -> str:
        if p is None or _is_url(p) or os.path.isabs(p):
            return p
        return str((base / p).resolve())

    ingest = data.get("ingest")
    if isinstance(ingest, dict) and isinstance(ingest.get("tiles"), list):
        ingest["tiles"] = [fix(t) if isinstance(t, str) else t for t in ingest["tiles"]]
    pois = data.get("pois")
    if isinstance(pois, dict) and isinstance(pois.get("sources"), list):
        for src in pois["sources"]:
            if isinstance(src, dict) and isinstance(src.get("path"), str):
                src["path"] = fix(src["path"])
    for sec, key in _INPUT_PATHS:
        d = data.get(sec)
        if isinstance(d, dict) and isinstance(d.get(key), str):
            d[key] = fix(d[key])


def _check_inputs_exist(cfg: RunConfig, source: str) -> None:
    missing = []
    for sec, key in _INPUT_PATHS:
        p = getattr(getattr(cfg, sec), key)
        if p and not _is_url(p) and not os.path.exists(p):
            missing.append(f"  {sec}.{key}: path does not exist: {p}")
    for i, src in enumerate(cfg.pois.sources):
        if not _is_url(src.path) and not os.path.exists(src.path):
            missing.append(f"  pois.sources.{i}.path: path does not exist: {src.path}")
    if missing:
        raise ConfigError(
            f"invalid config {source}:\n" + "\n".join(missing)
            + "\n  (fix the path; relative paths are resolved against the config file's folder)"
        )


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    d = data
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {p} is not a section")
    d[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=5"`` → ``("train.epochs", 5)`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


#: the run configs shipped in the package (``aether_scale/configs/<name>.yaml``)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the shipped configs (``demo``, ``london``, ``national``, ``reference``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config file path; a bare shipped name (``london``) means the shipped file."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and (CONFIG_DIR / f"{p.name}.yaml").exists():
        return CONFIG_DIR / f"{p.name}.yaml"
    return p


def config_yaml(cfg: RunConfig, *, relative_to: str | None = None) -> str:
    """The resolved config as YAML; input paths inside ``relative_to`` (a workspace
    folder) are written relative to it, so a config saved there moves with it. Secrets
    (``cluster.gateway.password``) are left out: give them again with ``--set`` or the
    standard ``DASK_GATEWAY__AUTH__*`` environment."""
    data = cfg.model_dump(mode="json")
    data["cluster"]["gateway"]["password"] = None
    if relative_to:
        base = os.path.abspath(relative_to).rstrip("/") + "/"

        def rel(p: Any) -> Any:
            if isinstance(p, str) and not _is_url(p) and os.path.abspath(p).startswith(base):
                return os.path.relpath(os.path.abspath(p), base)
            return p

        data["ingest"]["tiles"] = [rel(t) for t in data["ingest"]["tiles"]]
        for src in data["pois"]["sources"]:
            src["path"] = rel(src["path"])
        for sec, key in _INPUT_PATHS:
            data[sec][key] = rel(data[sec][key])
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    data: dict[str, Any] | None = None,
    check_paths: bool = False,
) -> RunConfig:
    """Load and validate a run config.

    ``path``: a YAML file (or None for all defaults). ``data``: a dict merged
    under the file's content (used by tests and the demo). ``overrides``:
    ``["train.epochs=5", ...]`` or ``{"train.epochs": 5}``, applied last.
    Raises :class:`ConfigError` naming the file and field on any problem.
    """
    source = str(path) if path is not None else "<defaults>"
    merged: dict[str, Any] = copy.deepcopy(data) if data else {}
    if path is not None:
        p = resolve_config_path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist (pass --config with a YAML file "
                              f"or one of the shipped configs: {', '.join(packaged_configs())})")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of sections")
        _resolve_paths(loaded, p.parent.resolve())
        merged = deep_merge(merged, loaded)
    if overrides:
        items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
        for k, v in items:
            _set_dotted(merged, k, v)
    try:
        cfg = RunConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    if check_paths:
        _check_inputs_exist(cfg, source)
    return cfg


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` merged over ``a``, recursively for nested sections (neither is modified)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def saved_config(workspace: str | os.PathLike | None) -> str | None:
    """The config a workspace's last run saved (``<workspace>/config.yaml``, fetched to a
    local temporary file for an fsspec URL), or None when there is none."""
    if not workspace:
        return None
    name = "config.yaml"  # aether_scale.workspace.CONFIG_FILE
    workspace = str(workspace)
    if "://" in workspace and not workspace.startswith("file://"):
        import tempfile

        import fsspec

        fs, root = fsspec.core.url_to_fs(workspace)
        src = f"{root.rstrip('/')}/{name}"
        if not fs.exists(src):
            return None
        dst = os.path.join(tempfile.mkdtemp(prefix="aether-config-"), name)
        fs.get(src, dst)
        return dst
    p = os.path.join(workspace.removeprefix("file://"), name)
    return p if os.path.exists(p) else None


def workspace_config(workspace: str | os.PathLike | None, config: str | os.PathLike | None = None,
                     overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """The run config for a command on ``workspace``: ``config`` (a file or shipped name)
    when given, else the one the workspace's last run saved, else every default; then
    ``overrides``."""
    return load_config(config if config is not None else saved_config(workspace), overrides)
