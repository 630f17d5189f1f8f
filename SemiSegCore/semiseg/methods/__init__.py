"""Semi-supervised methods, one module each, registered by name (``method:`` in a config) in ``semiseg.registry``."""
from __future__ import annotations

import dataclasses
import importlib

from ..registry import METHODS, available_methods

__all__ = ["available_methods", "build_method", "check_params", "get_method_class", "with_method_defaults"]


def get_method_class(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}' (available: {', '.join(available_methods())})")
    module, cls = METHODS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise ValueError(f"method '{name}' is not available in this installation ({module} is missing)") from exc
        raise


def check_params(cfg) -> None:
    """Validate the method's own config section (``config[method]``) without building the method, so that a bad
    value is reported before any data is loaded; errors name the key."""
    get_method_class(cfg.method).params_from(cfg.method_params)


def with_method_defaults(cfg):
    """``cfg`` (checked as ``check_params`` does) with every top-level key of its method's section present: the keys
    the config sets as written, the others at their defaults. Training saves this in config.yaml, so that a run
    records what its method used and a later change of a default shows up as a config difference (resume, the
    benchmarks' stale-run check)."""
    params = get_method_class(cfg.method).params_from(cfg.method_params)
    written = cfg.method_params or {}
    full = {f.name: written[f.name] if f.name in written else getattr(params, f.name)
            for f in dataclasses.fields(params)}
    return dataclasses.replace(cfg, method_params=full)


def build_method(cfg, device):
    method = get_method_class(cfg.method)(cfg, device)
    return method.to(device)
