"""Workspace manifests: atomic outputs, skip when current, redo when inputs/config change."""

from __future__ import annotations

import json
import os

import pytest

from aether_scale.workspace import Workspace


def _writer(calls: list, content: str):
    def fn(tmp):
        calls.append(dict(tmp))
        for _name, path in tmp.items():
            os.makedirs(path)
            with open(os.path.join(path, "data.txt"), "w") as f:
                f.write(content)
        return {"rows": 3}

    return fn


def test_stage_runs_then_skips_then_redoes(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("v1")
    ws = Workspace(tmp_path / "ws")
    calls: list = []
    r1 = ws.run_stage("demo", outputs=["out.zarr"], inputs={"src": str(src)},
                      config={"a": 1}, fn=_writer(calls, "x"), log=None)
    assert not r1.skipped and r1.stats == {"rows": 3}
    assert (tmp_path / "ws" / "out.zarr" / "data.txt").read_text() == "x"
    m = json.loads((tmp_path / "ws" / "manifests" / "demo.json").read_text())
    assert m["config"] == {"a": 1} and m["inputs"]["src"]["ref"] == str(src)

    r2 = ws.run_stage("demo", outputs=["out.zarr"], inputs={"src": str(src)},
                      config={"a": 1}, fn=_writer(calls, "y"), log=None)
    assert r2.skipped and len(calls) == 1

    r3 = ws.run_stage("demo", outputs=["out.zarr"], inputs={"src": str(src)},
                      config={"a": 2}, fn=_writer(calls, "z"), log=None)
    assert not r3.skipped and (tmp_path / "ws" / "out.zarr" / "data.txt").read_text() == "z"

    src.write_text("v2")
    r4 = ws.run_stage("demo", outputs=["out.zarr"], inputs={"src": str(src)},
                      config={"a": 2}, fn=_writer(calls, "w"), log=None)
    assert not r4.skipped and len(calls) == 3

    r5 = ws.run_stage("demo", outputs=["out.zarr"], inputs={"src": str(src)},
                      config={"a": 2}, fn=_writer(calls, "w"), force=True, log=None)
    assert not r5.skipped and len(calls) == 4


def test_crash_keeps_old_output_and_leaves_no_temporaries(tmp_path):
    ws = Workspace(tmp_path / "ws")
    calls: list = []
    ws.run_stage("s", outputs=["o"], config={"v": 1}, fn=_writer(calls, "good"), log=None)

    def crash(tmp):
        os.makedirs(tmp["o"])
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        ws.run_stage("s", outputs=["o"], config={"v": 2}, fn=crash, log=None)
    assert (tmp_path / "ws" / "o" / "data.txt").read_text() == "good"
    assert not [p for p in os.listdir(tmp_path / "ws") if p.startswith(".tmp-")]
    # the old manifest still describes the old output (config v=1), so v=1 is still current
    r = ws.run_stage("s", outputs=["o"], config={"v": 1}, fn=_writer(calls, "again"), log=None)
    assert r.skipped


def test_missing_output_is_an_error(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(RuntimeError, match="did not write its output 'o'"):
        ws.run_stage("s", outputs=["o"], fn=lambda tmp: {}, log=None)
    assert ws.manifest("s") is None


def test_deleted_output_reruns(tmp_path):
    ws = Workspace(tmp_path / "ws")
    calls: list = []
    ws.run_stage("s", outputs=["o"], fn=_writer(calls, "a"), log=None)
    import shutil

    shutil.rmtree(tmp_path / "ws" / "o")
    r = ws.run_stage("s", outputs=["o"], fn=_writer(calls, "a"), log=None)
    assert not r.skipped and len(calls) == 2


def test_downstream_stage_reruns_when_upstream_output_changes(tmp_path):
    ws = Workspace(tmp_path / "ws")
    calls: list = []
    ws.run_stage("up", outputs=["a.zarr"], config={"k": 1}, fn=_writer(calls, "1"), log=None)
    down = ws.run_stage("down", outputs=["b.zarr"], inputs={"a": "a.zarr"},
                        fn=_writer(calls, "d"), log=None)
    assert not down.skipped
    assert ws.run_stage("down", outputs=["b.zarr"], inputs={"a": "a.zarr"},
                        fn=_writer(calls, "d"), log=None).skipped
    ws.run_stage("up", outputs=["a.zarr"], config={"k": 2}, fn=_writer(calls, "2"), log=None)
    again = ws.run_stage("down", outputs=["b.zarr"], inputs={"a": "a.zarr"},
                         fn=_writer(calls, "d"), log=None)
    assert not again.skipped


def test_missing_external_input(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        ws.run_stage("s", outputs=["o"], inputs={"t": str(tmp_path / "nope.tif")},
                     fn=lambda tmp: {}, log=None)


def test_fsspec_memory_workspace():
    """Workspaces can be fsspec URLs; the in-memory filesystem stands in for s3:// here."""
    ws = Workspace("memory://aether-test/run")
    assert not ws.is_local

    def fn(tmp):
        with ws.fs.open(tmp["o.txt"], "w") as f:
            f.write("hello")
        return {"n": 1}

    r = ws.run_stage("s", outputs=["o.txt"], fn=fn, log=None)
    assert not r.skipped
    with ws.fs.open(ws.path("o.txt")) as f:
        assert f.read() == b"hello"
    assert ws.run_stage("s", outputs=["o.txt"], fn=fn, log=None).skipped


def test_hand_placed_workspace_entry_is_fingerprinted_by_content(tmp_path):
    """An input put into the workspace by hand (no producing stage) still invalidates on change."""
    ws = Workspace(tmp_path / "ws")
    (tmp_path / "ws" / "ae.zarr").mkdir()
    (tmp_path / "ws" / "ae.zarr" / "c.0").write_text("a")
    calls: list = []
    ws.run_stage("down", outputs=["o"], inputs={"ae": "ae.zarr"}, fn=_writer(calls, "x"), log=None)
    assert ws.run_stage("down", outputs=["o"], inputs={"ae": "ae.zarr"},
                        fn=_writer(calls, "x"), log=None).skipped
    (tmp_path / "ws" / "ae.zarr" / "c.1").write_text("b")
    again = ws.run_stage("down", outputs=["o"], inputs={"ae": "ae.zarr"},
                         fn=_writer(calls, "x"), log=None)
    assert not again.skipped and len(calls) == 2


def test_missing_workspace_input_names_its_workspace_path(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(FileNotFoundError, match=r"ws/triplets\.zarr does not exist"):
        ws.run_stage("train", outputs=["model"], inputs={"t": "triplets.zarr"},
                     fn=lambda tmp: {}, log=None)
