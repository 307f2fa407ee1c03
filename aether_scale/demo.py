"""``aether-scale demo``: the synthetic city through every stage.

The config is the shipped ``configs/demo.yaml`` (or the file given with ``-c``, over
the demo's inputs), with ``--set`` overrides. The city is written into
``<workspace>/city`` — once: a rerun with the same ``synth`` section finds it there —
and the stage inputs (tiles, POIs, label files) point at it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from .config import CONFIG_DIR, config_yaml, deep_merge, load_config
from .logs import get_logger
from .query.retrieval import retrieval_markdown

__all__ = ["city_inputs", "run_demo"]

log = get_logger("demo")
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def city_inputs(city: dict[str, str]) -> dict[str, Any]:
    """Config sections that point the stages at the synthetic city's files."""
    return {
        "ingest": {"tiles": [city["ae_tiles"]]},
        "pois": {"sources": [{
            "path": city["pois"],
            "columns": {"id": "poi_id", "name": "name", "category": "category",
                        "subcategory": "subcategory"},
        }]},
        "regions": {"luc_points": city["luc_points"], "sdm_units": city["sdm_units"],
                    "sdm_id": "unit_id"},
    }


def _city(city_dir: str, synth: Any) -> dict[str, str]:
    """The city's files: the ones already in ``city_dir`` when they were written for the
    same ``synth`` section, else freshly written. On object storage (``city_dir`` a URL)
    the city is written to a local folder and uploaded, as a user's inputs would be."""
    from .storage import is_url

    if is_url(city_dir):
        return _remote_city(city_dir, synth)
    from .synthetic import write_city
    from .synthetic.io import city_paths

    paths = city_paths(city_dir)
    try:
        meta = json.loads(Path(paths["meta"]).read_text())
        same = meta.get("config") == synth.model_dump(mode="json")
    except (OSError, ValueError):
        same = False
    if same and all(os.path.exists(p) for k, p in paths.items() if k != "ae_tiles"):
        log.info(f"[demo] synthetic city: {city_dir} (already written for this config)")
        return paths
    t0 = time.perf_counter()
    out = write_city(city_dir, synth)
    log.info(f"[demo] synthetic city written to {city_dir} in {time.perf_counter() - t0:.1f} s")
    return out


def run_demo(
    workspace: str | None = None,
    *,
    config: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """Write the synthetic city into ``workspace/city`` and run the stages on it.

    Returns ``{"workspace", "results" (StageResult per stage), "city" (its paths),
    "summary" (the closing text: Table 1, where the report is)}``.
    """
    from .pipeline import run_stages, stage_names
    from .storage import is_url
    from .workspace import Workspace

    workspace = workspace or "demo-out"
    if not is_url(workspace):
        workspace = os.path.abspath(workspace)
    t0 = time.perf_counter()
    demo = yaml.safe_load(DEMO_CONFIG.read_text()) or {}
    base = load_config(config, overrides, data=demo)
    city = _city(f"{workspace.rstrip('/')}/city", base.synth)
    cfg = load_config(config, overrides, data=deep_merge(demo, city_inputs(city)))
    ws = Workspace(workspace)
    ws.save_config(config_yaml(cfg, relative_to=workspace),
                   ["demo", *(["-c", config] if config else []),
                    *(f"--set {o}" for o in overrides or [])])
    names = stages or stage_names()
    results = run_stages(names, ws, cfg, force=force)
    ran = ", ".join(r.stage for r in results if not r.skipped) or "none (all current)"
    lines = [f"demo finished in {time.perf_counter() - t0:.0f} s; stages run: {ran}"]
    report = ws.path("report/report.md")
    if ws.fs.exists(report):
        md = ws.fs.cat_file(report).decode()
        table = [ln for ln in md.splitlines() if ln.startswith("|")]
        cut = next((i for i, ln in enumerate(table[1:], 1) if ln.startswith("| Model (paper")),
                   len(table))
        lines += ["", *table[:cut], ""]
        lines.append(f"report (table, protocol, plots): {report}")
    retrieval = _retrieval(ws, cfg, city, names)
    if retrieval is not None:
        md = retrieval_markdown(retrieval).splitlines()
        lines += ["", *md[:9], f"per subcategory: {ws.path('queries/retrieval-eval/retrieval.md')}"]
    swept = _sweep(workspace, cfg, names) if ws.is_local else None
    if not ws.is_local and "evaluate" in names and cfg.sweep.lam:
        log.warning("[demo] the λ study is skipped: sweeps need a local workspace (their "
                    "points link the parent's stores)")
    if swept is not None:
        md = [ln for ln in swept["markdown"].splitlines() if not ln.startswith("![")]
        lines += ["", *md[2:], f"sweep report and plots: "
                  f"{os.path.join(workspace, 'sweeps', swept['name'], 'sweep.md')}"]
    lines.append(f"workspace: {workspace}")
    return {"workspace": workspace, "results": results, "city": city,
            "retrieval": retrieval, "sweep": swept, "summary": "\n".join(lines)}


def _sweep(workspace: str, cfg: Any, names: list[str]) -> dict | None:
    """The demo's small sensitivity study (``sweep:`` in demo.yaml; ``--set
    'sweep.lam=[]'`` skips it) once the pipeline has run through evaluate."""
    from .sweep import plan_points, sweep

    if "evaluate" not in names or not plan_points(cfg.sweep):
        return None
    return sweep(workspace)


def _remote_city(url: str, synth: Any) -> dict[str, str]:
    import tempfile

    import fsspec

    from .synthetic.io import city_paths

    fs, root = fsspec.core.url_to_fs(url)
    remote = {k: f"{url.rstrip('/')}/{os.path.basename(p) if k != 'ae_tiles' else 'ae/*.tif'}"
              for k, p in city_paths("/").items()}
    try:
        meta = json.loads(fs.cat_file(f"{root}/city.json"))
        if meta.get("config") == synth.model_dump(mode="json"):
            log.info(f"[demo] synthetic city: {url} (already written for this config)")
            return remote
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory(prefix="aether-city-") as tmp:
        _city(tmp, synth)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        t0 = time.perf_counter()
        meta_file = city_paths(tmp)["meta"]
        files = [os.path.join(d, f) for d, _, fs_ in os.walk(tmp) for f in fs_
                 if os.path.join(d, f) != meta_file]
        fs.put(files, [f"{root}/{os.path.relpath(f, tmp)}" for f in files])
        fs.put_file(meta_file, f"{root}/city.json")  # last: marks the upload complete
        log.info(f"[demo] synthetic city uploaded to {url} in {time.perf_counter() - t0:.1f} s")
    return remote


def _retrieval(ws: Any, cfg: Any, city: dict[str, str], names: list[str]) -> dict | None:
    """Text retrieval scored against the city's held-out POIs (when the field is there)."""
    from .query.retrieval import evaluate_retrieval

    if "infer" not in names or not ws.exists("field.zarr/aether_chunks.json"):
        return None
    return evaluate_retrieval(ws, cfg, city["pois"], city["pois_heldout"])
