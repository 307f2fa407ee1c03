"""stores/reads.py: the two window readers (a raster task's CheckedWindow, open_field's
ChunkReader) assemble any window from exactly the chunks it overlaps, with chunks the
index lists as never stored read as the fill value without touching storage."""

from __future__ import annotations

import os

import numpy as np
import pytest
from fixtures import random_codes, write_tiny_ae

from aether_scale import aef
from aether_scale.stores.chunks import CorruptStoreError, StoreRef, read_index
from aether_scale.stores.reads import CheckedWindow, ChunkReader


@pytest.fixture()
def store(tmp_path):
    q = random_codes(50, 70, seed=7)
    q[16:32, 16:32] = aef.NODATA  # exactly chunk (1, 1): all nodata, so never stored
    path = str(tmp_path / "ae.zarr")
    write_tiny_ae(path, codes=q, chunk=16)
    ref = StoreRef.of(path)
    return ref, read_index(ref), q


def _readers(ref, index):
    reader = ChunkReader(ref, "embedding", index, fix="rewrite it")
    return (lambda w: np.asarray(CheckedWindow.of(ref, "embedding", index, w, fix="rewrite it")),
            lambda w: reader[w[0]:w[1], w[2]:w[3]])


def test_windows_equal_the_array_across_chunk_edges_and_unstored_chunks(store):
    ref, index, q = store
    stored = index["arrays"]["embedding"]["stored"]
    assert "c/1/1/0" not in stored and "c/1/2/0" in stored
    rng = np.random.default_rng(0)
    windows = [(16, 32, 16, 32), (0, 50, 0, 70), (15, 33, 15, 33), (49, 50, 69, 70),
               (3, 3, 5, 9)]  # the unstored chunk alone, all, its rim, a corner, empty
    for _ in range(40):
        r0, c0 = int(rng.integers(0, 50)), int(rng.integers(0, 70))
        windows.append((r0, int(rng.integers(r0, 51)), c0, int(rng.integers(c0, 71))))
    for read in _readers(ref, index):
        for w in windows:
            got = read(w)
            assert got.dtype == np.int8
            np.testing.assert_array_equal(got, q[w[0]:w[1], w[2]:w[3]], err_msg=str(w))


def test_a_window_reads_only_the_chunks_it_overlaps(store):
    """A damaged chunk outside a window does not stop it; one inside fails naming it."""
    ref, index, q = store
    stored = index["arrays"]["embedding"]["stored"]
    key = next(k for k in stored if k.endswith("/0/3/0"))  # rows 0–15, cols 48–63
    path = os.path.join(ref.uri, "embedding", *key.split("/"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    for read in _readers(ref, index):
        np.testing.assert_array_equal(read((0, 50, 0, 48)), q[:, :48])
        with pytest.raises(CorruptStoreError, match=r"chunk embedding/.*0/3/0.*rewrite it"):
            read((10, 20, 40, 50))
