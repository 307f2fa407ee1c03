"""The README's benchmark table is the one ``benchmarks/results/*.json`` gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_generated_from_the_results_json():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_summary_row_names_its_baseline_and_ratio():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    rows = report.rows()
    assert {r["stage"] for _, _, r in rows} >= {"infer"}
    for stem, machine, r in rows:
        assert machine, f"{stem}.json has no machine info"
        assert r["baseline_kind"] in {"reference", "fallback", "floor", "library",
                                      "plain sequential copy", "tuned sequential copy", "ours"}, (stem, r)
        if r["baseline_kind"] == "reference":
            assert r["baseline_commit"], f"{stem}: a reference baseline without its commit"
        if r["ratio"] is not None and r["required"] is not None:
            assert r["meets_required"] == (r["ratio"] >= r["required"])
