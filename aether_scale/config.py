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
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A run config that cannot be used; the message says where and how to fix it."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _is_url(path: str) -> bool:
    return "://" in str(path)


# --------------------------------------------------------------------------- cluster
class GatewaySection(Section):
    """Dask Gateway options; address/auth default to the standard dask-gateway config
    (``DASK_GATEWAY__ADDRESS``, ``DASK_GATEWAY__PROXY_ADDRESS``, ``DASK_GATEWAY__AUTH__*``)."""

    address: str | None = None
    proxy_address: str | None = None
    auth: str | None = Field(None, description="auth type: basic, kerberos, jupyterhub, simple")
    username: str | None = None
    password: str | None = None
    workers: int = Field(2, ge=0)
    cluster_options: dict[str, Any] = Field(default_factory=dict)
    shutdown_on_close: bool = True


class ClusterSection(Section):
    """Where dask work runs. ``kind`` picks the backend; see :mod:`aether_scale.cluster`."""

    kind: Literal["threads", "synchronous", "local", "address", "gateway", "cuda"] = "local"
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = Field("4GiB", description="per worker, e.g. '2GiB'; 'auto' splits RAM")
    address: str | None = Field(None, description="scheduler address for kind=address")
    dashboard_address: str | None = Field(":0", description="':0' picks a free port; null disables")
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    local_directory: str | None = None

    @model_validator(mode="after")
    def _address_needed(self) -> ClusterSection:
        if self.kind == "address" and not self.address:
            raise ValueError("cluster.kind 'address' needs cluster.address (e.g. tcp://host:8786)")
        return self


# --------------------------------------------------------------------------- synth
class SynthSection(Section):
    """The embedded synthetic city (``aether-scale synth``)."""

    size_px: int = Field(1024, ge=64, description="city edge in 10 m pixels")
    n_tiles_x: int = Field(2, ge=1)
    n_tiles_y: int = Field(1, ge=1)
    crs: str = "EPSG:32630"
    origin_x: float = 500000.0
    origin_y: float = 5700000.0
    n_pois: int = Field(20000, ge=10)
    n_luc_points: int = Field(2000, ge=10)
    n_regions: int = Field(600, ge=10)
    seed: int = 0
    socio_trace: float = Field(
        0.06, ge=0,
        description="amplitude of the weak, class-entangled socioeconomic trace in AE pixels "
        "(0 = AE blind to socio; see aether_scale.synthetic)",
    )
    poi_socio: float = Field(
        1.0, ge=0, description="how strongly POI categories and chain names follow the socio field"
    )
    unit_population: int = Field(1500, ge=10, description="mean residents per LSOA-like unit")
    nodata_fraction: float = Field(
        0.01, ge=0, le=0.2, description="share of AE pixels masked (cloud blob + edge gap)"
    )


# --------------------------------------------------------------------------- ingest
class IngestSection(Section):
    """AlphaEarth tiles → ``ae.zarr``."""

    tiles: list[str] = Field(
        default_factory=list,
        description="GeoTIFF/COG/VRT paths, folders or globs; input order = precedence for "
        "overlap 'first'/'last'",
    )
    crs: str | None = Field(None, description="target CRS; default: the first tile's CRS")
    resolution: float = Field(10.0, gt=0)
    chunk_px: int | None = Field(None, ge=16, description="chunk edge; default ≈64 MB chunks")
    overlap: Literal["error", "first", "last"] = Field(
        "error", description="what to do where overlapping tiles disagree on valid codes"
    )


# --------------------------------------------------------------------------- pois
class PoiColumns(Section):
    """Which source column plays which role."""

    id: str | None = None
    name: str | None = None
    category: str | None = None
    subcategory: str | None = None
    description: str | None = Field(None, description="a ready description column")


class PoiSource(Section):
    """One POI file (GeoParquet, partitioned parquet dir, GPKG, GeoJSON, Shapefile, CSV)."""

    path: str
    layer: str | None = None
    x: str | None = Field(None, description="CSV: x/easting column (needs crs)")
    y: str | None = None
    lon: str | None = Field(None, description="CSV: longitude column (crs EPSG:4326)")
    lat: str | None = None
    crs: str | None = Field(None, description="CRS of the coordinates when the file has none")
    columns: PoiColumns = Field(default_factory=PoiColumns)
    append_name: bool = Field(True, description="append ', named <name>.' to ready descriptions")
    encoding: str = Field(
        "utf-8", description="CSV: text encoding; undecodable bytes are read as cp1252 (counted)"
    )


