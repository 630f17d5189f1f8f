"""Semi-supervised methods, one module each, registered by name (``method:`` in a config)."""
from __future__ import annotations

import importlib

_REGISTRY = {
    "supervised": "semiseg.methods.supervised:Supervised",
    "knowledge_mining": "semiseg.methods.knowledge_mining:KnowledgeMining",
    "sam_mix": "semiseg.methods.sam_mix:SamMix",
    "llm_segnet": "semiseg.methods.llm_segnet:LLMSegNet",
    "versemi": "semiseg.methods.versemi:VerSemi",
}


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown method '{name}' (available: {', '.join(available_methods())})")
    module, cls = _REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise ValueError(f"method '{name}' is not available in this installation ({module} is missing)") from exc
        raise


def build_method(cfg, device):
    method = get_method_class(cfg.method)(cfg, device)
    return method.to(device)
