"""``aether-scale``: the command line. Thin: parse, load the config, call the pipeline.

Sub-commands come from the stage registry (:mod:`aether_scale.pipeline`): one per
stage, ``run`` (every stage in order), ``status`` (what is current, stale and why),
``stages`` (the stage graph and workspace contract), ``config`` (the resolved config),
``demo`` and ``synth``. Without ``-c`` a command on an existing workspace uses the
config its last run saved there (``<workspace>/config.yaml``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any

from . import __version__
from .config import (
    ConfigError,
    RunConfig,
    config_yaml,
    load_config,
    packaged_configs,
    saved_config,
)
from .logs import get_logger, setup
from .pipeline import ARTIFACTS, STAGES, producer, stage_names

log = get_logger("cli")

EPILOG = """\
examples:
  aether-scale demo                                  # synthetic city, every stage, ~minutes
  aether-scale status -w demo-out                    # what is current, stale (and why)
  aether-scale status -w demo-out --set train.lam=0.5
  aether-scale run -w runs/london -c london --set ingest.tiles='["/data/aef/*.tiff"]'
  aether-scale train -w runs/london --set train.epochs=20   # reuses the saved config
  aether-scale train -w s3://bucket/run -c national --set cluster.kind=gateway
  aether-scale stages --markdown                     # the stage graph, as in the README
  aether-scale config -c london                      # the resolved config, every default

