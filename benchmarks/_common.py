"""Shared benchmark helpers: peak RSS of a process tree, machine info, result JSON.

Small, stable API used by every ``benchmarks/bench_<stage>.py``::

    from _common import PeakRSS, machine_info, write_result

    with PeakRSS() as rss:          # samples this process + all its children
        run_the_thing()             # (dask worker processes included)
    print(rss.peak_mb)

    write_result("ingest", {"machine": machine_info(), "peak_rss_mb": rss.peak_mb, ...})
    # → benchmarks/results/ingest.json

Why a sampler thread: ``resource.getrusage`` only reports the largest single
process (and children only once they have exited), while a LocalCluster's
memory lives in several live worker processes; the sum over the tree at each
moment is what has to fit in the machine.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["PeakRSS", "machine_info", "write_result", "RESULTS_DIR", "add_reference_argument",
           "reference_origin", "fallback_origin", "ratio_row", "REFERENCE_REPO", "cli_argv"]

REFERENCE_REPO = "inwind0212/AETHER"


def _tree_rss(root: psutil.Process) -> tuple[int, int]:
    """(RSS of ``root`` + all live descendants, number of processes) in bytes."""
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.Error:
        pass
    total = 0
    n = 0
    for p in procs:
        try:
            total += p.memory_info().rss
            n += 1
        except psutil.Error:  # exited between listing and reading
            continue
    return total, n


class PeakRSS:
    """Context manager: peak resident memory of a process tree, sampled in a thread.

    ``pid`` defaults to the current process; every descendant (multiprocessing,
    dask worker "nanny" and worker processes, subprocesses) is included at each
    sample. Attributes after (or during) the block:

    - ``peak_mb``: largest total RSS seen over the tree, in MiB
    - ``peak_self_mb``: largest RSS of the root process alone, in MiB
    - ``baseline_mb``: tree RSS when the block started, in MiB
    - ``max_processes``: most processes seen in the tree at once
    - ``samples``: number of samples taken

    The sampling interval (default 0.05 s) bounds how short a spike can be and
    still be seen; a final sample is taken on exit.
    """

    def __init__(self, pid: int | None = None, *, interval: float = 0.05) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.interval = interval
        self.peak_mb = 0.0
        self.peak_self_mb = 0.0
        self.baseline_mb = 0.0
        self.max_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process(self.pid)

    def _sample(self) -> None:
        total, n = _tree_rss(self._proc)
        try:
            own = self._proc.memory_info().rss
        except psutil.Error:
            own = 0
        self.peak_mb = max(self.peak_mb, total / 2**20)
        self.peak_self_mb = max(self.peak_self_mb, own / 2**20)
        self.max_processes = max(self.max_processes, n)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        total, _ = _tree_rss(self._proc)
        self.baseline_mb = total / 2**20
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="PeakRSS", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def as_dict(self) -> dict[str, Any]:
        """The measurements as a JSON-able dict (MiB values rounded to 0.1)."""
        return {
            "peak_rss_mb": round(self.peak_mb, 1),
            "peak_rss_self_mb": round(self.peak_self_mb, 1),
            "baseline_rss_mb": round(self.baseline_mb, 1),
            "max_processes": self.max_processes,
            "rss_samples": self.samples,
        }


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: CPU, cores, RAM, OS, Python and key library versions."""
    vm = psutil.virtual_memory()
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu": _cpu_features(),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gb": round(vm.total / 2**30, 2),
        "memory_available_gb": round(vm.available / 2**30, 2),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    versions: dict[str, str] = {}
    for mod in ("numpy", "dask", "distributed", "xarray", "zarr", "rasterio", "torch"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except Exception:
                continue
        versions[mod] = str(getattr(m, "__version__", "?"))
    info["versions"] = versions
    return info


def _cpu_features() -> dict[str, Any]:
    """The CPU's family/model and the vector extensions the kernels' speed depends on
    (one VM name, e.g. "AMD EPYC", covers machines from AVX2-only to AVX-512 + BF16)."""
    out: dict[str, Any] = {}
    fields = _cpuinfo()
    if not fields:
        return out
    for k in ("vendor_id", "cpu family", "model", "stepping"):
        if k in fields:
            out[k.replace(" ", "_")] = fields[k]
    flags = set(fields.get("flags", "").split())
    out["flags"] = sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                   "amx_bf16", "amx_tile", "f16c"})
    try:
        import torch

        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - torch absent or too old
        pass
    return out


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown"


