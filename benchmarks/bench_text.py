"""Benchmark: the text stage vs the reference's own text encoder over every row.

    python benchmarks/bench_text.py --reference PATH   # 50,000 POIs against the checkout
    python benchmarks/bench_text.py --quick            # 8,000 POIs, smaller samples

One run measures, on the same generated POI set (realistic repetition: chains,
common pub/café names, a category list with a long tail, ~10% without a name):

1. **baseline** — with ``--reference PATH`` (a checkout of github inwind0212/AETHER),
   its own ``dataio.HFTextEncoder`` (what its ``train.py`` calls through
   ``encode_texts`` with ``text.backend: hf``; the shipped config's ``hf_model`` is
   sentence-transformers/all-MiniLM-L6-v2, here the bundled copy of that model, and its
   ``text.batch_size``) encodes the description of every row, in a fresh interpreter,
   unmodified. Encoding all 50k rows takes minutes on 2 cores, so by default a random
   sample of rows is encoded and the full time is extrapolated from the measured rate
   (``--baseline-rows 0`` encodes every row); the model's load is timed apart and
   added once. Without a checkout, plain ``SentenceTransformer.encode`` of every row is
   the baseline, labelled ``fallback``;
2. **the command** — ``aether-scale text -w WS --force`` from outside, default settings,
   a cold text cache: imports, model load, reading ``pois.parquet``, de-duplication,
   encoding the distinct texts, writing ``text.zarr``;
3. **stage, cold cache** — ``run_stage("text", ...)`` in this process (model loaded);
4. **stage, rerun** — ``run_stage("text", ..., force=True)`` with the cache warm: no
   model calls;
5. **local vs dask encoding** (the ``mode=auto`` rule) — the same fresh distinct
   texts encoded in-process and on a 2-worker LocalCluster (1 thread each),
   including worker model loading.

The stage's vectors are compared with the baseline's on the sampled rows (same model,
same mean pooling and L2 normalisation: equal to float rounding). Writes
``benchmarks/results/text.json`` with a ``summary`` of same-run ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import (  # noqa: E402
    PeakRSS,
    add_reference_argument,
    cli_argv,
    fallback_origin,
    machine_info,
    ratio_row,
    reference_origin,
    write_result,
)

# (subcategory, category, relative frequency) — a long-tailed mix like London OSM/OS data
CATEGORIES = [
    ("Cafe", "coffee", 30), ("Pub", "nightlife", 25), ("Restaurant", "food", 22),
    ("Fast food", "food", 15), ("Convenience store", "shops", 14), ("Supermarket", "shops", 8),
    ("Hairdresser", "personal services", 8), ("Pharmacy", "health", 6), ("Bank", "finance", 5),
    ("Post office", "public services", 3), ("Dentist", "health", 3), ("GP surgery", "health", 3),
    ("Bakery", "food", 4), ("Clothes shop", "shops", 6), ("Estate agent", "property", 4),
    ("Primary school", "education", 4), ("Church", "religion", 3), ("Park", "leisure", 3),
    ("Gym", "sport", 3), ("Hotel", "accommodation", 3), ("Bar", "nightlife", 4),
    ("Nightclub", "nightlife", 1), ("Theatre", "culture", 1), ("Museum / gallery", "culture", 1),
    ("Cinema", "culture", 1), ("Library", "public services", 1), ("Petrol station", "transport", 2),
    ("Car park", "transport", 2), ("Bus station", "transport", 1), ("Laundrette", "personal services", 1),
    ("Florist", "shops", 1), ("Bookshop", "shops", 1), ("Skate park", "sport", 0.3),
    ("Scheduled monument", "landmarks", 0.5), ("Veterinary clinic", "health", 0.7),
    ("Takeaway", "food", 6), ("Off licence", "shops", 2), ("Nursery", "education", 1.5),
    ("Electrical features", "infrastructure", 2), ("Headquarters and offices", "services", 4),
]
CHAINS = {
    "Cafe": ["Costa", "Starbucks", "Caffè Nero", "Pret A Manger", "Greggs"],
    "Pub": ["Wetherspoon", "The Red Lion", "The Crown", "The Royal Oak", "The White Hart",
            "The Kings Arms", "The Plough"],
    "Restaurant": ["Nando's", "Pizza Express", "Wagamama", "Zizzi", "Franco Manca"],
    "Fast food": ["McDonald's", "KFC", "Subway", "Burger King", "Chicken Cottage"],
    "Convenience store": ["Tesco Express", "Sainsbury's Local", "Co-op", "Londis", "Costcutter"],
    "Supermarket": ["Tesco", "Sainsbury's", "Lidl", "Aldi", "Waitrose", "Asda"],
    "Pharmacy": ["Boots", "Superdrug", "Lloyds Pharmacy"],
    "Bank": ["Barclays", "HSBC", "Lloyds", "NatWest", "Santander"],
    "Bakery": ["Greggs", "Gail's"],
    "Petrol station": ["Shell", "BP", "Esso"],
    "Gym": ["PureGym", "The Gym", "Anytime Fitness"],
    "Hotel": ["Premier Inn", "Travelodge", "Holiday Inn"],
    "Estate agent": ["Foxtons", "Winkworth", "Savills"],
    "Clothes shop": ["Primark", "H&M", "Marks & Spencer", "Next"],
}
WORDS = ["Green", "Park", "Royal", "King's", "Station", "High Street", "Victoria", "Golden",
         "London", "City", "Riverside", "Market", "Corner", "Bridge", "Hill", "Church",
         "Broadway", "Garden", "Central", "Village", "Abbey", "Albion", "Star", "Crown", "New"]
SURNAMES = ["Patel", "Smith", "Khan", "Jones", "Ali", "Brown", "Singh", "Taylor", "Williams",
            "Davies", "Evans", "Wilson", "Thomas", "Johnson", "Roberts", "Ahmed", "Lewis",
            "Walker", "Wright", "Green", "Hall", "Wood", "Hussain", "Clarke", "Begum", "Murphy",
            "Kelly", "Cohen", "Silva", "Costa", "Nowak", "Kowalski", "Rossi", "Chen", "Wang"]


def make_pois(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` POIs with realistic repetition of names and categories."""
    rng = np.random.default_rng(seed)
    w = np.array([c[2] for c in CATEGORIES], dtype=float)
    cat_idx = rng.choice(len(CATEGORIES), size=n, p=w / w.sum())
    sub = np.array([c[0] for c in CATEGORIES])[cat_idx]
    cat = np.array([c[1] for c in CATEGORIES])[cat_idx]
    kind = rng.random(n)
    names = np.empty(n, dtype=object)
    # ~10% no name, ~35% chain names (where the category has chains), ~45% common local
    # names ("Station Cafe", "Patel's Pharmacy") and ~6% rarer, mostly unique names
    for i_sub in np.unique(sub):
        rows = np.flatnonzero(sub == i_sub)
        chains = CHAINS.get(str(i_sub), [])
        for r, k in zip(rows, kind[rows], strict=True):
            if k < 0.10:
                names[r] = None
            elif k < 0.45 and chains:
                names[r] = chains[rng.integers(len(chains))]
            elif k < 0.70:
                names[r] = f"{WORDS[rng.integers(len(WORDS))]} {i_sub}"
            elif k < 0.94:
                names[r] = f"{SURNAMES[rng.integers(len(SURNAMES))]}'s {i_sub}"
            else:
                names[r] = (f"{WORDS[rng.integers(len(WORDS))]} "
                            f"{SURNAMES[rng.integers(len(SURNAMES))]} & "
                            f"{SURNAMES[rng.integers(len(SURNAMES))]}")
    desc = np.where(
        pd.isna(names),
        "A place of " + sub.astype(object) + ", a type of " + cat.astype(object) + ".",
        "A place of " + sub.astype(object) + ", a type of " + cat.astype(object)
        + ", named " + names.astype(str) + ".",
    )
    return pd.DataFrame({"poi_id": np.arange(n, dtype=np.int64), "description": desc,
                         "name": names, "category": cat, "subcategory": sub,
                         "x": rng.uniform(500_000, 560_000, n), "y": rng.uniform(150_000, 200_000, n)})


