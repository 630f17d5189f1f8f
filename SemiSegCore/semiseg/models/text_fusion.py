"""Text fusion at a network's bottleneck (LLM-SegNet): a task-knowledge embedding modulates the lowest-resolution
features, as a FiLM (default) or as a per-channel bias (the first version, kept for comparison)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TextFusion(nn.Module):
    """F' = F + lambda * Linear(t), broadcast over the bottleneck's spatial grid: a per-channel constant for a given
    text (``fusion: bias``, the first version; kept for comparison)."""

    def __init__(self, text_dim: int, channels: int, init: float):
        super().__init__()
        self.proj = nn.Linear(text_dim, channels)
        self.weight = nn.Parameter(torch.tensor(float(init)))

    def forward(self, feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        t = self.proj(text.to(feat.dtype)).view(1, -1, *([1] * (feat.ndim - 2)))
        return feat + self.weight * t


class TextFiLM(nn.Module):
    """F' = F + lambda * (gamma(t) * LN(F) + beta(t)) on a bottleneck F (B, C, *spatial).

    LN normalises each voxel's feature vector over the channels (no affine), so the modulation does not depend on
    the window size at inference. (gamma, beta) = Linear(t / |t|), its weights drawn from N(0, 1) so that for a unit
    text both have unit scale per channel; with lambda = ``init`` the fused term starts at about ``init`` times the
    scale of LN(F) (near identity) while every part of it gets gradients from the start. Another text changes F'
    by lambda ((gamma1 - gamma2) LN(F) + beta1 - beta2): a different amount at every voxel, not a bias."""

    def __init__(self, text_dim: int, channels: int, init: float):
        super().__init__()
        self.channels = channels
        self.proj = nn.Linear(text_dim, 2 * channels)
        nn.init.normal_(self.proj.weight, std=1.0)
        nn.init.zeros_(self.proj.bias)
        self.weight = nn.Parameter(torch.tensor(float(init)))

    def modulation(self, text: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.normalize(text.to(dtype).flatten(), dim=0)
        gamma, beta = self.proj(t).split(self.channels)
        return gamma, beta

    def forward(self, feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.modulation(text, feat.dtype)
        shape = (1, -1) + (1,) * (feat.ndim - 2)
        normed = F.layer_norm(feat.movedim(1, -1), (feat.shape[1],)).movedim(-1, 1)
        return feat + self.weight * (gamma.view(shape) * normed + beta.view(shape))


class TextGuidedNet(nn.Module):
    """A network whose bottleneck (``models.bottleneck``: the V-Net's last encoder stage or the strided U-Net's
    bottom block) is fused with a text embedding (passed in, shared by both networks). The fusion runs as a forward
    hook on that block, so the network itself is unchanged (its ``net.*`` weights are a supervised run's)."""

    def __init__(self, net: nn.Module, text_dim: int, fusion_init: float, fusion: str = "film"):
        super().__init__()
        from . import bottleneck

        self.net = net
        block, channels = bottleneck(net)
        kind = {"film": TextFiLM, "bias": TextFusion}[fusion]
        self.fusion = kind(text_dim, channels, fusion_init)
        self._text: torch.Tensor | None = None
        block.register_forward_hook(self._fuse)

    def _fuse(self, block: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self._text is None:
            raise RuntimeError("TextGuidedNet: call it with the text embedding, not its inner network")
        return self.fusion(output, self._text)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self._text = text
        try:
            return self.net(x)
        finally:
            self._text = None
