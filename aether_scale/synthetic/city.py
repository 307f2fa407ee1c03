"""Generate the synthetic city in memory: hidden latent fields → AE codes, POIs, labels.

See the package docstring (:mod:`aether_scale.synthetic`) for the design and why
the socioeconomic trace in AE is weak and entangled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from rasterio.transform import Affine
from scipy.spatial import cKDTree

from .. import aef
from ..config import SynthSection
from . import vocab
from .fields import SmoothFields, gumbel_argmax
from .observations import PIXEL, _luc_points, _pois, _units

N_SOCIO = 2  # hidden socioeconomic dimensions: affluence, student
SOCIO_NAMES = ("affluence", "student")

# Class logits of a parcel as a function of r (distance from the centre / half edge).
_R_KNOTS = np.array([0.0, 0.15, 0.3, 0.5, 0.7, 0.9, 1.1, 1.5])
_CLASS_LOGITS = np.array([
    [2.6, 2.4, 1.6, 0.2, -1.0, -2.0, -3.0, -3.0],   # HDR
    [-3.0, -2.0, -0.5, 0.6, 1.6, 1.6, 1.0, 0.6],     # LDR
    [0.5, 1.2, 2.0, 2.0, 1.0, 0.0, -1.0, -2.0],      # MDR
    [-6.0, -6.0, -4.0, -2.5, -0.5, 1.2, 2.2, 2.6],   # AGRI
    [-4.0, -3.0, -2.0, -0.8, 0.3, 1.0, 1.4, 1.6],    # WOOD
    [-0.6, -0.3, 0.2, 0.6, 0.6, 0.5, 0.2, 0.0],      # REC
    [-3.5, -3.0, -2.5, -2.5, -2.5, -3.0, -3.5, -4.0],  # TRANSPORT (depots/yards; lines added later)
    [-3.0, -1.5, -0.3, 0.2, 0.0, -0.6, -1.5, -2.0],  # IND
    [2.2, 1.0, -0.5, -1.5, -2.0, -2.5, -3.0, -3.0],  # LARGE
    [-9.0] * 8,                                      # WATER (river and lakes only)
])
# Residential morphology probabilities per residential class (terraced, detached, flats).
_MORPH_P = {vocab.HDR: (0.40, 0.05, 0.55), vocab.MDR: (0.55, 0.30, 0.15), vocab.LDR: (0.15, 0.80, 0.05)}

# ---- AE calibration (squared weights of the prototype components; see package docs)
_W_COMMON = 0.21
# residential: (built group, residential subgroup, morphology, class)
_W_RES = (0.16, 0.14, 0.32, 0.06)
# other built classes: (built group, non-residential subgroup, class)
_W_BUILT = (0.16, 0.30, 0.22)
# green classes: (green group, class)
_W_GREEN = (0.46, 0.22)
_GROUP = {  # class -> cover group index: 0 built, 1 green, 2 water
    vocab.HDR: 0, vocab.LDR: 0, vocab.MDR: 0, vocab.TRANSPORT: 0, vocab.IND: 0, vocab.LARGE: 0,
    vocab.AGRI: 1, vocab.WOOD: 1, vocab.REC: 1, vocab.WATER: 2,
}
_AE_PROTO = 0.58      # weight of the class/morph prototype in a pixel
_AE_PARCEL = 0.38     # per-parcel offset (each plot looks a bit different)
_AE_TEXTURE = 0.38    # spatially correlated texture (~40 m)
_AE_PIXEL = 0.34      # per-pixel noise
_N_TEXTURE = 12
# Pull of a parcel toward another class's look: Beta(1.2, 2) × this (mean ≈ 0.47; above 0.5
# a parcel looks more like the other class than its own). Tuned so that AE alone reaches
# LUC F1 ≈ 0.7 and POIs can still resolve some of the ambiguity.
_AE_AMBIGUITY = 1.25


@dataclass
class City:
    """A generated city: hidden truth, AE codes and the tables a user would have.

    Grids are ``(size, size)`` row-major, north-up, 10 m pixels; ``transform``
    maps (col, row) of the upper-left pixel corner to CRS coordinates.
    """

    cfg: SynthSection
    transform: Affine
    crs: str
    landuse: np.ndarray          # (H, W) uint8 land-use id 0..9
    morph: np.ndarray            # (H, W) uint8 residential morphology 0..2 (0 elsewhere)
    parcel: np.ndarray           # (H, W) int32 parcel id
    socio: np.ndarray            # (2, H, W) float32 hidden socioeconomic field (~N(0,1))
    valid: np.ndarray            # (H, W) bool, False where AE is nodata
    codes: np.ndarray            # (H, W, 64) int8 AEF codes (−128 = nodata)
    pois: pd.DataFrame           # poi_id, name, category, subcategory, x, y, row, col, affluence, student
    luc: pd.DataFrame            # loc_id, landuse_id, landuse, x, y, row, col
    units: pd.DataFrame          # unit_id, unit_name, x, y, row, col, population, ns-sec_1..9,
    #                              socio_1, socio_2 (300 m means), p_1..p_9 (noise-free)
    prototypes: np.ndarray = field(repr=False, default=None)  # (10, 3, 64) class/morph prototypes

    @property
    def size(self) -> int:
        return self.landuse.shape[0]

    def rowcol(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer pixel (row, col) containing CRS points (x, y)."""
        t = self.transform
        c = (np.asarray(x, dtype=np.float64) - t.c) / t.a
        r = (np.asarray(y, dtype=np.float64) - t.f) / t.e
        return np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)


