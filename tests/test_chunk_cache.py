"""The chunk cache of one pass: each chunk read once per process, whatever the threads."""

from __future__ import annotations

import threading
import time

import dask
import numpy as np
import pytest
import xarray as xr
from fixtures import count_chunk_reads, projector, write_tiny_ae

from aether_scale.config import InferSection
from aether_scale.infer import infer_field
from aether_scale.stores import chunks as ch
from aether_scale.stores.chunk_cache import ChunkCache


def _slow_reader(calls: list[int], value: np.ndarray, wait_s: float = 0.2):
    def read() -> np.ndarray:
        calls.append(threading.get_ident())
        time.sleep(wait_s)  # long enough that every other thread asks meanwhile
        return value.copy()
    return read


def test_threads_asking_for_a_chunk_at_once_share_one_read():
    cache = ChunkCache()
    calls: list[int] = []
    value = np.arange(12).reshape(3, 4)
    got: list[np.ndarray] = []
    start = threading.Barrier(4)

    def ask() -> None:
        start.wait()
        got.append(cache.get("pass", "c0", _slow_reader(calls, value)))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.reads == 1
    assert len(got) == 4 and all(g is got[0] for g in got)
    np.testing.assert_array_equal(got[0], value)
    assert not got[0].flags.writeable  # shared: nobody may change it under the others


def test_a_failed_read_is_not_kept_and_every_waiter_sees_the_error():
    cache = ChunkCache()
    calls: list[int] = []

    def broken() -> np.ndarray:
        calls.append(1)
        time.sleep(0.1)
        raise ch.CorruptStoreError("chunk embedding/c/0/0/0 fails its checksum")

    errors: list[str] = []
    start = threading.Barrier(3)

    def ask() -> None:
        start.wait()
        try:
            cache.get("pass", "c0", broken)
        except ch.CorruptStoreError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3 and all("checksum" in e for e in errors)
    assert cache.held() == 0 and cache.reads == 0
    assert len(calls) >= 2  # a waiter whose owner failed reads (and fails) itself


def test_holds_one_chunk_per_thread_of_the_pass_and_drops_it_after():
    cache = ChunkCache()
    one = np.zeros(4)
    for k in ("a", "b", "c"):  # one thread: only the last chunk stays
        cache.get("p1", k, lambda: one.copy())
    assert cache.held() == 1
    cache.get("p1", "c", lambda: pytest.fail("a held chunk is read again"))

    done = threading.Event()
    threading.Thread(target=lambda: (cache.get("p1", "d", lambda: one.copy()), done.set())
                     ).start()
    assert done.wait(5)
    assert cache.held() == 2  # two threads of the pass: two chunks
    reads = cache.reads
    cache.get("p1", "c", lambda: one.copy())
    assert cache.reads == reads  # "c" was kept (the least recently used went first)

    cache.get("p2", "c", lambda: one.copy())  # the next pass starts from nothing
    assert cache.reads == reads + 1 and cache.held() == 1
    cache.release("p1")  # another pass's release leaves this one's chunks
    assert cache.held() == 1
    cache.release("p2")
    assert cache.held() == 0


def test_infer_with_two_threads_reads_each_ae_chunk_once(tmp_path, monkeypatch):
    """Four field chunks per AE chunk, two scheduler threads: every AE chunk is read
    (and verified) once, the field equals a one-thread run's, and nothing is held after."""
    from aether_scale.stores.chunk_cache import CACHE

    path = str(tmp_path / "ae.zarr")
    write_tiny_ae(path, ny=128, nx=192, chunk=64)  # 2 × 3 AE chunks
    reads = count_chunk_reads(monkeypatch)
    model = projector()
    cfg = InferSection(chunk_px=32, read_chunk_px=32)  # 4 field chunks in each AE chunk
    with dask.config.set(scheduler="threads", num_workers=2):
        stats = infer_field(path, model, str(tmp_path / "f2.zarr"), cfg, progress=False)
    assert stats["n_chunks"] == 24
    assert sorted(reads) == sorted({r for r in reads}) and len(reads) == 6
    assert CACHE.held() == 0
    with dask.config.set(scheduler="sync"):
        infer_field(path, model, str(tmp_path / "f1.zarr"), cfg, progress=False)
    a = xr.open_zarr(tmp_path / "f2.zarr", mask_and_scale=False)["embedding"].values
    b = xr.open_zarr(tmp_path / "f1.zarr", mask_and_scale=False)["embedding"].values
    np.testing.assert_array_equal(a, b)
