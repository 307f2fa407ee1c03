"""POI bags: the tokens of the POIs in each unit's buffer, for the POI-only baselines.

A token is ``column=value`` of a ``pois.parquet`` column (``regions.poi_token_columns``,
default ``category`` and ``subcategory``). Point units get every POI within the buffer
(distance ≤ ``buffer_m``, the raster buffers' membership rule) from one KD-tree range
query over all units at once; polygon units the POIs inside them (a spatial join).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

__all__ = ["bag_columns", "poi_bags", "poi_token_matrix", "unit_xy"]


def unit_xy(units: gpd.GeoDataFrame | tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Point coordinates of point units (a GeoDataFrame, or an ``(x, y)`` tuple)."""
    if isinstance(units, tuple):
        return np.asarray(units[0], dtype=np.float64), np.asarray(units[1], dtype=np.float64)
    return units.geometry.x.to_numpy(np.float64), units.geometry.y.to_numpy(np.float64)


def is_points(units: Any) -> bool:
    if isinstance(units, tuple):
        return True
    return bool((units.geometry.geom_type == "Point").all())


def poi_token_matrix(pois: pd.DataFrame, columns: Sequence[str]) -> tuple[sp.csr_matrix, np.ndarray]:
    """(n_pois × vocab) 0/1 matrix of ``column=value`` tokens and the vocabulary."""
    mats, vocab = [], []
    n = len(pois)
    for c in columns:
        vals = pois[c].astype("string")
        codes, uniques = pd.factorize(vals, use_na_sentinel=True)
        ok = codes >= 0
        m = sp.csr_matrix(
            (np.ones(int(ok.sum()), np.float32), (np.flatnonzero(ok), codes[ok])),
            shape=(n, len(uniques)),
        )
        mats.append(m)
        vocab.extend(f"{c}={u}" for u in uniques)
    return sp.hstack(mats, format="csr"), np.asarray(vocab, dtype=object)


def poi_bags(
    units: gpd.GeoDataFrame,
    pois: gpd.GeoDataFrame,
    token_columns: Sequence[str],
    buffer_m: float,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Token counts of the POIs in each unit's buffer (points) or polygon.

    Returns ``(counts (n_units × vocab) CSR, vocab, n_pois per unit)``. Point
    units: one KD-tree range query for all units (distance ≤ ``buffer_m``,
    the same membership rule as the raster buffers); polygons: a spatial join.
    """
    tokens, vocab = poi_token_matrix(pois, token_columns)
    n_units, n_pois = len(units), len(pois)
    if n_pois == 0:
        return sp.csr_matrix((n_units, len(vocab)), dtype=np.float32), vocab, np.zeros(n_units, int)
    if is_points(units):
        ux, uy = unit_xy(units)
        px, py = unit_xy(pois)
        pairs = cKDTree(np.c_[ux, uy]).sparse_distance_matrix(
            cKDTree(np.c_[px, py]), float(buffer_m), output_type="ndarray"
        )
        ui, pj = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    else:
        joined = gpd.sjoin(pois[["geometry"]].reset_index(drop=True),
                           units[["geometry"]].reset_index(drop=True),
                           predicate="within", how="inner")
        ui = joined["index_right"].to_numpy(np.int64)
        pj = joined.index.to_numpy(np.int64)
    member = sp.csr_matrix((np.ones(len(ui), np.float32), (ui, pj)), shape=(n_units, n_pois))
    counts = (member @ tokens).tocsr()
    counts.sum_duplicates()
    return counts, vocab, np.asarray(member.sum(axis=1)).ravel().astype(np.int64)


def bag_columns(counts: sp.csr_matrix, vocab: np.ndarray) -> tuple[Any, Any]:
    """The bags as Arrow list columns ``(poi_tokens, poi_counts)``."""
    import pyarrow as pa

    counts = counts.tocsr()
    counts.sort_indices()
    offsets = pa.array(counts.indptr.astype(np.int32))
    toks = pa.ListArray.from_arrays(offsets, pa.array(vocab[counts.indices].astype(str),
                                                      type=pa.string()))
    vals = pa.ListArray.from_arrays(offsets, pa.array(counts.data.astype(np.int32)))
    return toks, vals
