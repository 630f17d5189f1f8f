"""Mixing of patches for semi-supervised training: CutMix boxes (LLM-SegNet's second network) and cube masks
(VerSemi's synthetic task). Random draws use torch's generator (or the one given), so they follow the run's seed."""
from __future__ import annotations

import torch


def cutmix_box(shape: tuple[int, ...], beta: float, device=None) -> torch.Tensor:
    """A (1, 1, *spatial) 0/1 mask with one random box (1 = take the partner) holding a Beta(beta, beta) share of
    the volume (same proportion along every axis)."""
    share = float(torch.distributions.Beta(beta, beta).sample())
    side = share ** (1.0 / len(shape))
    mask = torch.zeros((1, 1) + tuple(shape), device=device)
    box = []
    for s in shape:
        n = max(1, int(round(s * side)))
        start = int(torch.randint(0, s - n + 1, (1,)))
        box.append(slice(start, start + n))
    mask[(slice(None), slice(None)) + tuple(box)] = 1.0
    return mask


def mix(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CutMix each sample with the next one in the batch (a cyclic shift): inside the box, the partner's values."""
    return x * (1 - mask) + x.roll(1, dims=0) * mask


def cube_masks(n: int, patch, ratio, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n, *patch) masks: 1 everywhere except a zero box of side floor(ratio * side) per axis at a random
    position (one per sample); ``ratio`` is a number or a (low, high) range to draw from."""
    masks = torch.ones((n, *patch), device=device)
    for i in range(n):
        r = ratio
        if isinstance(ratio, (list, tuple)):
            r = float(ratio[0] + (ratio[1] - ratio[0]) * torch.rand((), generator=generator))
        sl = []
        for side in patch:
            size = max(int(side * r), 1)
            start = int(torch.randint(0, side - size + 1, (), generator=generator))
            sl.append(slice(start, start + size))
        masks[(i, *sl)] = 0
    return masks
