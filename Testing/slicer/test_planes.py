"""Slice planes of any orientation on a real LA volume and its label: which voxel slice a view shows, resampling on
an oblique plane, painting a plane's mask back into the volume, and prompts projected onto a plane."""
import numpy as np
import pytest

from conftest import view_node
from semiseg.io import read_label
from semiseg.metrics import dice_score
from SemiSegLib import nodes
from SemiSegLib.planes import Plane, PlaneError, box_of, plane_prompt


@pytest.fixture
def la(scene, la_case):
    volume = nodes.load_volume(scene, str(la_case[0]))
    label = read_label(la_case[1]).array == 1
    centre = np.argwhere(label).mean(axis=0)
    affine = nodes.ijk_to_ras(volume)
    return volume, label, centre, affine[:3, :3] @ centre + affine[:3, 3]


def test_each_view_cuts_its_own_voxel_axis(scene, la):
    volume, label, centre, ras = la
    shape = label.shape
    for name, normal, axis in (("Red", [0, 0, 1], 2), ("Yellow", [1, 0, 0], 0), ("Green", [0, 1, 0], 1)):
        plane = Plane.from_view(nodes.numpy_matrix(view_node(scene, name, normal, ras).GetSliceToRAS()),
                                nodes.ijk_to_ras(volume), shape)
        assert not plane.oblique and plane.axis == axis and plane.index == int(round(centre[axis]))
        out = np.zeros(shape, np.uint8)
        plane.paint(plane.sample(label), out)
        np.testing.assert_array_equal(out > 0, _only(label, plane))


def _only(label, plane):
    keep = np.zeros_like(label)
    idx = [slice(None)] * 3
    idx[plane.axis] = plane.index
    keep[tuple(idx)] = label[tuple(idx)]
    return keep


def test_oblique_plane_samples_and_paints_back(scene, la):
    volume, label, centre, ras = la
    tilt = np.radians(30)
    normal = [np.cos(tilt), np.sin(tilt), 0.0]
    plane = Plane.from_view(nodes.numpy_matrix(view_node(scene, "Yellow", normal, ras).GetSliceToRAS()),
                            nodes.ijk_to_ras(volume), label.shape)
    assert plane.oblique and plane.axis == 0
    pixels = plane.sample(label.astype(np.float32)) > 0.5
    assert pixels.sum() > 500  # the atrium, cut obliquely
    out = np.zeros(label.shape, np.uint8)
    plane.paint(pixels, out)
    painted = np.argwhere(out)
    assert np.abs(plane.offset(painted)).max() <= 0.5  # one voxel thick, on the plane
    on_plane = np.abs(plane.offset(np.argwhere(np.ones(label.shape, bool)))).reshape(label.shape) <= 0.5
    assert dice_score(out > 0, label & on_plane) > 0.9
    # neighbouring planes tile the volume: each column is hit once per plane, one voxel further along the axis
    nxt = plane.shifted(1)
    a, b = np.zeros(label.shape, np.uint8), np.zeros(label.shape, np.uint8)
    plane.paint(np.ones(plane.size, bool), a)
    nxt.paint(np.ones(nxt.size, bool), b)
    assert not (a & b).any() and abs(int(a.sum()) - int(b.sum())) < 0.05 * a.sum()


def test_prompts_project_onto_the_plane(scene, la):
    volume, label, centre, ras = la
    plane = Plane.aligned(label.shape, 2, int(round(centre[2])))
    box3d = np.array([centre - 5, centre + 5])
    prompt = plane_prompt(plane, [centre, centre + [0, 0, 3]], [1, 0], box3d)
    assert prompt.points == [(centre[1], centre[0])] and prompt.point_labels == [1]  # the far point is dropped
    assert prompt.box == pytest.approx((centre[1] - 5, centre[0] - 5, centre[1] + 5, centre[0] + 5))
    assert plane_prompt(Plane.aligned(label.shape, 2, 0), [centre], [1], box3d) is None  # nothing on slice 0
    assert box_of(np.zeros((4, 4), bool)) is None
    with pytest.raises(PlaneError, match="outside the volume"):
        Plane.aligned(label.shape, 2, label.shape[2])
