"""POI descriptions → ``text.zarr``: sentence-transformers embeddings with a persistent cache.

``aether-scale text`` embeds the ``description`` of every row of ``pois.parquet``:

- each *distinct* text is encoded once (POI sets repeat chain names and categories a
  lot, so this alone saves most of the model time);
- vectors live in a persistent cache keyed by (model identity, BLAKE2b-128 of the
  UTF-8 text) under ``text.cache_dir`` (default ``~/.cache/aether_scale/text``), shared
  by later runs and other cities: a rerun, or a city whose texts were seen before,
  performs no model calls;
- new texts are encoded in this process (``mode: local``) or spread over the dask
  workers with the model loaded once per worker process (``mode: dask``); ``mode: auto``
  (default) picks — see :func:`choose_mode` for the rule.

Layout: :mod:`.model` (which model, loading, identity), :mod:`.cache` (the shard
cache), :mod:`.compaction` (merging its shards), :mod:`.encode` (what to encode where)
and :mod:`.stage` (the registered stage). The output store is
:mod:`aether_scale.stores.text`.
"""

from .cache import DEFAULT_CACHE_DIR, Lookup, TextCache, compact_cache, text_keys
from .compaction import DEFAULT_MAX_SHARDS
from .encode import choose_mode, embed_texts, encode_unique
from .model import BUNDLED_MODEL_NAMES, MODEL_CALLS, load_text_model, model_identity, resolve_model

__all__ = [
    "BUNDLED_MODEL_NAMES",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_MAX_SHARDS",
    "MODEL_CALLS",
    "Lookup",
    "TextCache",
    "choose_mode",
    "compact_cache",
    "embed_texts",
    "encode_unique",
    "load_text_model",
    "model_identity",
    "resolve_model",
    "text_keys",
]
