"""Encoding the texts a cache lacks: in this process or on the dask workers.

:func:`encode_unique` makes sure every distinct text is in the cache and encodes the
rest — in this process (``text.mode: local``) or spread over the workers with the
model loaded once per worker process (``mode: dask``); ``mode: auto`` picks, by the
rule of :func:`choose_mode` (measurements in ``benchmarks/bench_text.py``).
:func:`embed_texts` is the convenience for any list of texts.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..cluster import active_client
from ..config import TextSection
from ..devices import choose_threads, local_cores, resolve_device
from ..logs import Progress, get_logger
from .cache import Lookup, TextCache, text_keys
from .model import _encode, _encode_on_worker, load_text_model, model_identity

__all__ = ["choose_mode", "embed_texts", "encode_unique"]

def _local_addresses() -> set[str]:
    import socket

    import psutil

    here = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        here.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    for addrs in psutil.net_if_addrs().values():
        here.update(a.address.split("%")[0] for a in addrs)
    return here


def _is_this_machine(address: str) -> bool:
    """Whether a dask worker address (``tcp://10.0.0.5:4321``, ``inproc://…``) is local."""
    scheme, _, rest = address.partition("://")
    if scheme == "inproc":
        return True
    host = rest.rsplit(":", 1)[0].strip("[]") if ":" in rest else rest
    return host in _local_addresses()


def choose_mode(cfg: TextSection, n_new: int, client: Any = None) -> tuple[str, str]:
    """``(mode, reason)`` for encoding ``n_new`` texts.

    ``mode`` set to ``local`` / ``dask`` is obeyed (``dask`` without a distributed
    client falls back to local). ``auto`` uses dask only when it can add compute:
    a distributed client exists, at least ``dask_min_texts`` new texts (below that,
    loading the model on every worker costs more than it saves), the model would
    run on CPU here, and the workers have more cores than this process can use —
    workers that all share this machine's cores (a LocalCluster) do not. Measured
    by ``benchmarks/bench_text.py`` on 2 shared cores: in-process 45 texts/s vs a
    2-process × 1-thread LocalCluster 34 texts/s once warm, plus ~6 s cluster start
    and ~45 s of model loading in the workers on the first batch.
    """
    if cfg.mode == "local":
        return "local", "text.mode=local"
    if client is None:
        return "local", "no distributed client" + (" (text.mode=dask ignored)" if cfg.mode == "dask" else "")
    if cfg.mode == "dask":
        return "dask", "text.mode=dask"
    if n_new < cfg.dask_min_texts:
        return "local", f"{n_new} new texts < text.dask_min_texts={cfg.dask_min_texts}"
    here = resolve_device(cfg.device, key="text.device")
    if here.type != "cpu":
        return "local", f"local device {here} is faster than CPU workers"
    workers = client.nthreads()  # {address: threads}
    remote = sum(t for a, t in workers.items() if not _is_this_machine(a))
    local = local_cores()
    if remote > 1.5 * local:
        return "dask", f"workers on other machines have {remote} threads vs {local} local cores"
    return "local", (f"dask workers add no cores ({remote} remote threads vs {local} local "
                     "cores); one in-process model is as fast without per-worker model loads")


def encode_unique(
    texts: Sequence[str],
    cfg: TextSection,
    *,
    cache: TextCache | None = None,
    keys: np.ndarray | None = None,
    log: logging.Logger | None = None,
) -> tuple[TextCache, Lookup, dict[str, Any]]:
    """Make sure every (distinct) text in ``texts`` is in the cache; encode the rest.

    Returns ``(cache, lookup, stats)`` where ``lookup`` locates each input text.
    ``stats``: ``unique``, ``cache_hits``, ``encoded``, ``mode``, ``mode_reason``,
    ``encode_s``, ``texts_per_s``, ``compaction`` (:meth:`TextCache.compact` stats when
    this run appended and pushed the cache past ``cache.max_shards``, else None).
    Raises OSError when the model cannot be loaded.
    """
    key, ident = model_identity(cfg.model, cfg.normalize)
    if cache is None:  # (not `cache or`: an empty cache is falsy)
        cache = TextCache(cfg.cache_dir, key, ident, max_shards=cfg.compact_shards)
    keys = text_keys(texts) if keys is None else keys
    loc = cache.lookup(keys)
    miss = np.flatnonzero(loc.missing)
    # the same text may appear twice in `texts` if the caller did not deduplicate
    if len(miss):
        _, first = np.unique(keys[miss], return_index=True)
        miss = miss[np.sort(first)]
    n_new = len(miss)
    stats: dict[str, Any] = {"unique": len(texts), "cache_hits": int(len(texts) - loc.missing.sum()),
                             "encoded": n_new, "mode": None, "mode_reason": None,
                             "encode_s": 0.0, "texts_per_s": None, "compaction": None}
    if n_new == 0:
        stats["mode"], stats["mode_reason"] = "none", "every text was cached"
        return cache, loc, stats
    client = active_client() if cfg.mode != "local" else None
    mode, reason = choose_mode(cfg, n_new, client)
    stats["mode"], stats["mode_reason"] = mode, reason
    t0 = time.perf_counter()
    prog = Progress(log or get_logger("text"), "text", n_new, "texts")
    with prog:
        _encode_missing(texts, keys, miss, cfg, cache, mode, client, prog)
    dt = time.perf_counter() - t0
    stats["encode_s"] = round(dt, 3)
    stats["texts_per_s"] = round(n_new / dt, 1) if dt > 0 else None
    stats["compaction"] = _auto_compact(cache)
    return cache, cache.lookup(keys), stats


def _encode_missing(texts: Sequence[str], keys: np.ndarray, miss: np.ndarray, cfg: TextSection,
                    cache: TextCache, mode: str, client: Any, prog: Progress) -> None:
    """Encode ``texts[miss]`` here or on the workers, appending to ``cache`` as they come."""
    if mode == "local":
        import torch

        model = load_text_model(cfg.model, cfg.device)
        n, why = choose_threads(cfg.threads, key="text.threads")
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        prog.log.info(f"[text] encoding {len(miss):,} texts here; torch threads: {why}")
        try:
            for a in range(0, len(miss), cfg.flush_texts):
                idx = miss[a : a + cfg.flush_texts]
                vec = _encode(model, [texts[i] for i in idx], batch_size=cfg.batch_size,
                              normalize=cfg.normalize)
                cache.append(keys[idx], vec)
                prog.advance(len(idx))
        finally:
            torch.set_num_threads(before)
    else:
        from distributed import as_completed

        nworkers = max(1, len(client.nthreads()))
        block = int(min(cfg.flush_texts, max(cfg.batch_size, -(-len(miss) // (4 * nworkers)))))
        groups = [miss[a : a + block] for a in range(0, len(miss), block)]
        # (a partial: Client.map has its own `batch_size` keyword)
        task = functools.partial(_encode_on_worker, name=cfg.model, device=cfg.device,
                                 batch_size=cfg.batch_size, normalize=cfg.normalize)
        futs = client.map(task, [[texts[i] for i in g] for g in groups], pure=False)
        which = {f.key: g for f, g in zip(futs, groups, strict=True)}
        for fut, vec in as_completed(futs, with_results=True):
            g = which[fut.key]
            cache.append(keys[g], vec)
            prog.advance(len(g))


def _auto_compact(cache: TextCache) -> dict[str, Any] | None:
    """Compact after a run that appended, once the cache has more than
    ``cache.max_shards`` shards (0 = never). Compaction only saves time later, so a
    failure (read-only or damaged cache) warns instead of failing the finished run."""
    if cache.max_shards < 1 or cache.n_shards <= cache.max_shards:
        return None
    try:
        return cache.compact()
    except (OSError, ValueError) as e:
        warnings.warn(f"text cache {cache.dir}: compaction failed ({e}); the cache is "
                      "still correct, only slower to open; fix the cause and run "
                      "aether_scale.text.compact_cache", stacklevel=2)
        return None


def embed_texts(texts: Sequence[str], cfg: TextSection | None = None) -> np.ndarray:
    """Embeddings of ``texts`` (n, dim) float32, row i for ``texts[i]``.

    Each distinct text is encoded at most once and only when the persistent cache
    (``cfg.cache_dir``) lacks it for this model; repeated calls cost no model time.
    """
    import pandas as pd

    cfg = cfg or TextSection()
    codes, uniques = pd.factorize(pd.Series(list(texts), dtype=object), use_na_sentinel=False)
    uniq = [str(u) for u in uniques]
    cache, loc, _ = encode_unique(uniq, cfg)
    dim = cache.dim or load_text_model(cfg.model, cfg.device).get_sentence_embedding_dimension()
    if not uniq:
        return np.empty((0, int(dim)), dtype=np.float32)
    vec = cache.gather(loc, int(dim))
    return vec[codes]