A workspace is a folder or fsspec URL; each stage leaves its outputs and a manifest
there and is skipped on rerun when its inputs and config are unchanged (--force redoes
it). -c takes a YAML file or a shipped config name: """ + ", ".join(packaged_configs())


def _add_verbosity(p: argparse.ArgumentParser, *, top: bool) -> None:
    """``-v``/``-q`` before or after the command (``aether-scale -q run …`` and
    ``aether-scale run -q …`` mean the same)."""
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="count", **({"default": 0} if top else d),
                   help="more detail (-v: debug; -vv: also dask/library logs; tracebacks)")
    p.add_argument("-q", "--quiet", action="store_true", **d,
                   help="only warnings and errors")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config",
                   help="run config: a YAML file or a shipped name (default: the workspace's "
                        "saved config.yaml, else every default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")


def _add_common(p: argparse.ArgumentParser, *, workspace_required: bool = True) -> None:
    p.add_argument("-w", "--workspace", required=workspace_required,
                   help="run folder or fsspec URL (s3://…, gs://…) holding stage outputs")
    _add_config(p)
    p.add_argument("--force", action="store_true",
                   help="redo the stage from scratch even if its manifest matches")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="fail instead of waiting when another run holds a stage's lock")
    _add_verbosity(p, top=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aether-scale",
        description="Align AlphaEarth satellite embeddings with POI text (AETHER), "
        "out-of-core and distributed, from one city to a country.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aether-scale {__version__}")
    _add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run every stage on the embedded synthetic city",
                       description="Generate the synthetic city into <workspace>/city and run "
                       "every stage on it (config: the shipped demo.yaml).")
    _add_common(p, workspace_required=False)
    p.set_defaults(workspace=None)

    p = sub.add_parser("synth", help="write the synthetic city (AE tiles, POIs, labels)",
                       description="Write the embedded synthetic city in the formats a real "
                       "user has: AE GeoTIFF tiles, GeoParquet POIs, LUC points, LSOA-like units.")
    p.add_argument("--out", required=True, help="output folder")
    _add_config(p)
    _add_verbosity(p, top=False)

    for st in STAGES:
        p = sub.add_parser(st.name, help=st.help, description=st.help)
        _add_common(p)

    p = sub.add_parser("run", help="run every stage in order (skipping up-to-date ones)")
    _add_common(p)
    p.add_argument("--until", choices=stage_names(), help="stop after this stage")
    p.add_argument("--from", dest="start", choices=stage_names(), help="start at this stage")

    p = sub.add_parser("query", help="where phrases fit the field: similarity rasters, top "
                       "locations (GeoParquet, GeoJSON), PNG maps",
                       description="Encode each phrase with the run's text encoder and text "
                       "projector and compare it with every field pixel (one pass for all "
                       "phrases). Writes <workspace>/queries/<name>/.")
    p.add_argument("phrases", nargs="+", metavar="PHRASE", help='e.g. "a place of cafes"')
    p.add_argument("-w", "--workspace", required=True)
    _add_config(p)
    p.add_argument("--name", help="output folder under queries/ (default: from the phrases)")
    p.add_argument("--variant", default="", help="a train.variants model (default: the main one)")
    p.add_argument("--top-k", type=int, help="locations per phrase (query.top_k)")
    p.add_argument("--min-distance", type=float, metavar="METRES",
                   help="locations at least this far apart (query.min_distance_m)")
    p.add_argument("--no-maps", dest="maps", action="store_const", const=False, default=None,
                   help="skip the PNG maps")
    _add_verbosity(p, top=False)

    p = sub.add_parser("export", help="the field, a similarity raster or an RGB rendering as a "
                       "Cloud Optimized GeoTIFF; the model as a portable bundle",
                       description="field/similarity/rgb → a band-first COG (overviews, band "
                       "descriptions, nodata; validated with rio-cogeo) that GDAL and QGIS "
                       "open; model → safetensors + model card + ONNX.")
    p.add_argument("what", choices=["field", "similarity", "rgb", "model"])
    p.add_argument("-w", "--workspace", required=True)
    p.add_argument("-o", "--out", help="output file (folder for model; default: "
                   "<workspace>/exports/…)")
    p.add_argument("--variant", default="", help="a train.variants field/model")
    p.add_argument("--query", help="the query (folder under queries/) for 'similarity'")
    p.add_argument("--dtype", choices=["float32", "int8"],
                   help="field: float32 (default) or int8 (an int8 field's codes as they are)")
    p.add_argument("--bbox", nargs=4, type=float, metavar=("MINX", "MINY", "MAXX", "MAXY"),
                   help="export only this box (in the raster CRS unless --bbox-crs)")
    p.add_argument("--bbox-crs", help="CRS of --bbox, e.g. EPSG:4326")
    p.add_argument("--blocksize", type=int, help="COG tile edge (default 256 for the field, "
                   "512 otherwise)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="model: skip ONNX")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_verbosity(p, top=False)

    p = sub.add_parser("sweep", help="the paper's sensitivity studies: λ, radii, training "
                       "fraction or any overrides, each point a train variant",
                       description="Run (or resume) the sweep that the config's `sweep:` "
                       "section describes on a workspace where the pipeline has run; points "
                       "run as parallel dask tasks, each reusing every stage output it does "
                       "not change. Writes <workspace>/sweeps/<name>/.")
    p.add_argument("-w", "--workspace", required=True)
    p.add_argument("-c", "--config", help="a YAML with a `sweep:` section (a file or a shipped "
                   "name, e.g. paper-sweeps); its other sections override every point")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set 'sweep.lam=[0, 0.2, 0.5]' --set train.epochs=10")
    _add_verbosity(p, top=False)

    p = sub.add_parser("status", help="each stage: current, stale (and why) or missing",
                       description="Compare the workspace's manifests with the config (default: "
                       "the one its last run saved) without running anything.")
    p.add_argument("-w", "--workspace", required=True)
    _add_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_verbosity(p, top=False)

    p = sub.add_parser("stages", help="the stage graph: what each stage reads and writes")
    p.add_argument("--markdown", action="store_true", help="the README's tables")
    _add_verbosity(p, top=False)

    from .plan.cli import add_parser as add_plan_parser

    add_plan_parser(sub, _add_config, _add_verbosity)

    p = sub.add_parser("config", help="print the resolved config (every default filled in)")
    p.add_argument("-w", "--workspace", help="use this workspace's saved config as the base")
    _add_config(p)
    _add_verbosity(p, top=False)
    return parser


# --------------------------------------------------------------------------- config
def _load(args: argparse.Namespace) -> RunConfig:
    path = args.config
    if path is None:
        path = saved_config(getattr(args, "workspace", None))
        if path is not None:
            log.info(f"config: {path} (saved by the workspace's last run)")
    return load_config(path, args.overrides)


# --------------------------------------------------------------------------- commands
def _entry(kind: str, *, variants: bool = False) -> str:
    """How an artifact is written in the docs: ``model/``, ``field.zarr`` (+ variants)."""
    a = ARTIFACTS[kind]
    d = "" if "." in a.name else "/"
    out = f"`{a.name}{d}`"
    if variants and a.per_variant:
        out += f", `{a.variant('<variant>')}{d}`"
    return out


def stages_markdown() -> str:
    """The stage table and the workspace contract table, from the registry (README)."""
    lines = ["| stage | reads | writes | what |", "|---|---|---|---|"]
    for st in STAGES:
        reads = [_entry(r, variants=True) for r in st.reads]
        reads += [_entry(r, variants=True) + " if there" for r in st.optional_reads]
        reads += [f"`{st.section}.{k}`" for k in st.input_keys]
        writes = ", ".join(_entry(w, variants=True) for w in st.writes)
        lines.append(f"| `{st.name}` | {', '.join(reads) or '—'} | {writes} | {st.help} |")
    lines += ["", "| workspace entry | holds | written by |", "|---|---|---|"]
    for a in ARTIFACTS.values():
        prod = producer(a.name)
        lines.append(f"| {_entry(a.name, variants=True)} | {a.holds} | "
                     f"{'`' + prod.name + '`' if prod else '—'} |")
    return "\n".join(lines)


def _print_stages(markdown: bool) -> None:
    if markdown:
        print(stages_markdown())
        return
    for st in STAGES:
        reads = ", ".join([*st.reads, *(f"[{r}]" for r in st.optional_reads),
                           *(f"{st.section}.{k}" for k in st.input_keys)]) or "-"
        print(f"{st.name:<9} {reads}  →  {', '.join(st.writes)}")
        print(f"{'':<9} {st.help}; config section '{st.section}'"
              + (f"; runtime-only: {', '.join(sorted(st.runtime_keys))}" if st.runtime_keys else "")
              + ("" if st.cluster is False else "; uses the dask cluster"))


def _print_status(ws: Any, cfg: RunConfig, as_json: bool) -> None:
    import json

    from .pipeline import status

    rows = status(ws, cfg)
    if as_json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return
    for r in rows:
        print(f"{r.stage:<9} {r.state:<8} " + (", ".join(r.outputs) if r.state == "current"
                                               else ""))
        for w in r.why if r.state != "current" else []:
            print(f"{'':<18}- {w}")


def _run(args: argparse.Namespace) -> int:
    from .pipeline import run_stages
    from .workspace import Workspace

    if args.command == "stages":
        _print_stages(args.markdown)
        return 0
    if args.command == "synth":
        from .synthetic import write_city

        paths = write_city(args.out, _load(args).synth)
        print(f"synthetic city written to {args.out}:")
        for k, v in paths.items():
            print(f"  {k}: {v}")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        out = run_demo(args.workspace, config=args.config, overrides=args.overrides,
                       force=args.force)
        print(out["summary"])
        return 0
    if args.command == "export":
        return _export(args)
    if args.command == "sweep":
        from .sweep import sweep

        out = sweep(args.workspace, args.config, args.overrides)
        print(out["markdown"])
        print(f"sweep results: {os.path.join(args.workspace, 'sweeps', out['name'])}")
        return 0
    if args.command == "plan":
        from .plan.cli import run as run_plan

        return run_plan(args, _load)
    cfg = _load(args)
    if args.command == "query":
        return _query(args, cfg)
    if args.command == "config":
        print(config_yaml(cfg), end="")
        return 0
    ws = Workspace(args.workspace)
    if args.command == "status":
        _print_status(ws, cfg, args.json)
        return 0
    names = stage_names() if args.command == "run" else [args.command]
    if args.command == "run":
        if args.start:
            names = names[names.index(args.start):]
        if args.until:
            names = names[: names.index(args.until) + 1]
    ws.save_config(config_yaml(cfg, relative_to=ws.root if ws.is_local else None),
                   sys.argv[1:] or [args.command])
    run_stages(names, ws, cfg, force=args.force, wait=args.wait)
    return 0


def _query(args: argparse.Namespace, cfg: RunConfig) -> int:
    from .query import query

    res = query(args.workspace, args.phrases, config=cfg, name=args.name, variant=args.variant,
                top_k=args.top_k, min_distance_m=args.min_distance, maps=args.maps)
    s = res.summary
    print(f"{len(res.phrases)} phrase(s) over {s['pixels']:,} px in {s['seconds']['total']:.1f} s "
          f"({s['pixels_per_s'] or 0:,.0f} px/s similarity); top {s['top_k']} locations "
          f"≥ {s['min_distance_m']:g} m apart:")
    for q, phrase in enumerate(res.phrases):
        rows = res.top[res.top["query"] == q].head(3)
        best = "; ".join(f"#{int(r.rank)} {r.similarity:.3f} at ({r.x:.0f}, {r.y:.0f})"
                         for r in rows.itertuples())
        print(f"  “{phrase}”: {best or 'no valid pixel'}")
    crs = res.top.crs.to_string() if res.top.crs is not None else "the field's CRS"
    print(f"coordinates in {crs}; outputs in {res.folder}:")
    for k in ("similarity", "top.parquet", "top.geojson"):
        print(f"  {k}: {s['outputs'][k]}")
    if res.maps:
        print(f"  maps: {', '.join(os.path.basename(m) for m in res.maps)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export

    res = export(args.workspace, args.what, args.out, variant=args.variant, query=args.query,
                 dtype=args.dtype, bbox=args.bbox, bbox_crs=args.bbox_crs,
                 blocksize=args.blocksize, onnx=args.onnx, overwrite=args.overwrite)
    if args.what == "model":
        print(f"model bundle: {res['path']} ({', '.join(sorted(os.listdir(res['path'])))})")
        return 0
    print(f"{res['path']}: {res['width']}×{res['height']} px, {res['bands']} band(s) "
          f"{res['dtype']}, nodata {res['nodata']}, {res['crs']}; valid Cloud Optimized GeoTIFF "
          f"(overviews {res.get('overviews')}), {res['bytes'] / 2**20:,.1f} MiB in "
          f"{res['seconds']:.1f} s")
    return 0


def _print_error(text: str) -> None:
    """The final message, in lines of at most MAX_LINE characters (like every log line)."""
    import textwrap

    from .logs import MAX_LINE

    for line in text.splitlines():
        print("\n".join(textwrap.wrap(line, MAX_LINE, subsequent_indent="  ",
                                       break_on_hyphens=False)) or line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup(-1 if args.quiet else args.verbose)
    try:
        return _run(args)
    except ConfigError as e:
        _print_error(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed chunks are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends as one clear message
        from .errors import explain

        if args.verbose:
            traceback.print_exc()
        _print_error(explain(e))
        if not args.verbose:
            print("(run with -v for the full traceback)", file=sys.stderr)
        logging.shutdown()
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
