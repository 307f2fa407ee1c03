"""``aether-scale query``: phrases → similarity rasters, top locations and maps in a
workspace (``queries/<name>/``).

:func:`query` checks what it needs (a trained model, the field it computed, the text
encoder that trained it), encodes the phrases, makes one pass over the field
(:mod:`.search`), picks each phrase's top locations and writes::

    queries/<name>/similarity.zarr   (y, x, query) float32 cosine similarity
    queries/<name>/top.parquet       GeoParquet: phrase, rank, similarity, point (field CRS)
    queries/<name>/top.geojson       the same in WGS 84 (RFC 7946)
    queries/<name>/map_<i>.png       one map per phrase (query.maps)
    queries/<name>/query.json        phrases, model, encoder, settings, counts, timings

Rerunning the same phrases against the same field reuses the finished raster (its
chunks are recorded in ``queries/<name>/.chunks``; a killed query resumes there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import RunConfig, workspace_config
from ..logs import get_logger
from .encode import QueryError, check_phrases, encode_phrases

if TYPE_CHECKING:
    import geopandas as gpd
    import xarray as xr

    from ..workspace import Workspace

__all__ = ["QueryResult", "query"]

log = get_logger("query")
QUERIES = "queries"
FORMAT = "aether_scale.query/1"


@dataclass
class QueryResult:
    """What :func:`query` made: ``similarity`` (lazy DataArray ``(y, x, query)``, the
    phrases on ``query``), ``top`` (GeoDataFrame of locations), ``maps`` (PNG paths),
    ``summary`` (what ``query.json`` records) and the ``folder`` holding them."""

    folder: str
    phrases: list[str]
    similarity: xr.DataArray
    top: gpd.GeoDataFrame
    maps: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "query"


def _local_model(ws: Workspace, name: str, stack: contextlib.ExitStack) -> str:
    """A local path to the model folder ``name`` (fetched for a remote workspace)."""
    from ..stores.models import CHECKPOINT

    src = ws.path(name)
    if ws.is_local:
        return src
    d = stack.enter_context(tempfile.TemporaryDirectory(prefix="aether-model-"))
    ws.fs.get(f"{src}/{CHECKPOINT}", os.path.join(d, CHECKPOINT))
    return d


def _inputs(ws: Workspace, variant: str) -> tuple[str, str]:
    from ..pipeline import ARTIFACTS
    from ..stores.models import CHECKPOINT

    model = ARTIFACTS["model"].variant(variant)
    fld = ARTIFACTS["field.zarr"].variant(variant)
    which = f" (variant {variant!r})" if variant else ""
    if not ws.exists(f"{model}/{CHECKPOINT}"):
        raise QueryError(f"workspace {ws.root} has no trained model{which} ({model}/"
                         f"{CHECKPOINT}): run `aether-scale train -w {ws.root}` (or `aether-scale "
                         f"run -w {ws.root}`) first")
    if not ws.exists(f"{fld}/aether_chunks.json"):
        raise QueryError(f"workspace {ws.root} has no finished field{which} ({fld}): run "
                         f"`aether-scale infer -w {ws.root}` first")
    return model, fld


def _pixel_radius(field: xr.DataArray, min_distance_m: float) -> tuple[int, float]:
    """(half-side in pixels, pixel size in metres) for a distance in metres."""
    from ..stores.raster import raster_crs

    x, y = field["x"].values, field["y"].values
    res = float(abs(x[1] - x[0])) if x.size > 1 else float(abs(y[1] - y[0]) if y.size > 1 else 1)
    crs = raster_crs(field, where="the field", required=False)
    if crs is not None and crs.is_geographic:  # degrees: metres along the parallel at the centre
        res *= 111_320.0 * math.cos(math.radians(float(np.mean(y))))
    return int(math.ceil(min_distance_m / res - 1e-9)) if min_distance_m > 0 else 0, res


@contextlib.contextmanager
def _scheduler(cfg: RunConfig, n_pixels: int) -> Iterator[str]:
    """Where the query's chunk tasks run (see ``query.cluster``)."""
    import dask

    from ..cluster import LOCAL_KINDS, ClusterSession

    q, kind = cfg.query, cfg.cluster.kind
    use = (q.cluster == "always" or (q.cluster == "auto" and kind not in ("threads", "synchronous")
                                      and (kind not in LOCAL_KINDS
                                           or n_pixels >= q.cluster_min_pixels)))
    if use:
        with ClusterSession(cfg.cluster) as session:
            session.require(True)
            yield f"cluster ({kind})"
        return
    n = q.threads or os.cpu_count() or 1
    with dask.config.set(scheduler="threads", num_workers=n):
        yield f"{n} thread(s) in this process"


