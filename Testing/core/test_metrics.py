import math

import numpy as np
import pytest
from medpy.metric import binary as medpy
from scipy import ndimage

from semiseg.io import read_label
from semiseg.metrics import binary_metrics, label_metrics, summarise


def _perturbed(mask: np.ndarray) -> np.ndarray:
    """A realistic wrong prediction: eroded, shifted, with a spurious blob."""
    pred = ndimage.binary_erosion(mask, iterations=2)
    pred = np.roll(pred, 3, axis=0)
    pred[5:9, 5:9, 5:9] = True
    return pred


@pytest.mark.parametrize("which", ["la", "acdc"])
def test_agrees_with_medpy_on_real_masks(which, la_case, acdc_dir):
    if which == "la":
        ref_img = read_label(la_case[1])
        ref = ref_img.array == 1
    else:
        ref_img = read_label(sorted((acdc_dir / "labelsTr").iterdir())[0])
        ref = ref_img.array == 2  # myocardium, anisotropic 10 x 1 x 1 mm
    pred = _perturbed(ref)
    ours = binary_metrics(pred, ref, ref_img.spacing)
    sp = ref_img.spacing
    assert ours["dice"] == pytest.approx(medpy.dc(pred, ref), abs=1e-9)
    assert ours["jaccard"] == pytest.approx(medpy.jc(pred, ref), abs=1e-9)
    assert ours["hd95"] == pytest.approx(medpy.hd95(pred, ref, voxelspacing=sp), rel=1e-6)
    assert ours["asd"] == pytest.approx(medpy.asd(pred, ref, voxelspacing=sp), rel=1e-6)
    assert ours["assd"] == pytest.approx(medpy.assd(pred, ref, voxelspacing=sp), rel=1e-3)
    assert ours["hd95"] > 0 and ours["dice"] < 1


def test_distances_are_in_millimetres(la_case):
    ref = read_label(la_case[1]).array == 1
    shifted = np.roll(ref, 4, axis=2)
    iso = binary_metrics(shifted, ref, (1.0, 1.0, 1.0))["hd95"]
    scaled = binary_metrics(shifted, ref, (0.5, 0.5, 0.5))["hd95"]
    assert scaled == pytest.approx(iso / 2)


def test_empty_mask_conventions():
    empty, full = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    full[2:5, 2:5] = True
    assert binary_metrics(empty, empty) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0}
    one = binary_metrics(empty, full)
    assert one["dice"] == 0 and math.isnan(one["hd95"]) and math.isnan(one["asd"])
    rows = [{"case": "a", "label": 1, **binary_metrics(full, full)}, {"case": "b", "label": 1, **one}]
    s = summarise(rows)["per_label"]["1"]
    assert s["dice"]["mean"] == 0.5 and s["hd95"]["n"] == 1 and s["hd95"]["n_undefined"] == 1


def test_label_metrics_per_label(acdc_dir):
    ref = read_label(sorted((acdc_dir / "labelsTr").iterdir())[0]).array
    pred = ref.copy()
    pred[pred == 3] = 0
    m = label_metrics(pred, ref, (10, 1, 1))
    assert m[1]["dice"] == 1.0 and m[2]["dice"] == 1.0 and m[3]["dice"] == 0.0
