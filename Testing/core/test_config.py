import pytest

from semiseg.config import ConfigError, config_from_dict, load_config


def test_example_configs_load(repo_dir):
    for path in sorted((repo_dir / "Resources" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name and cfg.data.root.startswith("../shared/data")


def test_unknown_key_named_with_suggestion(repo_dir):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_config(repo_dir / "Resources/configs/la2018_supervised.yaml", ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'train.iterations' must be int"):
        config_from_dict({"train": {"iterations": "many"}})
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        config_from_dict({"method": "magic"})
    with pytest.raises(ConfigError, match="'train.patch_size' must have 3 values"):
        config_from_dict({"model": {"name": "vnet"}, "train": {"patch_size": [64, 64]}})
    with pytest.raises(ConfigError, match="'train.rotate_augment' must be 0 to 180 degrees, got -5"):
        config_from_dict({"train": {"rotate_augment": -5}})


def test_overrides(repo_dir):
    cfg = load_config(repo_dir / "Resources/configs/la2018_supervised.yaml",
                      ["train.iterations=7", "train.patch_size=[32,32,32]", "data.labelled=0.5"])
    assert cfg.train.iterations == 7 and cfg.train.patch_size == [32, 32, 32] and cfg.data.labelled == 0.5