class PoisSection(Section):
    """POI files → ``pois.parquet``."""

    sources: list[PoiSource] = Field(default_factory=list)
    template: str = "A place of {subcategory}, a type of {category}, named {name}."
    template_no_name: str = "A place of {subcategory}, a type of {category}."
    keep_columns: list[str] = Field(default_factory=list)
    partition_rows: int = Field(250_000, ge=1000)


# --------------------------------------------------------------------------- text
class TextSection(Section):
    """Descriptions → ``text.zarr`` with a persistent (model, text) cache."""

    model: str = Field("all-MiniLM-L6-v2", description="sentence-transformers name or path")
    batch_size: int = Field(256, ge=1)
    cache_dir: str | None = Field(None, description="default: ~/.cache/aether_scale/text")
    mode: Literal["auto", "local", "dask"] = "auto"
    device: str = "auto"
    normalize: bool = True
    chunk_rows: int = Field(65536, ge=256, description="text.zarr rows per chunk")
    flush_texts: int = Field(
        16384, ge=256, description="texts encoded between cache writes (progress survives a crash)"
    )
    dask_min_texts: int = Field(
        20000, ge=0, description="mode=auto: fewest new texts worth shipping to dask workers"
    )
    compact_shards: int = Field(
        64, ge=0, description="merge the text cache's shards when a run leaves more (0 = never)"
    )


# --------------------------------------------------------------------------- pool
class BufferSpec(Section):
    """A buffer: ``circle`` of ``radius_m`` metres or ``square`` window of ``radius_px``."""

    shape: Literal["circle", "square"] = "circle"
    radius_m: float | None = Field(None, gt=0)
    radius_px: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _radius(self) -> BufferSpec:
        if self.shape == "circle" and self.radius_m is None:
            raise ValueError("a circle buffer needs radius_m (metres)")
        if self.shape == "square" and self.radius_px is None:
            raise ValueError("a square buffer needs radius_px (pixels)")
        return self


class PoolSection(Section):
    """AE pooled around POIs → ``triplets.zarr``."""

    base: BufferSpec = Field(default_factory=lambda: BufferSpec(shape="circle", radius_m=50.0))
    aug: BufferSpec = Field(default_factory=lambda: BufferSpec(shape="circle", radius_m=100.0))
    chunk_rows: int = Field(65536, ge=256, description="triplets.zarr rows per chunk")
    block_mb: int = Field(
        32, ge=8, description="cap (MiB) on one prefix-sum strip per worker thread while pooling"
    )