def write_pois_parquet(df: pd.DataFrame, path: str) -> None:
    import geopandas as gpd

    os.makedirs(path, exist_ok=True)
    gdf = gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df.x, df.y), crs=27700)
    gdf.to_parquet(os.path.join(path, "part.00000.parquet"), index=False)

# =========================================================================== baseline
REF_CHILD = r"""
import json, sys, time
import numpy as np
checkout, model_dir, texts_path, out, batch_size = sys.argv[1:6]
sys.path.insert(0, checkout)
t0 = time.perf_counter()
from dataio import HFTextEncoder  # the reference's own code, unmodified
t_imp = time.perf_counter() - t0
texts = json.load(open(texts_path))
t = time.perf_counter()
enc = HFTextEncoder(model_dir, device="cpu")
t_load = time.perf_counter() - t
enc.encode(texts[:64], batch_size=64)  # warm-up, as the stage's model gets one
t, c = time.perf_counter(), time.process_time()
X = enc.encode(texts, batch_size=int(batch_size))
res = {"import_s": t_imp, "load_s": t_load, "encode_s": time.perf_counter() - t,
       "encode_cpu_s": time.process_time() - c, "n": len(texts)}
np.save(out + ".npy", X)
json.dump(res, open(out, "w"))
"""


def reference_batch_size(checkout: str) -> int:
    """``text.batch_size`` of the checkout's shipped ``config.yaml`` (1024 at cc52099)."""
    import yaml

    with open(os.path.join(checkout, "config.yaml")) as f:
        return int((yaml.safe_load(f).get("text") or {}).get("batch_size") or 1024)


