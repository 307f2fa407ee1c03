"""The embedded synthetic city: a world whose truth is known, in the formats a real user has.

``aether-scale synth --out DIR`` / :func:`write_city` writes

* ``ae/*.tif`` — AlphaEarth-style int8 GeoTIFF tiles (64 bands A00…A63, nodata
  −128, the published square-root codec via :func:`aether_scale.aef.encode`),
  UTM (``synth.crs``), 10 m, north-up, tiled + DEFLATE, ``n_tiles_x × n_tiles_y``
  tiles, with a cloud-like blob and an edge gap of nodata (``nodata_fraction``);
* ``pois.parquet`` — GeoParquet POIs: ``poi_id`` (int64, unique), ``name``
  (chains repeat — "Tesco Express", "Costa Coffee" —, ~8% None), ``category``
  (10 OS-PointX-like groups), ``subcategory`` (~80);
* ``luc_points.geojson`` — land-use sample points ``loc_id``, ``landuse_id``
  0–9, ``landuse``: the ten NLUD-based classes of the London ground truth
  (:data:`vocab.LANDUSE_NAMES`), class-stratified in London's proportions
  (895×5 : 847 : 603 : 270 : 254 : 248);
* ``sdm_units.geojson`` — LSOA-like population-weighted centroids ``unit_id``,
  ``unit_name``, ``ns-sec_1…9`` (row-normalised);
* ``truth.npz`` / ``city.json`` — the hidden fields and the config (for tests
  and diagnostics only).

:func:`generate_city` returns the same in memory (:class:`City`).

How the city is made (hidden latent fields → observations)
---------------------------------------------------------
1. **Land use**: domain-warped Voronoi parcels (~140 m in the core to ~400 m at
   the fringe); a parcel's class is drawn from a ring profile (dense core →
   residential rings → suburbs → farmland/woodland) plus per-class smooth
   preference fields, industry pulled to the river; then a meandering river,
   lakes, radial transport corridors and a ring road are burnt in. Residential
   parcels also get a physical **morphology** (terraced / detached / flats)
   that is independent of the social field.
2. **Social field** ``s`` (2 dims, ~N(0,1), scale ~1 km): *affluence* (smooth
   field + an east/west divide) and *student* (smooth field), drawn
   independently of land use (no link to centrality either: that would make
   them visible through the land-use pattern).
3. **AE pixels** = ``0.58·prototype(class, morph)`` (+ a per-parcel pull
   toward another class of the same cover group: physical ambiguity) + a
   per-parcel offset + ~25 m texture + per-pixel noise + ``socio_trace ·
   (s₁·u₁(class, morph) + s₂·u₂(class, morph))``, L2-normalised and quantised.
   Calibrated against ``../shared/data/alphaearth_points`` (all regions pooled):
   random-pair cosine ≈ 0.22 (real 0.13–0.23), within-class cosine 0.30–0.47
   (real 0.3–0.55), class-mean norms 0.56–0.68 (real 0.54–0.74), median cosine
   between class means ≈ 0.31 (real 0.26–0.61; our three residential density
   classes are deliberately closer, up to ~0.93 — they differ in use, not form).
   Note: the real statistics mix four very different regions; within one real
   region (SF Bay urban) random pairs are more alike (≈ 0.42, class-mean norms
   0.78–0.93). The synthetic city follows the pooled numbers, which makes it a
   somewhat noisier (harder) world than a single real city.
4. **POIs**: placed by a land-use × centrality density; subcategory drawn with
   logit ``log(freq · where[land use]) + poi_socio · (aff·s₁ + stu·s₂)``; chain
   names drawn with their own affluence loading (Waitrose vs Iceland).
5. **NS-SeC** at each unit: softmax of London's mean log-proportions plus
   loadings on the 300 m mean of ``s`` (+ small idiosyncratic noise), then
   multinomial counts for ~``unit_population`` residents, row-normalised.

Why the socioeconomic trace is weak and entangled (the crucial design point)
---------------------------------------------------------------------------
The demo must reproduce the paper's finding: a projector trained to align AE
with POI text makes region features that predict NS-SeC clearly better than
raw AE, while land-use accuracy holds. A projector is a function of AE, so
the social signal must be *in* AE — but in a form that a head trained on a
few hundred labelled units cannot exploit from 300 m-averaged raw AE:

* it is **small** (``socio_trace`` = 0.06 per unit of ``s``, against ~0.8 of
  non-social variation per pixel);
* it is **entangled with what the pixel is**: the direction ``u(class,
  morph)`` differs for every class and morphology (all orthogonal to the
  class structure), so after averaging a 300 m buffer of mixed parcels the
  social signal in raw AE is a composition-dependent mixture — a linear or
  small MLP head on ~400 units sees a weak, inconsistent direction;
* the ~20k POIs supervise a per-pixel map: around every POI the projector
  sees the local class *and* the trace, and the POI text (category + chain)
  carries the social field strongly, so contrastive alignment learns to read
  ``s`` out of each pixel consistently; pooled over 300 m, the AETHER field
  carries ``s`` in a clean, shared direction.

Land use is carried by the prototypes (strong in AE) and POIs in a 50 m buffer
are few, so AE beats POI-only baselines on LUC; since POI categories also
follow land use (and resolve the physical ambiguity between residential
density classes) the projector does not lose LUC accuracy.

:mod:`.diagnostics` checks this on a generated city with the pipeline's own pooling,
text, trainer and field kernel, without a workspace (``benchmarks/bench_synth.py``
records it). Default city (seed 0, ``socio_trace`` 0.06), 400 training units; R² of the
hidden 300 m social means (ridge) / NS-SeC KL(q‖p)×10³ (linear softmax head) / LUC
macro-F1 (logistic, 50 m), under the paper's random split and, in brackets, a
1 km-blocked split:

============  ==============  ==============  ==============
feature       social R²       SDM KL×10³      LUC F1
============  ==============  ==============  ==============
raw AE        0.37 (0.03)     58 (73)         0.64 (0.60)
POI counts    0.66 (0.61)     29 (30)         0.33 (0.31)
AETHER        0.67 (0.43)     25 (31)         0.70 (0.62)
constant      —               89 (86)         —
============  ==============  ==============  ==============

("AETHER": :func:`.diagnostics.train_aether_like`, the real projector and loss trained
30 epochs on 50 m / 100 m pooled AE ↔ MiniLM POI text, applied per pixel and pooled.)
With ``socio_trace=0`` raw AE drops to 0.11 (−0.25) / KL 82, and the projector to
0.48 (−0.03) / KL 37: it still gains, by a second, realistic mechanism — every
parcel has a unique physical fingerprint, so the projector partly memorises
*where* each POI text occurs and interpolates it into the field — but the
trace is what makes it generalise across blocks. :func:`.diagnostics.trace_probe`
shows the trace at pixel level (held-out-parcel correlation 0.56 with the
trace, −0.01 without). Raise ``socio_trace`` to let raw AE see more of ``s``.
The real pipeline (``aether-scale demo``: ingest → … → evaluate, 30 epochs,
5 seeds, MLP heads) on this city gives: SDM KL×10³ AE 36.1 ± 1.8 → AETHER
24.3 ± 2.5 (−33 %; paper −24 %); LUC F1 AE 70.3 ± 1.2 → AETHER 72.9 ± 1.2
(paper +4.1); TF-IDF / LDA LUC F1 31.2 / 28.3. (Unlike London, TF-IDF over POIs
is about as good as AETHER on SDM here (KL 25.5): the POIs carry the social
field strongly; lower ``poi_socio`` to weaken both.)
Note: the random split lets nearby units share pixels, so part of raw AE's
random-split R² is spatial leakage, not social signal (compare the blocked
numbers).
"""

from .city import City, generate_city
from .io import write_ae_tiles, write_city

__all__ = ["City", "generate_city", "write_ae_tiles", "write_city"]
