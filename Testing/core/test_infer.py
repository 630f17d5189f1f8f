"""Sliding-window inference with test-time mirroring (``infer.mirror``)."""
from itertools import combinations

import numpy as np
import pytest
import torch
import yaml

from semiseg.cli import main
from semiseg.config import config_from_dict
from semiseg.data.cases import discover_cases
from semiseg.evaluate import LARGEST_COMPONENT_CHOICES, set_largest_component
from semiseg.infer import Predictor, sliding_window_probs
from semiseg.io import read_image, read_label
from semiseg.runs import load_predictor

CPU = torch.device("cpu")


class CoordinateLogits(torch.nn.Module):
    """Foreground logit = a fixed ramp along every axis plus a convolution of the image: a network that is not
    mirror-symmetric, so mirroring must change what it predicts."""

    def __init__(self, dims: int):
        super().__init__()
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.conv = conv(1, 1, 3, padding=1)

    def forward(self, x):
        ramp = sum(torch.linspace(-2, 2, n).reshape([n if i == d else 1 for i in range(x.ndim - 2)])
                   for d, n in enumerate(x.shape[2:]))
        fg = self.conv(x) + ramp
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def la_crop(la_case, shape=(32, 32, 16)) -> np.ndarray:
    arr = read_image(la_case[0]).array.astype(np.float32)
    arr = (arr - arr.mean()) / arr.std()
    return arr[tuple(slice(0, n) for n in shape)][None]  # (1, *shape)


def test_mirroring_averages_the_flipped_predictions_flipped_back(la_case):
    torch.manual_seed(0)
    net = CoordinateLogits(3).eval()
    image = la_crop(la_case)
    mirrored = sliding_window_probs(net, image, [32, 32, 16], 0.5, CPU, mirror=True)
    expected = np.zeros_like(mirrored)
    for n in range(4):
        for axes in combinations((1, 2, 3), n):
            flipped = np.flip(image, axes).copy()
            expected += np.flip(sliding_window_probs(net, flipped, [32, 32, 16], 0.5, CPU), axes)
    np.testing.assert_allclose(mirrored, expected / 8, atol=1e-5)
    plain = sliding_window_probs(net, image, [32, 32, 16], 0.5, CPU)
    assert np.abs(plain - mirrored).max() > 0.1


def test_mirroring_cancels_a_position_bias():
    """With a constant image, the ramp is all the network sees: mirrored, the prediction is the same read from
    either end of every axis (one window covers the image, so the window weights are symmetric too)."""
    net = CoordinateLogits(2).eval()
    torch.nn.init.zeros_(net.conv.weight)
    image = np.ones((1, 32, 48), np.float32)
    plain = sliding_window_probs(net, image, [32, 48], 0.5, CPU)
    mirrored = sliding_window_probs(net, image, [32, 48], 0.5, CPU, mirror=True)
    assert np.abs(plain - np.flip(plain, (1, 2))).max() > 0.5
    np.testing.assert_allclose(mirrored, np.flip(mirrored, 1), atol=1e-6)
    np.testing.assert_allclose(mirrored, np.flip(mirrored, 2), atol=1e-6)


def test_predictor_mirrors_when_the_config_asks(la_case):
    torch.manual_seed(0)
    net = CoordinateLogits(3).eval()
    image = la_crop(la_case)
    raw = {"model": {"name": "strided_unet3d"}, "train": {"patch_size": [32, 32, 16]}}
    plain = Predictor(net, config_from_dict(raw), CPU).predict_array(image)
    raw["infer"] = {"mirror": True}
    mirrored = Predictor(net, config_from_dict(raw), CPU).predict_array(image)
    np.testing.assert_allclose(mirrored, sliding_window_probs(net, image, [32, 32, 16], 0.5, CPU, mirror=True),
                               atol=1e-6)
    assert np.abs(plain - mirrored).max() > 0.1


@pytest.fixture(scope="module")
def tiny_run(la_dir, tmp_path_factory):
    """A one-iteration LA run, trained through the CLI, and one of its images."""
    root = tmp_path_factory.mktemp("tiny_run")
    raw = {"name": "tiny", "data": {"root": str(la_dir), "labelled": 1, "val": 0, "max_cases": 2,
                                     "target_spacing": 2.5},
           "model": {"name": "strided_unet3d", "features": 4},
           "train": {"iterations": 1, "patch_size": [32, 32, 32], "batch_size": 1, "device": "cpu", "amp": False}}
    (root / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(root / "c.yaml"), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run", read_image(discover_cases(la_dir)[0].image)


def predict_with_flags(run, image, out, *flags) -> np.ndarray:
    assert main(["predict", "--run", str(run), "--input", image.path, "--out", str(out), "--quiet", *flags]) == 0
    return read_label(next(out.iterdir())).array


def test_predict_cli_mirror_flag_overrides_the_run(tiny_run, tmp_path):
    run, image = tiny_run
    predictor = load_predictor(run, device="cpu")
    assert predictor.config.infer.mirror is False
    expected = {}
    for mirror in (False, True):
        predictor.config.infer.mirror = mirror
        expected[mirror] = predictor.segment(image).array
    assert (expected[False] != expected[True]).any()
    for flag, mirror in (("--mirror", True), ("--no-mirror", False)):
        written = predict_with_flags(run, image, tmp_path / flag.strip("-"), flag)
        np.testing.assert_array_equal(written, expected[mirror])


def test_predict_cli_largest_component_flag_overrides_the_run(tiny_run, tmp_path):
    """``--largest-component off|size|probability`` writes the label map of that clean-up (the run has none)."""
    run, image = tiny_run
    predictor = load_predictor(run, device="cpu")
    assert predictor.config.infer.largest_component is False
    expected = {}
    for choice in LARGEST_COMPONENT_CHOICES:
        set_largest_component(predictor.config, choice)
        assert predictor.config.infer.largest_component == (choice != "off")
        assert choice == "off" or predictor.config.infer.component_by == choice
        expected[choice] = predictor.segment(image).array
    assert (expected["off"] != expected["size"]).any()  # an untrained network's map has more than one component
    for choice in LARGEST_COMPONENT_CHOICES:
        written = predict_with_flags(run, image, tmp_path / choice, "--largest-component", choice)
        np.testing.assert_array_equal(written, expected[choice])
    with pytest.raises(ValueError, match="'volume'"):
        set_largest_component(predictor.config, "volume")


def test_predictor_gives_a_volume_net_all_slices_in_order(la_case):
    """A whole-image 2D predictor with a ``volume_net`` hands it one volume's slices at once, in order along
    ``train.slice_axis``, and returns its softmax on the volume's grid; the per-slice network is not used."""
    image = la_crop(la_case, (16, 12, 10))  # (1, 16, 12, 10): 10 axial slices of 16 x 12 (whole-image windows)

    def by_position(x):  # foreground logit = slice index: a slice is right only where its place is known
        index = torch.arange(len(x), dtype=x.dtype).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(index), index - 4.5 + 0 * x], 1)

    def per_slice(x):
        raise AssertionError("the per-slice network must not run when a volume net is given")

    raw = {"model": {"name": "unet2d"}, "train": {"patch_size": [16, 16], "slice_axis": 2}}
    probs = Predictor(per_slice, config_from_dict(raw), CPU, whole_image=True,
                      volume_net=by_position).predict_array(image)
    assert probs.shape == (2, 16, 12, 10)
    expected = 1 / (1 + np.exp(-(np.arange(10) - 4.5)))
    np.testing.assert_allclose(probs[1], np.broadcast_to(expected, (16, 12, 10)), atol=1e-6)
