"""The networks build_model returns: MONAI's, with instance norms as one-channel-per-group GroupNorms (faster on a
CPU), computing the same function with the same parameters."""
import pytest
import torch
import torch.nn as nn

from semiseg.models import _widths, build_model
from semiseg.registry import STRIDED_LEVELS


def monai_original(name: str, in_channels: int, features: int) -> nn.Module:
    from monai.networks.nets import BasicUNetPlusPlus, UNet

    if name == "unetpp2d":
        return BasicUNetPlusPlus(spatial_dims=2, in_channels=in_channels, out_channels=2, features=_widths(features))
    levels = STRIDED_LEVELS[name]
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=2,
                channels=tuple(features * 2 ** i for i in range(levels + 1)), strides=(2,) * levels)


@pytest.mark.parametrize("name,shape", [("unetpp2d", (2, 3, 32, 32)), ("strided_unet3d", (1, 1, 32, 32, 16))])
def test_group_norms_compute_what_monai_instance_norms_do(name, shape):
    torch.manual_seed(0)
    net = build_model(name, shape[1], 2, features=4)
    original = monai_original(name, shape[1], 4)
    assert any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in original.modules())
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in net.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    inner = net.net if name == "unetpp2d" else net
    # the same parameter names and shapes: checkpoints of either load into the other
    assert {k: v.shape for k, v in inner.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    with torch.no_grad():
        for p in inner.parameters():  # affine parameters away from 1 and 0, so that they matter
            p.add_(0.1 * torch.randn_like(p))
    original.load_state_dict(inner.state_dict())
    x = torch.randn(*shape)
    out = original(x)
    expected = out[0] if isinstance(out, list) else out
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-4)


def test_strides_per_level_and_axis_keep_the_coarse_axis():
    """``model.strides`` [[1,2,2],[1,2,2],[2,2,2]]: the slice axis is halved only at the third level, in the encoder
    and in the decoder's up-convolutions, and the output keeps the input's shape."""
    net = build_model("strided_unet3d", 1, 2, features=4, strides=[[1, 2, 2], [1, 2, 2], [2, 2, 2]])
    down = [m.stride for m in net.modules() if isinstance(m, nn.Conv3d) and m.stride != (1, 1, 1)]
    up = sorted(m.stride for m in net.modules() if isinstance(m, nn.ConvTranspose3d) and m.stride != (1, 1, 1))
    assert down == [(1, 2, 2), (1, 2, 2), (2, 2, 2)] and up == sorted(down)
    assert net(torch.randn(1, 1, 8, 32, 32)).shape == (1, 2, 8, 32, 32)
    default = build_model("strided_unet3d", 1, 2, features=4)
    strided = [m.stride for m in default.modules() if isinstance(m, nn.Conv3d) and m.stride != (1, 1, 1)]
    assert strided == [(2, 2, 2)] * 3
    with pytest.raises(ValueError, match="strided U-Nets"):
        build_model("unet3d", 1, 2, features=4, strides=[[1, 2, 2]] * 3)


def test_set_strides_gives_the_network_built_with_them():
    """One set of weights, two stride plans: set_strides makes a default strided U-Net compute what the network built
    with those strides computes, and back."""
    from semiseg.models import set_strides

    torch.manual_seed(0)
    plan = [[1, 2, 2], [1, 2, 2], [2, 2, 2]]
    net, built = build_model("strided_unet3d", 1, 2, features=4), build_model("strided_unet3d", 1, 2, features=4,
                                                                               strides=plan)
    built.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 8, 32, 32)
    plain = net(x)
    set_strides(net, plan)
    torch.testing.assert_close(net(x), built(x))
    set_strides(net, None)
    torch.testing.assert_close(net(x), plain)


def test_strides_give_the_depth():
    """Four levels of strides build a four-level U-Net (channels up to 16x the features, bottom at 1/16 along the
    halved axes); set_strides may change a network's strides but not its depth."""
    from semiseg.models import set_strides, unet_levels

    net = build_model("strided_unet3d", 1, 2, features=4, strides=[[2, 2, 2]] * 3 + [[2, 2, 1]])
    downs, _, bottom = unet_levels(net)
    assert [d.conv.stride for d in downs] == [(2, 2, 2)] * 3 + [(2, 2, 1)] and net.channels[-1] == 64
    kept = []
    handle = bottom.register_forward_hook(lambda module, inputs, output: kept.append(output.shape))
    assert net(torch.randn(1, 1, 32, 32, 8)).shape == (1, 2, 32, 32, 8)
    handle.remove()
    assert kept == [(1, 64, 2, 2, 1)]
    with pytest.raises(ValueError, match="3 levels of strides for a U-Net of 4 levels"):
        set_strides(net, [[2, 2, 2]] * 3)
