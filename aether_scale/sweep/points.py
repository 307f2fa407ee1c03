"""The points of a sweep: one config override set each, named for its folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import SweepSection

__all__ = ["POINT_FIXED", "Point", "plan_points"]

#: what every point changes besides its own setting: one model (no train.variants), no
#: trained or POI-only baselines, no plots — a point is AETHER at that setting against AE
POINT_FIXED: dict[str, Any] = {"train.variants": {}, "baselines.methods": [],
                               "evaluate.baselines": [], "evaluate.plots": False,
                               "cluster.kind": "threads"}


@dataclass(frozen=True)
class Point:
    """One sweep point: ``study`` (``lam``, ``radii``, ``train_fraction`` or ``points``),
    its ``value`` and the config ``overrides`` (dotted keys) that make it."""

    id: str
    study: str
    value: Any
    overrides: dict[str, Any] = field(default_factory=dict)


def _num(v: float) -> str:
    return f"{v:g}"


def plan_points(sw: SweepSection) -> list[Point]:
    """Every point of the sweep, in study order; ids are unique folder names."""
    pts = [Point(f"lam-{_num(v)}", "lam", float(v), {"train.lam": float(v)}) for v in sw.lam]
    for rb, ra in sw.radii:
        pts.append(Point(f"radii-{_num(rb)}-{_num(ra)}", "radii", [float(rb), float(ra)], {
            "pool.base": {"shape": "circle", "radius_m": float(rb)},
            "pool.aug": {"shape": "circle", "radius_m": float(ra)}}))
    pts += [Point(f"fraction-{_num(v)}", "train_fraction", float(v),
                  {"train.train_fraction": float(v)}) for v in sw.train_fraction]
    pts += [Point(f"point-{n}", "points", n, dict(o)) for n, o in sw.points.items()]
    ids = [p.id for p in pts]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"sweep: points {dup} appear twice; list each value once")
    return pts
