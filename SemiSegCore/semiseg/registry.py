"""The names a config may use, without importing torch: the methods (and where each is implemented) and the networks
with the facts a config check needs (spatial dimensions, patch-size multiple). ``config`` validates against them;
``methods`` and ``models`` build from them."""
from __future__ import annotations

import math

METHODS = {
    "supervised": "semiseg.methods.supervised:Supervised",
    "knowledge_mining": "semiseg.methods.knowledge_mining:KnowledgeMining",
    "sam_mix": "semiseg.methods.sam_mix:SamMix",
    "llm_segnet": "semiseg.methods.llm_segnet:LLMSegNet",
    "versemi": "semiseg.methods.versemi:VerSemi",
}
"""Method name (``method:`` in a config) -> ``module:class``."""

STRIDED_LEVELS = {"strided_unet3d": 3, "strided_unet2d": 4}
"""Default stride-2 levels of the strided U-Nets (3D: 16..128 channels with 16 features); ``model.strides`` may give
them another depth, up to ``MAX_STRIDED_LEVELS``."""
MAX_STRIDED_LEVELS = 6
MODEL_NAMES = ("vnet", "unet3d", "unet2d", "unetpp2d", *STRIDED_LEVELS)


def available_methods() -> list[str]:
    return sorted(METHODS)


def spatial_dims_of(model: str) -> int:
    return 2 if model.endswith("2d") else 3


def level_strides(model: str, strides: list | None = None) -> list[list[int]]:
    """A strided U-Net's strides per level and axis: ``model.strides``, or by default 2 everywhere at its default
    depth. Their count is the network's depth."""
    if strides is not None:
        return [list(level) for level in strides]
    return [[2] * spatial_dims_of(model) for _ in range(STRIDED_LEVELS[model])]


def size_multiple(model: str, strides: list | None = None) -> tuple[int, ...]:
    """What each patch side must be a multiple of: the product of the network's strides along that axis (the other
    networks: 16)."""
    if model not in STRIDED_LEVELS:
        return (16,) * spatial_dims_of(model)
    return tuple(int(math.prod(axis)) for axis in zip(*level_strides(model, strides)))
