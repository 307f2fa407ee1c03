"""``aether-scale status``: each stage current, stale (and why) or missing, without running."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from ..workspace import Workspace, output_fingerprint
from .keys import available, flatten, plan
from .registry import STAGES, artifact_of, is_complete

__all__ = ["StageStatus", "status"]

@dataclass
class StageStatus:
    """``state``: ``current``, ``stale`` (``why`` lists the reasons), ``missing`` (never
    run, or its outputs are gone) or ``blocked`` (an input is missing upstream)."""

    stage: str
    state: str
    why: list[str]
    outputs: list[str]


def _config_changes(old: Mapping[str, Any], new: Mapping[str, Any], section: str) -> list[str]:
    a, b = flatten(dict(old)), flatten(dict(new))
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{section}.{k} changed: {a.get(k, 'unset')!r} → {b.get(k, 'unset')!r}")
    return out


def status(ws: Workspace, cfg: RunConfig) -> list[StageStatus]:
    """Each stage's state against ``cfg``, as a run would see it: a stale stage makes
    everything that reads its outputs stale too (their inputs would change), with the
    upstream cause named."""
    avail = available(ws)
    result: list[StageStatus] = []
    cause: dict[str, str] = {}  # entry name → the upstream reason it will change
    for st in STAGES:
        try:
            p = plan(st, ws, cfg, avail)
        except (FileNotFoundError, ValueError) as e:
            result.append(StageStatus(st.name, "blocked", [str(e)], []))
            continue
        if p.missing:
            result.append(StageStatus(st.name, "blocked",
                                      [f"needs {', '.join(p.missing)}"], p.outputs))
            continue
        m = ws.manifest(st.name)
        own: list[str] = []       # reasons of this stage itself
        inherited: list[str] = []  # inputs that an upstream rerun will change
        if m is None:
            state = "missing"
            own.append("never run here")
        elif m.get("key") == p.key and all(is_complete(ws, n) for n in p.outputs):
            state = "current"
        else:
            complete = all(is_complete(ws, n) for n in m.get("outputs", []))
            state = "stale" if complete else "missing"
            if not complete:
                own.append("an output is missing or incomplete")
            own += _config_changes(m.get("config", {}), p.config, st.section)
            old_in = m.get("inputs", {})
            for label, inp in p.inputs.items():
                prev = old_in.get(label, {}).get("fingerprint")
                if label in cause:
                    inherited.append(f"input {label} will change ({cause[label]})")
                elif prev != inp.fingerprint:
                    own.append(f"input {label} changed" if prev else f"new input {label}")
            own += [f"input {label} is gone" for label in old_in if label not in p.inputs]
            if sorted(m.get("outputs", [])) != sorted(p.outputs):
                own.append(f"outputs change: {m.get('outputs')} → {p.outputs}")
            if not own and not inherited:
                own.append("stage format changed (a new version of aether_scale)")
        if state != "current":
            root = f"{st.name} is {state}: {own[0]}" if own else inherited[0].split("(", 1)[1][:-1]
            for n in p.outputs:
                cause[n] = root
        # downstream stages see this stage's outputs as they would be after a run
        for kind in st.writes:
            avail[kind] = [(n, output_fingerprint(p.key, n)) for n in p.outputs
                           if artifact_of(n) and artifact_of(n)[0].name == kind]
        result.append(StageStatus(st.name, state, own + inherited, p.outputs))
    return result
