"""Logging and progress: what a person sees on a terminal and finds in a log file.

The library logs through :mod:`logging` (loggers under ``aether_scale``) and never
prints; the CLI calls :func:`setup` once. Every record is one or more lines of at most
:data:`MAX_LINE` characters (longer messages, tracebacks included, are wrapped), so
``aether-scale demo > log.txt 2>&1`` stays readable.

:class:`Progress` reports long work: a live bar (rich) when stderr is a terminal, else
one line every :data:`PROGRESS_EVERY_S` seconds — ``[infer] 12/64 chunks (19 %),
3.2 chunks/s, ETA 16 s`` — and a last line when the work ends. Nothing writes carriage
returns into a log file.
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import time
import warnings
from types import TracebackType
from typing import Any

__all__ = ["MAX_LINE", "Progress", "get_logger", "setup"]

MAX_LINE = 300
PROGRESS_EVERY_S = float(os.environ.get("AETHER_SCALE_PROGRESS_S", "10"))
_NOISY = ("distributed", "bokeh", "tornado", "fsspec", "asyncio", "urllib3", "botocore",
          "aiobotocore", "s3fs", "numexpr", "sentence_transformers", "transformers", "filelock",
          "matplotlib", "PIL", "rasterio", "fiona", "pyogrio", "numba", "h5py")


_VERBOSITY = [0]


def verbosity() -> int:
    """What :func:`setup` was given (0 when it was not called)."""
    return _VERBOSITY[0]


def get_logger(name: str) -> logging.Logger:
    """The library logger for ``name`` (``"ingest"`` → ``aether_scale.ingest``)."""
    return logging.getLogger(name if name.startswith("aether_scale") else f"aether_scale.{name}")


class _WrappingFormatter(logging.Formatter):
    """``message`` (and any traceback) as lines of at most :data:`MAX_LINE` characters."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        out: list[str] = []
        for line in text.splitlines() or [""]:
            if len(line) <= MAX_LINE:
                out.append(line)
            else:
                out += textwrap.wrap(line, MAX_LINE, subsequent_indent="    ",
                                     break_long_words=True, break_on_hyphens=False)
        return "\n".join(out)


def setup(verbosity: int = 0, *, stream: Any = None) -> None:
    """Configure logging for the CLI: ``-1`` quiet (warnings and errors), ``0`` stage
    progress and summaries, ``1`` debug detail, ``2`` also the libraries' own logs.

    Messages go to ``stream`` (default stderr); Python warnings are logged too, so they
    obey the same line limit.
    """
    _VERBOSITY[0] = verbosity
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_WrappingFormatter("%(message)s"))
    if verbosity < 2:  # other libraries (distributed sets its loggers to INFO on import)
        handler.addFilter(lambda r: r.levelno >= logging.WARNING
                          or r.name.startswith("aether_scale"))
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_aether_scale", False):
            root.removeHandler(h)
    handler._aether_scale = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbosity < 2 else logging.INFO)
    logging.getLogger("aether_scale").setLevel(level)
    for name in _NOISY:  # third-party INFO chatter only at -vv; their warnings always show
        logging.getLogger(name).setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
    for name in ("distributed", "bokeh", "tornado"):  # distributed attaches its own handlers
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    if verbosity < 2:  # worker processes log on their own stderr: only their errors
        import dask

        dask.config.set({"logging": {"distributed": "error", "distributed.client": "error",
                                     "bokeh": "error", "tornado": "critical",
                                     "tornado.application": "error"}})
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    for msg in (".*[Cc]onsolidated metadata.*", ".*get_sentence_embedding_dimension.*",
                ".*is not recognized as a component of a Zarr hierarchy.*",
                ".*Sending large graph.*", ".*TypedStorage is deprecated.*"):
        warnings.filterwarnings("ignore", message=msg)
    for cat in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=cat)


def _fmt_s(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


class Progress:
    """Progress of ``total`` units of work of one stage.

    ``with Progress(log, "infer", 64, "chunks") as p: ... p.advance()``. On a terminal
    (stderr is a TTY and the logger would show INFO) a live rich bar; otherwise one log
    line every ``every_s`` seconds and one at the end, each with done/total, rate and
    ETA. ``done`` may start above zero (resumed work): the rate counts only new work.
    """

    def __init__(self, log: logging.Logger, label: str, total: int, unit: str = "chunks", *,
                 done: int = 0, every_s: float | None = None) -> None:
        self.log, self.label, self.total, self.unit = log, label, int(total), unit
        self.done = self._start_done = int(done)
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self._t0 = self._last = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if (self.total > 0 and sys.stderr.isatty() and self.log.isEnabledFor(logging.INFO)
                and os.environ.get("AETHER_SCALE_NO_BAR") != "1"):
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn(f"[{self.label}]"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn(self.unit),
                                     TimeRemainingColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done)
        return self

    def line(self) -> str:
        """``12/64 chunks (19 %), 3.2 chunks/s, ETA 16 s``."""
        dt = max(time.monotonic() - self._t0, 1e-9)
        new = self.done - self._start_done
        rate = new / dt
        pct = 100.0 * self.done / self.total if self.total else 100.0
        s = f"{self.done:,}/{self.total:,} {self.unit} ({pct:.0f} %)"
        if new and self.done < self.total:
            s += f", {rate:,.1f} {self.unit}/s, ETA {_fmt_s((self.total - self.done) / rate)}"
        elif new:
            s += f" in {_fmt_s(dt)}"
        return s

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s and self.done < self.total:
            self._last = now
            self.log.info(f"[{self.label}] {self.line()}")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
        if exc_type is None and self.total and self.done > self._start_done:
            self.log.info(f"[{self.label}] {self.line()}")
