"""Volume / segmentation nodes <-> semiseg images, and markups -> voxel prompts, on a real LA volume."""
import numpy as np
import pytest

from semiseg.io import read_image, read_label
from SemiSegLib import nodes


def test_volume_round_trip_keeps_voxels_and_geometry(scene, la_case):
    ref = read_image(la_case[0])
    volume = nodes.load_volume(scene, str(la_case[0]))
    img = nodes.image_from_volume(volume)
    assert img.array.shape == ref.array.shape  # (i, j, k), not Slicer's (k, j, i)
    np.testing.assert_array_equal(img.array, ref.array)
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-6)
    # a non-cubic, off-centre array survives the trip through a second node (axis order is not symmetric)
    probe = ref.with_array(np.arange(np.prod(ref.spatial_shape), dtype=np.float32).reshape(ref.spatial_shape))
    np.testing.assert_array_equal(nodes.image_from_volume(nodes.volume_from_image(scene, probe, "p")).array,
                                  probe.array)


def test_volume_under_linear_transform_reports_world_geometry(scene, la_case):
    import vtk

    volume = nodes.load_volume(scene, str(la_case[0]))
    before = nodes.image_from_volume(volume).affine
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 12.5)
    transform.SetMatrixTransformToParent(m)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    after = nodes.image_from_volume(volume).affine
    np.testing.assert_allclose(after[:3, 3], before[:3, 3] + [12.5, 0, 0])


def test_segments_from_label_and_back(scene, la_case):
    label = read_label(la_case[1])
    volume = nodes.load_volume(scene, str(la_case[0]))
    seg = nodes.segmentation_from_label(scene, label, volume, "reference")
    (sid,) = nodes.segment_ids(seg)
    np.testing.assert_array_equal(nodes.segment_mask(seg, sid, volume), label.array == 1)
    exported = nodes.label_from_segmentation(seg, volume)
    np.testing.assert_array_equal(exported.array, label.array)
    assert exported.same_grid(read_image(la_case[0]))


def test_add_segment_never_overwrites(scene, la_case):
    label = read_label(la_case[1])
    volume = nodes.load_volume(scene, str(la_case[0]))
    seg = nodes.segmentation_from_label(scene, label, volume, "reference")
    first = nodes.segment_ids(seg)[0]
    box = np.zeros(label.array.shape, dtype=bool)
    box[10:20, 10:20, 10:20] = True
    new = nodes.add_segment(seg, box, volume, "label 1", tags={nodes.TAG_SOURCE: "sam", nodes.TAG_SCORE: "0.5"})
    assert new != first and len(nodes.segment_ids(seg)) == 2
    assert seg.GetSegmentation().GetSegment(new).GetName() == "label 1 2"
    np.testing.assert_array_equal(nodes.segment_mask(seg, first, volume), label.array == 1)  # untouched
    assert nodes.segment_tags(seg, new) == {nodes.TAG_SOURCE: "sam", nodes.TAG_SCORE: "0.5"}
    with pytest.raises(nodes.NodeError, match="does not match"):
        nodes.add_segment(seg, box[:-1], volume, "bad")


def test_markups_to_voxel_prompts(scene, la_case):
    volume = nodes.load_volume(scene, str(la_case[0]))
    affine = nodes.image_from_volume(volume).affine
    pos = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    neg = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    pos.AddControlPoint(list((affine @ [30, 40, 50, 1])[:3]))
    neg.AddControlPoint(list((affine @ [5, 6, 7, 1])[:3]))
    points, labels = nodes.points_prompt(volume, pos, neg)
    np.testing.assert_allclose(points, [[30, 40, 50], [5, 6, 7]], atol=1e-6)
    assert labels.tolist() == [1, 0]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    centre = affine @ [60, 70, 40, 1]
    roi.SetCenter(list(centre[:3]))
    roi.SetSize(10 * 0.625, 20 * 0.625, 4 * 0.625)
    np.testing.assert_allclose(nodes.roi_box_ijk(roi, volume), [[55, 60, 38], [65, 80, 42]], atol=1e-6)
