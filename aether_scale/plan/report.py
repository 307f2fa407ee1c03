"""The plan as a readable table (plain text, Markdown) or JSON."""

from __future__ import annotations

from typing import Any

from .estimate import Plan

__all__ = ["fmt_bytes", "fmt_seconds", "markdown", "text"]


def fmt_bytes(n: float | None, *, binary: bool = False) -> str:
    if n is None:
        return "—"
    base, units = (1024.0, ("B", "KiB", "MiB", "GiB", "TiB", "PiB")) if binary else (
        1000.0, ("B", "kB", "MB", "GB", "TB", "PB"))
    v = float(n)
    for u in units:
        if abs(v) < base or u == units[-1]:
            return f"{v:,.0f} {u}" if u == "B" or v >= 100 else f"{v:,.1f} {u}"
        v /= base
    return f"{v:,.1f} {units[-1]}"  # pragma: no cover


def fmt_seconds(s: float) -> str:
    if s < 0.05:
        return "0 s"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400 * 2:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def fmt_hours(h: float) -> str:
    if h == 0:
        return "—"
    if h < 0.01:
        return f"{h * 3600:.1f} s"
    return f"{h:,.2f}" if h < 100 else f"{h:,.0f}"


def _rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    unit = "GPU worker" if plan.gpu else "worker"
    head = ["stage", "chunks", "tasks", "read", "written", f"mem/{unit}", "worker-h",
            "serial"] + [f"wall N={n}" for n in plan.workers]
    rows = []
    for s in plan.stages:
        rows.append([
            s.stage, f"{s.chunks:,}" if s.chunks else "—", f"{s.tasks:,}" if s.tasks else "—",
            fmt_bytes(s.bytes_read), fmt_bytes(s.bytes_written),
            fmt_bytes(s.memory_per_worker, binary=True) if s.memory_per_worker else "client",
            fmt_hours(s.worker_hours(plan.cal, plan.tpw)),
            fmt_seconds(s.serial_s) if s.serial_s else "—",
            *(fmt_seconds(s.wall(plan.cal, n, plan.tpw)) for n in plan.workers)])
    rows.append(["total", f"{sum(s.chunks for s in plan.stages):,}",
                 f"{sum(s.tasks for s in plan.stages):,}",
                 fmt_bytes(sum(s.bytes_read for s in plan.stages)),
                 fmt_bytes(sum(s.bytes_written for s in plan.stages)), "",
                 fmt_hours(plan.worker_hours()),
                 fmt_seconds(sum(s.serial_s for s in plan.stages)),
                 *(fmt_seconds(plan.wall(n)) for n in plan.workers)])
    return head, rows


def _header(plan: Plan) -> list[str]:
    g, p, lab = plan.inputs.grid, plan.inputs.pois, plan.inputs.labels
    mode = "GPU (one GPU per worker; train on one GPU)" if plan.gpu else "CPU"
    lim = (f", memory_limit {fmt_bytes(plan.memory_limit, binary=True)}"
           if plan.memory_limit else "")
    return [
        f"grid: {g.width:,} × {g.height:,} px ({g.pixels / 1e9:,.3g} billion) in {g.crs} at "
        f"{g.resolution:g} m; {g.n_chunks:,} chunks of {g.chunk_px} px; data "
        f"{g.data_pixels:,} px ≈ {g.area_km2:,.0f} km², "
        f"{fmt_bytes(g.data_pixels * 64)} int8 AE — from {g.source}",
        f"POIs: {p.rows:,} ({p.count_source}); labels: {lab.luc:,} LUC points, "
        f"{lab.sdm:,} SDM units",
        f"cluster: {plan.cluster_kind}, {plan.tpw} thread(s) per worker{lim}, {mode}; client "
        f"{plan.client_cores} core(s); cluster start {fmt_seconds(plan.cluster_start_s)}",
    ]


def _figures(plan: Plan) -> list[str]:
    used: list[str] = []
    for s in plan.stages:
        used += [f for f in s.figures if f not in used]
    used += [f for f in ("task_overhead_s", "scheduler_s") if f not in used]
    if plan.cluster_kind in ("gateway", "address"):
        used.append("remote_cluster_start_s")
    elif plan.cluster_kind in ("local", "cuda"):
        used.append("cluster_start_s")
    out = []
    for k in used:
        f = plan.cal.figures[k]
        v = f"{f.value:,.4g}"
        out.append(f"  {k} = {v} {f.unit}  [{f.kind}: {f.source}]")
    return out


def text(plan: Plan) -> str:
    """The plan as an aligned plain-text table with its inputs, figures and notes."""
    head, rows = _rows(plan)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    out = _header(plan) + ["", line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:-1]] + [line(["-" * w for w in widths]), line(rows[-1])]
    out += ["", "outputs: " + "; ".join(f"{k} {fmt_bytes(v)}" for s in plan.stages
                                        for k, v in s.outputs.items())]
    out += [f"serial floor (no number of workers goes below it): "
            f"{fmt_seconds(plan.serial_floor())}"]
    out += ["", "notes:"]
    for s in plan.stages:
        for n in s.notes:
            out.append(f"  {s.stage}: {n}")
        if s.memory_per_worker:
            out.append(f"  {s.stage}: memory = {s.memory_note}")
    out += [f"  {n}" for n in plan.notes]
    kinds = plan.cal.kinds()
    src = f"calibration file {plan.cal.path}" if plan.cal.path else "no calibration file"
    out += ["", f"figures ({src}; run `aether-scale plan --calibrate` to measure this machine; "
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + " in all):"]
    out += _figures(plan)
    return "\n".join(out)


def markdown(plan: Plan) -> str:
    """The table as Markdown (for a README)."""
    head, rows = _rows(plan)
    right = ["---"] + ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(right) + "|"]
    for r in rows[:-1]:
        lines.append("| " + " | ".join(r) + " |")
    lines.append("| " + " | ".join(f"**{c}**" if c else "" for c in rows[-1]) + " |")
    return "\n".join(lines)


def summary(plan: Plan) -> dict[str, Any]:
    return {"worker_hours": plan.worker_hours(),
            "wall_s": {n: plan.wall(n) for n in plan.workers}}
