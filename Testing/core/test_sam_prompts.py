"""SAM prompts: from masks, probability maps, CAMs and user points/boxes (IJK and RAS on a real LA volume)."""
import os
from pathlib import Path

import numpy as np
import pytest

from semiseg.io import Image, read_image
from semiseg.postprocess import largest_component
from semiseg.sam.prompts import (Prompt, ijk_to_ras, prompt_from_cam, prompt_from_probability, prompts_from_mask,
                                 prompts_from_user, ras_to_ijk, slice_prompts)

DATA = Path(os.environ.get("SEMISEG_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
LA = DATA / "la2018"


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def test_mask_prompt_box_points_and_labels():
    mask = np.zeros((60, 80), np.uint8)
    mask[10:21, 30:51] = 1  # rows 10..20, cols 30..50
    mask[40:46, 5:9] = 2
    prompts = prompts_from_mask(mask, padding=3, n_pos=2, n_neg=2)
    assert [p.label for p in prompts] == [1, 2]
    p1 = prompts[0]
    assert p1.box == (27.0, 7.0, 53.0, 23.0)  # x0, y0, x1, y1 grown by 3 px
    pos = [pt for pt, lab in zip(p1.points, p1.point_labels) if lab == 1]
    neg = [pt for pt, lab in zip(p1.points, p1.point_labels) if lab == 0]
    assert len(pos) == 2 and len(neg) == 2
    for x, y in pos:
        assert mask[int(y), int(x)] == 1
        assert 12 <= y <= 18  # interior maxima of the distance map lie on the mid row band
    for x, y in neg:
        assert mask[int(y), int(x)] != 1
        assert 27 <= x <= 53 and 7 <= y <= 23
    # padding is clipped at the image border
    assert prompts[1].box == (2.0, 37.0, 11.0, 48.0)
    assert prompts_from_mask(mask, labels=[2], padding=0)[0].box == (5.0, 40.0, 8.0, 45.0)
    assert prompts_from_mask(np.zeros((5, 5), np.uint8)) == []
    assert prompts_from_mask(mask, min_area=50)[0].label == 1 and len(prompts_from_mask(mask, min_area=50)) == 1


def test_prompt_validation_and_json():
    with pytest.raises(ValueError, match="needs a box, points or a mask"):
        Prompt()
    with pytest.raises(ValueError, match="x0 <= x1"):
        Prompt(box=(10, 0, 5, 5))
    with pytest.raises(ValueError, match="point labels"):
        Prompt(points=[(1, 2)], point_labels=[])
    d = Prompt(box=(1, 2, 3, 4), points=[(2, 3)], point_labels=[1], label=3, source="x").to_json()
    assert d == {"label": 3, "source": "x", "box": [1.0, 2.0, 3.0, 4.0], "points": [[2.0, 3.0]], "point_labels": [1]}
    with pytest.raises(ValueError, match="2D mask"):
        prompts_from_mask(np.zeros((2, 3, 4)))


def test_largest_component_of_each_label_and_of_a_binary_mask():
    """One function for inference post-processing (label maps) and the prompt builders (binary masks)."""
    labels = np.zeros((12, 12), np.uint8)
    labels[1:5, 1:5], labels[8:9, 8:9] = 1, 1  # label 1: a 4x4 block and a stray pixel
    labels[1:3, 8:11], labels[10:12, 0:2] = 2, 2  # label 2: 2x3 and 2x2
    kept = largest_component(labels)
    assert kept.dtype == np.uint8 and kept[8, 8] == 0 and (kept[1:5, 1:5] == 1).all()
    assert (kept[1:3, 8:11] == 2).all() and not kept[10:12, 0:2].any()
    binary = largest_component(labels == 1)
    assert binary.dtype == bool and (binary == (kept == 1)).all()
    assert not largest_component(np.zeros((4, 4), bool)).any()


def test_largest_component_by_probability_keeps_the_confident_structure():
    """A larger but unsure false component wins by voxels and loses by probability; label maps made by
    ``labels_from`` follow ``infer.component_by``."""
    from semiseg.config import config_from_dict
    from semiseg.evaluate import labels_from

    fg = np.zeros((12, 12))
    fg[0:4, 0:4] = 0.95  # the structure: 16 confident pixels (mass 15.2)
    fg[6:12, 6:9] = 0.55  # a false blob: 18 unsure pixels (mass 9.9)
    probs = np.stack([1 - fg, fg])
    labels = probs.argmax(0).astype(np.uint8)
    assert largest_component(labels)[8, 7] == 1 and not largest_component(labels)[1, 1]
    kept = largest_component(labels, probs)
    assert (kept[0:4, 0:4] == 1).all() and not kept[6:, 6:].any()
    cfg = {"infer": {"largest_component": True}}
    assert (labels_from(probs, config_from_dict(cfg)) == largest_component(labels)).all()
    cfg["infer"]["component_by"] = "probability"
    assert (labels_from(probs, config_from_dict(cfg)) == kept).all()


def test_probability_prompt_uses_largest_component_and_confident_points():
    prob = np.zeros((64, 64), np.float32)
    big = _disc(prob.shape, 30, 40, 10)
    prob[big] = 0.95
    prob[_disc(prob.shape, 30, 40, 4)] = 0.99
    prob[_disc(prob.shape, 8, 8, 3)] = 0.8  # a smaller component, ignored
    p = prompt_from_probability(prob, threshold=0.5, confident=0.9, n_pos=2, n_neg=1, padding=0)
    assert p.box == (30.0, 20.0, 50.0, 40.0)
    assert p.point_labels == [1, 1, 0]
    for (x, y), lab in zip(p.points, p.point_labels):
        assert (prob[int(y), int(x)] >= 0.9) == (lab == 1)
    assert prompt_from_probability(np.full((8, 8), 0.2)) is None
    # nothing confident: the most probable pixel is the positive point
    soft = np.where(big, 0.6, 0.0).astype(np.float32)
    soft[30, 41] = 0.7
    assert prompt_from_probability(soft, n_pos=1, confident=0.9).points == [(41.0, 30.0)]
    assert prompt_from_probability(prob, n_pos=1, use_box=False).box is None
    assert prompt_from_probability(prob).points == []  # the box alone by default (what LiteMedSAM learned from)
    with pytest.raises(ValueError, match="needs a box, points or a mask"):
        prompt_from_probability(prob, use_box=False)


def test_cam_prompt_box():
    cam = np.zeros((50, 50), np.float32)
    cam[10:20, 15:35] = 5.0
    cam[12:14, 20:22] = 9.0
    cam[40:42, 40:42] = 4.6  # above half of the max but smaller than the main blob
    p = prompt_from_cam(cam, threshold=0.5)
    assert p.box == (15.0, 10.0, 34.0, 19.0) and p.source == "cam"
    assert prompt_from_cam(np.ones((4, 4))) is None


@pytest.mark.skipif(not LA.is_dir(), reason=f"LA 2018 data not found at {LA}")
def test_user_prompts_ras_round_trip_on_la_volume():
    path = sorted((LA / "imagesTr").glob("*.nii.gz"))[0]
    img = read_image(path)
    # a geometry with rotation and an offset origin, so that RAS and IJK really differ
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    img = Image(img.array, img.spacing, (-40.0, 12.5, 7.0), rot @ img.direction, path=img.path)
    ijk = np.array([[10.0, 20.0, 30.0], [100.0, 50.0, 44.0], [5.0, 6.0, 44.2]])
    ras = ijk_to_ras(img, ijk)
    assert np.allclose(ras_to_ijk(img, ras), ijk, atol=1e-9)
    assert np.allclose(ras[0], np.array(img.origin) + img.direction @ (np.array(img.spacing) * ijk[0]))

    by_ijk = prompts_from_user(img, points=ijk, point_labels=[1, 1, 0], space="ijk", axis=2)
    by_ras = prompts_from_user(img, points=ras, point_labels=[1, 1, 0], space="ras", axis=2)
    assert sorted(by_ras) == sorted(by_ijk) == [30, 44]
    # axis 2: a slice is volume[:, :, k], y = i and x = j
    assert np.allclose(by_ras[44][0].points, [(50.0, 100.0), (6.0, 5.0)])
    assert by_ras[44][0].point_labels == [1, 0]
    # a 3D box spans slices along the axis; points on those slices join the box prompt
    box = ijk_to_ras(img, np.array([[90.0, 40.0, 43.0], [120.0, 70.0, 45.0]]))[None]
    out = prompts_from_user(img, points=ras[1:2], boxes=box, space="ras", axis=2)
    assert sorted(out) == [43, 44, 45]
    assert np.allclose(out[44][0].box, (40.0, 90.0, 70.0, 120.0))
    assert np.allclose(out[44][0].points, [(50.0, 100.0)]) and out[43][0].points == []
    # another axis: axis 0 slices are volume[k], y = j, x = k
    ax0 = prompts_from_user(img, points=ijk[:1], space="ijk", axis=0)
    assert list(ax0) == [10] and ax0[10][0].points == [(30.0, 20.0)]
    with pytest.raises(ValueError, match="outside the volume"):
        prompts_from_user(img, points=[[0, 0, 500]], axis=2)
    with pytest.raises(ValueError, match="space"):
        prompts_from_user(img, points=ijk, space="lps")


def test_user_prompts_2d_and_slice_prompts():
    img = Image(np.zeros((40, 60), np.uint8), (0.5, 0.5), origin=(10.0, 20.0))
    ras = ijk_to_ras(img, [[4, 8]])  # row 4, col 8
    out = prompts_from_user(img, points=ras, space="ras")
    assert list(out) == [0] and np.allclose(out[0][0].points, [(8.0, 4.0)])
    vol = np.zeros((6, 7, 5), np.uint8)
    vol[2:4, 3:5, 1] = 1
    vol[1:2, 1:2, 3] = 2
    sp = slice_prompts(vol, 2, lambda m: prompts_from_mask(m, padding=0))
    assert sorted(sp) == [1, 3]
    assert sp[1][0].box == (3.0, 2.0, 4.0, 3.0) and sp[3][0].label == 2
