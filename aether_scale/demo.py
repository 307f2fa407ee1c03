"""``aether-scale demo``: the synthetic city through every stage on a LocalCluster."""

from __future__ import annotations

import os
import time
from typing import Any

from .config import deep_merge, load_config

# The demo's own defaults: small enough for a few minutes on 2 cores, with
# memory-limited worker processes so the out-of-core paths really run.
DEMO_DEFAULTS: dict[str, Any] = {
    "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB"},
    "train": {"epochs": 30},
    "evaluate": {"seeds": [0, 1, 2, 3, 4]},
}


def demo_config_data(city: dict[str, str]) -> dict[str, Any]:
    """Config sections that point the stages at the synthetic city's files."""
    return {
        "ingest": {"tiles": [city["ae_tiles"]]},
        "pois": {
            "sources": [
                {
                    "path": city["pois"],
                    "columns": {
                        "id": "poi_id",
                        "name": "name",
                        "category": "category",
                        "subcategory": "subcategory",
                    },
                }
            ]
        },
        "regions": {
            "luc_points": city["luc_points"],
            "sdm_units": city["sdm_units"],
            "sdm_id": "unit_id",
        },
    }


def run_demo(
    workspace: str | None = None,
    *,
    config: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    stages: list[str] | None = None,
) -> dict[str, Any]:
    """Write the synthetic city into ``workspace/city`` and run the stages on it.

    Returns ``{"workspace": ..., "results": [StageResult, ...]}``.
    """
    from .cli import STAGES, run_stages
    from .synthetic import write_city

    workspace = workspace or os.path.abspath("demo-out")
    t0 = time.perf_counter()
    base = load_config(config, overrides, data=DEMO_DEFAULTS)
    city_dir = os.path.join(workspace, "city")
    city = write_city(city_dir, base.synth)
    data = demo_config_data(city)
    cfg = load_config(config, overrides, data=deep_merge(DEMO_DEFAULTS, data))
    names = stages or available_stages(STAGES)
    results = run_stages(names, workspace, cfg, force=force)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; stages run: {', '.join(names)}")
    print(f"workspace: {workspace}")
    report = os.path.join(workspace, "report", "report.md")
    if os.path.exists(report):
        print(f"report (table, protocol, plots): {report}")
    return {"workspace": workspace, "results": results, "city": city}


def available_stages(stages: dict[str, tuple[str, str]]) -> list[str]:
    """Stages whose implementing module exists in this installation, in data-flow order."""
    import importlib.util

    return [n for n, (t, _) in stages.items() if importlib.util.find_spec(t.split(":")[0])]

