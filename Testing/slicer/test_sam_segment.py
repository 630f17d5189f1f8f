"""SAM (real LiteMedSAM weights) on a real LA slice, prompted by an ROI box or by a model's probabilities, written
as new tagged segments; then the Dice review table and plot."""
import json

import numpy as np

from semiseg.metrics import binary_metrics
from SemiSegLib import evaluation, nodes, pseudolabel
from SemiSegLib.tasks import run_task


def _roi_around(scene, volume, label, k, margin=3):
    affine = nodes.image_from_volume(volume).affine
    ii, jj = np.nonzero(label[:, :, k] == 1)
    lo = affine @ [ii.min() - margin, jj.min() - margin, k, 1]
    hi = affine @ [ii.max() + margin, jj.max() + margin, k, 1]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(list((lo[:3] + hi[:3]) / 2))
    roi.SetSize(*[abs(v) + 0.1 for v in hi[:3] - lo[:3]])
    return roi


def test_sam_segments_and_dice_review(scene, la_case, la_mid_slice, sam_engine):
    label, k = la_mid_slice
    volume = nodes.load_volume(scene, str(la_case[0]), "la")
    volume.SetAttribute("SemiSeg.CaseId", "la")
    grid = nodes.image_from_volume(volume)
    reference = nodes.segmentation_from_label(scene, grid.with_array(label), volume, "ref")
    output = nodes.new_segmentation(scene, volume, "out")

    # 1. an ROI box spanning three slices, restricted to the current one
    roi = _roi_around(scene, volume, label, k)
    roi.SetSize(roi.GetSize()[0], roi.GetSize()[1], 3 * grid.spacing[2])
    inputs = pseudolabel.markup_inputs(volume, roi=roi)
    assert [p.index for p, _ in pseudolabel.markup_items(inputs, pseudolabel.aligned_planes(label.shape, 2))] == \
        [k - 1, k, k + 1]
    items = pseudolabel.markup_items(inputs, pseudolabel.aligned_planes(label.shape, 2, (k, k)))
    result = pseudolabel.add_sam_segment(volume, output, run_task(pseudolabel.planes_steps(sam_engine, grid, items)))
    mask = nodes.segment_mask(output, result.segment_id, volume)
    assert mask[:, :, k].any() and not np.delete(mask, k, axis=2).any()  # only the asked slice
    dice = binary_metrics(mask[:, :, k], label[:, :, k] == 1)["dice"]
    assert dice > 0.85, dice
    assert 0.5 < result.score <= 1.0
    tags = nodes.segment_tags(output, result.segment_id)
    assert tags[nodes.TAG_SOURCE] == "sam" and abs(float(tags[nodes.TAG_SCORE]) - result.score) < 1e-3
    provenance = json.loads(tags[nodes.TAG_PROVENANCE])
    assert provenance["backend"] == "litemedsam" and [s["index"] for s in provenance["slices"]] == [k]

    # 2. prompts from a model's probabilities (here a perfect model: the reference one-hot), the same slice
    embedded = sam_engine.timing.embedded
    probs = np.stack([label != 1, label == 1]).astype(np.float32)
    items = pseudolabel.model_items(probs, pseudolabel.aligned_planes(label.shape, 2, (k, k)))
    from_model = pseudolabel.add_sam_segment(
        volume, output, run_task(pseudolabel.planes_steps(sam_engine, grid, items, "model")), "SAM (model)")
    mask2 = nodes.segment_mask(output, from_model.segment_id, volume)
    assert not np.delete(mask2, k, axis=2).any()
    assert binary_metrics(mask2[:, :, k], label[:, :, k] == 1)["dice"] > 0.85
    assert json.loads(nodes.segment_tags(output, from_model.segment_id)[nodes.TAG_PROVENANCE])[
        "prompt_source"] == "model"
    assert sam_engine.timing.embedded == embedded  # the second run reused the cached embedding of slice k
    assert len(nodes.segment_ids(output)) == 2  # the first result is still there

    # 3. the Dice review: table rows agree with the metrics computed directly; the plot shows the table
    rows = evaluation.evaluate_segmentations("la", output, reference, volume)
    assert [r["reference"] for r in rows] == ["label 1", "label 1"]
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
    evaluation.fill_table(table, rows)
    back = evaluation.table_rows(table)
    whole = binary_metrics(mask, label == 1, grid.spacing)
    assert abs(back[0]["dice"] - whole["dice"]) < 1e-9 and abs(back[0]["hd95"] - whole["hd95"]) < 1e-9
    assert evaluation.case_of_row(table, 1) == "la"
    chart = evaluation.dice_plot(scene, table)
    series = scene.GetNodeByID(chart.GetNthPlotSeriesNodeID(0))
    assert series.GetTableNodeID() == table.GetID() and series.GetYColumnName() == "dice"
    assert evaluation.dice_plot(scene, table) is chart and chart.GetNumberOfPlotSeriesNodes() == 1
