"""The command line: help a newcomer can follow, config errors as exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aether_scale import pipeline
from aether_scale.cli import build_parser, main


def test_help_lists_every_stage_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in [*pipeline.stage_names(), "demo", "synth", "run"]:
        assert name in out
    assert "examples:" in out and "--workspace" in out or "-w " in out


def test_stage_help_names_workspace_config_and_overrides(capsys):
    with pytest.raises(SystemExit):
        main(["ingest", "--help"])
    out = capsys.readouterr().out
    assert "--workspace" in out and "--config" in out and "--set" in out and "--force" in out


def test_stage_requires_workspace(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pool"])
    assert e.value.code == 2
    assert "--workspace" in capsys.readouterr().err


def test_config_error_exits_2_with_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  tilez: []\n")
    code = main(["ingest", "-w", str(tmp_path / "ws"), "-c", str(bad)])
    assert code == 2
    err = capsys.readouterr().err
    assert "ingest.tilez" in err and "unknown key" in err and str(bad) in err


def test_every_stage_resolves_to_a_function():
    names = [st.name for st in pipeline.STAGES]
    assert names == pipeline.stage_names() and len(set(names)) == len(names)
    for st in pipeline.STAGES:
        assert pipeline.stage(st.name) is st
        assert callable(st.function()), st.name


def test_console_script_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "aether_scale", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "aether-scale" in out


def test_parser_run_until_choices():
    args = build_parser().parse_args(["run", "-w", "x", "--until", "pool"])
    assert args.until == "pool"


def test_missing_upstream_output_is_refused_before_a_cluster_starts(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    code = main(["pool", "-w", str(tmp_path / "ws")])
    assert code == 1
    err = capsys.readouterr().err
    assert "ae.zarr does not exist" in err and "aether-scale ingest" in err
    # no cluster was started for a run that cannot go anywhere (connect logs "dask: …")
    assert "dask:" not in caplog.text and "dask:" not in err


def test_ingest_without_tiles_is_refused(tmp_path, capsys):
    assert main(["ingest", "-w", str(tmp_path / "ws")]) == 1
    assert "ingest.tiles" in capsys.readouterr().err
