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


def pooled_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Dice loss on foreground probabilities pooled over everything given (VerSemi's):
    1 - (2 sum(p g) + eps) / (sum(p^2) + sum(g^2) + eps)."""
    target = target.float()
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / ((prob * prob).sum() + (target * target).sum() + eps)


def unified_segmentation_loss(logits: torch.Tensor, peer_probs: torch.Tensor, confidence: float,
                              reduction: str = "parts") -> torch.Tensor:
    """Unified Segmentation loss: -log p[argmax q] on voxels where the peer is confident (max q >= tau), the mean
    squared error over classes, mean_k (p_k - q_k)^2, on the others.

    logits (B, K, *spatial) of the trained network, peer_probs (B, K, *spatial) softmax of the peer (no gradient).
    ``reduction``: ``parts`` (default) averages the NLL over the confident voxels and the MSE over the other voxels
    and adds the two (the normalisation of TraCoCo's peer losses, LLM-SegNet's co-training lineage; a part with no
    voxel counts 0); ``voxel`` averages each voxel's single term over all voxels (the first version: the NLL then
    shrinks with the share of confident voxels and the MSE with the share of the others).
    """
    peer_probs = peer_probs.detach()
    conf, hard = peer_probs.max(1)
    confident = (conf >= confidence).to(logits.dtype)
    nll = F.cross_entropy(logits, hard, reduction="none")
    mse = (torch.softmax(logits, 1) - peer_probs).pow(2).mean(1)
    if reduction == "voxel":
        return (confident * nll + (1 - confident) * mse).mean()
    if reduction != "parts":
        raise ValueError(f"reduction must be 'parts' or 'voxel', got '{reduction}'")
    other = 1 - confident
    return (confident * nll).sum() / confident.sum().clamp_min(1.0) + (other * mse).sum() / other.sum().clamp_min(1.0)


def cross_pseudo_loss(logits: torch.Tensor, peer_probs: torch.Tensor) -> torch.Tensor:
    """Cross pseudo-supervision (Chen et al. 2021): cross-entropy against the peer's hard labels on every voxel."""
    return F.cross_entropy(logits, peer_probs.detach().argmax(1))
