"""Benchmark + diagnostic report for the synthetic city (``aether-scale synth``).

Measures generation and writing time and peak RSS for the demo city, and
records the diagnostics that say whether the city can reproduce the paper's
finding (see :mod:`aether_scale.synthetic`): AE calibration statistics, the
pixel-level trace probe, and region-feature probes for raw AE, POI counts and
a small AETHER-like projector, under random and 1 km-blocked splits, with the
``socio_trace`` knob at its default and at 0 (negative control).

    python benchmarks/bench_synth.py            # default demo city (1024 px), ~5-10 min
    python benchmarks/bench_synth.py --quick    # 512 px, no projector

Writes ``benchmarks/results/synth.json``. There is no reference implementation
to race against; the numbers are absolute, with machine info.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, machine_info, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _round(d):
    if isinstance(d, dict):
        return {str(k): _round(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        return [_round(v) for v in d]
    return round(float(d), 4) if isinstance(d, float | np.floating) else d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="512 px city, no projector")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    from aether_scale.config import SynthSection
    from aether_scale.synthetic import generate_city, write_city
    from aether_scale.synthetic.diagnostics import (
        ae_statistics,
        region_features,
        socio_probe,
        trace_probe,
    )

    size = 512 if args.quick else 1024
    scale = (size / 1024) ** 2
    cfg = SynthSection(size_px=size, n_pois=int(20000 * scale) if args.quick else 20000,
                       n_regions=300 if args.quick else 600,
                       n_luc_points=1000 if args.quick else 2000)
    out: dict = {"machine": machine_info(), "config": cfg.model_dump(mode="json")}
    with PeakRSS() as rss:
        t = time.perf_counter()
        city = generate_city(cfg)
        out["generate_s"] = time.perf_counter() - t
    out["generate_peak_rss_mb"] = rss.peak_mb
    with PeakRSS() as rss, tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = write_city(tmp, cfg)
        out["write_city_s"] = time.perf_counter() - t  # includes a second generation
        out["written_mb"] = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
        out["paths"] = sorted(paths)
    out["write_peak_rss_mb"] = rss.peak_mb

    st = ae_statistics(city)
    out["ae_statistics"] = {
        "random_pair_cos": st["random_pair_cos"],
        "within_class_cos": st["within_class_cos"],
        "class_mean_norm": st["class_mean_norm"],
        "class_mean_cos_min_median_max": [min(st["class_mean_cos"]), st["class_mean_cos_median"],
                                           max(st["class_mean_cos"])],
        "real_alphaearth_pooled": {"random_pair_cos": "0.13-0.23", "within_class_cos": "0.3-0.55",
                                   "class_mean_norm": "0.54-0.74", "class_mean_cos": "0.26-0.61"},
    }
    probes: dict = {}
    for trace in (cfg.socio_trace, 0.0):
        c = city if trace == cfg.socio_trace else generate_city(cfg.model_copy(update={"socio_trace": trace}))
        t = time.perf_counter()
        feats = region_features(c, aether=not args.quick)
        entry = {"features_s": time.perf_counter() - t, "trace_probe": trace_probe(c)}
        for split in ("random", "blocked"):
            entry[split] = socio_probe(c, features=feats, split=split,
                                       n_train=400 if not args.quick else 200)
        probes[f"socio_trace={trace}"] = entry
        print(f"socio_trace={trace}:", json.dumps(_round(entry), indent=1), flush=True)
    out["probes"] = probes
    res = write_result("synth", _round(out))
    print(f"generate {out['generate_s']:.1f} s, peak RSS {out['generate_peak_rss_mb']:.0f} MB; "
          f"write_city {out['write_city_s']:.1f} s; results: {res}")


if __name__ == "__main__":
    main()
