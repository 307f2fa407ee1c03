"""The README's benchmark table, generated from ``benchmarks/results/*.json``.

Every benchmark writes a ``summary`` list of rows (:func:`_common.ratio_row`): ours,
the baseline measured in the same run, where the baseline came from (the
reference's own code at a commit, another library, or a labelled fallback
re-implementation), the ratio and the required / goal ratios. This script renders
those rows as one Markdown table and puts it between the README's
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` markers, so the README's numbers
are exactly the JSON's::

    python benchmarks/report.py           # rewrite the README's table
    python benchmarks/report.py --check   # exit 1 when the README is not the JSON's table

``tests/test_bench_report.py`` runs the check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ORDER = ["ingest", "text", "pool", "train", "infer"]


def _num(v: Any, unit: str) -> str:
    if v is None:
        return "–"
    if unit == "fraction":
        return f"{float(v):.0%}"
    v = float(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def _load(v: Any) -> str:
    return "?" if v is None else f"{float(v):.1f}"


def _cpu(machine: dict[str, Any]) -> str:
    """The CPU as the kernels see it: one VM name ("AMD EPYC") covers hosts from AVX2-only to
    AVX-512 with bf16, so the family/model and the widest vector extension are named."""
    cpu = machine.get("cpu") or {}
    name = str(machine.get("processor", "?"))
    if not cpu.get("cpu_family"):
        return name
    flags = set(cpu.get("flags") or [])
    isa = ("AMX" if "amx_bf16" in flags else "AVX-512 + BF16" if "avx512_bf16" in flags
           else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    return f"{name}, family {cpu['cpu_family']} model {cpu.get('model', '?')}, {isa}"


def _origin(row: dict[str, Any]) -> str:
    kind, commit = row.get("baseline_kind"), row.get("baseline_commit")
    if kind == "reference":
        return f"reference @ `{commit[:7]}`" if commit else "reference (commit unknown)"
    if kind == "fallback":
        return "**fallback re-implementation**"
    return str(kind or "")


def rows() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(benchmark file stem, its JSON's machine, row) for every summary row, in stage order."""
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        for row in data.get("summary") or []:
            if isinstance(row, dict) and "ratio" in row and "stage" in row:
                out.append((path.stem, data.get("machine") or {}, row))
    rank = {s: i for i, s in enumerate(ORDER)}
    return sorted(out, key=lambda t: (rank.get(t[2]["stage"], len(ORDER)), t[0]))


def render() -> str:
    """The Markdown table (with a line saying where and when each file was measured)."""
    lines = [
        "| stage | measured | ours | baseline (same run) | baseline from | ratio | required / goal |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    machines: dict[str, str] = {}
    for stem, machine, r in rows():
        unit = r.get("unit", "")
        ratio = r.get("ratio")
        need = r.get("required")
        met = r.get("meets_required")
        req = ("" if need is None else
               f"≥ {_num(need, unit if unit == 'fraction' else '')}"
               + ("" if unit == "fraction" else "×")
               + (f" / {_num(r['goal'], '')}×" if r.get("goal") else "")
               + ("" if met is None else (" ✅" if met else " ❌ not met")))
        if r.get("target"):
            op, val = r["target"].split()
            req += ("; " if req else "") + f"ours {op.replace('<=', '≤').replace('>=', '≥')} " \
                f"{_num(float(val), unit)} {unit}" + (" ✅" if r.get("meets_target") else " ❌ not met")
        req = req or "–"
        ratio_s = "–" if ratio is None else (
            f"{_num(ratio, 'fraction')}" if unit == "fraction" else f"{ratio:.2f}×")
        ours = _num(r.get("ours"), unit) + ("" if unit in ("fraction", "") else f" {unit}")
        base = ("–" if unit == "fraction" else
                _num(r.get("baseline"), unit) + ("" if not unit else f" {unit}"))
        what = r["metric"] + (f" ({r['ours_what']})" if r.get("ours_what") else "")
        base_name = r.get("baseline_name", "")
        lines.append(f"| {r['stage']} (`{stem}`) | {what} | {ours} | {base}: {base_name} | "
                     f"{_origin(r)} | {ratio_s} | {req} |")
        m = machine
        machines[stem] = (f"`{stem}.json`: {m.get('time_utc', '?')}, "
                          f"{m.get('cpu_affinity') or m.get('cpu_count_logical', '?')} cores "
                          f"({_cpu(m)}), load {_load(m.get('load_avg_1m'))}")
    lines.append("")
    lines.append("Measured: " + "; ".join(machines[k] for k in sorted(machines)) + ".")
    return "\n".join(lines)


def splice(readme: str, table: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{README}: no {BEGIN} … {END} block to put the table in")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="only check that the README holds the JSON's table")
    args = ap.parse_args()
    text = README.read_text()
    new = splice(text, render())
    if args.check:
        if new != text:
            print("README.md's benchmark table is not the one benchmarks/results/*.json gives; "
                  "run: python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"{README}: {len(rows())} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
