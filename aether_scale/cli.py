"""``aether-scale``: the command line. Thin: parse, load config, open the cluster, call a stage.

Every stage reads the workspace and its config section, writes its outputs
atomically with a manifest, and is skipped on rerun when nothing changed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable

from .config import ConfigError, RunConfig, load_config

# stage name → (module:function, one-line help). Order = the data flow.
STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("aether_scale.ingest:run_ingest", "AlphaEarth GeoTIFF/COG/VRT tiles → ae.zarr"),
    "pois": ("aether_scale.pois:run_pois", "POI files → pois.parquet (descriptions, AE CRS)"),
    "text": ("aether_scale.text:run_text", "POI descriptions → text.zarr (sentence-transformers)"),
    "pool": ("aether_scale.pooling:run_pool", "AE pooled in buffers around POIs → triplets.zarr"),
    "train": ("aether_scale.train:run_train", "train the AETHER projector → model/"),
    "infer": ("aether_scale.field:run_infer", "projector over every AE pixel → field.zarr"),
    "regions": ("aether_scale.regions:run_regions", "AE and field pooled around label units → regions.parquet"),
    "evaluate": ("aether_scale.evaluate:run_evaluate", "the paper's Table 1 protocol → report/"),
}

EPILOG = """\
examples:
  aether-scale demo                                  # synthetic city, every stage, ~minutes
  aether-scale synth --out city/                     # just write the synthetic city's files
  aether-scale ingest --workspace runs/london --config configs/london.yaml
  aether-scale run --workspace runs/london --config configs/london.yaml --set train.epochs=20
  aether-scale train -w s3://bucket/run -c configs/national.yaml --set cluster.kind=gateway

A workspace is a folder or fsspec URL; each stage leaves its outputs and a manifest
there and is skipped on rerun when its inputs and config are unchanged (--force redoes it).
"""


# What each stage reads from the workspace, and the stage that writes it.
NEEDS: dict[str, dict[str, str]] = {
    "pois": {"ae.zarr": "ingest"},
    "text": {"pois.parquet": "pois"},
    "pool": {"ae.zarr": "ingest", "pois.parquet": "pois", "text.zarr": "text"},
    "train": {"triplets.zarr": "pool"},
    "infer": {"ae.zarr": "ingest", "model": "train"},
    "regions": {"ae.zarr": "ingest", "field.zarr": "infer"},
    "evaluate": {"regions.parquet": "regions"},
}


def check_ready(names: list[str], workspace: str, cfg: RunConfig) -> None:
    """Refuse early (before any cluster starts) when the first stage's inputs are missing.

    Later stages get their inputs from the earlier ones in the same run. Raises
    ``FileNotFoundError`` naming the missing output and the command that makes it.
    """
    from .workspace import Workspace

    first = names[0]
    if first == "ingest" and not cfg.ingest.tiles:
        raise FileNotFoundError(
            "no AlphaEarth tiles given: set ingest.tiles in the config or pass "
            "--set ingest.tiles='[\"/path/to/tiles/*.tif\"]'"
        )
    ws = Workspace(workspace)
    for name, producer in NEEDS.get(first, {}).items():
        if not ws.exists(name):
            raise FileNotFoundError(
                f"{ws.path(name)} does not exist: run `aether-scale {producer} -w {workspace}` "
                f"first (or `aether-scale run -w {workspace} -c CONFIG` for every stage)"
            )


def stage_function(name: str) -> Callable:
    """Import the function that implements a stage (``"ingest"`` → ``run_ingest``)."""
    target, _ = STAGES[name]
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def _add_common(p: argparse.ArgumentParser, *, workspace_required: bool = True) -> None:
    p.add_argument("-w", "--workspace", required=workspace_required,
                   help="run folder or fsspec URL (s3://…, gs://…) holding stage outputs")
    p.add_argument("-c", "--config", help="run config YAML (see configs/); defaults apply without")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--force", action="store_true", help="redo the stage even if its manifest matches")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aether-scale",
        description="Align AlphaEarth satellite embeddings with POI text (AETHER), "
        "out-of-core and distributed, from one city to a country.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run every stage on the embedded synthetic city",
                       description="Generate the synthetic city and run every stage on a "
                       "LocalCluster; prints where the outputs are.")
    _add_common(p, workspace_required=False)
    p.set_defaults(workspace=None)

    p = sub.add_parser("synth", help="write the synthetic city (AE tiles, POIs, labels)",
                       description="Write the embedded synthetic city in the formats a real "
                       "user has: AE GeoTIFF tiles, GeoParquet POIs, LUC points, LSOA-like units.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-c", "--config", help="config YAML whose 'synth' section is used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set synth.size_px=2048 --set synth.seed=3")

    for name, (_, help_) in STAGES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _add_common(p)

    p = sub.add_parser("run", help="run every stage in order (skipping up-to-date ones)")
    _add_common(p)
    p.add_argument("--until", choices=list(STAGES), help="stop after this stage")
    return parser


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def run_stages(names: list[str], workspace: str, cfg: RunConfig, *, force: bool = False) -> list:
    """Run the named stages in order on one cluster; returns their StageResults."""
    from .cluster import connect
    from .workspace import Workspace

    check_ready(names, workspace, cfg)
    ws = Workspace(workspace)
    results = []
    with connect(cfg.cluster):
        for name in names:
            t0 = time.perf_counter()
            res = stage_function(name)(ws, cfg, force=force)
            if not res.skipped:
                print(f"[{name}] {time.perf_counter() - t0:.1f} s")
            results.append(res)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "synth":
            from .synthetic import write_city

            cfg = _load(args)
            paths = write_city(args.out, cfg.synth)
            print(f"synthetic city written to {args.out}:")
            for k, v in paths.items():
                print(f"  {k}: {v}")
            return 0
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.workspace, config=args.config, overrides=args.overrides, force=args.force)
            return 0
        cfg = _load(args)
        if args.command == "run":
            names = list(STAGES)
            if args.until:
                names = names[: names.index(args.until) + 1]
        else:
            names = [args.command]
        run_stages(names, args.workspace, cfg, force=args.force)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
