"""Semi-supervised methods, one module each, registered by name (``method:`` in a config) in ``semiseg.registry``."""
from __future__ import annotations

import importlib

from ..registry import METHODS, available_methods

__all__ = ["available_methods", "build_method", "check_params", "get_method_class"]


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


def build_method(cfg, device):
    method = get_method_class(cfg.method)(cfg, device)
    return method.to(device)
