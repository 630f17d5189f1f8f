"""A slice classifier on SAM image embeddings, with closed-form Grad-CAM (SAM-Mix's classification branch)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SliceClassifier(nn.Module):
    """Multi-label presence logits (B, K) from an image embedding (B, C, h, w): GAP -> FC -> ReLU -> Dropout -> FC."""

    def __init__(self, channels: int, num_structures: int, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_structures)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(emb.mean((2, 3))))))

    def grad_cam(self, emb: torch.Tensor) -> torch.Tensor:
        """Grad-CAM maps (B, K, h, w) in [0, 1], one per structure, without autograd.

        For this head d logit_k / d emb[c, y, x] = (W1^T (W2_k * relu'(h)))_c / (h w) at every position, so the
        Grad-CAM channel weight (the spatial mean of the gradient) has a closed form. Dropout is taken as in eval
        mode. Each map is ReLU(sum_c w_c emb_c), min-max scaled per map."""
        pre = self.fc1(emb.mean((2, 3)))  # (B, H)
        active = (pre > 0).to(emb.dtype)
        weights = torch.einsum("kh,bh,hc->bkc", self.fc2.weight, active, self.fc1.weight) / emb[0, 0].numel()
        cam = F.relu(torch.einsum("bkc,bcyx->bkyx", weights, emb))
        lo = cam.flatten(2).min(-1).values[..., None, None]
        hi = cam.flatten(2).max(-1).values[..., None, None]
        return (cam - lo) / (hi - lo).clamp_min(1e-12)