# --------------------------------------------------------------------------- train
class TrainSection(Section):
    """AETHER projector training (defaults: the paper / reference config)."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(512, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_final_frac: float = Field(0.01, ge=0, le=1)
    tau_ae: float = Field(0.07, gt=0)
    tau_poi: float = Field(0.07, gt=0)
    lam: float = Field(0.2, ge=0, le=1)
    use_aug: bool = Field(True, description="false = 'AETHER w/o aug' (no AE↔AE term)")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"noaug": {"use_aug": False}},
        description="extra models trained beside model/: name → train keys that differ "
        "(written as model_<name>/, evaluated as AETHER_<name>); {} for none",
    )
    train_fraction: float = Field(1.0, gt=0, le=1)
    hidden_dim: int = Field(256, ge=1)
    out_dim: int = Field(128, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    gate_init: float = -4.0
    seed: int = 0
    device: str = "auto"
    in_memory: Literal["auto", "always", "never"] = "auto"
    shuffle_buffer_chunks: int = Field(4, ge=1)
    prefetch: int = Field(2, ge=0)
    threads: int | None = Field(None, ge=1)
    precision: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="GEMM operands: bfloat16 = mixed precision (float32 accumulation, "
        "normalisation, loss, weights and optimizer); ≈1.5× faster per step on AVX512-BF16 CPUs",
    )

    @model_validator(mode="after")
    def _variants(self) -> TrainSection:
        for name, over in self.variants.items():
            if not re.fullmatch(r"[a-z0-9_]+", name):
                raise ValueError(f"train.variants: name {name!r} must be lower-case letters, "
                                 "digits and _ (it names the folder model_<name>/)")
            if not isinstance(over, dict):
                raise ValueError(f"train.variants.{name} must be a mapping of train keys")
            bad = sorted(set(over) - (set(TrainSection.model_fields) - {"variants"}))
            if bad:
                raise ValueError(f"train.variants.{name}: unknown train key(s) {bad}")
            try:
                TrainSection.model_validate({**self.model_dump(exclude={"variants"}), **over,
                                             "variants": {}})
            except ValidationError as e:
                first = e.errors()[0]
                loc = ".".join(str(x) for x in first["loc"])
                raise ValueError(f"train.variants.{name}.{loc}: {first['msg']} "
                                 f"(got {first.get('input')!r})") from None
        return self

    def variant(self, name: str) -> TrainSection:
        """The train section of variant ``name`` ('' = the main model)."""
        if not name:
            return self.model_copy(update={"variants": {}})
        return TrainSection.model_validate({**self.model_dump(exclude={"variants"}),
                                            **self.variants[name], "variants": {}})


# --------------------------------------------------------------------------- infer
class InferSection(Section):
    """Trained projector over every AE pixel → ``field.zarr``."""

    dtype: Literal["float16", "int8"] = Field(
        "float16", description="float16, or int8 with the AEF sqrt codec (attrs say so)"
    )
    batch_pixels: int = Field(
        16_384, ge=1024, description="pixels per projector call (small batches stay in cache)"
    )
    device: str = Field("auto", description="auto (cuda when the worker has one), cpu, cuda")
    threads: int | None = Field(
        None, ge=1, description="torch threads per task thread; default 1 (dask runs the tasks)"
    )
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="projector GEMMs; bfloat16 ≈2× faster on AVX512-BF16 CPUs"
    )
    chunk_px: int | None = Field(
        None, ge=16, description="field chunk edge (must divide the ae.zarr chunk edge); "
        "default: the largest divisor of it up to 512 (a 64 MiB float16 chunk)",
    )


# --------------------------------------------------------------------------- regions / evaluate
class RegionsSection(Section):
    """Units and labels for downstream evaluation."""

    luc_points: str | None = Field(None, description="points with a land-use label")
    luc_label: str = "landuse_id"
    luc_label_name: str | None = "landuse"
    luc_buffer_m: float = Field(50.0, gt=0)
    sdm_units: str | None = Field(None, description="points (centroids) with ns-sec_1..9")
    sdm_table: str | None = Field(None, description="optional raw ONS long table to normalise")
    sdm_columns: list[str] = Field(default_factory=lambda: [f"ns-sec_{i}" for i in range(1, 10)])
    sdm_id: str = "lsoa21cd"
    sdm_buffer_m: float = Field(300.0, gt=0)
    crs: str | None = Field(None, description="CRS of label files that carry none")
    poi_token_columns: list[str] = Field(
        default_factory=lambda: ["category", "subcategory"],
        description="pois.parquet columns whose values form the POI bags (TF-IDF/LDA)",
    )


class EvaluateSection(Section):
    """The paper's Table 1 protocol."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    tasks: list[Literal["luc", "sdm"]] = Field(default_factory=lambda: ["luc", "sdm"])
    head: Literal["mlp", "linear"] = "mlp"
    hidden_dim: int = Field(128, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_epochs: int = Field(300, ge=1)
    patience: int = Field(20, ge=1)
    lr: float = Field(1e-3, gt=0)
    baselines: list[Literal["tfidf", "lda"]] = Field(default_factory=lambda: ["tfidf", "lda"])
    batch_size: int | None = Field(
        None, ge=8, description="head minibatch size; null = full batch"
    )
    weight_decay: float = Field(0.0, ge=0)
    lda_topics: int = Field(20, ge=2)
    plots: bool = True


# --------------------------------------------------------------------------- run config
class RunConfig(Section):
    """The whole run: one section per stage."""

    cluster: ClusterSection = Field(default_factory=ClusterSection)
    synth: SynthSection = Field(default_factory=SynthSection)
    ingest: IngestSection = Field(default_factory=IngestSection)
    pois: PoisSection = Field(default_factory=PoisSection)
    text: TextSection = Field(default_factory=TextSection)
    pool: PoolSection = Field(default_factory=PoolSection)
    train: TrainSection = Field(default_factory=TrainSection)
    infer: InferSection = Field(default_factory=InferSection)
    regions: RegionsSection = Field(default_factory=RegionsSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)

    def section(self, name: str) -> dict[str, Any]:
        """A section as a plain JSON-able dict (what stage manifests record)."""
        return getattr(self, name).model_dump(mode="json")


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
            lines.append(f"  {loc}: {e['msg']}{got_s}")
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
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
    check_paths: bool = True,
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