def cli_argv() -> list[str]:
    """The ``aether-scale`` console script of this interpreter's environment (what a user
    runs), or ``python -m aether_scale.cli`` where the script is not installed."""
    exe = Path(sys.executable).with_name("aether-scale")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "aether_scale.cli"]


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` as ``benchmarks/results/<name>.json`` (atomic) and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# Baselines: the reference's own code from a checkout, or a labelled fallback
# ---------------------------------------------------------------------------

def add_reference_argument(ap: Any) -> None:
    """``--reference PATH``: a checkout of github inwind0212/AETHER (default ``$AETHER_REFERENCE``).

    Its scripts run unmodified as the baseline; without a checkout the benchmark
    falls back to its own re-implementation and says so in the JSON.
    """
    ap.add_argument(
        "--reference", default=os.environ.get("AETHER_REFERENCE") or None, metavar="PATH",
        help="checkout of github.com/inwind0212/AETHER whose scripts are the baseline "
             "(default $AETHER_REFERENCE; without one a labelled re-implementation is used)")


def reference_origin(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Where the baseline came from: the checkout's path and commit (an error if it is not one)."""
    import subprocess

    root = Path(path).expanduser().resolve()
    missing = [f for f in ("dataio.py", "model.py", "train.py", "infer_aether_raster.py")
               if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"--reference {root}: not a checkout of github.com/{REFERENCE_REPO} "
                         f"(missing {', '.join(missing)}); clone it, e.g. "
                         f"git clone https://github.com/{REFERENCE_REPO} {root}")
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                     "--untracked-files=no"], check=True, capture_output=True,
                                    text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass  # an export without .git: the path is recorded, the commit is unknown
    return {"kind": "reference", "repo": REFERENCE_REPO, "path": str(root),
            "commit": commit, "modified": dirty}


def fallback_origin(where: str, what: str) -> dict[str, Any]:
    """A re-implementation used because no reference checkout was given (labelled as such)."""
    return {"kind": "fallback", "repo": REFERENCE_REPO, "where": where,
            "note": f"re-implementation of the reference's {what} in {where}; "
                    "pass --reference PATH to time the reference's own code"}


def ratio_row(*, stage: str, metric: str, ours: float, baseline: float | None, unit: str,
              baseline_name: str, origin: dict[str, Any], higher_is_better: bool = True,
              required: float | None = None, goal: float | None = None,
              target: tuple[str, float] | None = None,
              ours_what: str = "", command: str = "") -> dict[str, Any]:
    """One line of a benchmark's ``summary``: ours vs a baseline measured in the same run.

    ``ratio`` is always "times better than the baseline" (ours/baseline for rates,
    baseline/ours for seconds). ``required`` / ``goal`` are thresholds on the
    ratio when given; ``meets_required`` says whether this run met it.
    """
    ratio = None
    if baseline not in (None, 0) and ours not in (None, 0):
        ratio = (ours / baseline) if higher_is_better else (baseline / ours)
        ratio = round(float(ratio), 3)
    return {
        "stage": stage, "metric": metric, "unit": unit,
        "ours": ours, "ours_what": ours_what, "baseline": baseline,
        "baseline_name": baseline_name, "baseline_kind": origin.get("kind"),
        "baseline_commit": origin.get("commit"),
        "higher_is_better": higher_is_better, "ratio": ratio,
        "required": required, "goal": goal,
        "meets_required": None if (required is None or ratio is None) else bool(ratio >= required),
        "target": None if target is None else f"{target[0]} {target[1]}",
        "meets_target": None if target is None or ours is None else bool(
            ours <= target[1] if target[0] == "<=" else ours >= target[1]),
        "command": command,
    }
