"""What a user observes of the synthetic city: POIs, land-use sample points, LSOA-like units.

Each is drawn from the hidden fields :mod:`.city` generates (land use, morphology, the
social field): POIs by a land-use × centrality density with subcategories and chain
names that follow the social field; LUC points class-stratified in London's proportions;
units at population-weighted centroids with NS-SeC distributions from the 300 m mean of
the social field.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from rasterio.transform import Affine

from .. import aef
from ..config import SynthSection
from . import vocab
from .fields import disk_mean, gumbel_argmax

PIXEL = aef.PIXEL_SIZE_M
UNIT_RADIUS_M = 300.0  # NS-SeC truth = socio field averaged within 300 m of the centroid

# Relative POI density (per pixel) and residential population density per class.
_POI_DENSITY = np.array([10.0, 1.5, 5.0, 0.08, 0.08, 0.6, 1.5, 2.0, 10.0, 0.3])
_POP_DENSITY = np.array([3.0, 1.0, 2.0, 0.01, 0.0, 0.01, 0.0, 0.03, 0.3, 0.0])


def _xy(t: Affine, col: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CRS coordinates of fractional (col, row) pixel positions (north-up transform)."""
    return t.c + np.asarray(col) * t.a, t.f + np.asarray(row) * t.e


# --------------------------------------------------------------------------- POIs
def _pois(cfg: SynthSection, rng: np.random.Generator, landuse: np.ndarray,
          socio: np.ndarray, transform: Affine) -> pd.DataFrame:
    """POIs placed by land-use density; subcategory and name chosen by land use AND socio."""
    n = cfg.size_px
    subs = vocab.SUBCATEGORIES
    r = np.hypot(*np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij"))
    dens = _POI_DENSITY[landuse] * (1.0 + 2.0 * np.exp(-((r / 0.35) ** 2)))
    dens *= np.exp(0.15 * socio[0])
    p = (dens / dens.sum()).ravel()
    flat = rng.choice(p.size, size=cfg.n_pois, replace=True, p=p)
    row, col = np.divmod(flat, n)
    lu = landuse[row, col]
    s = socio[:, row, col]
    where = np.zeros((len(subs), vocab.N_CLASSES))
    for k, sc in enumerate(subs):
        for c, w in sc.where.items():
            where[k, c] = w
    freq = np.array([sc.freq for sc in subs])
    aff = np.array([sc.affluence for sc in subs])
    stu = np.array([sc.student for sc in subs])
    logits = np.log(freq[None, :] * (0.005 + where[:, lu].T))
    logits += cfg.poi_socio * (s[0][:, None] * aff[None, :] + s[1][:, None] * stu[None, :])
    k = gumbel_argmax(rng, logits)

    names = np.empty(cfg.n_pois, dtype=object)
    for j, sc in enumerate(subs):
        sel = np.flatnonzero(k == j)
        if sel.size == 0:
            continue
        opts = [nm for nm, _ in sc.names]
        lg = [cfg.poi_socio * a * s[0][sel] for _, a in sc.names]
        if sc.generic is not None:
            opts.append(None)
            lg.append(np.full(sel.size, np.log(0.6 * len(sc.names) + 1.0)))
        choice = gumbel_argmax(rng, np.stack(lg, axis=1))
        place = np.asarray(vocab.PLACE_WORDS, dtype=object)[rng.integers(0, len(vocab.PLACE_WORDS), sel.size)]
        chosen = np.asarray(opts, dtype=object)[choice]
        generic = np.array([o is None for o in chosen])
        chosen[generic] = place[generic] + f" {sc.generic}" if sc.generic else None
        chosen[rng.random(sel.size) < sc.unnamed] = None
        names[sel] = chosen
    fr, fc = row + rng.random(cfg.n_pois), col + rng.random(cfg.n_pois)
    x, y = _xy(transform, fc, fr)
    order = rng.permutation(cfg.n_pois)
    cat = np.asarray([sc.category for sc in subs], dtype=object)
    sub = np.asarray([sc.name for sc in subs], dtype=object)
    return pd.DataFrame({
        "poi_id": np.arange(1, cfg.n_pois + 1, dtype=np.int64) + 1_000_000,
        "name": names[order], "category": cat[k][order], "subcategory": sub[k][order],
        "x": x[order], "y": y[order], "row": row[order], "col": col[order],
        "landuse_id": lu[order].astype(np.int64),
        "affluence": s[0][order], "student": s[1][order],
    })


# --------------------------------------------------------------------------- labels
def _luc_points(cfg: SynthSection, rng: np.random.Generator, landuse: np.ndarray,
                transform: Affine) -> pd.DataFrame:
    """Class-stratified LUC sample points in London's class proportions."""
    n = cfg.size_px
    props = np.asarray(vocab.LONDON_LUC_COUNTS, dtype=float)
    props /= props.sum()
    raw = props * cfg.n_luc_points
    counts = np.floor(raw).astype(int)
    counts[np.argsort(counts - raw)[: cfg.n_luc_points - counts.sum()]] += 1
    flat = landuse.ravel()
    picks, labels = [], []
    for c in range(vocab.N_CLASSES):
        pix = np.flatnonzero(flat == c)
        if pix.size == 0 or counts[c] == 0:
            continue
        picks.append(rng.choice(pix, size=counts[c], replace=counts[c] > pix.size))
        labels.append(np.full(counts[c], c))
    flat_idx = np.concatenate(picks)
    lab = np.concatenate(labels)
    order = rng.permutation(flat_idx.size)
    flat_idx, lab = flat_idx[order], lab[order]
    row, col = np.divmod(flat_idx, n)
    x, y = _xy(transform, col + rng.random(row.size), row + rng.random(row.size))
    return pd.DataFrame({
        "loc_id": np.arange(row.size, dtype=np.int64), "landuse_id": lab.astype(np.int64),
        "landuse": np.asarray(vocab.LANDUSE_NAMES, dtype=object)[lab],
        "x": x, "y": y, "row": row, "col": col,
    })


def _units(cfg: SynthSection, rng: np.random.Generator, landuse: np.ndarray,
           socio: np.ndarray, transform: Affine) -> pd.DataFrame:
    """LSOA-like population-weighted centroids with NS-SeC proportions from the socio field."""
    n = cfg.size_px
    pop = _POP_DENSITY[landuse].ravel()
    p = pop / pop.sum()
    cand = rng.choice(p.size, size=8 * cfg.n_regions, replace=True, p=p)
    populated = float(np.count_nonzero(pop >= 1.0)) or float(n * n)
    cell = max(1.0, np.sqrt(populated / (1.3 * cfg.n_regions)))
    while True:  # thin candidates to ~one per cell so units tile the populated area
        cr, cc = np.divmod(cand, n)
        key = (cr // cell).astype(np.int64) * (n + 1) + (cc // cell).astype(np.int64)
        _, first = np.unique(key, return_index=True)
        if first.size >= cfg.n_regions or cell <= 1.0:
            break
        cell *= 0.85
    kept = cand[np.sort(first)]
    if kept.size < cfg.n_regions:
        kept = np.concatenate([kept, np.setdiff1d(cand, kept)[: cfg.n_regions - kept.size]])
    flat = rng.choice(kept, size=cfg.n_regions, replace=False)
    row, col = np.divmod(flat, n)
    sbar = disk_mean(socio, row, col, UNIT_RADIUS_M / PIXEL)  # (n, 2)
    base = np.log(np.asarray(vocab.NSSEC_BASE))
    logits = (base[None] + sbar[:, :1] * np.asarray(vocab.NSSEC_AFFLUENCE)[None]
              + sbar[:, 1:2] * np.asarray(vocab.NSSEC_STUDENT)[None]
              + rng.normal(0, 0.05, size=(cfg.n_regions, 9)))
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    popn = rng.integers(int(0.8 * cfg.unit_population), int(1.2 * cfg.unit_population) + 1,
                        size=cfg.n_regions)
    counts = rng.multinomial(popn, prob)
    props = counts / counts.sum(1, keepdims=True)
    x, y = _xy(transform, col + rng.random(row.size), row + rng.random(row.size))
    df = pd.DataFrame({
        "unit_id": [f"S{i:05d}" for i in range(cfg.n_regions)],
        "unit_name": [f"Synthtown {i // 4 + 1:03d}{'ABCD'[i % 4]}" for i in range(cfg.n_regions)],
        "x": x, "y": y, "row": row, "col": col, "population": popn,
    })
    for i in range(9):
        df[f"ns-sec_{i + 1}"] = props[:, i]
    df["socio_1"], df["socio_2"] = sbar[:, 0], sbar[:, 1]
    for i in range(9):
        df[f"p_{i + 1}"] = prob[:, i]
    return df