# --------------------------------------------------------------------------- layout
def _layout(
    cfg: SynthSection, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Land use, residential morphology and parcel ids on the full grid, plus each
    parcel's class and morphology."""
    n = cfg.size_px
    half = n / 2.0
    cy, cx = half + rng.normal(0, 0.04 * n, size=2)

    # Parcels: Voronoi cells of seeds whose spacing grows from ~140 m (core) to ~400 m.
    def spacing(r: np.ndarray) -> np.ndarray:
        return np.interp(r, [0.0, 0.3, 0.7, 1.2], [14.0, 20.0, 30.0, 40.0])

    n_cand = int(n * n / 14.0**2 * 1.3) + 16
    cand = rng.uniform(0, n, size=(n_cand, 2))
    r_c = np.hypot(cand[:, 0] - cy, cand[:, 1] - cx) / half
    seeds = cand[rng.random(n_cand) < (14.0 / spacing(r_c)) ** 2]
    r_s = np.hypot(seeds[:, 0] - cy, seeds[:, 1] - cx) / half

    # River: a meander across the city, west → east near the centre.
    amp1, amp2 = 0.10 * n, 0.03 * n
    ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
    yoff = cy + rng.normal(0, 0.05 * n)

    def river_y(col: np.ndarray) -> np.ndarray:
        return (yoff + amp1 * np.sin(2 * np.pi * col / (0.9 * n) + ph1)
                + amp2 * np.sin(2 * np.pi * col / (0.25 * n) + ph2))

    # Parcel classes: ring profile + per-class smooth preference fields + river pull for industry.
    pref = SmoothFields(rng, vocab.N_CLASSES, n, sigma_px=60.0).sample(seeds[:, 0], seeds[:, 1])
    logits = np.stack([np.interp(r_s, _R_KNOTS, _CLASS_LOGITS[c]) for c in range(vocab.N_CLASSES)], 1)
    logits += 1.1 * pref.T
    near_river = np.abs(seeds[:, 0] - river_y(seeds[:, 1])) < 0.08 * n
    logits[near_river, vocab.IND] += 1.2
    pclass = gumbel_argmax(rng, logits)
    for c in (vocab.HDR, vocab.LDR, vocab.MDR, vocab.AGRI, vocab.WOOD, vocab.REC, vocab.IND, vocab.LARGE):
        if not np.any(pclass == c):  # tiny cities: make sure every parcel class exists
            pclass[np.argmax(logits[:, c] - logits.max(1) + rng.random(len(pclass)) * 1e-3)] = c
    morph_u = SmoothFields(rng, 1, n, sigma_px=40.0).sample(seeds[:, 0], seeds[:, 1])[0]
    pmorph = np.zeros(len(seeds), dtype=np.uint8)
    for c, p in _MORPH_P.items():
        sel = pclass == c
        lg = np.log(np.asarray(p))[None, :] + np.array([0.0, 0.8, -0.8])[None, :] * morph_u[sel, None]
        pmorph[sel] = gumbel_argmax(rng, lg)

    # Assign pixels to parcels (domain-warped Voronoi so boundaries are not straight).
    tree = cKDTree(seeds)
    warp = SmoothFields(rng, 2, n, sigma_px=10.0)
    landuse = np.empty((n, n), dtype=np.uint8)
    morph = np.empty((n, n), dtype=np.uint8)
    parcel = np.empty((n, n), dtype=np.int32)
    cols = np.arange(n) + 0.5
    rows_per = max(1, 2**20 // n)
    for r0 in range(0, n, rows_per):
        rr, cc = np.meshgrid(np.arange(r0, min(n, r0 + rows_per)) + 0.5, cols, indexing="ij")
        w = warp.sample(rr, cc) * 4.0
        _, idx = tree.query(np.column_stack([rr.ravel() + w[0], cc.ravel() + w[1]]))
        parcel[r0 : r0 + rr.shape[0]] = idx.reshape(rr.shape)
    landuse[:] = pclass[parcel]
    morph[:] = pmorph[parcel]

    # Linear features: transport corridors (radial roads/rail + a ring road), then water.
    rr, cc = np.meshgrid(np.arange(n) + 0.5, cols, indexing="ij")
    transport = np.zeros((n, n), dtype=bool)
    width = max(1.5, 0.0022 * n)
    for theta in rng.uniform(0, 2 * np.pi) + np.arange(6) * (2 * np.pi / 6) + rng.normal(0, 0.15, 6):
        dy, dx = np.sin(theta), np.cos(theta)
        along = (rr - cy) * dy + (cc - cx) * dx
        across = np.abs(-(rr - cy) * dx + (cc - cx) * dy)
        transport |= (across <= width) & (along > 0.05 * n)
    ring = np.hypot(rr - cy, cc - cx)
    transport |= np.abs(ring - 0.62 * half) <= width
    river = np.abs(rr - river_y(cc)) <= max(3.0, 0.008 * n)
    lakes = np.zeros((n, n), dtype=bool)
    for _ in range(3):
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.55, 0.95) * half
        ly, lx = cy + rad * np.sin(ang), cx + rad * np.cos(ang)
        ay, ax = rng.uniform(0.008, 0.02, 2) * n
        lakes |= ((rr - ly) / ay) ** 2 + ((cc - lx) / ax) ** 2 <= 1.0
    landuse[river | lakes] = vocab.WATER
    landuse[transport] = vocab.TRANSPORT  # bridges: transport crosses the river
    res = np.isin(landuse, vocab.RESIDENTIAL)
    morph[~res] = 0
    return landuse, morph, parcel, pclass, pmorph


def _socio_field(cfg: SynthSection, rng: np.random.Generator, landuse: np.ndarray) -> np.ndarray:
    """Two smooth socioeconomic dims, independent of land use (~N(0,1) each)."""
    n = cfg.size_px
    f = SmoothFields(rng, 2, n, sigma_px=45.0).grid(n)
    rr, cc = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    a = rng.uniform(0, 2 * np.pi)
    aff = f[0] + 0.5 * (np.cos(a) * cc + np.sin(a) * rr)  # an east/west-style divide
    stu = f[1]  # no link to centrality: that would make it visible through land use
    out = np.stack([aff, stu]).astype(np.float32)
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True)
    return out


