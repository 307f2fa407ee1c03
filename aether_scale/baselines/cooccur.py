"""POI co-occurrence baselines of Table 1: Place2Vec and Doc2Vec, trained with gensim.

- **Place2Vec** (Yan et al., 2017): place-type embeddings from *augmented spatial
  contexts*: each POI's type is paired with the types of its ``neighbours`` nearest
  POIs and a skip-gram model (gensim ``Word2Vec``, ``sg=1``, negative sampling) learns
  from those (centre, neighbour) pairs, with no down-sampling of frequent types (gensim's
  ``sample``, meant for stop words, would drop most pairs of a city's common types). A unit's feature is the mean type vector over
  the POIs in its buffer (the bag counts of ``regions/``, so the same POIs as TF-IDF
  and LDA); a unit without POIs is the zero vector.
- **Doc2Vec** (Niu and Silva, 2021): each unit is a document of the POI tokens in its
  buffer (each token as often as it occurs); gensim ``Doc2Vec`` (PV-DBOW) learns one
  vector per document, the unit's feature. Like LDA it is fitted on all units of a
  task without labels (transductive); a unit without POIs is the zero vector.

Both run single-threaded with a stable hash of the tokens, so a seed gives the same
vectors on every machine (gensim's default hashes with Python's salted ``hash``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["doc2vec_features", "place2vec_features", "place2vec_vectors", "stable_hash"]


def stable_hash(s: str) -> int:
    """gensim's ``hashfxn``: the same on every run (Python's ``hash`` of a str is salted)."""
    return zlib.crc32(s.encode("utf-8"))


def place2vec_vectors(xy: np.ndarray, types: np.ndarray, *, neighbours: int = 10, dim: int = 64,
                      epochs: int = 5, negative: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Skip-gram vectors of the POI ``types`` (strings, row-aligned with ``xy``) from
    (type, type of each of the ``neighbours`` nearest POIs) pairs. ``{type: (dim,)}``."""
    from gensim.models import Word2Vec
    from scipy.spatial import cKDTree

    ok = np.isfinite(xy).all(axis=1) & np.asarray([t is not None for t in types])
    xy, types = xy[ok], np.asarray(types, dtype=object)[ok]
    if len(xy) < 2:
        raise ValueError(f"baselines.place2vec: {len(xy)} located POI(s) with a type — need 2")
    k = min(neighbours, len(xy) - 1)
    _, nb = cKDTree(xy).query(xy, k=k + 1)
    model = Word2Vec(_Pairs(types, nb[:, 1:]), vector_size=dim, window=1, sg=1, negative=negative,
                     min_count=1, sample=0,
                     epochs=epochs, seed=seed, workers=1, hashfxn=stable_hash)
    return {t: model.wv[t].astype(np.float32) for t in model.wv.index_to_key}


class _Pairs:
    """The (centre type, neighbour type) sentences, generated on each pass (gensim reads
    the corpus once for the vocabulary and once per epoch; nothing is materialised)."""

    def __init__(self, types: np.ndarray, nb: np.ndarray) -> None:
        self.types, self.nb = types, nb

    def __iter__(self):
        t = self.types
        for i in range(len(t)):
            for j in self.nb[i]:
                yield [t[i], t[j]]


def place2vec_features(tokens: Sequence[Sequence[str]], counts: Sequence[Sequence[int]],
                       vectors: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """Per unit, the count-weighted mean of the type vectors of its bag tokens that
    start with ``prefix`` (``subcategory=``): ``(n_units, dim)`` float32."""
    dim = len(next(iter(vectors.values())))
    out = np.zeros((len(tokens), dim), np.float32)
    for u, (tok, cnt) in enumerate(zip(tokens, counts, strict=True)):
        acc, w = np.zeros(dim, np.float64), 0.0
        for t, c in zip(tok, cnt, strict=True):
            if t.startswith(prefix) and t[len(prefix):] in vectors:
                acc += c * vectors[t[len(prefix):]]
                w += c
        if w:
            out[u] = acc / w
    return out


def doc2vec_features(tokens: Sequence[Sequence[str]], counts: Sequence[Sequence[int]], *,
                     dim: int = 64, epochs: int = 40, seed: int = 0) -> np.ndarray:
    """PV-DBOW document vectors of the unit bags: ``(n_units, dim)`` float32."""
    from gensim.models.doc2vec import Doc2Vec, TaggedDocument

    docs, rows = [], []
    for u, (tok, cnt) in enumerate(zip(tokens, counts, strict=True)):
        words = [t for t, c in zip(tok, cnt, strict=True) for _ in range(int(c))]
        if words:
            docs.append(TaggedDocument(words, [len(docs)]))
            rows.append(u)
    out = np.zeros((len(tokens), dim), np.float32)
    if not docs:
        return out
    model = Doc2Vec(docs, vector_size=dim, dm=0, min_count=1, epochs=epochs, seed=seed,
                    workers=1, negative=5, hashfxn=stable_hash)
    out[np.asarray(rows)] = np.stack([model.dv[i] for i in range(len(docs))])
    return out
