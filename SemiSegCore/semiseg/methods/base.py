"""The method interface. A method owns its networks (it is an ``nn.Module``), computes its losses from one labelled
and one unlabelled batch, and predicts logits for whole-image inference. The trainer knows nothing else about it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import Config, build_dataclass
from ..data.sampling import Batch
from ..models import build_model


@dataclass
class NoParams:
    pass


class Method(nn.Module):
    name: str = ""
    needs_unlabelled: bool = False
    """Load the unlabelled cases (``trainer.unlabelled``)."""
    uses_unlabelled_batches: bool | None = None
    """Have the trainer draw an unlabelled batch every step (default: same as ``needs_unlabelled``)."""
    Params = NoParams

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.device = device
        self.params = self.params_from(cfg.method_params)

    @classmethod
    def params_from(cls, raw: dict | None):
        """The method's own config section as a validated dataclass (errors name the key)."""
        return build_dataclass(cls.Params, raw or {}, cls.name)

    def build_network(self, **overrides) -> nn.Module:
        m = self.cfg.model
        kwargs = dict(name=m.name, in_channels=m.in_channels, num_classes=self.cfg.data.num_classes,
                      features=m.features, dropout=m.dropout, norm=m.norm)
        kwargs.update(overrides)
        return build_model(**kwargs)

    def forward(self, labelled: Batch, unlabelled: Batch | None, step: int) -> dict[str, torch.Tensor]:
        """One training step's losses; must contain ``loss``. (``forward`` so that DistributedDataParallel wraps it.)"""
        return self.training_step(labelled, unlabelled, step)

    def training_step(self, labelled: Batch, unlabelled: Batch | None, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_step(self, trainer, step: int) -> None:
        """Called by the trainer before each step (e.g. to re-mine pseudo-labels). Default: nothing."""

    def validate(self, trainer) -> dict | None:
        """Validation Dice for choosing ``best.pt``: ``{"dice": mean, ...}``, or None for the trainer's default
        (sliding-window Dice on the trainer's validation cases). Methods over several datasets override it."""
        return None

    def load_initial_weights(self, state: dict, source: str) -> int:
        """Copy every tensor of another method's ``state_dict`` whose name and shape match ours (e.g. a supervised
        run's ``net.*`` into knowledge mining's ``net``); returns how many. An error when nothing matches."""
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own and hasattr(v, "shape") and v.shape == own[k].shape}
        if not matched:
            raise ValueError(f"{source}: no network weights match this run's '{self.cfg.model.name}' network "
                             f"(was it trained with another model.name or model.features?)")
        self.load_state_dict(matched, strict=False)
        return len(matched)

    def parameter_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]