def run_reference(checkout: str, model_dir: str, texts: list[str], root: str) -> tuple[dict, np.ndarray]:
    """The reference's HFTextEncoder over ``texts`` in a fresh interpreter (its cwd the checkout)."""
    texts_path, out = os.path.join(root, "ref_texts.json"), os.path.join(root, "ref.json")
    with open(texts_path, "w") as f:
        json.dump(texts, f)
    bs = reference_batch_size(checkout)
    cmd = [sys.executable, "-c", REF_CHILD, checkout, model_dir, texts_path, out, str(bs)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(os.path.join(root, "reference.log"), "wb") as logf, PeakRSS() as rss:
        rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=checkout,
                            env=env).returncode
    if rc != 0:
        tail = open(os.path.join(root, "reference.log"), errors="replace").read()[-2000:]
        raise SystemExit(f"the reference's HFTextEncoder exited {rc}:\\n{tail}")
    res = json.load(open(out))
    return ({"what": f"dataio.HFTextEncoder({model_dir!r}, device='cpu').encode(texts, "
                     f"batch_size={bs}) from the checkout, unmodified (what train.py's "
                     "encode_texts runs for text.backend: hf)",
             "batch_size": bs, "rows_encoded": res["n"], "seconds": round(res["encode_s"], 2),
             "cpu_seconds": round(res["encode_cpu_s"], 2),
             "texts_per_s": round(res["n"] / res["encode_s"], 1),
             "model_load_s": round(res["load_s"], 2), "import_s": round(res["import_s"], 2),
             **rss.as_dict()}, np.load(out + ".npy"))


