"""YAML configs -> validated dataclasses. Errors name the bad key by its dotted path.

A config has the sections ``data``, ``model``, ``train``, ``infer`` and one free-form section per method
(``knowledge_mining:``, ``llm_segnet:`` ...) that the method validates against its own dataclass
(``semiseg.methods.check_params``): method and model names come from ``semiseg.registry``, so this module never
imports the methods or torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import SemiSegError
from .registry import (MAX_STRIDED_LEVELS, MODEL_NAMES, STRIDED_LEVELS, available_methods, size_multiple,
                       spatial_dims_of)


class ConfigError(SemiSegError, ValueError):
    """A bad config value; the message names the key by its dotted path."""


@dataclass
class DataConfig:
    root: str = ""
    """An MSD dataset (dataset.json, imagesTr/, labelsTr/), an images/ + masks/ (or labels/) folder pair, or a
    folder of UA-MT/SSL4MIS .h5 files. Relative paths are taken from the directory the command runs in."""
    layout: str = "auto"  # auto | msd | folders | h5
    num_classes: int = 2
    labelled: float = 0.1
    """Count (>= 1) or fraction (< 1) of the training cases that keep their labels."""
    val: float = 0.2
    """Count or fraction of all cases held back for validation (never trained on)."""
    test: float = 0.0
    group_pattern: Optional[str] = None
    """Regex naming a case's group (e.g. ``^(patient\\d+)`` for ACDC): a group's cases stay in one set, and
    counts and fractions count groups."""
    labelled_ids: Optional[list] = None
    """Case ids that are always labelled (e.g. pseudo-labels a person accepted), on top of ``labelled``."""
    unlabelled: Optional[float] = None
    """Count or fraction of the remaining cases used without labels; default: all of them."""
    seed: int = 0
    intensity: str = "none"  # none | zscore | minmax | percentile | rgb
    target_spacing: Optional[Union[float, list]] = None
    """Working resolution in mm (one value per axis, or one for all): images are resampled linearly and labels by
    nearest neighbour on load; training, validation and SAM prompts use that grid, and predictions are resampled
    back to each input's own grid before the argmax. None keeps every image's own grid. ``semiseg plan`` suggests
    one."""
    max_cases: Optional[int] = None
    """Use only this many cases in total (a random subset, for quick runs)."""
    cache_dir: Optional[str] = None
    labels: Optional[dict] = None
    """Label value -> name; read from dataset.json when absent."""


@dataclass
class ModelConfig:
    name: str = "vnet"  # vnet | unet3d | unet2d | unetpp2d | strided_unet3d | strided_unet2d
    in_channels: int = 1
    features: int = 16
    dropout: float = 0.0
    norm: str = "batch"
    """V-Net normalisation: batch | instance | none."""
    strides: Optional[list] = None
    """Strided U-Nets only: the stride of each level along each axis (e.g. ``[[1,2,2],[1,2,2],[2,2,2]]``), for
    anisotropic grids (``semiseg plan`` suggests them: ``plan.plan_strides``). The number of levels is the network's
    depth (channels ``features`` x 1, 2, 4, ... down to the bottom block); patch sides must be multiples of the
    product of their axis's strides. None: the network's default depth, 2 along every axis at every level."""


@dataclass
class TrainConfig:
    iterations: int = 6000
    patch_size: list = field(default_factory=lambda: [112, 112, 80])
    batch_size: int = 2
    unlabelled_batch_size: int = 2
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    weight_decay: float = 1e-4
    schedule: str = "poly"  # poly | constant | cosine
    val_every: int = 500
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    init_from: Optional[str] = None
    """Start from the network weights of another run (its directory, for ``best.pt``, or a checkpoint file); the
    optimizer, schedule and step start afresh. Used to fine-tune a converged supervised model (knowledge mining's
    warm start, and the "supervised, continued" baseline that gets the same extra iterations)."""
    threads: int = 0
    """CPU threads for torch (0: all cores of this machine)."""
    amp: bool = True
    """Mixed precision; only ever used on CUDA."""
    augment: bool = True
    scale_augment: float = 0.0
    """Random zoom of training patches: factors from 1/(1+x) to 1+x (0: none). See data.sampling.Augmentation."""
    intensity_augment: float = 0.0
    """Random per-channel brightness and contrast of training patches, factors from 1-x to 1+x (0: none)."""
    rotate_augment: float = 0.0
    """Random in-plane rotation of training patches, angles from -x to x degrees (0: none). See
    data.sampling.Augmentation."""
    gamma_augment: float = 0.0
    """Random gamma (nnU-Net's transform) on a share of training patches, powers from 1/(1+x) to 1+x (0: none). See
    data.sampling.Augmentation."""
    invert_augment: float = 0.0
    """Share of training patches whose contrast is inverted about the patch mean (0: none). See
    data.sampling.Augmentation."""
    foreground_crop: float = 0.5
    """Probability that a labelled patch is centred on foreground (helps small structures)."""
    val_max_cases: Optional[int] = None
    slice_axis: int = -1
    """With a 2D network on 3D volumes: the axis slices are taken along (training and inference)."""


@dataclass
class InferConfig:
    patch_size: Optional[list] = None  # default: train.patch_size
    overlap: float = 0.5
    largest_component: bool = False
    component_by: str = "size"  # which component largest_component keeps: most voxels, or most "probability"
    batch_size: int = 4
    mirror: bool = False  # test-time mirroring: average over the image and its flips along every axis (2^d passes)


@dataclass
class Config:
    name: str = "run"
    method: str = "supervised"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    method_params: dict = field(default_factory=dict)
    """The method's own section (``config[method]`` in YAML), validated by the method."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        params = d.pop("method_params")
        if params:
            d[self.method] = params
        return d


def _type_ok(value, tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _type_ok(value, a)
            if ok:
                return True, v
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        return (isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value)
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if tp is list or origin is list:
        return isinstance(value, (list, tuple)), list(value) if isinstance(value, (list, tuple)) else value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return True, value


def build_dataclass(cls, values: dict | None, where: str):
    """Instantiate dataclass ``cls`` from ``values``, rejecting unknown keys and wrong types with their path."""
    values = dict(values or {})
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{where}' must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(known))})"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, path)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key '{path}' must be {getattr(tp, '__name__', tp)}, got {value!r}")
        kwargs[key] = coerced
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{k}' is not a section")
        node[keys[-1]] = value
    return raw


SECTIONS = {"name", "method", "data", "model", "train", "infer"}


AT_LEAST = {"data.num_classes": 2, "model.features": 1, "train.iterations": 1, "train.batch_size": 1,
            "train.unlabelled_batch_size": 1, "train.val_every": 1, "train.checkpoint_every": 1, "infer.batch_size": 1}
CHOICES = {"data.intensity": ("none", "zscore", "minmax", "percentile", "rgb"),
           "model.norm": ("batch", "instance", "none"), "train.optimizer": ("sgd", "adam", "adamw"),
           "train.schedule": ("poly", "constant", "cosine"), "infer.component_by": ("size", "probability")}


def check_values(cfg: Config) -> None:
    """The value ranges and names that types alone do not catch; errors name the key."""
    def get(key):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key, lowest in AT_LEAST.items():
        if get(key) < lowest:
            raise ConfigError(f"config key '{key}' must be >= {lowest}, got {get(key)}")
    for key, names in CHOICES.items():
        if get(key) not in names:
            raise ConfigError(f"config key '{key}': unknown value '{get(key)}' ({', '.join(names)})")
    t, i = cfg.train, cfg.infer
    if not t.lr > 0:
        raise ConfigError(f"config key 'train.lr' must be > 0, got {t.lr}")
    if not 0 <= t.scale_augment <= 1 or not 0 <= t.intensity_augment < 1:
        raise ConfigError(f"config keys 'train.scale_augment' (0 to 1) and 'train.intensity_augment' (0 to below 1): "
                          f"got {t.scale_augment}, {t.intensity_augment}")
    if not 0 <= t.rotate_augment <= 180:
        raise ConfigError(f"config key 'train.rotate_augment' must be 0 to 180 degrees, got {t.rotate_augment}")
    if not 0 <= t.gamma_augment <= 2:
        raise ConfigError(f"config key 'train.gamma_augment' must be 0 to 2, got {t.gamma_augment}")
    if not 0 <= t.invert_augment <= 1:
        raise ConfigError(f"config key 'train.invert_augment' must be 0 to 1, got {t.invert_augment}")
    if t.weight_decay < 0 or not 0 <= t.foreground_crop <= 1 or not 0 <= i.overlap < 1:
        raise ConfigError(f"config keys 'train.weight_decay' (>= 0), 'train.foreground_crop' (0 to 1) and "
                          f"'infer.overlap' (0 to below 1): got {t.weight_decay}, {t.foreground_crop}, {i.overlap}")
    check_strides(cfg.model.strides, cfg.model.name)
    multiples = size_multiple(cfg.model.name, cfg.model.strides)
    for key in ("train.patch_size", "infer.patch_size"):
        sizes = get(key)
        if sizes is None:
            continue
        fits = len(sizes) == len(t.patch_size) and all(isinstance(s, int) and s > 0 and s % m == 0
                                                       for s, m in zip(sizes, multiples))
        if not fits:
            given = " with model.strides" if cfg.model.strides is not None else ""
            raise ConfigError(f"config key '{key}' must be {len(t.patch_size)} sizes, multiples of "
                              f"{'x'.join(map(str, multiples))} (what model '{cfg.model.name}' needs{given}), "
                              f"got {sizes}")


def check_strides(strides, model: str, key: str = "model.strides", depth: int | None = None) -> None:
    """Per-level strides (``model.strides``) that network ``model`` can take, with ``depth`` levels where given (a
    built network's strides may change, not its depth); errors name ``key``."""
    if strides is None:
        return
    if model not in STRIDED_LEVELS:
        raise ConfigError(f"config key '{key}' applies to the strided U-Nets ({', '.join(STRIDED_LEVELS)}), "
                          f"not to '{model}'")
    dims = spatial_dims_of(model)
    ok = isinstance(strides, list) and 1 <= len(strides) <= MAX_STRIDED_LEVELS and all(
        isinstance(level, (list, tuple)) and len(level) == dims and all(s in (1, 2) and not isinstance(s, bool)
                                                                         for s in level) for level in strides)
    if not ok:
        raise ConfigError(f"config key '{key}' must be 1 to {MAX_STRIDED_LEVELS} levels (the network's depth; "
                          f"{STRIDED_LEVELS[model]} by default) of {dims} strides (1 or 2) for '{model}', "
                          f"got {strides!r}")
    if depth is not None and len(strides) != depth:
        raise ConfigError(f"config key '{key}': {len(strides)} levels, but the network has {depth} (model.strides); "
                          f"a dataset's strides may differ, not the network's depth")


def config_from_dict(raw: dict) -> Config:
    raw = dict(raw or {})
    method = raw.get("method", "supervised")
    if not isinstance(method, str):
        raise ConfigError("config key 'method' must be a string")
    if method not in available_methods():
        raise ConfigError(f"config key 'method': unknown method '{method}' (available: {', '.join(available_methods())})")
    params = raw.pop(method, None) or {}
    extra = set(raw) - SECTIONS
    if extra:
        k = sorted(extra)[0]
        close = difflib.get_close_matches(k, SECTIONS | set(available_methods()), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{k}'{hint}")
    cfg = build_dataclass(Config, raw, "")
    cfg.method_params = params  # validated by the method (``semiseg.methods.check_params``; ``train`` checks it first)
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"config key 'model.name': unknown model '{cfg.model.name}' ({', '.join(MODEL_NAMES)})")
    dims = spatial_dims_of(cfg.model.name)
    if len(cfg.train.patch_size) != dims:
        raise ConfigError(f"config key 'train.patch_size' must have {dims} values for model '{cfg.model.name}'")
    check_spacing(cfg.data.target_spacing, "data.target_spacing")
    if cfg.train.threads < 0:
        raise ConfigError(f"config key 'train.threads' must be >= 0 (0: all cores), got {cfg.train.threads}")
    check_values(cfg)
    return cfg


def check_spacing(value, key: str) -> None:
    """A target spacing: None, or positive millimetres (one for every axis, or one per axis)."""
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConfigError(f"config key '{key}' must be positive millimetres, got {values}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
    return config_from_dict(apply_overrides(raw, overrides or []))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, cfg: Config) -> dict[str, tuple]:
    """Dotted key -> (saved value, new value) for every value that differs."""
    old, new = _flat(saved), _flat(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    missing = "(unset)"
    return {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(old.keys() | new.keys())
            if old.get(k, missing) != new.get(k, missing)}


def describe_changes(changes: dict[str, tuple], limit: int | None = None) -> str:
    """``config_changes`` as text, 'key: old -> new; ...'; past ``limit`` keys, '; and N more'."""
    keys = list(changes)
    shown = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys[:limit])
    return shown + (f"; and {len(keys) - limit} more" if limit is not None and len(keys) > limit else "")


def save_config(cfg: Config, path: str | Path) -> None:
    from .utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
