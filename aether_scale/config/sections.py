"""The config schema: one pydantic section per stage, every field with its default.

``RunConfig`` holds one section per stage (``cluster``, ``synth``, ``ingest``,
``pois``, ``text``, ``pool``, ``train``, ``infer``, ``regions``, ``baselines``,
``evaluate``) and per on-demand command (``query``, ``sweep``). Sections forbid unknown
keys and validate on assignment; descriptions here are what ``aether-scale config``
shows a user. Loading, overrides and errors are in :mod:`aether_scale.config`.

The module is longer than the project's ~400-line guide on purpose: it is the one
place where every config key, its default and its check are found, in data-flow
order (it holds no logic beyond the validators); splitting it by stage would scatter
the schema a user reads top to bottom.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "TRAIN_LEGACY_DEFAULTS",
    "SweepSection",
    "BaselinesSection",
    "BufferSpec",
    "ClusterSection",
    "EvaluateSection",
    "GatewaySection",
    "InferSection",
    "IngestSection",
    "PoiColumns",
    "PoiSource",
    "PoisSection",
    "PoolSection",
    "QuerySection",
    "RegionsSection",
    "RunConfig",
    "Section",
    "SynthSection",
    "TextSection",
    "TrainSection",
]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated."""

    # strict: a YAML ``true`` is not an epoch count, ``"5"`` is not a number (ints still
    # pass where a float is wanted)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


# --------------------------------------------------------------------------- cluster
class GatewaySection(Section):
    """Dask Gateway options; address/auth default to the standard dask-gateway config
    (``DASK_GATEWAY__ADDRESS``, ``DASK_GATEWAY__PROXY_ADDRESS``, ``DASK_GATEWAY__AUTH__*``)."""

    address: str | None = None
    proxy_address: str | None = None
    auth: str | None = Field(None, description="auth type: basic, kerberos, jupyterhub, simple")
    username: str | None = None
    password: str | None = None
    workers: int = Field(2, ge=0, description="fixed number of workers (scale)")
    cluster_options: dict[str, Any] = Field(
        default_factory=dict, description="passed to Gateway.new_cluster: the options the "
        "server offers (e.g. worker_cores, worker_memory, image, a GPU option)")
    idle_timeout_s: float | None = Field(
        1800.0, ge=0, description="the server shuts the cluster down after this long without "
        "a client (a crashed client leaves nothing running); sent as the cluster option "
        "'idle_timeout' when the server offers it; null: the server's default")
    adaptive_max: int | None = Field(
        None, ge=1, description="adaptive scaling between adaptive_min and this many workers "
        "instead of a fixed 'workers'. Off by default: adaptive scaling retires idle workers, "
        "and the results they hold (persisted pooled features, the model a worker loaded "
        "once) are recomputed or lost")
    adaptive_min: int = Field(0, ge=0)
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
    threads: int | None = Field(
        None, ge=1, description="torch threads when encoding here; default: one per idle core")
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

    def reach_m(self, pixel_m: float = 10.0) -> float:
        """How far the buffer reaches from its POI, in metres (a square window's half edge
        at ``pixel_m`` per pixel) — to compare two buffers."""
        if self.shape == "circle":
            return float(self.radius_m or 0.0)
        return (float(self.radius_px or 0) + 0.5) * pixel_m

    def describe(self) -> str:
        return (f"circle {self.radius_m:g} m" if self.shape == "circle"
                else f"square {2 * (self.radius_px or 0) + 1}×{2 * (self.radius_px or 0) + 1} px")

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

    @model_validator(mode="after")
    def _aug_reaches_farther(self) -> PoolSection:
        base, aug = self.base.reach_m(), self.aug.reach_m()
        if aug <= base:
            raise ValueError(
                f"pool.aug must reach farther than pool.base (the augmented view is the wider "
                f"buffer around the same POI): base {self.base.describe()} reaches {base:g} m, "
                f"aug {self.aug.describe()} {aug:g} m; swap them or widen pool.aug")
        return self


