"""The ``text`` stage: ``pois.parquet`` descriptions → ``text.zarr``.

Every *distinct* description is embedded once (POI sets repeat chain names and
categories a lot), through the persistent cache (:mod:`.cache`): a rerun, or a city
whose texts were seen before, makes no model calls. The stage's key holds the model's
identity (:func:`~.model.model_identity`) instead of its name or path, and the cache
location, mode, batch sizes and device are runtime settings (see the registry in
:mod:`aether_scale.pipeline`): a changed model folder reruns the stage, moving the
cache does not.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..config import RunConfig
from ..stores.pois import PoiTable
from ..stores.text import write_text_store
from .cache import Lookup
from .encode import encode_unique
from .model import MODEL_CALLS, load_text_model, model_identity, resolve_model

__all__ = ["build", "external_inputs"]


def external_inputs(cfg: RunConfig) -> dict[str, str]:
    """The model's identity (its files' fingerprint and the normalisation), as an input."""
    key, _ = model_identity(cfg.text.model, cfg.text.normalize)
    return {"text_model": f"id:{key}"}


def build(ctx) -> dict[str, Any]:
    """Embed the descriptions of ``pois.parquet`` and write ``text.zarr``.

    Raises ValueError when ``pois.parquet`` has empty descriptions, OSError when the
    model cannot be loaded.
    """
    tcfg = ctx.cfg.text
    key, _ = model_identity(tcfg.model, tcfg.normalize)
    t0 = time.perf_counter()
    poi_id, uniq, codes = PoiTable(ctx.reads["pois.parquet"],
                                   storage_options=ctx.storage_options).descriptions()
    t_read = time.perf_counter() - t0
    calls0 = dict(MODEL_CALLS)
    ctx.log.info(f"[text] {len(poi_id):,} POIs, {len(uniq):,} distinct descriptions")
    cache, loc, st = encode_unique(uniq, tcfg, log=ctx.log)
    dim = cache.dim or int(load_text_model(tcfg.model, tcfg.device)
                           .get_sentence_embedding_dimension())
    t1 = time.perf_counter()
    cr = max(1, min(tcfg.chunk_rows, max(len(poi_id), 1)))

    def blocks():
        for a in range(0, len(poi_id), cr):
            u, inv = np.unique(codes[a:a + cr], return_inverse=True)
            yield cache.gather(Lookup(loc.shard[u], loc.row[u]), int(dim))[inv]

    attrs = {"model": tcfg.model, "model_path": resolve_model(tcfg.model), "model_key": key,
             "dim": int(dim), "normalize": bool(tcfg.normalize), "dtype": "float32"}
    write_text_store(ctx.outputs["text.zarr"], poi_id, blocks(), dim=int(dim), chunk_rows=cr,
                     attrs=attrs, storage_options=ctx.storage_options)
    stats = {
        "rows": int(len(poi_id)),
        "distinct_texts": len(uniq),
        "cache_hits": st["cache_hits"],
        "encoded": st["encoded"],
        "model_calls_here": MODEL_CALLS["calls"] - calls0["calls"],
        "mode": st["mode"],
        "mode_reason": st["mode_reason"],
        "encode_s": st["encode_s"],
        "texts_per_s": st["texts_per_s"],
        "cache_compaction": st["compaction"],
        "read_s": round(t_read, 3),
        "write_s": round(time.perf_counter() - t1, 3),
        "dim": int(dim),
        "model_key": key,
        "cache_dir": str(cache.dir),
    }
    ctx.log.info(f"[text] {stats['rows']:,} rows: {stats['cache_hits']:,} distinct texts from "
                 f"the cache, {stats['encoded']:,} encoded ({st['mode']}: {st['mode_reason']})")
    return stats
