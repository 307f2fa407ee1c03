"""Workspace manifests: atomic outputs, skip when current, redo when inputs/config change."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from aether_scale.workspace import Workspace, fingerprint_path, stable_hash


def _key(stage: str, outputs: list[str], *, config=None, inputs=None) -> str:
    """What a caller of ``run_stage`` hashes: stage, config, inputs' fingerprints, outputs."""
    return stable_hash({"stage": stage, "config": config, "inputs": dict(inputs or {}),
                        "outputs": list(outputs)})


def _writer(calls: list, content: str):
    def fn(work):
        calls.append(dict(work.outputs))
        for _name, path in work.outputs.items():
            os.makedirs(path)
            with open(os.path.join(path, "data.txt"), "w") as f:
                f.write(content)
        return {"rows": 3}

    return fn


def _work_entries(ws_dir) -> list[str]:
    w = ws_dir / ".work"
    return sorted(os.listdir(w)) if w.exists() else []


def test_stage_runs_then_skips_then_redoes(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("v1")
    ws = Workspace(tmp_path / "ws")
    calls: list = []

    def run(config, fn, **kw):
        fp = fingerprint_path(str(src))
        key = _key("demo", ["out.zarr"], config=config, inputs={"src": fp})
        rec = {"config": config, "inputs": {"src": {"ref": str(src), "fingerprint": fp}}}
        return ws.run_stage("demo", key=key, outputs=["out.zarr"], fn=fn, record=rec, **kw)

    r1 = run({"a": 1}, _writer(calls, "x"))
    assert not r1.skipped and r1.stats == {"rows": 3}
    assert (tmp_path / "ws" / "out.zarr" / "data.txt").read_text() == "x"
    m = json.loads((tmp_path / "ws" / "manifests" / "demo.json").read_text())
    assert m["config"] == {"a": 1} and m["inputs"]["src"]["ref"] == str(src)
    assert m["key"] == _key("demo", ["out.zarr"], config={"a": 1},
                            inputs={"src": fingerprint_path(str(src))})
    # the output was built in the stage's work folder, which is gone once published
    assert calls[0]["out.zarr"].startswith(str(tmp_path / "ws" / ".work" / "demo-"))
    assert _work_entries(tmp_path / "ws") == []

    r2 = run({"a": 1}, _writer(calls, "y"))
    assert r2.skipped and len(calls) == 1
    assert (tmp_path / "ws" / "out.zarr" / "data.txt").read_text() == "x"

    r3 = run({"a": 2}, _writer(calls, "z"))
    assert not r3.skipped and (tmp_path / "ws" / "out.zarr" / "data.txt").read_text() == "z"

    src.write_text("v2")
    r4 = run({"a": 2}, _writer(calls, "w"))
    assert not r4.skipped and len(calls) == 3

    r5 = run({"a": 2}, _writer(calls, "w"), force=True)
    assert not r5.skipped and len(calls) == 4


def test_crash_keeps_old_output_and_leaves_no_temporaries(tmp_path):
    ws = Workspace(tmp_path / "ws")
    calls: list = []
    ws.run_stage("s", key=_key("s", ["o"], config={"v": 1}), outputs=["o"],
                 fn=_writer(calls, "good"))

    def crash(work):
        os.makedirs(work.outputs["o"])
        with open(os.path.join(work.outputs["o"], "data.txt"), "w") as f:
            f.write("half")
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        ws.run_stage("s", key=_key("s", ["o"], config={"v": 2}), outputs=["o"], fn=crash)
    assert (tmp_path / "ws" / "o" / "data.txt").read_text() == "good"
    # nothing half-written under a final name or beside it: partial work lives only in .work/
    assert sorted(p for p in os.listdir(tmp_path / "ws") if not p.startswith(".")) == [
        "manifests", "o"]
    assert not [p for p in os.listdir(tmp_path / "ws") if p.startswith(".tmp-")]
    assert sorted(os.listdir(tmp_path / "ws" / "manifests")) == ["s.json"]
    # the old manifest still describes the old output (config v=1), so v=1 is still current
    r = ws.run_stage("s", key=_key("s", ["o"], config={"v": 1}), outputs=["o"],
                     fn=_writer(calls, "again"))
    assert r.skipped and len(calls) == 1
    # the next run that builds sweeps the crashed run's work folder and removes its own
    r = ws.run_stage("s", key=_key("s", ["o"], config={"v": 3}), outputs=["o"],
                     fn=_writer(calls, "new"))
    assert not r.skipped and (tmp_path / "ws" / "o" / "data.txt").read_text() == "new"
    assert _work_entries(tmp_path / "ws") == []


def test_missing_output_is_an_error(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(RuntimeError, match="did not write its output 'o'"):
        ws.run_stage("s", key=_key("s", ["o"]), outputs=["o"], fn=lambda work: {})
    assert ws.manifest("s") is None
    assert not ws.exists("o")


def test_deleted_output_reruns(tmp_path):
    ws = Workspace(tmp_path / "ws")
    calls: list = []
    key = _key("s", ["o"])
    ws.run_stage("s", key=key, outputs=["o"], fn=_writer(calls, "a"))
    shutil.rmtree(tmp_path / "ws" / "o")
    r = ws.run_stage("s", key=key, outputs=["o"], fn=_writer(calls, "a"))
    assert not r.skipped and len(calls) == 2
    assert (tmp_path / "ws" / "o" / "data.txt").read_text() == "a"


def test_downstream_stage_reruns_when_upstream_output_changes(tmp_path):
    ws = Workspace(tmp_path / "ws")
    calls: list = []

    def up(k: int):
        return ws.run_stage("up", key=_key("up", ["a.zarr"], config={"k": k}),
                            outputs=["a.zarr"], fn=_writer(calls, str(k)))

    def down():
        key = _key("down", ["b.zarr"], inputs={"a": ws.fingerprint("a.zarr")})
        return ws.run_stage("down", key=key, outputs=["b.zarr"], fn=_writer(calls, "d"))

    up(1)
    fp1 = ws.fingerprint("a.zarr")
    assert not down().skipped
    assert down().skipped
    up(2)
    assert ws.fingerprint("a.zarr") != fp1  # derived from the producer's (new) key
    again = down()
    assert not again.skipped and len(calls) == 4


def test_missing_external_input(tmp_path):
    ws = Workspace(tmp_path / "ws")
    calls: list = []
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        ws.run_stage("s", key=_key("s", ["o"], inputs={
            "t": fingerprint_path(str(tmp_path / "nope.tif"))}),
            outputs=["o"], fn=_writer(calls, "x"))
    assert not calls and ws.manifest("s") is None


def test_fsspec_memory_workspace():
    """Workspaces can be fsspec URLs; the in-memory filesystem stands in for s3:// here."""
    ws = Workspace("memory://aether-test/run")
    assert not ws.is_local

    def fn(work):
        with ws.fs.open(work.outputs["o.txt"], "w") as f:
            f.write("hello")
        return {"n": 1}

    key = _key("s", ["o.txt"])
    r = ws.run_stage("s", key=key, outputs=["o.txt"], fn=fn)
    assert not r.skipped and r.stats == {"n": 1}
    with ws.fs.open(ws.path("o.txt")) as f:
        assert f.read() == b"hello"
    assert ws.run_stage("s", key=key, outputs=["o.txt"], fn=fn).skipped
    assert not ws.fs.exists(ws.work_root("s", key))  # the work folder went with the publish


def test_hand_placed_workspace_entry_is_fingerprinted_by_content(tmp_path):
    """An input put into the workspace by hand (no producing stage) still invalidates on change."""
    ws = Workspace(tmp_path / "ws")
    (tmp_path / "ws" / "ae.zarr").mkdir()
    (tmp_path / "ws" / "ae.zarr" / "c.0").write_text("a")
    calls: list = []

    def down():
        key = _key("down", ["o"], inputs={"ae": ws.fingerprint("ae.zarr")})
        return ws.run_stage("down", key=key, outputs=["o"], fn=_writer(calls, "x"))

    down()
    # by content, not by where it is: a copy elsewhere fingerprints alike
    shutil.copytree(tmp_path / "ws" / "ae.zarr", tmp_path / "copy.zarr")
    assert ws.fingerprint("ae.zarr") == fingerprint_path(str(tmp_path / "copy.zarr"))
    assert down().skipped
    (tmp_path / "ws" / "ae.zarr" / "c.1").write_text("b")
    again = down()
    assert not again.skipped and len(calls) == 2


def test_checksummed_zarr_chunks_are_fingerprinted_by_their_own_crc32c(tmp_path):
    """Chunks of a Zarr v3 array ending in crc32c are fingerprinted by size and their own
    checksum: a rewritten chunk changes the fingerprint, a copy matches, and only the last
    4 bytes of a chunk are read (a payload byte flipped under an intact checksum is not seen
    here; the read itself refuses that chunk). Other files and sharded arrays stay hashed
    by content."""
    import numpy as np
    import zarr

    from aether_scale.stores.chunks import CorruptStoreError, StoreRef, compressors
    from aether_scale.stores.rows import read_rows

    root = zarr.open_group(str(tmp_path / "ae.zarr"), mode="w", zarr_format=3)
    a = root.create_array("ae", shape=(8, 4), chunks=(4, 4), dtype="int8",
                          compressors=compressors(None))
    a[:] = np.arange(32, dtype="int8").reshape(8, 4)
    sh = root.create_array("sh", shape=(8,), chunks=(2,), shards=(8,), dtype="int8")
    sh[:] = 1
    (tmp_path / "ae.zarr" / "notes.txt").write_text("a")
    fp0 = fingerprint_path(str(tmp_path / "ae.zarr"))
    shutil.copytree(tmp_path / "ae.zarr", tmp_path / "copy.zarr")
    assert fingerprint_path(str(tmp_path / "copy.zarr")) == fp0

    a[0, 0] = 99  # a real rewrite: new bytes, new checksum
    fp1 = fingerprint_path(str(tmp_path / "ae.zarr"))
    assert fp1 != fp0

    chunk = tmp_path / "ae.zarr" / "ae" / "c" / "1" / "0"
    blob = bytearray(chunk.read_bytes())
    blob[0] ^= 0xFF  # payload damaged, checksum left as it was
    chunk.write_bytes(bytes(blob))
    assert fingerprint_path(str(tmp_path / "ae.zarr")) == fp1
    with pytest.raises(CorruptStoreError, match="c/1/0"):
        read_rows(StoreRef.of(tmp_path / "ae.zarr"), "ae", 4, 8, fix="fix it")

    blob[-1] ^= 0xFF  # the checksum itself changed: seen
    chunk.write_bytes(bytes(blob))
    fp2 = fingerprint_path(str(tmp_path / "ae.zarr"))
    assert fp2 != fp1

    shard = tmp_path / "ae.zarr" / "sh" / "c" / "0"
    blob = bytearray(shard.read_bytes())
    blob[0] ^= 0xFF  # a shard's trailer checks only its index: hashed whole, so seen
    shard.write_bytes(bytes(blob))
    fp3 = fingerprint_path(str(tmp_path / "ae.zarr"))
    assert fp3 != fp2
    (tmp_path / "ae.zarr" / "notes.txt").write_text("b")  # same size, other content
    assert fingerprint_path(str(tmp_path / "ae.zarr")) != fp3


def test_missing_workspace_input_names_its_workspace_path(tmp_path):
    ws = Workspace(tmp_path / "ws")
    calls: list = []
    with pytest.raises(FileNotFoundError, match=r"ws/triplets\.zarr does not exist"):
        ws.run_stage("train", key=_key("train", ["model"], inputs={
            "t": ws.fingerprint("triplets.zarr")}), outputs=["model"], fn=_writer(calls, "x"))
    assert not calls and ws.manifest("train") is None


def test_a_replaced_output_is_deleted_in_the_background_and_waited_for(tmp_path):
    """Inside ``deferred_removals`` (``run_stages`` holds it), a ``--force`` run renames the
    old output out of the way and deletes it in a thread; leaving the block waits for it.
    A deletion cut short (a ``trash-*`` folder left behind) goes with the next run."""
    ws = Workspace(tmp_path / "ws")
    calls: list = []
    key = _key("demo", ["out.zarr"])
    ws.run_stage("demo", key=key, outputs=["out.zarr"], fn=_writer(calls, "old"))
    for k in range(200):  # enough files that the deletion is still going when the run returns
        (tmp_path / "ws" / "out.zarr" / f"f{k}").write_bytes(b"x" * 4096)
    with ws.deferred_removals():
        ws.run_stage("demo", key=key, outputs=["out.zarr"], fn=_writer(calls, "new"), force=True)
        assert (tmp_path / "ws" / "out.zarr" / "data.txt").read_text() == "new"
        assert not (tmp_path / "ws" / "out.zarr" / "f0").exists()
        pending = list(ws._removals or [])
        assert len(pending) == 1  # the old output's deletion, in a thread
    assert not pending[0].is_alive() and ws._removals is None
    assert _work_entries(tmp_path / "ws") == []
    # outside the block an output is removed at once, as before
    ws.run_stage("demo", key=key, outputs=["out.zarr"], fn=_writer(calls, "again"), force=True)
    assert ws._removals is None and _work_entries(tmp_path / "ws") == []
    # a trash folder of a killed run is removed by the next run of any stage
    (tmp_path / "ws" / ".work" / "trash-1-deadbeef" / "x").mkdir(parents=True)
    ws.run_stage("other", key=_key("other", ["o.zarr"]), outputs=["o.zarr"],
                 fn=_writer(calls, "o"))
    assert _work_entries(tmp_path / "ws") == []
