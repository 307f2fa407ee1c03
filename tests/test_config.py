"""Config loading: defaults, YAML, overrides, and readable errors."""

from __future__ import annotations

import pytest

from aether_scale.config import ConfigError, RunConfig, load_config, parse_override


def test_defaults_are_the_paper_hyperparameters():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.weight_decay) == (100, 512, 1e-3, 1e-4)
    assert (t.tau_ae, t.tau_poi, t.lam, t.lr_final_frac) == (0.07, 0.07, 0.2, 0.01)
    assert cfg.pool.base.radius_m == 50 and cfg.pool.aug.radius_m == 100
    assert cfg.regions.luc_buffer_m == 50 and cfg.regions.sdm_buffer_m == 300
    assert cfg.evaluate.seeds == [0, 1, 2, 3, 4]


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  epochs: 7\ncluster:\n  kind: threads\n")
    cfg = load_config(p, ["train.lam=0.5", "pool.base.radius_m=25"])
    assert cfg.train.epochs == 7 and cfg.train.lam == 0.5
    assert cfg.cluster.kind == "threads"
    assert cfg.pool.base.radius_m == 25


def test_unknown_key_names_file_field_and_allowed_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epoch: 7\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.epoch" in msg and "epochs" in msg and "unknown key" in msg


def test_unknown_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trian:\n  epochs: 7\n")
    with pytest.raises(ConfigError, match="trian: unknown key; allowed here: .*train"):
        load_config(p)


def test_wrong_type_is_reported_with_value(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*'many'"):
        load_config(p)


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"train\.lam"):
        load_config(overrides=["train.lam=1.5"])


def test_missing_input_path_is_reported(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("regions:\n  luc_points: nowhere/points.geojson\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "regions.luc_points" in str(e.value)
    # relative paths resolve against the config file's folder
    assert str(tmp_path / "nowhere" / "points.geojson") in str(e.value)


def test_relative_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pts.geojson").write_text("{}")
    (tmp_path / "cfg").mkdir()
    p = tmp_path / "cfg" / "run.yaml"
    p.write_text("regions:\n  luc_points: ../data/pts.geojson\ningest:\n  tiles: [../ae/*.tif]\n")
    cfg = load_config(p)
    assert cfg.regions.luc_points == str(tmp_path / "data" / "pts.geojson")
    assert cfg.ingest.tiles == [str(tmp_path / "ae" / "*.tif")]


def test_config_file_missing_and_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_buffer_spec_needs_radius():
    with pytest.raises(ConfigError, match="radius_px"):
        load_config(data={"pool": {"base": {"shape": "square"}}})


def test_address_cluster_needs_address():
    with pytest.raises(ConfigError, match="cluster.address"):
        load_config(overrides=["cluster.kind=address"])


def test_parse_override():
    assert parse_override("train.epochs=5") == ("train.epochs", 5)
    assert parse_override("ingest.tiles=[a.tif, b.tif]") == ("ingest.tiles", ["a.tif", "b.tif"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.epochs")


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ should ship run configs"
    for f in files:
        load_config(f, check_paths=False)
