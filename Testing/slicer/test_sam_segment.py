"""SAM (real LiteMedSAM weights) on a real LA slice from an ROI box, written as a new tagged segment."""
import json

import numpy as np

from semiseg.metrics import binary_metrics
from SemiSegLib import evaluation, nodes, pseudolabel


def _roi_around(scene, volume, label, k, margin=3):
    affine = nodes.image_from_volume(volume).affine
    ii, jj = np.nonzero(label[:, :, k] == 1)
    lo = affine @ [ii.min() - margin, jj.min() - margin, k, 1]
    hi = affine @ [ii.max() + margin, jj.max() + margin, k, 1]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(list((lo[:3] + hi[:3]) / 2))
    roi.SetSize(*[abs(v) + 0.1 for v in hi[:3] - lo[:3]])
    return roi


def test_sam_box_on_one_slice_matches_reference(scene, la_case, la_mid_slice, sam_backend):
    label, k = la_mid_slice
    volume = nodes.load_volume(scene, str(la_case[0]), "la")
    volume.SetAttribute("SemiSeg.CaseId", "la")
    reference = nodes.segmentation_from_label(scene, nodes.image_from_volume(volume).with_array(label), volume, "ref")
    output = nodes.new_segmentation(scene, volume, "out")
    image = nodes.image_from_volume(volume)
    prompts = pseudolabel.markup_prompts(volume, image, roi=_roi_around(scene, volume, label, k))
    result = pseudolabel.sam_segment(volume, output, sam_backend, pseudolabel.restrict(prompts, (k, k)))

    mask = nodes.segment_mask(output, result.segment_id, volume)
    assert mask[:, :, k].any() and not np.delete(mask, k, axis=2).any()  # only the asked slice
    dice = binary_metrics(mask[:, :, k], label[:, :, k] == 1)["dice"]
    assert dice > 0.85, dice
    assert 0.5 < result.score <= 1.0
    tags = nodes.segment_tags(output, result.segment_id)
    assert tags[nodes.TAG_SOURCE] == "sam" and abs(float(tags[nodes.TAG_SCORE]) - result.score) < 1e-3
    provenance = json.loads(tags[nodes.TAG_PROVENANCE])
    assert provenance["backend"] == "litemedsam" and provenance["slices"] == [k]
    assert "box" in provenance["prompts"][str(k)][0]

    # the Dice review of that slice through the table node agrees with the direct computation
    rows = evaluation.evaluate_segmentations("la", output, reference, volume)
    assert len(rows) == 1 and rows[0]["reference"] == "label 1"
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
    evaluation.fill_table(table, rows)
    back = evaluation.table_rows(table)[0]
    whole = binary_metrics(mask, label == 1, image.spacing)
    assert abs(back["dice"] - whole["dice"]) < 1e-9 and abs(back["hd95"] - whole["hd95"]) < 1e-9
