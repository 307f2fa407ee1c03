"""POI-only baselines of the paper's Table 1: TF-IDF and LDA over the POI categories in each unit.

Each unit's *bag* is the token counts of the POIs in its buffer
(``category=…``, ``subcategory=…``; built by :mod:`aether_scale.regions`).
The baselines turn bags into features that go through the same task heads as
the embedding methods:

- **TF-IDF**: scikit-learn's smoothed idf over raw term counts,
  L2-normalised rows; a unit without POIs is the zero vector.
- **LDA**: scikit-learn's batch variational LDA (10 passes) with
  ``n_topics`` topics; the feature is the unit's topic mixture (units without
  POIs get the prior's uniform mixture).

Both are unsupervised and fitted on all units of a task (no labels are
touched, so this is not test leakage in the supervised sense; it is the usual
transductive use of these baselines).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import LatentDirichletAllocation
from sklearn.feature_extraction.text import TfidfTransformer

__all__ = ["bags_to_matrix", "tfidf_features", "lda_features", "BASELINE_NAMES"]

BASELINE_NAMES = {"tfidf": "TF-IDF", "lda": "LDA"}


def bags_to_matrix(tokens: Sequence[Sequence[str]], counts: Sequence[Sequence[int]]
                   ) -> tuple[sp.csr_matrix, np.ndarray]:
    """Per-unit token lists and counts (``regions.parquet`` columns) → (n × vocab) CSR + vocab."""
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    flat_tok = np.concatenate([np.asarray(t, dtype=object) for t in tokens]) if len(tokens) else \
        np.array([], dtype=object)
    flat_cnt = (np.concatenate([np.asarray(c, dtype=np.float64) for c in counts])
                if len(counts) else np.array([], dtype=np.float64))
    codes, vocab = pd.factorize(pd.Series(flat_tok, dtype=object), sort=True)
    indptr = np.r_[0, np.cumsum(lengths)]
    m = sp.csr_matrix((flat_cnt, codes, indptr), shape=(len(tokens), len(vocab)))
    m.sum_duplicates()
    return m, np.asarray(vocab, dtype=object)


def tfidf_features(counts: sp.spmatrix) -> np.ndarray:
    """TF-IDF of the bags (smoothed idf, L2-normalised rows) as a dense float32 array."""
    if counts.shape[1] == 0:
        return np.zeros((counts.shape[0], 1), dtype=np.float32)
    return TfidfTransformer(norm="l2", smooth_idf=True).fit_transform(counts).toarray().astype(
        np.float32)


def lda_features(counts: sp.spmatrix, n_topics: int = 20, seed: int = 0,
                 max_iter: int = 10) -> np.ndarray:
    """LDA topic mixtures of the bags (n × n_topics, rows sum to 1), deterministic per ``seed``.

    Batch variational Bayes with ``max_iter`` passes (10: the topic mixtures
    used as features are stable by then; the fit dominates the protocol's cost).
    """
    if counts.shape[1] == 0:
        return np.full((counts.shape[0], n_topics), 1.0 / n_topics, dtype=np.float32)
    lda = LatentDirichletAllocation(n_components=n_topics, learning_method="batch",
                                    max_iter=max_iter, random_state=seed)
    theta = lda.fit_transform(counts)
    return theta.astype(np.float32)
