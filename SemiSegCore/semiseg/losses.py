"""Losses shared by the methods. Shapes, unless a loss says otherwise: logits (B, K, *spatial), labels (B, *spatial)
long."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def soft_dice_loss(probs: torch.Tensor, target_onehot: torch.Tensor, weight: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """1 - mean over foreground classes of the batch-global soft Dice. ``weight`` (B, *spatial) masks voxels."""
    dims = (0,) + tuple(range(2, probs.ndim))
    if weight is not None:
        probs = probs * weight.unsqueeze(1)
        target_onehot = target_onehot * weight.unsqueeze(1)
    inter = (probs * target_onehot).sum(dims)
    denom = probs.sum(dims) + target_onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[1:].mean() if probs.shape[1] > 1 else 1.0 - dice.mean()


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy + soft Dice on softmax probabilities (the usual supervised segmentation loss)."""
    k = logits.shape[1]
    ce = F.cross_entropy(logits, labels.long(), reduction="none")
    ce = (ce * weight).sum() / weight.sum().clamp_min(1.0) if weight is not None else ce.mean()
    return ce + soft_dice_loss(torch.softmax(logits, 1), one_hot(labels, k), weight)


def sigmoid_rampup(step: int, length: int) -> float:
    """exp(-5 (1 - t)^2), the ramp of Laine & Aila used across the semi-supervised literature; 1 after ``length``."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def binary_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.5,
                      gamma: float = 2.0) -> torch.Tensor:
    """Mean of ``-a_t (1 - p_t)^gamma log p_t`` (Lin et al. 2017); a_t = alpha for positives, 1 - alpha else."""
    targets = targets.float()
    log_pt = -F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pt = log_pt.exp()
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (-a_t * (1 - pt) ** gamma * log_pt).mean()


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BCE + (1 - soft Dice) on sigmoid probabilities of binary masks, Dice per mask and averaged. Shapes (N, H, W)."""
    targets = targets.float()
    probs = torch.sigmoid(logits).flatten(1)
    t = targets.flatten(1)
    dice = (2 * (probs * t).sum(1) + eps) / (probs.sum(1) + t.sum(1) + eps)
    return F.binary_cross_entropy_with_logits(logits, targets) + (1 - dice).mean()
