"""``aether-scale plan``: what a run will cost, before anything runs.

From the run config — tile headers or a tile index, POI and label metadata (never their
rows, except a bounded sample to count distinct descriptions) — and throughput figures
measured on this machine, print per stage: chunks, tasks, bytes read and written, memory
per worker, worker-hours, wall time on N workers and output sizes::

    aether-scale plan -c london                         # the config's tiles and POIs
    aether-scale plan -w demo-out                       # a workspace's saved config
    aether-scale plan -c national --area-km2 230000 --pois 4000000 \\
        --luc-points 100000 --sdm-units 42000 --workers 1,8,64 [--gpu]
    aether-scale plan --calibrate                       # measure this machine (≈1 min)

Figures come from a calibration file (``--calibrate`` writes it), else
``benchmarks/results/*.json``, else documented defaults; GPU figures are stated
assumptions. Each printed figure says which. Modules: :mod:`.inputs` (what the plan
reads), :mod:`.calibration` (the figures), :mod:`.estimate` (the cost model),
:mod:`.report` (table and JSON).
"""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from .calibration import DEFAULT_PATH, Calibration, calibrate, load_calibration
from .estimate import Plan, StageEstimate, cluster_shape, estimate
from .inputs import PlanInputs, SyntheticInputs, read_inputs
from .report import markdown, text

__all__ = ["DEFAULT_PATH", "Calibration", "Plan", "PlanInputs", "StageEstimate",
           "SyntheticInputs", "calibrate", "cluster_shape", "estimate", "load_calibration",
           "make_plan", "markdown", "read_inputs", "text"]


def make_plan(cfg: RunConfig, *, synthetic: SyntheticInputs | None = None,
              calibration: str | None = None, workers: list[int] | None = None,
              gpu: bool = False, threads_per_worker: int | None = None,
              client_cores: int | None = None, benchmarks: bool = True,
              default_calibration: bool = True) -> Plan:
    """The plan of every stage of ``cfg`` (see the module docstring). ``calibration``: a
    calibration JSON (default: ``~/.cache/aether_scale/calibration.json`` when it exists
    and ``default_calibration``); ``benchmarks``: use ``benchmarks/results`` where no
    calibration file is used."""
    inp = read_inputs(cfg, synthetic)
    cal = load_calibration(calibration, benchmarks=benchmarks,
                           default_file=default_calibration)
    if not workers:
        workers = [cluster_shape(cfg)[0]]
    return estimate(cfg, inp, cal, workers=list(workers), gpu=gpu, tpw=threads_per_worker,
                    client_cores=client_cores)


def plan_json(plan: Plan) -> dict[str, Any]:
    return plan.to_json()
