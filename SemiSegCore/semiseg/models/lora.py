"""Low-rank adapters (LoRA, Hu et al. 2021) for the linear layers of a frozen network.

``add_lora(encoder, rank=8, targets=("qkv", "proj"))`` wraps every ``nn.Linear`` whose name ends with a target in a
:class:`LoRALinear`: ``y = W x + b + (alpha / rank) * B A x`` with the base ``W, b`` frozen, ``A`` (rank, in) drawn
from N(0, 0.01^2) and ``B`` (out, rank) zero, so the wrapped network starts out exactly as the base one. The adapters
are saved and loaded on their own (:func:`save_lora`, :func:`load_lora`), apart from the base checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

LORA_KEYS = ("lora_a", "lora_b")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = float(alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def add_lora(module: nn.Module, rank: int = 8, alpha: float | None = None,
             targets: tuple[str, ...] | list[str] = ("qkv", "proj")) -> list[str]:
    """Wrap, in place, the linear layers of ``module`` whose names end with one of ``targets``; return their names.

    Raises when nothing matches (a wrong target name would otherwise train no adapter at all)."""
    names = [n for n, m in module.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no linear layer of {type(module).__name__} is named like {list(targets)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (keys ending with ``lora_a`` / ``lora_b``)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k.rsplit(".", 1)[-1] in LORA_KEYS}


def load_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights into a module that already has the same adapters (same names and rank)."""
    own = lora_state_dict(module)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         f"(different targets or base network?)")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"LoRA weight {k}: shape {tuple(v.shape)}, expected {tuple(own[k].shape)} (other rank?)")
    module.load_state_dict(state, strict=False)


def save_lora(module: nn.Module, path: str | Path, **meta) -> None:
    """Write the adapters (and ``meta``, e.g. the base checkpoint's hash) to ``path``."""
    from ..utils import atomic_torch_save

    atomic_torch_save({"lora": lora_state_dict(module), "meta": meta}, Path(path))


def load_lora(module: nn.Module, path: str | Path) -> dict:
    """Load adapters written by :func:`save_lora`; returns their ``meta``."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    load_lora_state_dict(module, data["lora"])
    return data.get("meta", {})
