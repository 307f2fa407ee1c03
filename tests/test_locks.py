"""One writer per stage: concurrent runs wait for each other, never interleave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from fixtures import make_problem

from aether_scale.stores.triplets import write_triplets
from aether_scale.workspace import Workspace, WorkspaceBusy


def _train_cmd(ws: str, cfg: str, lam: float, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aether_scale", "train", "-w", ws, "-c", cfg,
            "--set", f"train.lam={lam}", *extra]


@pytest.fixture
def workspace(tmp_path) -> tuple[str, str]:
    ws = Workspace(tmp_path / "ws")
    write_triplets(ws.path("triplets.zarr"), **make_problem(800), chunk_rows=256)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"epochs": 3, "batch_size": 128, "threads": 1}}))
    return ws.root, str(cfg)


def _checkpoint_lam(path: str) -> float:
    return float(torch.load(path, map_location="cpu", weights_only=True)["config"]["lam"])


def test_two_concurrent_train_runs_never_publish_a_stale_model(workspace):
    root, cfg = workspace
    env = {**os.environ, "AETHER_SCALE_NO_BAR": "1"}
    for round_ in range(2):
        lams = (0.3, 0.6) if round_ == 0 else (0.6, 0.3)
        procs = [subprocess.Popen(_train_cmd(root, cfg, lam), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=env, text=True) for lam in lams]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        m = json.loads(open(os.path.join(root, "manifests", "train.json")).read())
        lam = m["config"]["lam"]
        assert lam in lams
        # both models of the published manifest come from the same (last) run
        for name in ("model", "model_noaug"):
            assert _checkpoint_lam(os.path.join(root, name, "checkpoint.pt")) == lam, name
        assert not os.listdir(os.path.join(root, ".work"))
        for o in outs:  # one after the other: each trained, or found its config current
            assert "Traceback" not in o, o
            ran = "[train] done in" in o
            assert ran or (round_ and "up to date" in o), o


def test_a_second_run_refuses_with_no_wait_while_the_lock_is_held(workspace):
    root, cfg = workspace
    ws = Workspace(root)
    with ws.lock("train"):
        res = subprocess.run(_train_cmd(root, cfg, 0.2, "--no-wait"), capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 1
        assert "stage 'train' is being run by" in res.stderr and "pid" in res.stderr
    assert not ws.exists("model")


def test_a_waiting_run_proceeds_when_the_holder_finishes(tmp_path):
    ws = Workspace(tmp_path / "ws")
    order: list[str] = []

    def second() -> None:
        with ws.lock("pool"):
            order.append("second")

    with ws.lock("pool"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.6)
        order.append("first")
        with pytest.raises(WorkspaceBusy):
            with Workspace(tmp_path / "ws").lock("pool", wait=False):
                pass
    t.join(timeout=10)
    assert order == ["first", "second"]