# --------------------------------------------------------------------------- train
#: train keys added after the first release, at the value that reproduces the older
#: behaviour: left out of stage keys and resume checks at that value, so checkpoints and
#: workspaces from before them stay current
TRAIN_LEGACY_DEFAULTS: dict[str, Any] = {"precision": "float32", "val_fraction": 0.0,
                                         "proj_dim": 256, "use_gate": True}


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
    val_fraction: float = Field(
        0.0, ge=0, lt=1, description="triplets held out (fixed seed) to select the checkpoint "
        "on their L_AP (the reference's val_ratio); 0 = select on the training loss")
    save_every: int = Field(0, ge=0, description="also keep epoch_<N>.pt every N epochs; 0 = no")
    proj_dim: int = Field(256, ge=1, description="the projector's first layer (256 in the "
                          "reference, whatever its hidden)")
    hidden_dim: int = Field(256, ge=1, description="the post-MLP's width (the reference's hidden)")
    out_dim: int = Field(128, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1, description="post-MLP dropout; the reference "
                           "trains with none")
    use_gate: bool = Field(True, description="gated shortcut (sigmoid(gate)·shortcut(x)); "
                           "false = plain residual, the reference's use_gate=False")
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
    kernels: Literal["auto", "autograd", "compile"] = Field(
        "auto", description="how the training forward runs: autograd through the modules or "
        "torch.compile of them; auto = compile on CPU for epochs of ≥256 steps (the faster "
        "in benchmarks/results/train.json), else autograd",
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
        "float16", description="float16 (256 B/px), or int8 with the AEF sqrt codec (128 B/px; "
        "per-pixel cosine to float32 ≥ 0.99964; codec and bound in the field's attrs)"
    )
    batch_pixels: int = Field(
        2_048, ge=256, description="pixels per projector call (small batches stay in cache: "
        "aether_scale.infer.kernel.BATCH_PIXELS says why this default)"
    )
    device: str = Field("auto", description="auto (cuda when the worker has one), cpu, cuda")
    threads: int | None = Field(
        None, ge=1, description="torch threads per task thread; default 1 (dask runs the tasks)"
    )
    scheduler: Literal["auto", "cluster", "threads"] = Field(
        "auto", description="where the field's tasks run: cluster (the run's dask cluster), "
        "threads (this process, cluster.n_workers × threads_per_worker threads), or auto: "
        "threads when cluster.kind is local (worker processes would only add start-up: each "
        "task holds one chunk, so no worker memory limit is needed), else cluster"
    )
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="projector GEMMs; bfloat16 ≈2× faster on AVX512-BF16 CPUs"
    )
    chunk_px: int | None = Field(
        None, ge=16, description="field chunk edge (must divide the ae.zarr chunk edge); "
        "default: the largest divisor of it up to 512 (a 64 MiB float16 chunk); one task and "
        "one ledger record each",
    )
    read_chunk_px: int | None = Field(
        None, ge=16, description="Zarr chunk edge the field is stored in (must divide the "
        "field chunk; ≥ it: one Zarr chunk per field chunk); default: the largest divisor of "
        "the field chunk up to 128, so a 100×100 px read fetches ≤ 4 chunks of 2 MiB (int8) "
        "instead of up to 4 of 32 MiB (benchmarks/results/field_read.json)",
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
        128, ge=8, description="head minibatch size (Adam steps per epoch = train units / "
        "this); null = full batch, whose few steps per epoch let early stopping fire before "
        "the head converges — on the demo city that made AE's SDM KL vary ±7 % across seeds"
    )
    weight_decay: float = Field(0.0, ge=0)
    workers: int | None = Field(None, ge=1, description="processes fitting heads at once "
                                "(the same numbers for any count); default: every core")
    lda_topics: int = Field(20, ge=2)
    plots: bool = True


