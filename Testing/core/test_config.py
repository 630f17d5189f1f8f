import pytest
import yaml

from semiseg.config import ConfigError, config_from_dict, load_config
from semiseg.methods import with_method_defaults


def test_example_configs_load(repo_dir):
    for path in sorted((repo_dir / "Resources" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name and cfg.data.root.startswith("../shared/data")


def test_method_defaults_fill_the_section_and_survive_config_yaml(repo_dir):
    """What training saves in config.yaml (the method's section with its defaults) loads back to the same config."""
    for path in sorted((repo_dir / "Resources" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        full = with_method_defaults(cfg)
        assert set(cfg.method_params) <= set(full.method_params)
        assert all(full.method_params[k] == v for k, v in cfg.method_params.items()), path.name
        again = with_method_defaults(config_from_dict(yaml.safe_load(yaml.safe_dump(full.to_dict()))))
        assert again.to_dict() == full.to_dict(), path.name
    km = with_method_defaults(load_config(repo_dir / "Resources/configs/kvasir_km.yaml"))
    assert km.method_params["sam_grid"] == "source" and "sam_grid" not in load_config(
        repo_dir / "Resources/configs/kvasir_km.yaml").method_params


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
    with pytest.raises(ConfigError, match="'train.gamma_augment' must be 0 to 2, got 3"):
        config_from_dict({"train": {"gamma_augment": 3}})
    with pytest.raises(ConfigError, match="'train.invert_augment' must be 0 to 1, got 1.5"):
        config_from_dict({"train": {"invert_augment": 1.5}})
    with pytest.raises(ConfigError, match=r"'infer.component_by': unknown value 'volume' \(size, probability\)"):
        config_from_dict({"infer": {"component_by": "volume"}})


def test_overrides(repo_dir):
    cfg = load_config(repo_dir / "Resources/configs/la2018_supervised.yaml",
                      ["train.iterations=7", "train.patch_size=[32,32,32]", "data.labelled=0.5"])
    assert cfg.train.iterations == 7 and cfg.train.patch_size == [32, 32, 32] and cfg.data.labelled == 0.5


@pytest.mark.parametrize("strides,model,message", [
    ("[" + ",".join(["[2,2,2]"] * 7) + "]", "strided_unet3d", "must be 1 to 6 levels"),
    ("[[1,2,3],[1,2,2],[2,2,2]]", "strided_unet3d", "must be 1 to 6 levels"),
    ("[[1,2,2],[1,2,2],[2,2,2]]", "unet3d", "applies to the strided U-Nets"),
])
def test_strides_are_checked_against_the_network(repo_dir, strides, model, message):
    with pytest.raises(ConfigError, match=f"'model.strides' {message}"):
        load_config(repo_dir / "Resources/configs/la2018_cpu.yaml", [f"model.name={model}", f"model.strides={strides}"])
    cfg = load_config(repo_dir / "Resources/configs/la2018_cpu.yaml", ["model.strides=[[1,2,2],[1,2,2],[2,2,2]]"])
    assert cfg.model.strides == [[1, 2, 2], [1, 2, 2], [2, 2, 2]]


def test_strides_set_the_depth_and_the_patch_multiples(repo_dir):
    """Four levels on LA's 64x64x40 patch: the last one keeps the 40-voxel axis (40 is a multiple of 8, not of 16)."""
    deep = "model.strides=[[2,2,2],[2,2,2],[2,2,2],[2,2,1]]"
    cfg = load_config(repo_dir / "Resources/configs/la2018_cpu.yaml", [deep])
    assert len(cfg.model.strides) == 4 and cfg.train.patch_size == [64, 64, 40]
    with pytest.raises(ConfigError, match="'train.patch_size' must be 3 sizes, multiples of 16x16x16"):
        load_config(repo_dir / "Resources/configs/la2018_cpu.yaml", ["model.strides=[[2,2,2],[2,2,2],[2,2,2],[2,2,2]]"])
