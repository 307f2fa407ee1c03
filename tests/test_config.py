"""Config loading: defaults, YAML, overrides, and readable errors."""

from __future__ import annotations

import pytest

from aether_scale.config import (
    CONFIG_DIR,
    ConfigError,
    RunConfig,
    config_yaml,
    load_config,
    packaged_configs,
    parse_override,
)


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
    load_config(p)  # a stage that does not read it does not care (checked when planned)
    with pytest.raises(ConfigError) as e:
        load_config(p, check_paths=True)
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

    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert files, "aether_scale/configs/ should ship run configs"
    assert CONFIG_DIR == Path(__file__).resolve().parents[1] / "aether_scale" / "configs"
    assert packaged_configs() == [f.stem for f in files]
    assert {"demo", "london", "national", "reference"} <= set(packaged_configs())
    # the top-level configs/ of a checkout is the same folder
    top = Path(__file__).resolve().parents[1] / "configs"
    assert top.resolve() == CONFIG_DIR.resolve()
    for f in files:
        cfg = load_config(f, check_paths=False)
        # a bare shipped name resolves to the shipped file
        assert load_config(f.stem, check_paths=False) == cfg


def test_missing_config_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*shipped configs: .*london"):
        load_config(tmp_path / "nope.yaml")


def test_evaluate_noaug_moved_to_train_variants():
    with pytest.raises(ConfigError, match=r"evaluate\.noaug: this key moved .*train\.variants"):
        load_config(data={"evaluate": {"noaug": True}})


def test_train_variants_default_override_and_validation():
    t = load_config().train
    assert t.variants == {"noaug": {"use_aug": False}}  # the paper's "AETHER w/o aug"
    v = t.variant("noaug")
    assert v.use_aug is False and v.variants == {}
    assert v.model_dump(exclude={"use_aug", "variants"}) == \
        t.model_dump(exclude={"use_aug", "variants"})
    main = t.variant("")
    assert main.use_aug is True and main.variants == {}
    assert load_config(data={"train": {"variants": {}}}).train.variants == {}
    two = load_config(data={"train": {"epochs": 5, "variants": {"lam0": {"lam": 0.0},
                                                                "noaug": {"use_aug": False}}}})
    assert two.train.variant("lam0").lam == 0.0 and two.train.variant("lam0").epochs == 5
    with pytest.raises(ConfigError, match="unknown train key"):
        load_config(data={"train": {"variants": {"x": {"epoch": 3}}}})
    with pytest.raises(ConfigError, match="lower-case"):
        load_config(data={"train": {"variants": {"No-Aug": {"use_aug": False}}}})



def test_invalid_variant_value_names_the_variant():
    # a variant's values are validated like train's own, and the error says where the bad
    # value is: train.variants.<name>.<key>, not the (valid, unset) train.<key>
    with pytest.raises(ConfigError, match=r"train\.variants\.bad\b.*lam.*1\.5"):
        load_config(data={"train": {"variants": {"bad": {"lam": 1.5}}}})


def test_infer_chunk_px():
    assert load_config().infer.chunk_px is None  # default: derived from the ae.zarr chunks
    assert load_config(overrides=["infer.chunk_px=256"]).infer.chunk_px == 256
    with pytest.raises(ConfigError, match=r"infer\.chunk_px"):
        load_config(overrides=["infer.chunk_px=8"])


def test_config_yaml_round_trips_relative_to_a_workspace(tmp_path):
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "pts.geojson").write_text("{}")
    cfg = load_config(data={"ingest": {"tiles": [str(ws / "tiles" / "*.tif"), "s3://b/t.tif"]},
                            "regions": {"luc_points": str(ws / "data" / "pts.geojson")},
                            "train": {"epochs": 3}})
    text = config_yaml(cfg, relative_to=str(ws))
    assert str(ws) not in text  # paths inside the workspace are written relative to it
    assert "tiles/*.tif" in text and "s3://b/t.tif" in text
    (ws / "config.yaml").write_text(text)
    assert load_config(ws / "config.yaml") == cfg
    # secrets are never written out
    secret = load_config(overrides=["cluster.gateway.password=hunter2"])
    assert "hunter2" not in config_yaml(secret)
