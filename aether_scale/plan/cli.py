"""The ``plan`` sub-command's arguments and handler (wired into :mod:`aether_scale.cli`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

__all__ = ["add_parser", "run"]

HELP = "what a run will cost: per stage chunks, tasks, bytes, memory, worker-hours, wall time"
DESCRIPTION = """\
Estimate every stage before anything runs, from the config's inputs (tile headers or a
tile index, POI and label file metadata) and throughput figures measured on this
machine (--calibrate), else benchmarks/results/*.json, else documented defaults; GPU
figures are stated assumptions. Without the data, describe it: --area-km2, --pois,
--luc-points, --sdm-units, or --tile-index FILE (YAML/JSON footprints), or --synth
(the city `aether-scale demo` writes)."""
EXAMPLES = """\
examples:
  aether-scale plan -w demo-out                    # a workspace's saved config
  aether-scale plan -c national --area-km2 230000 --pois 4000000 \\
      --luc-points 100000 --sdm-units 42000 --workers 1,8,64
  aether-scale plan -c national --area-km2 230000 --pois 4000000 --gpu
  aether-scale plan --calibrate                    # measure this machine (≈1 min)
"""


def _workers(v: str) -> list[int]:
    try:
        out = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers {v!r}: a comma-separated list of "
                                         "worker counts, e.g. 1,8,64") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--workers {v!r}: counts must be ≥ 1")
    return out


def add_parser(sub: Any, add_config: Callable[[Any], None],
               add_verbosity: Callable[..., None]) -> None:
    p = sub.add_parser("plan", help=HELP, description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-w", "--workspace", help="use this workspace's saved config (no -c)")
    add_config(p)
    p.add_argument("--workers", type=_workers, metavar="N,N,…",
                   help="worker counts to estimate wall time for (default: the config's)")
    p.add_argument("--threads-per-worker", type=int, metavar="T",
                   help="threads per worker (default: the cluster section's)")
    p.add_argument("--client-cores", type=int, metavar="C", help="cores of the machine that "
                   "runs the client's serial stages (train, baselines, evaluate, local text; "
                   "default: this machine's)")
    p.add_argument("--gpu", action="store_true", help="workers with one GPU each; train on "
                   "one GPU (GPU figures are assumptions unless calibrated on a GPU)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--markdown", action="store_true", help="the table as Markdown")
    p.add_argument("--calibrate", action="store_true", help="first measure this machine: "
                   "the real stages on a small synthetic city, one thread (≈1 min)")
    p.add_argument("--calibration", metavar="FILE", help="calibration JSON to write/read "
                   "(default ~/.cache/aether_scale/calibration.json)")
    p.add_argument("--no-benchmarks", dest="benchmarks", action="store_false",
                   help="ignore benchmarks/results/*.json (defaults where not calibrated)")
    g = p.add_argument_group("inputs described instead of read")
    g.add_argument("--tile-index", metavar="FILE", help="YAML/JSON list of tile footprints "
                   "(see aether_scale.plan.inputs)")
    g.add_argument("--area-km2", type=float, metavar="A", help="AE coverage of this area "
                   "(one square in ingest.crs, default EPSG:27700)")
    g.add_argument("--pois", type=int, metavar="N", help="POI count instead of pois.sources")
    g.add_argument("--distinct-ratio", type=float, metavar="R",
                   help="distinct descriptions per POI (default: sampled, or 1 with --pois)")
    g.add_argument("--luc-points", type=int, metavar="N")
    g.add_argument("--sdm-units", type=int, metavar="N")
    g.add_argument("--synth", action="store_true", help="the config's synth city, as "
                   "`aether-scale demo` writes it")
    add_verbosity(p, top=False)


def run(args: argparse.Namespace, load: Callable[[argparse.Namespace], Any]) -> int:
    from . import SyntheticInputs, calibrate, make_plan, markdown, text

    if args.calibrate:
        from ..logs import get_logger

        log = get_logger("plan")
        doc = calibrate(args.calibration, log=log.info)
        print(f"calibration written to {doc['path']} in {doc['seconds']:.0f} s "
              f"({len(doc['figures'])} figures measured)")
        if not (args.config or args.workspace):
            for k, f in doc["figures"].items():
                print(f"  {k} = {f['value']:,.4g} {f['unit']}  [{f['source']}]")
            return 0
    elif not (args.config or args.workspace) and not (args.area_km2 or args.tile_index):
        raise SystemExit("error: plan needs a config (-c), a workspace (-w) or described "
                         "inputs (--area-km2/--tile-index); see aether-scale plan --help")
    cfg = load(args)
    syn = SyntheticInputs(tile_index=args.tile_index, area_km2=args.area_km2, pois=args.pois,
                          luc_points=args.luc_points, sdm_units=args.sdm_units,
                          distinct_ratio=args.distinct_ratio, synth=args.synth)
    plan = make_plan(cfg, synthetic=syn, calibration=args.calibration, workers=args.workers,
                     gpu=args.gpu, threads_per_worker=args.threads_per_worker,
                     client_cores=args.client_cores,
                     benchmarks=args.benchmarks)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2, default=str))
    elif args.markdown:
        print(markdown(plan))
    else:
        print(text(plan))
    return 0
