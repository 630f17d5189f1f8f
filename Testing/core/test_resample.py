"""Resolution planning: resampling to a working grid and back keeps geometry, labels stay labels, and predictions
come back on each input's own grid."""
import numpy as np
import pytest
import torch

from semiseg.config import ConfigError, config_from_dict
from semiseg.data.cases import discover_cases, load_case
from semiseg.data.resample import (resample_label, resample_probabilities, resampled_grid, spacing_per_axis,
                                   working_shape)
from semiseg.infer import Predictor
from semiseg.io import read_image, read_label
from semiseg.metrics import dice_score
from semiseg.methods import build_method


def test_working_shape_and_grid_round_trip(la_case):
    img = read_image(la_case[0])
    shape = working_shape(img.spatial_shape, img.spacing, 1.25)
    assert all(abs(w - n / 2) <= 0.5 for w, n in zip(shape, img.spatial_shape))
    grid = resampled_grid(img, shape)
    # same physical extent: first voxel corner and last voxel corner stay where they were
    corner = lambda g: np.asarray(g.origin) - g.direction @ (np.asarray(g.spacing) / 2)  # noqa: E731
    np.testing.assert_allclose(corner(grid), corner(img), atol=1e-6)
    np.testing.assert_allclose(np.asarray(grid.spacing) * shape, np.asarray(img.spacing) * img.spatial_shape)
    back = resampled_grid(grid, img.spatial_shape)
    assert back.spatial_shape == img.spatial_shape
    assert back.same_grid(img, atol=1e-6)
    np.testing.assert_allclose(back.direction, img.direction)


def test_spacing_per_axis_checks_values():
    assert spacing_per_axis(2.0, 3) == (2.0, 2.0, 2.0)
    assert spacing_per_axis([1, 2], 2) == (1.0, 2.0)
    assert spacing_per_axis(None, 3) is None
    with pytest.raises(ConfigError, match="2 values for a 3D image"):
        spacing_per_axis([1, 2], 3)
    with pytest.raises(ConfigError, match="positive"):
        spacing_per_axis([1, 0, 1], 3)


def test_labels_resample_by_nearest_neighbour(acdc_dir):
    case = discover_cases(acdc_dir)[0]
    label = read_label(case.label).array.astype(np.int64)
    small = resample_label(label, [label.shape[0], label.shape[1] // 2, label.shape[2] // 2])
    assert set(np.unique(small)) <= set(np.unique(label))  # no new (interpolated) label values
    back = resample_label(small, label.shape)
    assert back.shape == label.shape
    for k in range(1, 4):  # halving and doubling loses only boundary voxels
        assert dice_score(back == k, label == k) > 0.85


def test_probabilities_come_back_on_the_native_grid():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 10, 12, 8)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    up = resample_probabilities(probs, (20, 24, 16))
    assert up.shape == (3, 20, 24, 16)
    np.testing.assert_allclose(up.sum(0), 1.0, atol=1e-5)  # still a distribution per voxel


def test_load_case_resamples_image_and_label_and_keeps_the_reference(la_dir):
    case = discover_cases(la_dir)[0]
    native = load_case(case, "none", 2)
    lc = load_case(case, "none", 2, target_spacing=1.25)
    assert lc.image.shape[1:] == lc.label.shape == lc.grid.spatial_shape
    assert lc.geometry.spatial_shape == native.image.shape[1:] == lc.reference.shape
    np.testing.assert_array_equal(lc.reference, native.label)
    assert set(np.unique(lc.label)) == {0, 1}
    assert abs(lc.label.mean() - native.label.mean()) < 0.01  # the atrium keeps its volume fraction
    assert native.grid is native.geometry and native.reference is native.label  # no resampling, no copies


def test_predictor_writes_labels_on_the_input_grid(la_dir):
    cfg = config_from_dict({"data": {"root": str(la_dir), "target_spacing": 2.5},
                            "model": {"name": "strided_unet3d", "features": 4},
                            "train": {"patch_size": [32, 32, 32], "device": "cpu", "amp": False}})
    method = build_method(cfg, "cpu").eval()
    predictor = Predictor(method.predict_logits, cfg, torch.device("cpu"))
    case = discover_cases(la_dir)[0]
    image = read_image(case.image)
    assert predictor.prepare(image).shape[1:] == working_shape(image.spatial_shape, image.spacing, 2.5)
    probs = predictor.predict(image)
    assert probs.shape == (2,) + image.spatial_shape
    seg = predictor.segment(image)
    assert seg.same_grid(image)
    lc = load_case(case, "none", 2, target_spacing=2.5)
    np.testing.assert_allclose(predictor.predict_case(lc), probs, atol=1e-5)  # the same path for loaded cases


def test_config_checks_target_spacing_and_model(la_dir):
    with pytest.raises(ConfigError, match="data.target_spacing"):
        config_from_dict({"data": {"target_spacing": [1.0, -1.0, 1.0]}})
    with pytest.raises(ConfigError, match="model.name"):
        config_from_dict({"model": {"name": "resnet"}})
    with pytest.raises(ConfigError, match="3 values"):
        config_from_dict({"model": {"name": "strided_unet3d"}, "train": {"patch_size": [64, 64]}})
