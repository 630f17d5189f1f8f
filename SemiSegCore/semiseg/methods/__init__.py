"""Semi-supervised methods, one module each, registered by name (``method:`` in a config)."""
from __future__ import annotations

import importlib

_REGISTRY = {
    "supervised": "semiseg.methods.supervised:Supervised",
}


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown method '{name}' (available: {', '.join(available_methods())})")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(cfg, device):
    method = get_method_class(cfg.method)(cfg, device)
    return method.to(device)