# --------------------------------------------------------------------------- AE
def _prototypes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class/morph prototypes (10, 3, 64), socio trace directions (10, 3, 2, 64), basis."""
    q, _ = np.linalg.qr(rng.standard_normal((aef.N_BANDS, aef.N_BANDS)))
    basis = q.T  # rows are orthonormal directions
    common, groups, sub_res, sub_bld = basis[0], basis[1:4], basis[4], basis[5]
    cls, morphs = basis[6:16], basis[16:19]
    proto = np.zeros((vocab.N_CLASSES, 3, aef.N_BANDS))
    for c in range(vocab.N_CLASSES):
        g = _GROUP[c]
        for m in range(3):
            if c in vocab.RESIDENTIAL:
                wg, ws, wm, wc = np.sqrt(_W_RES)
                v = (np.sqrt(_W_COMMON) * common + wg * groups[0] + ws * sub_res
                     + wm * morphs[m] + wc * cls[c])
            elif g == 0:
                wg, ws, wc = np.sqrt(_W_BUILT)
                v = np.sqrt(_W_COMMON) * common + wg * groups[0] + ws * sub_bld + wc * cls[c]
            elif g == 1:
                wg, wc = np.sqrt(_W_GREEN)
                v = np.sqrt(_W_COMMON) * common + wg * groups[1] + wc * cls[c]
            else:
                v = np.sqrt(_W_COMMON) * common + np.sqrt(1.0 - _W_COMMON) * groups[2]
            proto[c, m] = v / np.linalg.norm(v)
    # Socio directions: random, orthogonal to the structural span, different for every
    # (class, morphology) — the trace is entangled with what the pixel is.
    rest = basis[19:]
    trace = rng.standard_normal((vocab.N_CLASSES, 3, N_SOCIO, rest.shape[0])) @ rest
    trace /= np.linalg.norm(trace, axis=-1, keepdims=True)
    return proto, trace, basis


def _ae_codes(
    cfg: SynthSection, rng: np.random.Generator, landuse: np.ndarray, morph: np.ndarray,
    parcel: np.ndarray, pclass: np.ndarray, pmorph: np.ndarray, socio: np.ndarray,
    proto: np.ndarray, trace: np.ndarray,
) -> np.ndarray:
    """AE codes (H, W, 64) int8 from the latent fields, generated in row blocks."""
    n = cfg.size_px
    n_parcels = pclass.size
    offsets = rng.standard_normal((n_parcels, aef.N_BANDS)).astype(np.float32) / 8.0
    # Physical ambiguity: each parcel looks partly like another class of its cover group
    # (a medium-density block that looks high-density, a park that looks like farmland).
    groups = np.array([_GROUP[c] for c in range(vocab.N_CLASSES)])
    alt = pclass.copy()
    for g in range(3):
        members = np.flatnonzero(groups == g)
        sel = np.flatnonzero(groups[pclass] == g)
        if members.size > 1:
            alt[sel] = members[rng.integers(0, members.size, sel.size)]
    gamma = (_AE_AMBIGUITY * rng.beta(1.2, 2.0, n_parcels)).astype(np.float32)
    delta = gamma[:, None] * (proto[alt, pmorph] - proto[pclass, pmorph]).astype(np.float32)
    delta *= _AE_PROTO
    texture = SmoothFields(rng, _N_TEXTURE, n, sigma_px=2.5)
    # K smooth fields mixed into 64-d: the texture term has unit expected norm.
    tex_dirs = (rng.standard_normal((_N_TEXTURE, aef.N_BANDS)) / np.sqrt(_N_TEXTURE * aef.N_BANDS)
                ).astype(np.float32)
    proto_f = (_AE_PROTO * proto.reshape(-1, aef.N_BANDS)).astype(np.float32)
    trace_f = (cfg.socio_trace * trace.reshape(-1, N_SOCIO, aef.N_BANDS)).astype(np.float32)
    codes = np.empty((n, n, aef.N_BANDS), dtype=np.int8)
    rows_per = max(1, 2**17 // n)
    block_seeds = rng.integers(0, 2**63 - 1, size=(n + rows_per - 1) // rows_per)
    cols = np.arange(n) + 0.5
    for b, r0 in enumerate(range(0, n, rows_per)):
        r1 = min(n, r0 + rows_per)
        brng = np.random.default_rng(block_seeds[b])
        idx = (landuse[r0:r1].astype(np.int64) * 3 + morph[r0:r1]).ravel()
        rr, cc = np.meshgrid(np.arange(r0, r1) + 0.5, cols, indexing="ij")
        tex = texture.sample(rr, cc)  # (K, m)
        s = socio[:, r0:r1].reshape(N_SOCIO, -1)
        v = proto_f[idx]
        pj = parcel[r0:r1].ravel()
        own = landuse[r0:r1].ravel() == pclass[pj]  # not overwritten by river/transport
        v[own] += delta[pj[own]]
        v += _AE_PARCEL * offsets[pj]
        v += _AE_TEXTURE * (tex.T @ tex_dirs)
        v += (_AE_PIXEL / 8.0) * brng.standard_normal(v.shape, dtype=np.float32)
        tr = trace_f[idx]  # (m, 2, 64)
        v += s[0][:, None] * tr[:, 0] + s[1][:, None] * tr[:, 1]
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        codes[r0:r1] = aef.encode(v).reshape(r1 - r0, n, aef.N_BANDS)
    return codes


def _nodata_mask(cfg: SynthSection, rng: np.random.Generator) -> np.ndarray:
    """Valid-pixel mask with a cloud-like blob and an edge strip of nodata (~1%)."""
    n = cfg.size_px
    valid = np.ones((n, n), dtype=bool)
    if cfg.nodata_fraction <= 0:
        return valid
    rr, cc = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5, indexing="ij")
    area = cfg.nodata_fraction * n * n
    a = np.sqrt(0.8 * area / np.pi / 0.6)
    cy, cx = rng.uniform(0.2, 0.8) * n, rng.uniform(0.1, 0.4) * n
    th = rng.uniform(0, np.pi)
    u = ((rr - cy) * np.cos(th) + (cc - cx) * np.sin(th)) / a
    w = (-(rr - cy) * np.sin(th) + (cc - cx) * np.cos(th)) / (0.6 * a)
    valid &= u**2 + w**2 > 1.0
    strip_w = max(1, int(round(0.2 * area / (n / 2))))  # an edge gap along the east edge
    valid[: n // 2, n - strip_w :] = False
    return valid


# --------------------------------------------------------------------------- entry
def generate_city(cfg: SynthSection | None = None) -> City:
    """Generate the whole city in memory; deterministic given ``cfg.seed``.

    Each part (layout, socio field, AE, POIs, LUC points, units) draws from its
    own child of the seed, so changing e.g. ``n_pois`` leaves the AE unchanged.
    Raises ``ValueError`` when the tiles cannot be laid out on the grid.
    """
    cfg = cfg or SynthSection()
    if cfg.size_px < 4 * max(cfg.n_tiles_x, cfg.n_tiles_y):
        raise ValueError(
            f"synth.size_px={cfg.size_px} is too small for {cfg.n_tiles_x}×{cfg.n_tiles_y} tiles; "
            "raise size_px or lower n_tiles_x / n_tiles_y"
        )
    ss = np.random.SeedSequence(cfg.seed)
    r_layout, r_socio, r_ae, r_proto, r_nodata, r_pois, r_luc, r_units = (
        np.random.default_rng(s) for s in ss.spawn(8)
    )
    transform = Affine(PIXEL, 0.0, cfg.origin_x, 0.0, -PIXEL, cfg.origin_y)
    landuse, morph, parcel, pclass, pmorph = _layout(cfg, r_layout)
    socio = _socio_field(cfg, r_socio, landuse)
    proto, trace, _ = _prototypes(r_proto)
    codes = _ae_codes(cfg, r_ae, landuse, morph, parcel, pclass, pmorph, socio, proto, trace)
    valid = _nodata_mask(cfg, r_nodata)
    codes[~valid] = aef.NODATA
    pois = _pois(cfg, r_pois, landuse, socio, transform)
    luc = _luc_points(cfg, r_luc, landuse, transform)
    units = _units(cfg, r_units, landuse, socio, transform)
    return City(cfg=cfg, transform=transform, crs=cfg.crs, landuse=landuse, morph=morph,
                parcel=parcel, socio=socio, valid=valid, codes=codes, pois=pois, luc=luc,
                units=units, prototypes=proto)


#: the seed child of the held-out POIs (beyond the eight :func:`generate_city` spawns)
HELDOUT_CHILD = 100


def heldout_pois(city: City, n: int | None = None) -> pd.DataFrame:
    """A second, independent POI survey of the same city (``n`` POIs, default as many as
    the first): same generator, its own seed child, ids from 9,000,001. Truth for
    retrieval evaluation — never a pipeline input."""
    cfg = city.cfg if n is None else city.cfg.model_copy(update={"n_pois": int(n)})
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(HELDOUT_CHILD,)))
    df = _pois(cfg, rng, city.landuse, city.socio, city.transform)
    df["poi_id"] = df["poi_id"] - 1_000_000 + 9_000_000
    return df
