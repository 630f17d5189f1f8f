"""Supervised baseline: one network, Dice + cross-entropy on the labelled batch; unlabelled data unused."""
from __future__ import annotations

import torch

from ..data.sampling import Batch
from ..losses import dice_ce_loss
from .base import Method


class Supervised(Method):
    name = "supervised"

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.net = self.build_network()

    def training_step(self, batches: dict[str, Batch], step: int) -> dict[str, torch.Tensor]:
        labelled = batches["labelled"]
        loss = dice_ce_loss(self.net(labelled.image), labelled.label)
        return {"loss": loss}

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