def _top_table(results: Sequence[Sequence[tuple[float, int, int]]], phrases: Sequence[str],
               field: xr.DataArray) -> gpd.GeoDataFrame:
    import geopandas as gpd
    import pandas as pd

    from ..stores.raster import raster_crs

    xs, ys = field["x"].values, field["y"].values
    rows = [{"query": q, "phrase": phrases[q], "rank": rank, "similarity": v,
             "row": r, "col": c, "x": float(xs[c]), "y": float(ys[r])}
            for q, res in enumerate(results) for rank, (v, r, c) in enumerate(res, 1)]
    df = pd.DataFrame(rows, columns=["query", "phrase", "rank", "similarity", "row", "col",
                                     "x", "y"])
    crs = raster_crs(field, where="the field", required=False)
    return gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df["x"], df["y"]), crs=crs)


def _write_tables(ws: Workspace, folder: str, top: gpd.GeoDataFrame) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="aether-query-") as d:
        top.to_parquet(os.path.join(d, "top.parquet"), index=False)
        wgs = top.to_crs("EPSG:4326") if top.crs is not None else top
        if len(wgs):
            wgs.to_file(os.path.join(d, "top.geojson"), driver="GeoJSON")
        else:  # pyogrio refuses to write an empty layer
            with open(os.path.join(d, "top.geojson"), "w") as f:
                json.dump({"type": "FeatureCollection", "features": []}, f)
        out = {}
        for name in ("top.parquet", "top.geojson"):
            ws.fs.put_file(os.path.join(d, name), f"{folder}/{name}")
            out[name] = f"{folder}/{name}"
    return out


