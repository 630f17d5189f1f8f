"""V-Net for volumetric segmentation (Milletari et al. 2016), in the compact form used by the semi-supervised
literature on LA / Pancreas (16 base filters, four stride-2 stages, additive skip connections)."""
from __future__ import annotations

import torch
import torch.nn as nn


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(ch)
    if kind == "instance":
        return nn.InstanceNorm3d(ch, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}'")


class ConvStack(nn.Sequential):
    """``stages`` 3x3x3 convolutions, each followed by normalisation and ReLU."""

    def __init__(self, stages: int, cin: int, cout: int, norm: str):
        layers = []
        for i in range(stages):
            layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class Resample(nn.Sequential):
    """Stride-2 convolution down (``up=False``) or transposed convolution up."""

    def __init__(self, cin: int, cout: int, norm: str, up: bool):
        conv = nn.ConvTranspose3d(cin, cout, 2, stride=2) if up else nn.Conv3d(cin, cout, 2, stride=2)
        super().__init__(conv, _norm(norm, cout), nn.ReLU(inplace=True))


class VNet(nn.Module):
    """(B, C, X, Y, Z) -> (B, K, X, Y, Z) logits; X, Y, Z multiples of 16.

    ``encode`` returns the five feature maps (full resolution ... bottleneck at 1/16, ``16 * base`` channels) and
    ``decode`` maps them back to logits, so a method can change the bottleneck in between.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base: int = 16, dropout: float = 0.0,
                 norm: str = "batch"):
        super().__init__()
        f = base
        self.bottleneck_channels = 16 * f
        self.enc1 = ConvStack(1, in_channels, f, norm)
        self.down1, self.enc2 = Resample(f, 2 * f, norm, False), ConvStack(2, 2 * f, 2 * f, norm)
        self.down2, self.enc3 = Resample(2 * f, 4 * f, norm, False), ConvStack(3, 4 * f, 4 * f, norm)
        self.down3, self.enc4 = Resample(4 * f, 8 * f, norm, False), ConvStack(3, 8 * f, 8 * f, norm)
        self.down4, self.enc5 = Resample(8 * f, 16 * f, norm, False), ConvStack(3, 16 * f, 16 * f, norm)
        self.up4, self.dec4 = Resample(16 * f, 8 * f, norm, True), ConvStack(3, 8 * f, 8 * f, norm)
        self.up3, self.dec3 = Resample(8 * f, 4 * f, norm, True), ConvStack(3, 4 * f, 4 * f, norm)
        self.up2, self.dec2 = Resample(4 * f, 2 * f, norm, True), ConvStack(2, 2 * f, 2 * f, norm)
        self.up1, self.dec1 = Resample(2 * f, f, norm, True), ConvStack(1, f, f, norm)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv3d(f, num_classes, 1)
        self.decoder_channels = f

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x1 = self.enc1(x)
        x2 = self.enc2(self.down1(x1))
        x3 = self.enc3(self.down2(x2))
        x4 = self.enc4(self.down3(x3))
        x5 = self.enc5(self.down4(x4))
        return [x1, x2, x3, x4, self.dropout(x5)]

    def decode_features(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Decoder output before the 1x1 head: (B, base, X, Y, Z)."""
        x1, x2, x3, x4, x5 = feats
        y = self.dec4(self.up4(x5) + x4)
        y = self.dec3(self.up3(y) + x3)
        y = self.dec2(self.up2(y) + x2)
        y = self.dec1(self.up1(y) + x1)
        return self.dropout(y)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.decode_features(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
