"""The Segment Editor SAM effect's computation (SemiSegLib.sam_effect) on a real LA volume with real LiteMedSAM: a
box and a click in the Yellow (sagittal) view segment in that view's plane, and Apply is one undoable step of the Segment
Editor logic (vtkSlicerSegmentEditorLogic from the slicer-core wheel)."""
import json

import numpy as np
import pytest
import slicer

from conftest import view_node
from semiseg.io import read_label
from semiseg.metrics import dice_score
from SemiSegLib import nodes
from SemiSegLib.nodes import NodeError
from SemiSegLib.sam_effect import ClickSession, apply_to_segment, sam_settings


def test_box_and_click_in_the_yellow_view_segment_its_plane_and_apply_undoes(scene, la_case, sam_engine):
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()  # registers the segmentation converters (undo)
    segmentations.SetMRMLScene(scene)
    volume = nodes.load_volume(scene, str(la_case[0]), "la")
    label = read_label(la_case[1]).array == 1
    affine = nodes.ijk_to_ras(volume)
    # a box dragged around the atrium on its middle sagittal slice, then a click deep inside it
    i = int(round(np.argwhere(label)[:, 0].mean()))
    jj, kk = np.nonzero(label[i])
    corner0, corner1 = affine @ [i, jj.min() - 3, kk.min() - 3, 1], affine @ [i, jj.max() + 3, kk.max() + 3, 1]
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(label[i])
    j, k = np.unravel_index(np.argmax(depth), depth.shape)
    click = affine @ [i, j, k, 1]
    yellow = nodes.numpy_matrix(view_node(scene, "Yellow", [1, 0, 0], click[:3]).GetSliceToRAS())

    session = ClickSession(lambda: sam_engine)
    with pytest.raises(NodeError, match="drag one around the structure"):  # LiteMedSAM was trained on boxes
        session.click(volume, yellow, click[:3])
    boxed = session.drag(volume, yellow, corner0[:3], corner1[:3])
    painted = np.argwhere(boxed.mask)
    assert len(painted) > 50 and set(painted[:, 0]) == {i}  # in the sagittal plane of the box
    assert dice_score(boxed.mask[i], label[i]) > 0.85
    preview = session.click(volume, yellow, click[:3], include=True)  # a click joins the box on that plane
    assert set(np.argwhere(preview.mask)[:, 0]) == {i}
    prompts = preview.provenance["slices"][0]["prompts"][0]
    assert prompts["points"] == [[round(float(k), 2), round(float(j), 2)]] and len(prompts["box"]) == 4

    # Apply through the Segment Editor logic: one undo step brings the segment back to what it was
    segmentation = nodes.new_segmentation(scene, volume, "edited")
    before = np.zeros(label.shape, bool)
    before[10:14, 10:14, 10] = True
    sid = nodes.add_segment(segmentation, before, volume, "atrium")
    editor_node = slicer.vtkMRMLSegmentEditorNode()
    scene.AddNode(editor_node)
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(editor_node)
    editor_node.SetAndObserveSegmentationNode(segmentation)
    editor_node.SetAndObserveSourceVolumeNode(volume)
    editor_node.SetSelectedSegmentID(sid)
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(segmentation.GetSegmentation())
    editor.SetSegmentationHistory(history)

    apply_to_segment(preview, volume, segmentation, sid, editor.SaveStateForUndo,
                     lambda labelmap: editor.ModifySegmentByLabelmap(segmentation, sid, labelmap,
                                                                     editor.ModificationModeAdd, False, True))
    after = nodes.segment_mask(segmentation, sid, volume)
    np.testing.assert_array_equal(after, before | preview.mask)
    tags = nodes.segment_tags(segmentation, sid)
    assert tags[nodes.TAG_SOURCE] == "corrected"
    assert json.loads(tags[nodes.TAG_PROVENANCE])["sam"]["slices"][0]["axis"] == 0
    editor.Undo()
    np.testing.assert_array_equal(nodes.segment_mask(segmentation, sid, volume), before)


def test_the_effect_uses_the_modules_backend_and_checkpoint(scene):
    assert sam_settings(scene) == ("litemedsam", "")  # no SemiSeg parameter node yet
    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetSingletonTag("SemiSeg")
    node.SetParameter("samBackend", "sam")
    node.SetParameter("samCheckpoint", "/models/sam_vit_b.pth")
    scene.AddNode(node)
    assert sam_settings(scene) == ("sam", "/models/sam_vit_b.pth")