def run_command(ws: str, cache_dir: str, root: str) -> dict:
    """``aether-scale text -w ws --force`` from outside with a fresh text cache."""
    argv = cli_argv() + ["text", "-w", ws, "--force", "--set", f"text.cache_dir={cache_dir}"]
    Path(ws, "config.yaml").unlink(missing_ok=True)  # every default, as a user's first run
    log = os.path.join(root, "command.log")
    t0 = time.perf_counter()
    with open(log, "wb") as f, PeakRSS() as rss:
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(argv)} exited {rc}:\\n{open(log, errors='replace').read()[-2000:]}")
    return {"argv": ["aether-scale", *argv[-6:]], "wall_s": round(wall, 2),
            "log_tail": open(log, errors="replace").read()[-600:], **rss.as_dict()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8k POIs, small samples (~1 min)")
    ap.add_argument("--rows", type=int, default=None, help="POI rows (default 50000; quick 8000)")
    ap.add_argument("--baseline-rows", type=int, default=None,
                    help="rows the baseline encodes (0 = every row; default 1500, quick "
                         "600); its rate is extrapolated to all rows")
    ap.add_argument("--no-command", dest="command", action="store_false",
                    help="skip timing the aether-scale text command from outside")
    add_reference_argument(ap)
    ap.add_argument("--dask-texts", type=int, default=None,
                    help="fresh texts for the local-vs-dask comparison (default 500; quick 200; 0 skips)")
    args = ap.parse_args(argv)
    n = args.rows or (8_000 if args.quick else 50_000)
    base_rows = args.baseline_rows if args.baseline_rows is not None else (600 if args.quick else 1500)
    dask_n = args.dask_texts if args.dask_texts is not None else (200 if args.quick else 500)

    import dask
    import torch

    from aether_scale import text as T
    from aether_scale.config import load_config
    from aether_scale.pipeline import run_stage
    from aether_scale.stores.text import TextStore
    from aether_scale.workspace import Workspace

    tmp = tempfile.mkdtemp(prefix="bench_text_")
    result: dict = {"benchmark": "text", "rows": n, "quick": args.quick,
                    "torch_threads": torch.get_num_threads()}
    try:
        pois = make_pois(n)
        texts = pois.description.tolist()
        n_distinct = int(pois.description.nunique())
        result["distinct_texts"] = n_distinct
        result["distinct_ratio"] = round(n_distinct / n, 4)
        print(f"{n} POIs, {n_distinct} distinct descriptions ({n_distinct / n:.1%})")

        t0 = time.perf_counter()
        model = T.load_text_model("all-MiniLM-L6-v2", "cpu")
        result["model_load_s"] = round(time.perf_counter() - t0, 2)
        model.encode(texts[:64], batch_size=64)  # warm-up (both paths benefit equally)

        # 1. baseline over every row (or a random sample of rows, extrapolated)
        rng = np.random.default_rng(1)
        pick = (np.arange(n) if base_rows in (0, None) or base_rows >= n
                else np.sort(rng.choice(n, size=base_rows, replace=False)))
        sample = [texts[i] for i in pick]
        if args.reference:
            origin = reference_origin(args.reference)
            print(f"--- reference HFTextEncoder ({origin['commit']}), {len(sample)} rows")
            base, base_vecs = run_reference(args.reference, T.resolve_model("all-MiniLM-L6-v2"),
                                            sample, tmp)
            load_s = base["model_load_s"]
        else:
            origin = fallback_origin("benchmarks/bench_text.py:main",
                                     "text encoding (one encode call over every row's description)")
            print(f"--- fallback: SentenceTransformer.encode, {len(sample)} rows")
            with PeakRSS() as rss_base:
                t0 = time.perf_counter()
                base_vecs = model.encode(sample, batch_size=256, normalize_embeddings=True,
                                         convert_to_numpy=True)
                dt = time.perf_counter() - t0
            base = {"what": "SentenceTransformer.encode over every row (batch 256)",
                    "rows_encoded": len(sample), "seconds": round(dt, 2),
                    "texts_per_s": round(len(sample) / dt, 1), **rss_base.as_dict()}
            load_s = result["model_load_s"]
        rate = base["texts_per_s"]
        base["all_rows_extrapolated"] = len(sample) < n
        base["all_rows_encode_s"] = round(n / rate, 1) if len(sample) < n else base["seconds"]
        base["all_rows_s_with_model_load"] = round(base["all_rows_encode_s"] + load_s, 1)
        result["baseline_origin"] = origin
        result["baseline"] = base
        print(f"baseline: {rate:.0f} texts/s on {len(sample)} rows → all {n} rows "
              f"≈ {base['all_rows_encode_s']:.0f} s (+ {load_s:.1f} s model load)")

        # 2. the command from outside, cold cache (default settings)
        ws = Workspace(os.path.join(tmp, "ws"))
        write_pois_parquet(pois, ws.path("pois.parquet"))
        if args.command:
            cmd = run_command(ws.root, os.path.join(tmp, "cache_cmd"), tmp)
            cmd["rows_per_s"] = round(n / cmd["wall_s"], 1)
            result["command"] = cmd
            print(f"command: {cmd['wall_s']:.1f} s = {cmd['rows_per_s']:.0f} rows/s (from outside)")

        # 3. the stage in this process, cold cache (model loaded)
        cfg = load_config(data={"text": {"cache_dir": os.path.join(tmp, "cache"),
                                         "mode": "local", "device": "cpu"}})
        with dask.config.set(scheduler="threads"), PeakRSS() as rss_stage:
            c0 = dict(T.MODEL_CALLS)
            t0 = time.perf_counter()
            r1 = run_stage("text", ws, cfg, force=True)
            dt1 = time.perf_counter() - t0
            calls1 = T.MODEL_CALLS["texts"] - c0["texts"]
        st = r1.stats
        result["stage_cold"] = {
            "seconds": round(dt1, 2), "rows_per_s": round(n / dt1, 1),
            "texts_encoded": calls1, "encode_s": st["encode_s"],
            "encode_texts_per_s": st["texts_per_s"], "read_s": st["read_s"],
            "write_s": st["write_s"], "peak_rss_mb": round(rss_stage.peak_mb, 1),
        }
        speedup = base["all_rows_encode_s"] / dt1
        result["speedup_vs_baseline"] = round(speedup, 2)
        print(f"stage (cold cache): {dt1:.1f} s = {n / dt1:.0f} rows/s, encoded {calls1} texts; "
              f"{speedup:.1f}× the baseline's encode time")

        # 3. rerun with the cache warm
        c0 = dict(T.MODEL_CALLS)
        t0 = time.perf_counter()
        r2 = run_stage("text", ws, cfg, force=True)
        dt2 = time.perf_counter() - t0
        result["stage_rerun"] = {
            "seconds": round(dt2, 3), "rows_per_s": round(n / dt2, 1),
            "model_calls": T.MODEL_CALLS["calls"] - c0["calls"],
            "texts_encoded": T.MODEL_CALLS["texts"] - c0["texts"],
            "encode_s": r2.stats["encode_s"],
        }
        print(f"stage rerun (warm cache): {dt2:.2f} s, model calls: "
              f"{result['stage_rerun']['model_calls']}")

        # correctness: the stage's vectors equal the baseline's on the sampled rows
        store = TextStore(ws.path("text.zarr"))
        got = store.take(store.rows_of(pick))
        result["max_abs_diff_vs_baseline"] = float(np.abs(got - base_vecs).max())
        print(f"max |stage − baseline| over {len(pick)} rows: {result['max_abs_diff_vs_baseline']:.2e}")

        # 5. local vs dask encoding of fresh texts (what mode=auto decides)
        if dask_n:
            from distributed import Client, LocalCluster

            fresh = [f"A place of {s}, a type of {c}, named {w} {k}."
                     for k, (s, c, w) in enumerate(zip(pois.subcategory[:dask_n],
                                                         pois.category[:dask_n],
                                                         np.resize(SURNAMES, dask_n),
                                                         strict=True))]
            lcfg = cfg.text.model_copy(update={"cache_dir": os.path.join(tmp, "c_local"),
                                               "mode": "local"})
            t0 = time.perf_counter()
            T.encode_unique(fresh, lcfg)
            local_s = time.perf_counter() - t0
            dcfg = cfg.text.model_copy(update={"cache_dir": os.path.join(tmp, "c_dask"),
                                               "mode": "dask"})
            t0 = time.perf_counter()
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                              dashboard_address=None) as lc, Client(lc) as client:
                t_up = time.perf_counter() - t0
                t1 = time.perf_counter()
                _, _, dst = T.encode_unique(fresh, dcfg)
                first_s = time.perf_counter() - t1
                # second batch: models already loaded on the workers
                fresh2 = [t.replace("named", "called") for t in fresh]
                t1 = time.perf_counter()
                T.encode_unique(fresh2, dcfg)
                warm_s = time.perf_counter() - t1
                auto = T.choose_mode(cfg.text.model_copy(update={"mode": "auto"}), 10**6, client)
            result["local_vs_dask"] = {
                "texts": dask_n,
                "local_s": round(local_s, 2), "local_texts_per_s": round(dask_n / local_s, 1),
                "dask_cluster_start_s": round(t_up, 2),
                "dask_first_s_incl_model_load": round(first_s, 2),
                "dask_warm_s": round(warm_s, 2),
                "dask_warm_texts_per_s": round(dask_n / warm_s, 1),
                "workers": "LocalCluster 2 processes x 1 thread (same machine)",
                "auto_choice_here": list(auto),
            }
            print(f"local {dask_n / local_s:.0f} texts/s vs dask (warm) {dask_n / warm_s:.0f} texts/s; "
                  f"dask first batch incl. model load {first_s:.1f} s; auto → {auto[0]}")
        result["summary"] = summary_rows(result, n, origin, args.reference)
        result["machine"] = machine_info()
        path = write_result("text", result)
        print(f"results → {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def summary_rows(result: dict, n: int, origin: dict, reference: str | None) -> list[dict]:
    """The same-run ratios for the README's table."""
    how = "python benchmarks/bench_text.py" + (" --reference PATH" if reference else "")
    base = result["baseline"]
    bname = ("the reference's HFTextEncoder over every row" if reference
             else "SentenceTransformer.encode over every row")
    est = " (rate of a random sample, extrapolated)" if base["all_rows_extrapolated"] else ""
    distinct = f"{result['distinct_texts']:,} distinct of {n:,} descriptions"
    rows = []
    if "command" in result:
        rows.append(ratio_row(
            stage="text", metric=f"rows/s, whole `aether-scale text` command, {n:,} POIs ({distinct})",
            ours=result["command"]["rows_per_s"],
            baseline=round(n / base["all_rows_s_with_model_load"], 1), unit="rows/s",
            baseline_name=f"{bname}, model load included{est}", origin=origin,
            ours_what="wall from outside, cold text cache, default settings", command=how))
    rows.append(ratio_row(
        stage="text", metric=f"rows/s, the text stage in process, {n:,} POIs ({distinct})",
        ours=result["stage_cold"]["rows_per_s"], baseline=round(n / base["all_rows_encode_s"], 1),
        unit="rows/s", baseline_name=f"{bname}, model already loaded{est}", origin=origin,
        ours_what="run_stage, cold cache, model loaded", command=how))
    rows.append(ratio_row(
        stage="text", metric="texts/s per text the model encodes (no de-duplication counted)",
        ours=result["stage_cold"]["encode_texts_per_s"], baseline=base["texts_per_s"],
        unit="texts/s", baseline_name=bname, origin=origin,
        ours_what="the stage's encode of its distinct texts", command=how))
    return rows


if __name__ == "__main__":
    sys.exit(main())