# --------------------------------------------------------------------------- baselines
class BaselinesSection(Section):
    """The trained baselines of Table 1 (``aether_scale.baselines``): CaLLiPer+, a
    Space2Vec-style coordinate encoder, Place2Vec and Doc2Vec."""

    methods: list[Literal["calliper", "space2vec", "place2vec", "doc2vec"]] = Field(
        default_factory=lambda: ["calliper", "space2vec", "place2vec", "doc2vec"],
        description="which baselines to train; [] = none")
    dim: int = Field(128, ge=2, description="location-encoder embedding width (AETHER's)")
    n_scales: int = Field(32, ge=1, description="wavelengths of the sinusoidal encoding")
    min_scale_m: float = Field(10.0, gt=0, description="shortest wavelength, metres")
    max_scale_m: float = Field(20_000.0, gt=0, description="longest wavelength, metres")
    hidden: int = Field(256, ge=1)
    layers: int = Field(2, ge=1)
    epochs: int = Field(20, ge=1, description="location-encoder training epochs")
    batch_size: int = Field(512, ge=2)
    lr: float = Field(1e-3, gt=0)
    tau: float = Field(0.07, gt=0, description="CaLLiPer+ InfoNCE temperature")
    context_m: float = Field(100.0, gt=0, description="Space2Vec: the POI-type mix within "
                             "this distance of a POI is its target")
    type_column: str = Field("subcategory", description="pois.parquet column of the POI type "
                             "(Space2Vec targets, Place2Vec tokens)")
    word_dim: int = Field(64, ge=2, description="Place2Vec / Doc2Vec vector width")
    neighbours: int = Field(10, ge=1, description="Place2Vec: nearest POIs paired with each")
    word_epochs: int = Field(5, ge=1, description="Place2Vec skip-gram epochs")
    doc_epochs: int = Field(40, ge=1, description="Doc2Vec epochs")
    seed: int = 0
    device: str = Field("auto", description="torch device of the location encoders")
    threads: int | None = Field(None, ge=1)


# --------------------------------------------------------------------------- query
class QuerySection(Section):
    """``aether-scale query``: phrases against the field (not a stage: run on demand)."""

    top_k: int = Field(10, ge=1, le=10_000, description="locations per phrase")
    min_distance_m: float = Field(
        250.0, ge=0, description="each location is the best pixel within this distance "
        "(square window); any two are farther apart")
    maps: bool = Field(True, description="a PNG map per phrase")
    map_px: int = Field(1400, ge=200, le=8000, description="longest edge of a map, pixels")
    cluster: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: the configured cluster for non-local clusters or fields "
        "over cluster_min_pixels; else threads in this process")
    cluster_min_pixels: int = Field(100_000_000, ge=0)
    threads: int | None = Field(None, ge=1, description="threads in this process; default: "
                                "every core")


# --------------------------------------------------------------------------- sweep
class SweepSection(Section):
    """``aether-scale sweep``: the paper's one-factor studies (§4.6) as train variants
    (not a stage: run on demand; each point is a workspace under ``sweeps/<name>/``)."""

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$", description="folder under sweeps/")
    lam: list[float] = Field(default_factory=list, description="λ values (train.lam): Figure 3")
    radii: list[list[float]] = Field(
        default_factory=list, description="[r_b, r_a] circle pairs in metres (pool.base/aug), "
        "r_a > r_b: Table 2")
    train_fraction: list[float] = Field(
        default_factory=list, description="training fractions (train.train_fraction, fixed "
        "seed): Figure 4")
    points: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="any other points: name → {dotted.key: value}")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="{dotted.key: value} for every point, e.g. "
        "{train.epochs: 10} (the workspace's own run is not changed)")
    parallel: int | None = Field(None, ge=1, description="points at once (dask tasks); "
                                 "default: one per worker of the configured cluster")

    @model_validator(mode="after")
    def _check(self) -> SweepSection:
        for pair in self.radii:
            if len(pair) != 2:
                raise ValueError(f"sweep.radii: {pair} is not a pair [r_b, r_a]")
            rb, ra = pair
            if not 0 < rb < ra:
                raise ValueError(f"sweep.radii: [{rb:g}, {ra:g}] needs 0 < r_b < r_a (the "
                                 "augmented view is the wider buffer)")
        for v in self.lam:
            if not 0 <= v <= 1:
                raise ValueError(f"sweep.lam: {v} is not in [0, 1]")
        for v in self.train_fraction:
            if not 0 < v <= 1:
                raise ValueError(f"sweep.train_fraction: {v} is not in (0, 1]")
        for n in self.points:
            if not re.fullmatch(r"[a-z0-9_.-]+", n):
                raise ValueError(f"sweep.points: name {n!r} must be lower-case letters, digits, "
                                 "'_', '.' or '-' (it names a folder)")
        return self


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
    baselines: BaselinesSection = Field(default_factory=BaselinesSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    query: QuerySection = Field(default_factory=QuerySection)
    sweep: SweepSection = Field(default_factory=SweepSection)

    def section(self, name: str) -> dict[str, Any]:
        """A section as a plain JSON-able dict (what stage manifests record)."""
        return getattr(self, name).model_dump(mode="json")