def query(workspace: str | os.PathLike | Workspace, phrases: Sequence[str] | str, *,
          config: RunConfig | str | os.PathLike | None = None,
          overrides: list[str] | dict[str, Any] | None = None, name: str | None = None,
          variant: str = "", top_k: int | None = None, min_distance_m: float | None = None,
          maps: bool | None = None, progress: bool = True) -> QueryResult:
    """Ask a workspace's field for ``phrases``: similarity rasters, top locations, maps.

    ``config``: a RunConfig, a config file, or None for the workspace's saved config
    (its ``text`` section says which encoder to use, its ``query`` section the
    defaults that ``top_k``, ``min_distance_m`` and ``maps`` override). ``variant``: a
    ``train.variants`` name (default the main model). ``name``: the output folder under
    ``queries/`` (default from the phrases). Raises :class:`QueryError` (with the fix)
    for an empty phrase, a workspace without a model or field, a mismatched encoder.
    """
    from ..cluster import InTask  # noqa: F401  (tasks pickle it; import before workers)
    from ..stores import similarity as sim_store
    from ..stores.field import open_field
    from ..workspace import Workspace, stable_hash
    from .search import similarity_raster, top_locations

    t0 = time.perf_counter()
    phrases = check_phrases(phrases)
    if not isinstance(workspace, Workspace):
        root = str(workspace)
        if "://" not in root and not os.path.isdir(root):
            raise QueryError(f"no workspace at {root}: give the folder a pipeline run wrote "
                             "(e.g. the demo's demo-out)")
        workspace = Workspace(root)
    ws = workspace
    cfg = config if isinstance(config, RunConfig) else workspace_config(ws.root, config,
                                                                        overrides)
    if isinstance(config, RunConfig) and overrides:
        from ..config import load_config

        cfg = load_config(None, overrides, data=config.model_dump(mode="json"))
    q = cfg.query.model_copy(update={k: v for k, v in {
        "top_k": top_k, "min_distance_m": min_distance_m, "maps": maps}.items() if v is not None})
    model_name, field_name = _inputs(ws, variant)
    with contextlib.ExitStack() as stack:
        model_dir = _local_model(ws, model_name, stack)
        text_attrs = None
        if ws.exists("text.zarr/zarr.json"):
            text_attrs = json.loads(ws.fs.cat_file(ws.path("text.zarr/zarr.json"))).get(
                "attributes")
        vectors, encoder = encode_phrases(phrases, model_dir, cfg.text, text_store=text_attrs)
        from ..infer.models import model_key
        from ..model import load_projector

        mkey = model_key(load_projector(model_dir))
    field_ds = open_field(ws.path(field_name), storage_options=ws.storage_options or None)
    fld = field_ds["embedding"]
    if fld.attrs.get("model_hash") not in (None, mkey):
        raise QueryError(f"{ws.path(field_name)} was computed by another model (hash "
                         f"{fld.attrs.get('model_hash')}) than {model_name}/ (hash {mkey}): the "
                         f"field is stale; run `aether-scale infer -w {ws.root}`")
    if fld.sizes["dim"] != vectors.shape[1]:
        raise QueryError(f"{ws.path(field_name)} has {fld.sizes['dim']} dims but the text head "
                         f"gives {vectors.shape[1]}; rerun `aether-scale infer -w {ws.root}`")
    r, res = _pixel_radius(fld, q.min_distance_m)
    per_chunk = 2 * q.top_k + 8
    vec_hash = hashlib.sha256(vectors.tobytes()).hexdigest()[:16]
    token = stable_hash([FORMAT, mkey, list(fld.shape), [c[0] for c in fld.data.chunks[:2]],
                         fld.attrs.get("dtype"), vec_hash, phrases, r, per_chunk])
    name = name or (slug(phrases[0]) + (f"-and-{len(phrases) - 1}-more" if len(phrases) > 1
                                        else "") + "-" + token[:6])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise QueryError(f"query name {name!r}: use letters, digits, '.', '_' or '-' (it is "
                         f"a folder under {QUERIES}/)")
    folder = ws.path(f"{QUERIES}/{name}")
    ws.fs.makedirs(folder, exist_ok=True)
    for old in ws.fs.glob(f"{folder}/map_*.png"):
        ws.fs.rm(old)
    n_px = int(fld.shape[0] * fld.shape[1])
    log.info(f"[query] {len(phrases)} phrase(s) × {n_px:,} px of {field_name}; top {q.top_k} "
             f"per phrase, ≥ {q.min_distance_m:g} m apart (±{r} px) → {QUERIES}/{name}")
    with _scheduler(cfg, n_px) as where:
        log.debug(f"[query] tasks run on {where}")
        t1 = time.perf_counter()
        out = similarity_raster(fld, vectors, phrases, f"{folder}/{sim_store.NAME}", r=r,
                                per_chunk=per_chunk, ledger=f"{folder}/.chunks", token=token,
                                storage_options=ws.storage_options or None,
                                attrs={"model_hash": mkey, "field": field_name,
                                       "text_encoder": encoder["model"],
                                       "text_encoder_key": encoder["model_key"]},
                                progress=progress)
    t_sim = time.perf_counter() - t1
    sim = sim_store.open_similarity(f"{folder}/{sim_store.NAME}",
                                    storage_options=ws.storage_options or None)
    t2 = time.perf_counter()
    results, checks = top_locations(out["records"], sim, k=q.top_k, r=r, per_chunk=per_chunk)
    top = _top_table(results, phrases, fld)
    paths = _write_tables(ws, folder, top)
    t_top = time.perf_counter() - t2
    maps_out: list[str] = []
    if q.maps:
        from .maps import render_maps

        t3 = time.perf_counter()
        maps_out = render_maps(ws, folder, sim, top, ae_name="ae.zarr", max_px=q.map_px)
        log.debug(f"[query] maps in {time.perf_counter() - t3:.1f} s")
    n_valid = sum(int(rec.get("valid", 0)) for rec in out["records"].values())
    secs = time.perf_counter() - t0
    summary = {
        "format": FORMAT, "name": name, "phrases": phrases, "model": model_name,
        "model_hash": mkey, "field": field_name, "text_encoder": encoder,
        "top_k": q.top_k, "min_distance_m": q.min_distance_m, "window_half_px": r,
        "pixel_m": res, "pixels": n_px, "valid_pixels": n_valid,
        "chunks": out["n_chunks"], "chunks_computed": out["chunks_computed"],
        "locations": len(top), "checks": checks,
        "seconds": {"total": round(secs, 3), "similarity": round(t_sim, 3),
                    "top": round(t_top, 3)},
        "pixels_per_s": round(n_px / t_sim, 1) if t_sim > 0 else None,
        "outputs": {"similarity": f"{folder}/{sim_store.NAME}", **paths,
                    "maps": maps_out},
    }
    ws.fs.pipe_file(f"{folder}/query.json", json.dumps(summary, indent=2).encode())
    reused = " (reused the finished raster)" if out["chunks_computed"] == 0 else ""
    log.info(f"[query] {len(phrases)} phrase(s): {n_valid:,} valid of {n_px:,} px, "
             f"{len(top)} locations in {secs:.1f} s{reused} → {folder}")
    return QueryResult(folder=folder, phrases=phrases, similarity=sim, top=top, maps=maps_out,
                       summary=summary)

