"""A slice classifier on SAM image embeddings, with its class activation maps (SAM-Mix's classification branch)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

POOLINGS = ("features", "scores")


class SliceClassifier(nn.Module):
    """Multi-label presence logits (B, K) from an image embedding (B, C, h, w), by an MLP FC -> ReLU -> Dropout -> FC.

    ``pooling`` says where the MLP sits:
    - ``features`` (ADA-SAM's head): on the spatially averaged embedding; its maps are Grad-CAMs.
    - ``scores``: on every embedding position, giving a score map per structure; the logit is the log of the mean
      of exp(score) over positions, and the map itself is the activation map. The head must then find the structure
      somewhere rather than in the average, and its map shows where it found it.
    Both have the same parameters, so either pooling loads the other's weights."""

    def __init__(self, channels: int, num_structures: int, hidden: int = 256, dropout: float = 0.3,
                 pooling: str = "features"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
        self.pooling = pooling
        self.fc1 = nn.Linear(channels, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_structures)

    def mlp(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(self.drop(h) if dropout else h)

    def score_maps(self, emb: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """The MLP at every embedding position: (B, K, h, w)."""
        return self.mlp(emb.permute(0, 2, 3, 1), dropout).permute(0, 3, 1, 2)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if self.pooling == "features":
            return self.mlp(emb.mean((2, 3)))
        scores = self.score_maps(emb).flatten(2)  # (B, K, positions)
        return torch.logsumexp(scores, 2) - math.log(scores.shape[2])

    def activation_maps(self, emb: torch.Tensor) -> torch.Tensor:
        """Maps (B, K, h, w) in [0, 1], min-max scaled per map, without autograd and with dropout as in eval mode:
        the Grad-CAM of the ``features`` head, or ReLU of the ``scores`` head's score maps."""
        with torch.no_grad():
            if self.pooling == "features":
                cam = self.grad_cam(emb)
            else:
                cam = F.relu(self.score_maps(emb, dropout=False))
        lo = cam.flatten(2).min(-1).values[..., None, None]
        hi = cam.flatten(2).max(-1).values[..., None, None]
        return (cam - lo) / (hi - lo).clamp_min(1e-12)

    def grad_cam(self, emb: torch.Tensor) -> torch.Tensor:
        """Unscaled Grad-CAM maps (B, K, h, w) of the ``features`` head, one per structure, without autograd.

        For this head d logit_k / d emb[c, y, x] = (W1^T (W2_k * relu'(h)))_c / (h w) at every position, so the
        Grad-CAM channel weight (the spatial mean of the gradient) has a closed form. Dropout is taken as in eval
        mode. Each map is ReLU(sum_c w_c emb_c)."""
        pre = self.fc1(emb.mean((2, 3)))  # (B, H)
        active = (pre > 0).to(emb.dtype)
        weights = torch.einsum("kh,bh,hc->bkc", self.fc2.weight, active, self.fc1.weight) / emb[0, 0].numel()
        return F.relu(torch.einsum("bkc,bcyx->bkyx", weights, emb))
