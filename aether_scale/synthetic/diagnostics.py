"""Diagnostics of the synthetic city: AE calibration and how visible the social field is.

They answer the questions the demo depends on (see :mod:`aether_scale.synthetic`)
straight from a generated :class:`City`, with the pipeline's own parts — the pooling
engine (:func:`aether_scale.pool.pool_buffers`), the POI descriptions of the pois stage,
the text cache (:func:`aether_scale.text.embed_texts`), the trainer
(:func:`aether_scale.train.train_model`) and the field kernel
(:func:`aether_scale.infer.project_pixels`) — on in-memory rasters instead of a
workspace:

* :func:`ae_statistics` — random-pair / within-class cosines, class-mean norms
  and cosines between class means, to compare with real AlphaEarth vectors.
* :func:`socio_probe` — how well the hidden social field (and the NS-SeC
  labels) can be predicted from (a) 300 m-pooled raw AE, (b) POI subcategory
  counts within 300 m and, optionally, (c) the AETHER projector trained on 50/100 m
  pooled AE ↔ MiniLM POI text, applied per pixel and pooled at 300 m. (b) ≫ (a) >
  chance, and (c) > (a), is the city working as designed.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .. import aef
from . import vocab
from .city import City

DESCRIPTION = "A place of {subcategory}, a type of {category}, named {name}."
DESCRIPTION_NO_NAME = "A place of {subcategory}, a type of {category}."


# --------------------------------------------------------------------------- AE statistics
def ae_statistics(city: City, *, n_pairs: int = 20000, seed: int = 0) -> dict[str, object]:
    """Calibration statistics of the AE codes over valid pixels (decoded floats).

    Returns ``random_pair_cos`` (mean cosine of random pixel pairs),
    ``within_class_cos`` (per class, mean cosine of random same-class pairs),
    ``class_mean_norm`` (per class, norm of the mean unit vector) and
    ``class_mean_cos`` (upper-triangle cosines between class means) plus their
    median. Classes with fewer than 10 valid pixels are left out.
    """
    rng = np.random.default_rng(seed)
    lu = city.landuse.ravel()
    flat = city.codes.reshape(-1, aef.N_BANDS)
    ok = np.flatnonzero(city.valid.ravel())
    i, j = rng.choice(ok, n_pairs), rng.choice(ok, n_pairs)
    a, b = aef.decode(flat[i]), aef.decode(flat[j])
    rp = float(np.mean(np.sum(a * b, axis=1)))
    within, norms, means = {}, {}, {}
    for c in range(vocab.N_CLASSES):
        pix = ok[lu[ok] == c]
        if pix.size < 10:
            continue
        s = aef.decode(flat[rng.choice(pix, min(pix.size, 4000), replace=False)])
        m = s.mean(0)
        means[c], norms[c] = m, float(np.linalg.norm(m))
        p, q = rng.integers(0, len(s), 4000), rng.integers(0, len(s), 4000)
        keep = p != q
        within[c] = float(np.mean(np.sum(s[p[keep]] * s[q[keep]], axis=1)))
    cl = sorted(means)
    mm = np.stack([means[c] / norms[c] for c in cl])
    cos = mm @ mm.T
    iu = np.triu_indices(len(cl), 1)
    return {
        "random_pair_cos": rp,
        "within_class_cos": within,
        "class_mean_norm": norms,
        "class_mean_cos": cos[iu].tolist(),
        "class_mean_cos_median": float(np.median(cos[iu])),
    }


# --------------------------------------------------------------------------- pooling helpers
def city_raster(city: City, values: np.ndarray | None = None, *, chunk: int = 512):
    """The city's AE codes (or a per-pixel ``values`` array (H, W, C)) as the ``(y, x, C)``
    DataArray the pooling engine reads, with pixel-centre coordinates."""
    import dask.array as dsa
    import xarray as xr

    v = city.codes if values is None else values
    n = city.size
    t = city.transform
    xs = t.c + (np.arange(n) + 0.5) * t.a
    ys = t.f + (np.arange(n) + 0.5) * t.e
    dim = "band" if values is None else "dim"
    return xr.DataArray(dsa.from_array(v, chunks=(chunk, chunk, -1)), dims=("y", "x", dim),
                        coords={"y": ys, "x": xs})


def _centres(city: City, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = city.transform
    return (t.c + (np.asarray(cols) + 0.5) * t.a, t.f + (np.asarray(rows) + 0.5) * t.e)


def _pool(da, city: City, rows: np.ndarray, cols: np.ndarray, radius_m: float) -> np.ndarray:
    """Mean of the valid pixels whose centres lie within ``radius_m`` of each pixel centre
    (row, col), L2-normalised, through the pooling engine; NaN rows where none is valid."""
    import dask

    from ..config import BufferSpec
    from ..pool import pool_buffers

    x, y = _centres(city, rows, cols)
    with dask.config.set(scheduler="threads"):
        res = pool_buffers(da, x, y, [BufferSpec(shape="circle", radius_m=float(radius_m))])
    return np.asarray(res.vectors[0], dtype=np.float32)


def pool_ae(city: City, rows: np.ndarray, cols: np.ndarray, radius_m: float) -> np.ndarray:
    """Raw AE pooled within ``radius_m`` of each pixel (row, col): (n, 64) float32."""
    return _pool(city_raster(city), city, rows, cols, radius_m)


def poi_counts(city: City, x: np.ndarray, y: np.ndarray, radius_m: float,
               *, by: str = "subcategory") -> tuple[np.ndarray, list[str]]:
    """Counts of POIs per ``by`` value within ``radius_m`` of each point → (n, K), labels."""
    labels, codes = np.unique(city.pois[by].to_numpy(dtype=str), return_inverse=True)
    tree = cKDTree(np.column_stack([city.pois["x"], city.pois["y"]]))
    hits = tree.query_ball_point(np.column_stack([x, y]), r=radius_m, return_sorted=False)
    lens = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
    owner = np.repeat(np.arange(len(hits)), lens)
    idx = np.concatenate([np.asarray(h, dtype=np.int64) for h in hits]) if lens.sum() else np.zeros(0, np.int64)
    out = np.zeros((len(hits), len(labels)))
    np.add.at(out, (owner, codes[idx]), 1.0)
    return out, labels.tolist()


def descriptions(city: City) -> np.ndarray:
    """POI descriptions as the pois stage builds them (default templates, name appended
    when present)."""
    import pandas as pd

    from ..pois import build_descriptions, clean_text

    p = city.pois.reset_index(drop=True)
    cols = {c: clean_text(p[c])[0] for c in ("name", "category", "subcategory")}
    cols["description"] = None
    out = build_descriptions(cols, template=DESCRIPTION, template_no_name=DESCRIPTION_NO_NAME,
                             index=pd.RangeIndex(len(p)))
    return out.to_numpy(dtype=object)


# --------------------------------------------------------------------------- probes
def _r2_ridge(X: np.ndarray, Y: np.ndarray, tr: np.ndarray, te: np.ndarray) -> float:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    m = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    m.fit(X[tr], Y[tr])
    pred = m.predict(X[te])
    ss_res = ((Y[te] - pred) ** 2).sum(0)
    ss_tot = ((Y[te] - Y[te].mean(0)) ** 2).sum(0)
    return float(np.mean(1 - ss_res / ss_tot))


def _kl_softmax(X: np.ndarray, Q: np.ndarray, tr: np.ndarray, te: np.ndarray,
                seed: int) -> float:
    """KL(q‖p)×10³ on ``te`` of a linear softmax head (soft cross-entropy, L2 picked on a
    validation split of ``tr``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
    Xs = torch.tensor((X - mu) / sd, dtype=torch.float32)
    Qt = torch.tensor(Q, dtype=torch.float32)
    perm = torch.randperm(len(tr), generator=g).numpy()
    n_val = max(1, len(tr) // 5)
    va, fit = tr[perm[:n_val]], tr[perm[n_val:]]

    def train(idx: np.ndarray, wd: float) -> torch.nn.Linear:
        torch.manual_seed(seed)
        lin = torch.nn.Linear(X.shape[1], Q.shape[1])
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=100, line_search_fn="strong_wolfe")
        xi, qi = Xs[idx], Qt[idx]

        def closure():
            opt.zero_grad()
            loss = -(qi * torch.log_softmax(lin(xi), 1)).sum(1).mean() + wd * (lin.weight**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return lin

    def kl(lin: torch.nn.Linear, idx: np.ndarray) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(lin(Xs[idx]), 1)
            q = Qt[idx]
            return float((q * (torch.log(q.clamp_min(1e-12)) - logp)).sum(1).mean()) * 1e3

    best = min((kl(train(fit, wd), va), wd) for wd in (1e-3, 1e-2, 1e-1))
    return kl(train(tr, best[1]), te)


def _macro_f1(X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    m = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    m.fit(X[tr], y[tr])
    return float(f1_score(y[te], m.predict(X[te]), average="macro"))


def trace_probe(city: City, *, n_pixels: int = 40000, seed: int = 0) -> dict[str, float]:
    """Is the social trace *in* AE? A one-direction probe on single AE pixels of one
    (class, morphology) — the most common residential one.

    On two thirds of the parcels, the direction ``d_k = cov(AE, s_k)`` is estimated;
    on the held-out parcels, the correlation of ``AE·d_k`` with ``s_k`` is measured
    (mean over the two social dims). Holding out whole parcels stops parcel identity
    from leaking, and one direction per dim cannot overfit. Clearly positive with
    ``socio_trace`` > 0, ≈ 0 without: the trace is present, readable once the class is
    fixed. Returns ``{"corr": ..., "class": ..., "morph": ..., "n": ...}``.
    """
    rng = np.random.default_rng(seed)
    res = np.isin(city.landuse, vocab.RESIDENTIAL) & city.valid
    key = city.landuse.astype(np.int64) * 3 + city.morph
    cls_m = int(np.bincount(key[res], minlength=vocab.N_CLASSES * 3).argmax())
    pix = np.flatnonzero((key == cls_m).ravel() & res.ravel())
    pix = rng.choice(pix, min(n_pixels, pix.size), replace=False)
    X = aef.decode(city.codes.reshape(-1, aef.N_BANDS)[pix]).astype(np.float64)
    Y = city.socio.reshape(2, -1)[:, pix].T.astype(np.float64)
    parcels = city.parcel.ravel()[pix]
    up = rng.permutation(np.unique(parcels))
    te = np.isin(parcels, up[: max(1, up.size // 3)])
    Xc = X - X[~te].mean(0)
    corr = []
    for k in range(Y.shape[1]):
        d = Xc[~te].T @ (Y[~te, k] - Y[~te, k].mean())
        corr.append(np.corrcoef(Xc[te] @ d, Y[te, k])[0, 1])
    return {"corr": float(np.mean(corr)), "class": float(cls_m // 3), "morph": float(cls_m % 3),
            "n": float(pix.size)}


def region_features(
    city: City, *, aether: bool = False, aether_epochs: int = 30, seed: int = 0,
    text_model: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features per SDM unit (300 m) and per LUC point (50 m): ``ae`` (raw AE pooled),
    ``poi`` (log1p subcategory counts) and, with ``aether=True``, ``aether`` (a small
    AETHER-like projector, :func:`train_aether_like`, applied per pixel, then pooled)."""
    u, lp = city.units, city.luc
    fu = {"ae": pool_ae(city, u["row"], u["col"], 300.0),
          "poi": np.log1p(poi_counts(city, u["x"], u["y"], 300.0)[0])}
    fl = {"ae": pool_ae(city, lp["row"], lp["col"], 50.0),
          "poi": np.log1p(poi_counts(city, lp["x"], lp["y"], 50.0)[0])}
    if aether:
        proj = train_aether_like(city, epochs=aether_epochs, seed=seed, text_model=text_model)
        fu["aether"] = pool_field(city, proj, u["row"], u["col"], 300.0)
        fl["aether"] = pool_field(city, proj, lp["row"], lp["col"], 50.0)
    return fu, fl


def _split(rows: np.ndarray, cols: np.ndarray, idx: np.ndarray, n_train: int, split: str,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if split == "random":
        p = rng.permutation(idx)
        k = min(n_train, int(0.75 * len(p)))
        return p[:k], p[k:]
    if split == "blocked":  # whole 1 km blocks go to train or test: no shared pixels, less leakage
        block = (rows[idx] // 100) * 100_000 + cols[idx] // 100
        ub = rng.permutation(np.unique(block))
        order = np.concatenate([idx[block == b] for b in ub])
        k = min(n_train, int(0.75 * len(order)))
        return order[:k], order[k:]
    raise ValueError(f"split must be 'random' or 'blocked', got {split!r}")


def socio_probe(
    city: City, *, n_train: int = 400, seed: int = 0, aether: bool = False,
    aether_epochs: int = 30, text_model: str | None = None, split: str = "random",
    metrics: tuple[str, ...] = ("socio_r2", "sdm_kl", "luc_f1"),
    features: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
) -> dict[str, dict[str, float]]:
    """Probe how visible the social field is to each kind of region feature.

    For the SDM units (300 m): ridge R² of the hidden socio means (``socio_r2``)
    and KL(q‖p)×10³ of a linear softmax head on NS-SeC (``sdm_kl``), trained on
    ``n_train`` units and tested on the rest. For the LUC points (50 m): macro
    F1 of a logistic head (``luc_f1``), trained on 70%. Features: see
    :func:`region_features` (pass ``features`` to reuse them). ``split``:
    ``random`` (the paper's protocol; nearby units share pixels, so smooth
    spatial structure leaks) or ``blocked`` (1 km blocks, measures what the
    features carry beyond location). Units/points whose buffer has no valid AE
    are dropped for every feature, so all are compared on the same rows.
    """
    u, lp = city.units, city.luc
    rng = np.random.default_rng(seed)
    fu, fl = features or region_features(city, aether=aether, aether_epochs=aether_epochs,
                                         seed=seed, text_model=text_model)
    iu = np.flatnonzero(np.all([np.isfinite(f).all(1) for f in fu.values()], axis=0))
    il = np.flatnonzero(np.all([np.isfinite(f).all(1) for f in fl.values()], axis=0))
    tr_u, te_u = _split(u["row"].to_numpy(), u["col"].to_numpy(), iu, n_train, split, rng)
    tr_l, te_l = _split(lp["row"].to_numpy(), lp["col"].to_numpy(), il, int(0.7 * len(il)), split, rng)
    S = u[["socio_1", "socio_2"]].to_numpy()
    Q = u[[f"ns-sec_{i}" for i in range(1, 10)]].to_numpy()
    y = lp["landuse_id"].to_numpy()
    out: dict[str, dict[str, float]] = {}
    for name in fu:
        out[name] = {}
        if "socio_r2" in metrics:
            out[name]["socio_r2"] = _r2_ridge(fu[name], S, tr_u, te_u)
        if "sdm_kl" in metrics:
            out[name]["sdm_kl"] = _kl_softmax(fu[name], Q, tr_u, te_u, seed)
        if "luc_f1" in metrics:
            out[name]["luc_f1"] = _macro_f1(fl[name], y, tr_l, te_l)
    q_mean = Q[tr_u].mean(0)
    qt = np.clip(Q[te_u], 1e-12, None)
    out["constant"] = {"socio_r2": 0.0,
                       "sdm_kl": float(np.mean((Q[te_u] * np.log(qt / q_mean)).sum(1))) * 1e3}
    out["_n"] = {"units": float(len(iu)), "train_units": float(len(tr_u)),
                 "test_units": float(len(te_u)), "luc_points": float(len(il))}
    return out


# --------------------------------------------------------------------------- the AETHER projector
def embed_texts(texts: np.ndarray, model: str | None = None) -> np.ndarray:
    """Sentence embeddings of ``texts`` through the text stage's cache
    (all-MiniLM-L6-v2, bundled, by default); each distinct text is encoded once."""
    from ..config import TextSection
    from ..text import embed_texts as embed

    cfg = TextSection() if model is None else TextSection(model=model)
    return embed([str(t) for t in texts], cfg)


def train_aether_like(city: City, *, epochs: int = 30, seed: int = 0, text_model: str | None = None,
                      batch: int = 512, tau: float = 0.07):
    """The AETHER projector trained on the city with the real trainer: 50 m / 100 m
    pooled AE ↔ the POIs' MiniLM text, the paper's loss (λ = 0.2), ``epochs`` epochs.

    Returns the trained :class:`~aether_scale.model.AEProj` (eval mode).
    """
    import tempfile

    from ..config import TrainSection
    from ..stores.models import load_projector
    from ..stores.triplets import write_triplets
    from ..train import train_model

    p = city.pois
    base = pool_ae(city, p["row"], p["col"], 50.0)
    aug = pool_ae(city, p["row"], p["col"], 100.0)
    ok = np.isfinite(base).all(1) & np.isfinite(aug).all(1)
    text = embed_texts(descriptions(city)[ok], text_model)
    cfg = TrainSection(epochs=epochs, batch_size=batch, seed=seed, tau_ae=tau, tau_poi=tau,
                       threads=None, variants={})
    with tempfile.TemporaryDirectory(prefix="aether-diag-") as d:
        src = write_triplets(f"{d}/triplets.zarr", base=base[ok], aug=aug[ok], text=text,
                             poi_id=p["poi_id"].to_numpy()[ok])
        train_model(src, cfg, f"{d}/model", log=None)
        return load_projector(f"{d}/model")


def pool_field(city: City, proj, rows: np.ndarray, cols: np.ndarray, radius_m: float) -> np.ndarray:
    """The field of ``proj`` over every pixel (the infer stage's kernel), pooled like
    :func:`pool_ae`."""
    from ..infer import project_pixels

    n = city.size
    flat = city.codes.reshape(-1, aef.N_BANDS)
    field = project_pixels(flat, proj, out_dtype="float16").reshape(n, n, -1)
    return _pool(city_raster(city, field), city, rows, cols, radius_m)
