"""Chunk-level resume and integrity of the raster stages, with real killed processes.

A stage killed (SIGKILL, as an out-of-memory kill or a lost machine would) in the middle
of ``ingest``, ``pool`` or ``infer`` is rerun: only the chunks its ledger lacks are
computed, and the final store is byte-identical to an uninterrupted run's. A flipped,
truncated or deleted chunk makes the next stage fail naming the store and the chunk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aether_scale.config import load_config
from aether_scale.pipeline import run_stages
from aether_scale.workspace import Workspace

KILL_AFTER = 9


def _config(tmp: Path, city: dict[str, str]) -> Path:
    """A run config for a 256 px city in 32 px chunks (64 chunks per raster stage), on the
    threaded scheduler so a killed stage is one process."""
    import yaml
    from fixtures import city_run

    cfg = city_run(city, tmp)
    p = tmp / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from aether_scale.config import SynthSection
    from aether_scale.synthetic import write_city

    tmp = tmp_path_factory.mktemp("resume")
    city = write_city(tmp / "city", SynthSection(size_px=256, n_pois=3000, n_luc_points=200,
                                                 n_regions=60, seed=5))
    cfg_path = _config(tmp, city)
    ref = Workspace(tmp / "ref")
    run_stages(["ingest", "pois", "text", "pool", "train", "infer"], ref, load_config(cfg_path))
    return {"tmp": tmp, "cfg": cfg_path, "ref": ref}


def _cli(stage: str, ws: Path, cfg: Path, *, kill_after: int | None = None
         ) -> subprocess.CompletedProcess:
    env = {**os.environ, "AETHER_SCALE_NO_BAR": "1"}
    env.pop("AETHER_SCALE_KILL_AFTER", None)
    if kill_after:
        env["AETHER_SCALE_KILL_AFTER"] = str(kill_after)
    return subprocess.run([sys.executable, "-m", "aether_scale", stage, "-w", str(ws), "-c",
                           str(cfg)], capture_output=True, text=True, env=env, timeout=600)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _ledger_records(ws: Path, stage: str, output: str) -> int:
    [work] = list((ws / ".work").glob(f"{stage}-*"))
    return len(list((work / "ledger" / output).glob("*.json")))


def _manifest(ws: Path, stage: str) -> dict:
    return json.loads((ws / "manifests" / f"{stage}.json").read_text())


def test_killed_stages_resume_per_chunk_and_end_byte_identical(setup, tmp_path):
    ref: Workspace = setup["ref"]
    cfg = setup["cfg"]
    ws = tmp_path / "killed"
    plan = [("ingest", "ae.zarr", []), ("pool", "triplets.zarr", ["pois", "text"]),
            ("infer", "field.zarr", ["train"])]
    for stage, output, before in plan:
        if before:
            run_stages(before, Workspace(ws), load_config(cfg))
        killed = _cli(stage, ws, cfg, kill_after=KILL_AFTER)
        assert killed.returncode == -9, (stage, killed.returncode, killed.stderr[-2000:])
        assert not (ws / "manifests" / f"{stage}.json").exists() and not (ws / output).exists()
        done = _ledger_records(ws, stage, output)
        assert KILL_AFTER <= done < 64, (stage, done)

        again = _cli(stage, ws, cfg)
        assert again.returncode == 0, again.stderr[-3000:]
        stats = _manifest(ws, stage)["stats"]
        stats = stats.get(output, stats)  # infer reports per field
        total = stats["chunks_computed"] + stats["chunks_resumed"]
        assert stats["chunks_resumed"] == done, (stage, stats)
        assert total in (stats.get("chunks"), stats.get("n_chunks"),
                         stats.get("n_raster_chunks_used")), (stage, stats)
        assert _files(ws / output) == _files(Path(ref.path(output))), f"{output} differs"
        assert _manifest(ws, stage)["key"] == _manifest(Path(ref.root), stage)["key"]
        assert not list((ws / ".work").iterdir()), "work folders left behind"


def _copy(setup, tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(setup["ref"].root, ws)
    return ws


def _flip(path: Path, at: int = 40) -> None:
    b = bytearray(path.read_bytes())
    b[min(at, len(b) - 5)] ^= 0x10
    path.write_bytes(bytes(b))


def _a_chunk(store: Path, array: str = "embedding") -> Path:
    index = json.loads((store / "aether_chunks.json").read_text())
    key = sorted(index["arrays"][array]["stored"])[len(index["arrays"][array]["stored"]) // 2]
    return store / array / key


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_ae_chunk_fails_the_next_stage_naming_it(setup, tmp_path, damage):
    ws = _copy(setup, tmp_path)
    chunk = _a_chunk(ws / "ae.zarr")
    if damage == "flip":
        _flip(chunk)
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:-7])
    else:
        chunk.unlink()
    name = f"embedding/{chunk.relative_to(ws / 'ae.zarr' / 'embedding')}"
    res = subprocess.run([sys.executable, "-m", "aether_scale", "pool", "-w", str(ws), "-c",
                          str(setup["cfg"]), "--force"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 1
    assert "ae.zarr" in res.stderr and name in res.stderr and "damaged" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("store,array,stage", [
    ("text.zarr", "embedding", "pool"),
    ("triplets.zarr", "base", "train"),
    ("field.zarr", "embedding", "regions"),
])
def test_a_flipped_chunk_in_any_store_is_an_error_naming_it(setup, tmp_path, store, array,
                                                              stage):
    ws = _copy(setup, tmp_path)
    chunk = _a_chunk(ws / store, array)
    _flip(chunk)
    with pytest.raises(ValueError, match=rf"{store}: chunk {array}/c/.* cannot be decoded"):
        run_stages([stage], Workspace(ws), load_config(setup["cfg"]), force=True)
