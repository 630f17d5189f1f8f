"""SemiSeg.py itself: the module, its widget and its Logic, opened on the slicer-core wheel with the stand-in for what
only the Slicer application has (Testing/slicer/slicer_app_standin.py). Real scenes, real data, real LiteMedSAM."""
import json
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from conftest import REPO, view_node
from semiseg.io import read_label
from SemiSegLib import nodes, review

OPEN_WIDGET = textwrap.dedent("""
    import sys
    sys.path[:0] = [{core!r}, {ext!r}, {testing!r}]
    import slicer
    from slicer_app_standin import Installed, open_widget
    from SemiSegLib import dependencies

    calls = []
    real = dependencies.ensure_dependencies
    dependencies.ensure_dependencies = lambda *a, **k: calls.append(a) or real(*a, **k)
    installed = Installed(slicer.vtkMRMLScene())
    SemiSeg, widget = open_widget(installed)
    ui = widget.ui
    shown = {{n: getattr(ui, n).currentPath for n in ("datasetPathLineEdit", "samCheckpointPathLineEdit",
                                                   "runFolderPathLineEdit", "trainConfigPathLineEdit")}}
    for ch in {dataset!r}:  # typing a dataset folder, key by key, then a pause
        ui.datasetPathLineEdit.currentPath += ch
    widget.datasetTimer.fire()
    print(repr(dict(torch="torch" in sys.modules, monai="monai" in sys.modules, ensure=len(calls), shown=shown,
                    summary=ui.datasetSummaryLabel.text, cases=ui.caseComboBox.count(),
                    effect=[s for s, _ in installed.app.connections])))
""")


