"""What a plan is made of: the target grid, the POI count and the label counts, read
from headers and metadata only (or described synthetically when the data is not here).

- **Tiles** (``ingest.tiles``): every tile's header (:func:`~aether_scale.ingest.inputs.
  inspect_tile`) and the ingest's own grid planner (:func:`~aether_scale.ingest.grid.
  plan_grid`), so width, height and chunk count are what ingest will write.
- **A tile index** (``--tile-index FILE``, YAML or JSON): tile footprints instead of
  files, for a plan before the data is downloaded::

      crs: EPSG:32630            # default CRS of the tiles below
      resolution: 10             # tile pixel size (default ingest.resolution)
      tiles:
        - {bounds: [300000, 5600000, 409600, 5709600]}           # left, bottom, right, top
        - {crs: EPSG:32631, bounds: [...], valid_fraction: 0.6}  # share of land pixels

  The footprints go through the same grid planner (reprojected to ``ingest.crs``).
- **An area** (``--area-km2 A``): one square tile of that area in ``ingest.crs`` (default
  EPSG:27700) — a country's size without its outline. A real outline's bounding box holds
  more chunks; the extra ones hold only nodata (they are not stored).
- **POIs**: row counts from each source's metadata (parquet footers, ``pyogrio.read_info``),
  never its rows; a CSV's rows are estimated from its size and first lines. How many
  distinct descriptions the text stage will encode comes from a bounded sample of rows
  rendered exactly as the pois stage does (exact when the sample holds every row), and how
  many of them the text cache already holds from a lookup of their keys. ``--pois N``
  replaces the sources by a count.
- **Labels**: feature counts of ``regions.luc_points`` / ``regions.sdm_units`` likewise
  (``--luc-points N`` / ``--sdm-units N``).

The module is a little longer than the project's ~400-line guide. Its seam is the two
comment-marked halves, ``grid`` (the raster a plan is for) and ``counts`` (POIs and
labels), about 190 lines each; both fill the one :class:`PlanInputs` that
:func:`read_inputs` returns, and each is read only through it. Split, two modules would
share the result types defined here and one call site; the split is due when either half
grows (a new input kind for the grid, or another counted source).
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import aef
from ..config import RunConfig

__all__ = ["GridInfo", "Labels", "PlanInputs", "PoiInfo", "SyntheticInputs", "read_inputs"]

#: rows of POI sources rendered to count distinct descriptions (and cache hits)
SAMPLE_ROWS = 200_000


@dataclass
class GridInfo:
    """The ae.zarr grid the ingest will write, and what it reads."""

    width: int
    height: int
    chunk_px: int
    crs: str
    resolution: float
    tiles: int
    tiles_reprojected: int
    data_pixels: int  # pixels the tiles hold (≤ width × height: gaps and sea are nodata)
    tile_bytes: int | None  # bytes of the tile files (None: no files, synthetic inputs)
    source: str

    @property
    def chunks_y(self) -> int:
        return math.ceil(self.height / self.chunk_px)

    @property
    def chunks_x(self) -> int:
        return math.ceil(self.width / self.chunk_px)

    @property
    def n_chunks(self) -> int:
        return self.chunks_y * self.chunks_x

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def data_chunks(self) -> int:
        """Chunks that hold data (the rest are nodata only: cheap, not stored)."""
        share = self.data_pixels / max(self.pixels, 1)
        return max(1, min(self.n_chunks, math.ceil(self.n_chunks * share)))

    @property
    def area_km2(self) -> float:
        return self.data_pixels * self.resolution ** 2 / 1e6


@dataclass
class PoiInfo:
    """POI rows and the distinct descriptions the text stage will meet."""

    rows: int
    per_source: list[dict[str, Any]]
    source_bytes: int | None
    distinct: int
    distinct_source: str
    cached: int  # distinct descriptions already in the text cache
    cached_source: str
    count_source: str


@dataclass
class Labels:
    luc: int
    sdm: int
    source: str


@dataclass
class PlanInputs:
    grid: GridInfo
    pois: PoiInfo
    labels: Labels
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        g = asdict(self.grid)
        g.update(n_chunks=self.grid.n_chunks, pixels=self.grid.pixels,
                 data_chunks=self.grid.data_chunks, area_km2=round(self.grid.area_km2, 3))
        return {"grid": g, "pois": asdict(self.pois), "labels": asdict(self.labels),
                "notes": list(self.notes)}


@dataclass
class SyntheticInputs:
    """Inputs described instead of read (any of them; the rest come from the config)."""

    tile_index: str | None = None
    area_km2: float | None = None
    pois: int | None = None
    luc_points: int | None = None
    sdm_units: int | None = None
    distinct_ratio: float | None = None  # distinct descriptions / rows when not sampled
    synth: bool = False  # the config's synth section: the city `aether-scale demo` writes


# --------------------------------------------------------------------------- grid
def _tile_info(i: int, crs: str, bounds: list[float], res: float) -> Any:
    from rasterio.crs import CRS

    from ..ingest.inputs import TileInfo

    left, bottom, right, top = (float(v) for v in bounds)
    if not (right > left and top > bottom):
        raise ValueError(f"tile index: tile {i} bounds {bounds} are not [left, bottom, right, "
                         "top] with right > left and top > bottom")
    w, h = max(1, round((right - left) / res)), max(1, round((top - bottom) / res))
    return TileInfo(path=f"<tile index #{i}>", crs_wkt=CRS.from_user_input(crs).to_wkt(),
                    transform=(res, 0.0, left, 0.0, -res, top), width=w, height=h,
                    dtype="int8", nodata=float(aef.NODATA),
                    band_indexes=tuple(range(1, aef.N_BANDS + 1)), files=())


def _grid_of(tiles: list[Any], cfg: RunConfig, data_pixels: int, tile_bytes: int | None,
             source: str, crs: str | None) -> GridInfo:
    from ..ingest.grid import plan_grid
    from ..ingest.stage import _crs_label
    from ..stores import ae as ae_store

    grid, placements = plan_grid(tiles, crs=crs, resolution=cfg.ingest.resolution)
    cpx = int(cfg.ingest.chunk_px or ae_store.DEFAULT_CHUNK_PX)
    return GridInfo(width=grid.width, height=grid.height, chunk_px=cpx,
                    crs=_crs_label(grid.crs_wkt), resolution=grid.resolution, tiles=len(tiles),
                    tiles_reprojected=sum(not p.aligned for p in placements),
                    data_pixels=min(int(data_pixels), grid.width * grid.height),
                    tile_bytes=tile_bytes, source=source)


def _file_size(path: str) -> int | None:
    try:
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return int(fs.du(p)) if fs.isdir(p) else int(fs.size(p))
    except (OSError, ValueError, ImportError):
        return None


def grid_from_tiles(cfg: RunConfig) -> GridInfo:
    from ..ingest.inputs import inspect_tile, resolve_tiles

    files = resolve_tiles(cfg.ingest.tiles)
    tiles = [inspect_tile(f) for f in files]
    sizes = [_file_size(f) for f in files]
    total = None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[arg-type]
    px = sum(_data_pixels(t, cfg.ingest.resolution) for t in tiles)
    return _grid_of(tiles, cfg, px, total, f"headers of {len(files)} tile(s) (ingest.tiles)",
                    cfg.ingest.crs)


def _data_pixels(t: Any, res: float) -> int:
    """Target pixels a tile holds (its area at the target pixel size)."""
    a, e = abs(t.transform[0]), abs(t.transform[4])
    return round(t.width * a * t.height * e / (res * res))


def grid_from_index(path: str, cfg: RunConfig) -> GridInfo:
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = json.load(f) if path.lower().endswith(".json") else yaml.safe_load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("tiles"), list) or not doc["tiles"]:
        raise ValueError(f"tile index {path}: expected a mapping with a non-empty 'tiles' list "
                         "of {bounds: [left, bottom, right, top], crs: …}")
    crs = doc.get("crs")
    res = float(doc.get("resolution") or cfg.ingest.resolution)
    tiles, px = [], 0
    for i, t in enumerate(doc["tiles"]):
        tcrs = t.get("crs", crs)
        if not tcrs:
            raise ValueError(f"tile index {path}: tile {i} has no crs (set it or a top-level crs)")
        info = _tile_info(i, tcrs, t["bounds"], res)
        tiles.append(info)
        share = float(t.get("valid_fraction", 1.0))
        px += round(_data_pixels(info, cfg.ingest.resolution) * share)
    return _grid_of(tiles, cfg, px, None, f"tile index {path} ({len(tiles)} footprints)",
                    cfg.ingest.crs)


def grid_from_area(area_km2: float, cfg: RunConfig) -> GridInfo:
    if area_km2 <= 0:
        raise ValueError(f"--area-km2 must be positive (got {area_km2})")
    crs = cfg.ingest.crs or "EPSG:27700"
    res = cfg.ingest.resolution
    side = max(1, math.ceil(math.sqrt(area_km2 * 1e6) / res)) * res
    tile = _tile_info(0, crs, [0.0, 0.0, side, side], res)
    px = round(area_km2 * 1e6 / res ** 2)
    return _grid_of([tile], cfg, px, None, f"--area-km2 {area_km2:g} (one square of that area "
                    f"in {crs})", crs)


def grid_from_synth(cfg: RunConfig) -> GridInfo:
    s = cfg.synth
    res = cfg.ingest.resolution
    w = math.ceil(s.size_px / s.n_tiles_x)
    h = math.ceil(s.size_px / s.n_tiles_y)
    tiles = [_tile_info(i * s.n_tiles_x + j, s.crs,
                        [s.origin_x + j * w * 10.0, s.origin_y - (i + 1) * h * 10.0,
                         s.origin_x + (j + 1) * w * 10.0, s.origin_y - i * h * 10.0], 10.0)
             for i in range(s.n_tiles_y) for j in range(s.n_tiles_x)]
    px = round(s.size_px * s.size_px * (10.0 / res) ** 2)
    return _grid_of(tiles, cfg, px, None,
                    f"the synth section ({s.size_px}×{s.size_px} px city, as `aether-scale demo` "
                    "writes it)", cfg.ingest.crs)


# --------------------------------------------------------------------------- counts
def _parquet_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    return [path]


def count_features(path: str, layer: str | None = None) -> tuple[int, str]:
    """Rows of a vector/table file from its metadata: ``(rows, how)``."""
    low = path.lower().rstrip("/")
    if low.endswith((".parquet", ".geoparquet")) or os.path.isdir(path):
        import pyarrow.parquet as pq

        files = _parquet_files(path)
        return sum(pq.read_metadata(f).num_rows for f in files), "parquet metadata"
    if low.endswith((".csv", ".tsv", ".txt", ".csv.gz")):
        return _csv_rows(path), "estimated from the CSV's size and first lines"
    import pyogrio

    info = pyogrio.read_info(path, layer=layer, force_feature_count=True)
    return int(info["features"]), "pyogrio.read_info feature count"


def _csv_rows(path: str) -> int:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    lines = head.count(b"\n")
    if len(head) >= size:
        return max(0, lines - 1 + (0 if head.endswith(b"\n") else 1))
    return max(1, round(size / (len(head) / max(lines, 1))) - 1)


def _sample_frame(src: Any, n: int) -> Any:
    """Up to ``n`` rows of the role columns of a source (no geometry)."""
    import pandas as pd

    roles = {r: c for r, c in src.columns.model_dump().items() if c and r != "id"}
    cols = sorted(set(roles.values()))
    if not cols:
        return pd.DataFrame(index=pd.RangeIndex(0)), roles
    path = src.path
    low = path.lower().rstrip("/")
    if low.endswith((".parquet", ".geoparquet")) or os.path.isdir(path):
        import pyarrow.parquet as pq

        parts, got = [], 0
        for f in _parquet_files(path):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=min(n, 65536), columns=cols):
                parts.append(batch.to_pandas())
                got += batch.num_rows
                if got >= n:
                    break
            if got >= n:
                break
        df = pd.concat(parts, ignore_index=True).head(n) if parts else pd.DataFrame(columns=cols)
    elif low.endswith((".csv", ".tsv", ".txt", ".csv.gz")):
        df = pd.read_csv(path, usecols=cols, nrows=n, dtype=str, encoding=src.encoding,
                         encoding_errors="replace", sep="\t" if low.endswith(".tsv") else ",")
    else:
        import pyogrio

        df = pyogrio.read_dataframe(path, layer=src.layer, columns=cols, read_geometry=False,
                                    max_features=n)
    return df, roles


def _descriptions(cfg: RunConfig, src: Any, df: Any, roles: dict[str, str]) -> Any:
    from ..pois.clean import build_descriptions, clean_text

    cols = {}
    for role in ("name", "category", "subcategory", "description"):
        cols[role] = clean_text(df[roles[role]])[0] if role in roles else None
    return build_descriptions(cols, template=cfg.pois.template,
                              template_no_name=cfg.pois.template_no_name,
                              append_name=src.append_name, index=df.index).dropna()


def _cache_hits(cfg: RunConfig, texts: list[str]) -> int | None:
    """How many of ``texts`` the text cache holds (None: no cache for this model yet)."""
    from ..text.cache import DEFAULT_CACHE_DIR, TextCache, text_keys
    from ..text.model import model_identity

    try:
        key, ident = model_identity(cfg.text.model, cfg.text.normalize)
    except Exception:  # noqa: BLE001 - a model that cannot be resolved here: no cache to ask
        return None
    root = os.path.expanduser(cfg.text.cache_dir or DEFAULT_CACHE_DIR)
    if not os.path.isdir(os.path.join(root, key)) or not texts:
        return None
    cache = TextCache(root, key, ident)
    return int((~cache.lookup(text_keys(texts)).missing).sum())


def read_pois(cfg: RunConfig, syn: SyntheticInputs) -> PoiInfo:
    if syn.pois is not None or syn.synth:
        n = int(syn.pois if syn.pois is not None else cfg.synth.n_pois)
        ratio = 1.0 if syn.distinct_ratio is None else float(syn.distinct_ratio)
        how = "--pois" if syn.pois is not None else "synth.n_pois"
        dsrc = ("--distinct-ratio" if syn.distinct_ratio is not None else
                "upper bound: every description distinct (set --distinct-ratio)")
        return PoiInfo(rows=n, per_source=[{"path": how, "rows": n}], source_bytes=None,
                       distinct=round(n * ratio), distinct_source=dsrc, cached=0,
                       cached_source="not known without the POI files: none assumed",
                       count_source=how)
    if not cfg.pois.sources:
        raise ValueError("no POIs to plan: set pois.sources in the config, or give --pois N")
    per, total, nbytes = [], 0, 0
    texts: set[str] = set()
    sampled = 0
    budget = SAMPLE_ROWS
    for src in cfg.pois.sources:
        n, how = count_features(src.path, src.layer)
        size = _file_size(src.path)
        per.append({"path": src.path, "rows": n, "count": how, "bytes": size})
        total += n
        nbytes += size or 0
        if budget > 0:
            df, roles = _sample_frame(src, budget)
            budget -= len(df)
            sampled += len(df)
            if len(df):
                texts.update(_descriptions(cfg, src, df, roles).tolist())
    exact = sampled >= total
    if syn.distinct_ratio is not None:
        distinct = round(total * syn.distinct_ratio)
        dsrc = "--distinct-ratio"
    elif exact:
        distinct, dsrc = len(texts), f"exact: all {total:,} rows rendered with pois.template"
    else:
        distinct = min(total, round(total * len(texts) / max(sampled, 1)))
        dsrc = (f"upper estimate: {len(texts):,} distinct in the first {sampled:,} rows, "
                "scaled to every row")
    hits = _cache_hits(cfg, sorted(texts))
    if hits is None:
        cached, csrc = 0, "text cache holds nothing for this model"
    elif exact:
        cached, csrc = hits, "exact: every description looked up in the text cache"
    else:
        cached = round(distinct * hits / max(len(texts), 1))
        csrc = f"{hits:,} of the {len(texts):,} sampled descriptions are cached, scaled"
    return PoiInfo(rows=total, per_source=per, source_bytes=nbytes or None, distinct=distinct,
                   distinct_source=dsrc, cached=min(cached, distinct), cached_source=csrc,
                   count_source="source metadata (no rows read)")


def read_labels(cfg: RunConfig, syn: SyntheticInputs) -> Labels:
    rc = cfg.regions
    out, how = {}, []
    for task, given, path, synth_n in (("luc", syn.luc_points, rc.luc_points,
                                        cfg.synth.n_luc_points),
                                       ("sdm", syn.sdm_units, rc.sdm_units, cfg.synth.n_regions)):
        if given is not None:
            out[task] = int(given)
            how.append(f"{task}: --{'luc-points' if task == 'luc' else 'sdm-units'}")
        elif syn.synth:
            out[task] = int(synth_n)
            how.append(f"{task}: synth")
        elif path:
            out[task] = count_features(path)[0]
            how.append(f"{task}: {os.path.basename(path)} feature count")
        else:
            out[task] = 0
            how.append(f"{task}: none configured")
    if not set(cfg.evaluate.tasks) & {t for t, n in out.items() if n}:
        how.append("no evaluated task has units: regions/baselines/evaluate would fail")
    return Labels(luc=out["luc"], sdm=out["sdm"], source="; ".join(how))


def read_inputs(cfg: RunConfig, syn: SyntheticInputs | None = None) -> PlanInputs:
    """Everything a plan needs from the config's inputs (headers and metadata only)."""
    syn = syn or SyntheticInputs()
    notes: list[str] = []
    if syn.tile_index:
        grid = grid_from_index(syn.tile_index, cfg)
    elif syn.area_km2 is not None:
        grid = grid_from_area(syn.area_km2, cfg)
        notes.append("--area-km2: a square of that area; a real outline's bounding box has "
                     "more chunks, the extra ones nodata only (not stored, little work)")
    elif syn.synth:
        grid = grid_from_synth(cfg)
    elif not cfg.ingest.tiles:
        raise ValueError("no tiles to plan: set ingest.tiles in the config (only their headers "
                         "are read), or describe them with --area-km2 A or --tile-index FILE")
    else:
        grid = grid_from_tiles(cfg)
    return PlanInputs(grid=grid, pois=read_pois(cfg, syn), labels=read_labels(cfg, syn),
                      notes=notes)
