"""Networks by name. Every network maps (B, C, *spatial) to class logits (B, K, *spatial).

- ``vnet``: a V-Net (the UA-MT / SSL4MIS semi-supervised baseline) with ``encode``/``decode`` so methods can work
  on the bottleneck (text fusion, task-prompted heads).
- ``unet3d`` / ``unet2d``: MONAI's BasicUNet. ``unetpp2d``: MONAI's BasicUNetPlusPlus (U-Net++).
- ``strided_unet3d`` / ``strided_unet2d``: MONAI's UNet whose first convolution is already strided (no
  full-resolution block), ``features`` doubling per level: the network sized for CPUs (about 4x cheaper per
  iteration than the V-Net on the same patch).
"""
from __future__ import annotations

import torch.nn as nn

from ..registry import MODEL_NAMES, STRIDED_LEVELS, level_strides, size_multiple, spatial_dims_of
from .vnet import VNet

__all__ = ["MODEL_NAMES", "build_model", "instance_norms_as_group_norms", "replace_modules", "set_strides",
           "size_multiple", "spatial_dims_of", "unet_levels"]


def _widths(base: int) -> tuple[int, ...]:
    return (base, base, 2 * base, 4 * base, 8 * base, base)


def build_model(name: str, in_channels: int, num_classes: int, features: int = 16, dropout: float = 0.0,
                norm: str = "batch", strides: list | None = None) -> nn.Module:
    """``strides``: per level and axis, for the strided U-Nets only (None: 2 everywhere; ``ModelConfig.strides``)."""
    from monai.networks.nets import UNet, BasicUNet, BasicUNetPlusPlus

    if strides is not None and name not in STRIDED_LEVELS:
        raise ValueError(f"strides apply to the strided U-Nets, not to '{name}'")
    if name == "vnet":
        net = VNet(in_channels, num_classes, base=features, dropout=dropout, norm=norm)
    elif name in ("unet3d", "unet2d"):
        net = BasicUNet(spatial_dims=3 if name == "unet3d" else 2, in_channels=in_channels, out_channels=num_classes,
                        features=_widths(features), dropout=dropout)
    elif name == "unetpp2d":
        net = _UNetPlusPlus(BasicUNetPlusPlus(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                                              features=_widths(features), dropout=dropout))
    elif name in STRIDED_LEVELS:
        levels = tuple(map(tuple, level_strides(name, strides)))
        net = UNet(spatial_dims=spatial_dims_of(name), in_channels=in_channels, out_channels=num_classes,
                   channels=tuple(features * 2 ** i for i in range(len(levels) + 1)), strides=levels, dropout=dropout)
    else:
        raise ValueError(f"unknown model '{name}' ({', '.join(MODEL_NAMES)})")
    return instance_norms_as_group_norms(net)


def replace_modules(net: nn.Module, replacement) -> nn.Module:
    """Replace, in place, every submodule for which ``replacement(module)`` returns a module (None keeps it)."""
    for module in list(net.modules()):
        for child_name, child in list(module.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(module, child_name, new)
    return net


def instance_norms_as_group_norms(net: nn.Module) -> nn.Module:
    """Replace every instance norm without running statistics (MONAI's default) by the GroupNorm with one channel
    per group: the same normalisation and the same parameters (``weight``, ``bias``), so checkpoints load either
    way, but PyTorch's CPU kernels for it are faster (on 2 cores: a training step of the Kvasir preset's U-Net++ 219
    -> 189 ms, of the LA preset's strided 3D U-Net 64 -> 61 ms; ``scripts/bench_norms``)."""

    def group_norm(child: nn.Module) -> nn.Module | None:
        if not isinstance(child, nn.modules.instancenorm._InstanceNorm) or child.track_running_stats:
            return None
        group = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine)
        if child.affine:
            group.load_state_dict(child.state_dict())
        return group

    return replace_modules(net, group_norm)


class _UNetPlusPlus(nn.Module):
    """MONAI's U-Net++ returns a list of outputs (for deep supervision); we use the final one."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[0]


def bottleneck(net: nn.Module) -> tuple[nn.Module, int]:
    """The block at a network's lowest resolution and its output channels, for methods that work there (text
    fusion): the V-Net's last encoder stage, or the innermost (bottom) block of a strided U-Net."""
    from monai.networks.nets import UNet

    if isinstance(net, VNet):
        return net.enc5, net.bottleneck_channels
    if isinstance(net, UNet):
        return unet_levels(net)[2], net.channels[-1]
    raise ValueError(f"no known bottleneck in {type(net).__name__} (vnet or a strided U-Net)")


def unet_levels(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module], nn.Module]:
    """A MONAI UNet's down-convolutions and up-convolutions by level (first level first) and its bottom block: the
    UNet nests each level as Sequential(down, SkipConnection(next level), up)."""
    from monai.networks.layers.simplelayers import SkipConnection

    downs, ups, block = [], [], net.model
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        downs.append(block[0])
        ups.append(block[2])
        block = block[1].submodule
    return downs, ups, block


def set_strides(net: nn.Module, strides: list | None) -> None:
    """Give a strided U-Net other per-level strides in place (None: 2 everywhere). A convolution's weights do not
    depend on its stride, so one network can take patches of differently spaced datasets, each with the strides
    that fit its grid (VerSemi's datasets)."""
    downs, ups, _ = unet_levels(net)
    if strides is not None and len(strides) != len(downs):
        raise ValueError(f"{len(strides)} levels of strides for a U-Net of {len(downs)} levels: the strides may "
                         f"change, not the depth")
    for level, (down, up) in enumerate(zip(downs, ups)):
        stride = (2,) * len(down.conv.stride) if strides is None else tuple(strides[level])
        down.conv.stride = up.conv.stride = stride
        up.conv.output_padding = tuple(s - 1 for s in stride)  # kernel 3, padding 1: the transpose doubles exactly