def test_opening_the_widget_installs_nothing_and_imports_no_torch(msd_dataset):
    """A fresh interpreter: open the module, type a dataset folder; nothing is installed, torch is never loaded."""
    root, _ = msd_dataset
    code = OPEN_WIDGET.format(core=str(REPO / "SemiSegCore"), ext=str(REPO / "SemiSegExtension"),
                              testing=str(REPO / "Testing" / "slicer"), dataset=str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    state = eval(out.stdout.strip().splitlines()[-1])
    assert state["torch"] is False and state["monai"] is False
    assert state["ensure"] == 0  # no dependency check, let alone an install
    shown = state["shown"]
    assert shown["datasetPathLineEdit"] == shown["samCheckpointPathLineEdit"] == shown["runFolderPathLineEdit"] == ""
    assert shown["trainConfigPathLineEdit"].endswith("la2018_supervised.yaml")  # the packaged example config
    assert state["summary"] == "3 cases: 2 labelled, 1 unlabelled" and state["cases"] == 3
    assert state["effect"] == ["startupCompleted()"]  # the SAM effect registers once Slicer has started


def test_the_sam_effect_registers_when_the_module_loads_after_startup(slicer_app):
    from slicer_app_standin import Widget

    slicer_app.app.windows.append(Widget("qSlicerMainWindow", "qSlicerMainWindow"))  # shown: Slicer has started
    import SemiSeg

    SemiSeg.SemiSeg(types.SimpleNamespace())
    assert slicer_app.app.connections == []  # startupCompleted() will not come again
    assert slicer_app.qt.QTimer.pending == [SemiSeg.registerSAMEffect]  # registered as soon as events run


@pytest.fixture
def widget(slicer_app):
    from slicer_app_standin import open_widget

    module, widget = open_widget(slicer_app)
    yield widget
    widget.cleanup()


def _set_dataset(widget, root):
    widget.ui.datasetPathLineEdit.currentPath = str(root)
    widget.datasetTimer.fire()


def _select_queued(widget, case_id):
    table = widget.ui.reviewTableWidget
    row = next(r for r in range(table.rowCount()) if table.item(r, 0).text() == case_id)
    table.setCurrentCell(row, 0)


def _volumes(scene, case_id):
    found = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    volumes = [found.GetItemAsObject(i) for i in range(found.GetNumberOfItems())]
    return [n for n in volumes if n.GetAttribute("SemiSeg.CaseId") == case_id]


def test_cases_load_one_at_a_time_and_review_keeps_label_values(widget, scene, msd_dataset):
    root, cases = msd_dataset
    ui, p, logic = widget.ui, widget._parameterNode, widget.logic
    _set_dataset(widget, root)
    ids = [ui.caseComboBox._items[i][1] for i in range(ui.caseComboBox.count())]

    # Load case: the image and its label as the reference; the next case replaces it in the scene
    ui.caseComboBox.currentIndex = 0
    ui.loadCaseButton.click()
    first = p.inputVolume
    assert first.GetAttribute("SemiSeg.CaseId") == ids[0] and p.referenceSegmentation is not None
    ui.caseComboBox.currentIndex = 1
    ui.loadCaseButton.click()
    assert first.GetScene() is None and p.inputVolume.GetAttribute("SemiSeg.CaseId") == ids[1]

    # a two-label pseudo-label queued for the unlabelled case
    unlabelled = ids[2]
    reference = read_label(cases[2][1])
    two = reference.array.astype(np.uint8)
    two[:, :, two.shape[2] // 2:] *= 2  # upper half: label 2
    review.ReviewQueue(root).add(unlabelled, str(root / "imagesTr" / cases[2][0].name),
                                 reference.with_array(two), 0.7, {"source": "sam"})
    widget.refreshQueue()
    _select_queued(widget, unlabelled)
    ui.openCaseButton.click()
    pseudo = p.outputSegmentation
    assert sorted(nodes.label_values(pseudo).values()) == [1, 2]
    assert not _volumes(scene, ids[1])  # the previous case left the scene
    assert logic.isOpen(unlabelled)
    volume_before = p.inputVolume
    ui.openCaseButton.click()  # opening it again (as Correct does) reuses the loaded case
    assert p.inputVolume is volume_before and len(_volumes(scene, unlabelled)) == 1

    # Accept writes each segment's own label value; removing label 1 keeps label 2 as 2
    ui.acceptButton.click()
    item = review.ReviewQueue(root).get(unlabelled)
    assert item.status == "accepted"
    np.testing.assert_array_equal(read_label(item.label).array, two)
    label1 = next(s for s, v in nodes.label_values(pseudo).items() if v == 1)
    pseudo.GetSegmentation().RemoveSegment(label1)
    ui.acceptButton.click()
    item = review.ReviewQueue(root).get(unlabelled)
    assert item.status == "corrected"
    np.testing.assert_array_equal(read_label(item.label).array, np.where(two == 2, 2, 0))

    # the edited pseudo-label stays in the scene when another case is loaded
    ui.caseComboBox.currentIndex = 0
    ui.loadCaseButton.click()
    assert pseudo.GetScene() is scene and logic.keptNodes == [pseudo.GetName()]
    assert "Kept" in ui.samStatusLabel.text


def test_unset_folders_give_clear_errors_not_the_working_directory(widget):
    from SemiSeg import SemiSegLogic

    logic = SemiSegLogic()
    with pytest.raises(ValueError, match="Choose a dataset folder first"):
        logic.cases("")
    with pytest.raises(ValueError, match="Choose a dataset folder first"):
        logic.queue(".")
    with pytest.raises(ValueError, match="run folder"):
        logic.startTraining(logic.defaultConfig(), "", "", "supervised", 10, "cpu", 1)
    with pytest.raises(ValueError, match="Choose a dataset folder"):  # the example config's data.root is relative
        logic.startTraining(logic.defaultConfig(), "/tmp/semiseg-run", "", "supervised", 10, "cpu", 1)


def atrium_box(scene, la_case, label, k):
    """The LA volume and an ROI around the atrium on slices k-1..k+1 (3 voxels of margin),
    with the Red view on slice k."""
    volume = nodes.load_volume(scene, str(la_case[0]), "la")
    affine = nodes.ijk_to_ras(volume)
    ii, jj = np.nonzero(label[:, :, k] == 1)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    lo, hi = affine @ [ii.min() - 3, jj.min() - 3, k - 1, 1], affine @ [ii.max() + 3, jj.max() + 3, k + 1, 1]
    roi.SetCenter(list((lo[:3] + hi[:3]) / 2))
    roi.SetSize(*[abs(v) + 0.1 for v in hi[:3] - lo[:3]])
    view_node(scene, "Red", [0, 0, 1], affine @ [0, 0, k, 1])
    return volume, roi


def test_sam_runs_as_a_task_with_progress_and_cancel(widget, scene, la_case, la_mid_slice, sam_engine):
    """Run SAM from the SAM section: slice by slice with progress; Cancel leaves the segmentation untouched."""
    label, k = la_mid_slice
    ui, p = widget.ui, widget._parameterNode
    volume, roi = atrium_box(scene, la_case, label, k)
    p.inputVolume, p.promptBox = volume, roi
    p.sliceScope, p.firstSlice, p.lastSlice = "slice range", k - 1, k + 1

    ui.samApplyButton.click()
    task = widget.task
    messages = []
    while widget.task is not None and "2 of 3" not in ui.taskStatusLabel.text:
        widget.taskTimer.fire()
        messages.append(ui.taskStatusLabel.text)
    assert ui.taskProgressBar.visible and ui.cancelTaskButton.enabled and 0 < ui.taskProgressBar.value < 100
    ui.cancelTaskButton.click()
    assert task.state == "cancelled" and widget.task is None and "cancelled" in ui.taskStatusLabel.text
    assert nodes.segment_ids(p.outputSegmentation) == []  # nothing half-written
    assert not ui.taskProgressBar.visible and not ui.cancelTaskButton.enabled

    p.sliceScope = "current slice"  # the Red view's slice, k
    ui.samApplyButton.click()
    while widget.task is not None:
        widget.taskTimer.fire()
    (sid,) = nodes.segment_ids(p.outputSegmentation)
    mask = nodes.segment_mask(p.outputSegmentation, sid, volume)
    assert mask[:, :, k].any() and not np.delete(mask, k, axis=2).any()
    assert "SAM score" in ui.samStatusLabel.text and "done" in ui.taskStatusLabel.text


def test_propagation_follows_the_structure_within_the_box(scene, la_case, la_mid_slice, sam_engine, slicer_app):
    """Propagate from the Red view's slice: box -> mask -> box on the neighbouring slices, bounded by the ROI's
    slices as in MedSAM-Lite; one new segment (one undo step)."""
    from SemiSeg import SemiSegLogic
    from semiseg.metrics import dice_score
    from SemiSegLib.tasks import run_task

    label, k = la_mid_slice
    volume, roi = atrium_box(scene, la_case, label, k)
    box = nodes.roi_box_ijk(roi, volume)
    assert round(box[0][2]) == k - 1 and round(box[1][2]) == k + 1
    logic = SemiSegLogic()
    output = logic.newSegmentation(volume)
    result = run_task(logic.samSteps(volume, output, "litemedsam", "", None, None, roi, "propagate", "Red"))
    mask = nodes.segment_mask(output, result.segment_id, volume)
    assert sorted(np.nonzero(mask.any(axis=(0, 1)))[0].tolist()) == [k - 1, k, k + 1]
    for s in (k - 1, k, k + 1):
        assert dice_score(mask[:, :, s], label[:, :, s] == 1) > 0.75, s
    ended = result.provenance["propagation"]["ended"]
    assert ended["+"] == f"limit at slice {k + 1}" and ended["-"] == f"limit at slice {k - 1}"
    assert len(nodes.segment_ids(output)) == 1
    tags = nodes.segment_tags(output, result.segment_id)
    assert json.loads(tags[nodes.TAG_PROVENANCE])["prompt_source"] == "propagation"
