"""SemiSeg: annotation-efficient segmentation in 3D Slicer (SAM pseudo-labels, review, semi-supervised training).

The widget binds ``Resources/UI/SemiSeg.ui`` to the parameter node and calls :class:`SemiSegLogic`; the logic
delegates all work to the Qt-free ``SemiSegLib`` package (tested headlessly on slicer-core). Dependencies (torch,
MONAI, SAM backends) are installed on first use after asking, never at import time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTableNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from SemiSegLib import dependencies

SCOPES = ("current slice", "slice range", "whole volume")


def given(path) -> Path | None:
    """A path parameter as set by the person, or None (an unset ``Path`` parameter reads as ".")."""
    return Path(path) if path is not None and str(path) not in ("", ".") else None


class SemiSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SemiSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["SemiSeg contributors"]
        self.parent.helpText = _(
            "Annotation-efficient segmentation: SAM pseudo-labels from points, boxes or the current model; a review "
            "queue to accept, correct or reject them; semi-supervised training in a background process; Dice, "
            "HD95 and ASD against a reference. See the extension's README.")
        self.parent.acknowledgementText = _(
            "Uses LiteMedSAM (Apache-2.0), segment-anything and MONAI. Data sets named in the README keep their "
            "own terms.")
        slicer.app.connect("startupCompleted()", registerSAMEffect)


def registerSAMEffect():
    """Add the SAM effect to the Segment Editor (a scripted effect defined in SemiSegLib)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    effect = effects.qSlicerSegmentEditorScriptedEffect(None)
    effect.setPythonSource(str(Path(__file__).resolve().parent / "SemiSegLib" / "SegmentEditorSAMEffect.py"))
    effect.self().register()


@parameterNodeWrapper
class SemiSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    datasetFolder: Path
    referenceSegmentation: vtkMRMLSegmentationNode
    samBackend: Annotated[str, Choice(["litemedsam", "sam", "hf"])] = "litemedsam"
    samCheckpoint: Path
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    promptBox: vtkMRMLMarkupsROINode
    promptFromModel: bool = False
    sliceScope: Annotated[str, Choice(list(SCOPES))] = "current slice"
    firstSlice: Annotated[int, WithinRange(0, 100000)] = 0
    lastSlice: Annotated[int, WithinRange(0, 100000)] = 0
    outputSegmentation: vtkMRMLSegmentationNode
    trainConfig: Path
    method: Annotated[str, Choice(["supervised", "knowledge_mining", "sam_mix", "llm_segnet", "versemi"])] = \
        "supervised"
    iterations: Annotated[int, WithinRange(1, 1000000)] = 6000
    valCases: Annotated[int, WithinRange(0, 10000)] = 2
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    runFolder: Path
    segmentSource: Annotated[str, Choice(["trained model", "SAM"])] = "trained model"
    resultTable: vtkMRMLTableNode


class SemiSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.timer = qt.QTimer()
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.onTrainingTimer)

    def resourcePath(self, filename: str) -> str:
        return str(dependencies.resource_path(filename))  # works from a source checkout and from a build

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SemiSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SemiSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadCaseButton.connect("clicked(bool)", lambda: self.run(self.onLoadCase))
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", lambda _p: self.run(self.refreshDataset))
        self.ui.samApplyButton.connect("clicked(bool)", lambda: self.run(self.onRunSAM))
        self.ui.queueButton.connect("clicked(bool)", lambda: self.run(self.onQueue))
        self.ui.refreshQueueButton.connect("clicked(bool)", lambda: self.run(self.refreshQueue))
        self.ui.openCaseButton.connect("clicked(bool)", lambda: self.run(self.onOpenQueued))
        self.ui.reviewTableWidget.connect("cellDoubleClicked(int,int)", lambda r, c: self.run(self.onOpenQueued))
        self.ui.correctButton.connect("clicked(bool)", lambda: self.run(self.onCorrect))
        self.ui.acceptButton.connect("clicked(bool)", lambda: self.run(self.onAccept))
        self.ui.rejectButton.connect("clicked(bool)", lambda: self.run(self.onReject))
        self.ui.startTrainingButton.connect("clicked(bool)", lambda: self.run(self.onStartTraining))
        self.ui.resumeTrainingButton.connect("clicked(bool)", lambda: self.run(self.onStartTraining))
        self.ui.stopTrainingButton.connect("clicked(bool)", lambda: self.run(self.logic.stopTraining))
        self.ui.segmentButton.connect("clicked(bool)", lambda: self.run(self.onSegment))
        self.ui.evaluateSceneButton.connect("clicked(bool)", lambda: self.run(self.onEvaluateScene))
        self.ui.evaluateDatasetButton.connect("clicked(bool)", lambda: self.run(self.onEvaluateDataset))
        self.ui.showPlotButton.connect("clicked(bool)", lambda: self.run(self.onShowPlot))
        self.ui.metricsTableView.connect("clicked(QModelIndex)", lambda index: self.run(self.onMetricsRow, index))
        self.initializeParameterNode()

    # -- parameter node
    def cleanup(self) -> None:
        self.timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputVolume:
            p.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if given(p.trainConfig) is None:
            default = dependencies.resources_dir() / "configs" / "la2018_supervised.yaml"
            if default.exists():
                p.trainConfig = default

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def run(self, function, *args) -> None:
        """Every action: dependencies first (asks before installing), errors shown in a dialog."""
        with slicer.util.tryWithErrorDisplay(_("SemiSeg failed."), waitCursor=True):
            self.logic.ensureDependencies()
            function(*args)

    # -- 1 Data
    def refreshDataset(self) -> None:
        self.ui.caseComboBox.clear()
        folder = given(self._parameterNode.datasetFolder)
        if folder is None or not folder.is_dir():
            self.ui.datasetSummaryLabel.text = _("No dataset folder selected.")
            return
        cases = self.logic.cases(folder)
        for case in cases:
            self.ui.caseComboBox.addItem(f"{case.id} ({'labelled' if case.label else 'unlabelled'})", case.id)
        n_lab = sum(1 for c in cases if c.label)
        self.ui.datasetSummaryLabel.text = _("{n} cases: {lab} labelled, {unl} unlabelled").format(
            n=len(cases), lab=n_lab, unl=len(cases) - n_lab)
        self.ui.labelledSetLabel.text = self.ui.datasetSummaryLabel.text
        self.refreshQueue()

    def onLoadCase(self, case_id: str | None = None) -> None:
        case_id = case_id or self.ui.caseComboBox.currentData
        volume, reference = self.logic.loadCase(self._parameterNode.datasetFolder, case_id)
        self._parameterNode.inputVolume = volume
        if reference is not None:
            self._parameterNode.referenceSegmentation = reference
        slicer.util.setSliceViewerLayers(background=volume, fit=True)

    # -- 2 SAM
    def sliceRange(self):
        p = self._parameterNode
        if p.sliceScope == "whole volume":
            return None
        if p.sliceScope == "slice range":
            return (p.firstSlice, p.lastSlice)
        k = self.logic.currentSlice(p.inputVolume)
        return (k, k)

    def outputSegmentation(self):
        p = self._parameterNode
        if not p.outputSegmentation:
            p.outputSegmentation = self.logic.newSegmentation(p.inputVolume)
        return p.outputSegmentation

    def onRunSAM(self) -> None:
        p = self._parameterNode
        checkpoint = str(given(p.samCheckpoint) or "")
        result = self.logic.runSAM(p.inputVolume, self.outputSegmentation(), p.samBackend, checkpoint,
                                   p.positivePoints, p.negativePoints, p.promptBox, self.sliceRange(),
                                   given(p.runFolder) if p.promptFromModel else None)
        self.ui.samStatusLabel.text = _("New segment, SAM score {score:.3f}").format(score=result.score)

    def onQueue(self) -> None:
        p = self._parameterNode
        item = self.logic.queueSegment(p.datasetFolder, p.inputVolume, self.outputSegmentation())
        self.ui.samStatusLabel.text = _("Queued {case} for review").format(case=item.case_id)
        self.refreshQueue()

    # -- 3 Review queue
    def refreshQueue(self) -> None:
        table = self.ui.reviewTableWidget
        table.setRowCount(0)
        folder = given(self._parameterNode.datasetFolder)
        if folder is None or not folder.is_dir():
            return
        for row, item in enumerate(self.logic.queue(folder).sorted()):
            table.insertRow(row)
            for col, text in enumerate((item.case_id, f"{item.score:.3f}", item.status)):
                table.setItem(row, col, qt.QTableWidgetItem(text))

    def selectedQueuedCase(self) -> str:
        row = self.ui.reviewTableWidget.currentRow()
        if row < 0:
            raise ValueError(_("Select a case in the review queue first."))
        return self.ui.reviewTableWidget.item(row, 0).text()

    def onOpenQueued(self) -> None:
        p = self._parameterNode
        volume, segmentation = self.logic.openQueued(p.datasetFolder, self.selectedQueuedCase())
        p.inputVolume, p.outputSegmentation = volume, segmentation
        slicer.util.setSliceViewerLayers(background=volume, fit=True)

    def onCorrect(self) -> None:
        self.onOpenQueued()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(self._parameterNode.outputSegmentation)
        editor.setSourceVolumeNode(self._parameterNode.inputVolume)

    def onAccept(self) -> None:
        p = self._parameterNode
        item = self.logic.acceptQueued(p.datasetFolder, self.selectedQueuedCase(), p.outputSegmentation,
                                       p.inputVolume)
        slicer.util.showStatusMessage(_("{case} {status}: {label}").format(case=item.case_id, status=item.status,
                                                                           label=item.label), 5000)
        self.refreshDataset()

    def onReject(self) -> None:
        self.logic.queue(self._parameterNode.datasetFolder).reject(self.selectedQueuedCase())
        self.refreshQueue()

    # -- 4 Train
    def onStartTraining(self) -> None:
        p = self._parameterNode
        self.logic.startTraining(p.trainConfig, p.runFolder, p.datasetFolder, p.method, p.iterations, p.device,
                                 p.valCases)
        self.timer.start()

    def onTrainingTimer(self) -> None:
        progress = self.logic.pollTraining()
        if progress is None:
            return
        self.ui.trainingProgressBar.value = int(100 * progress.fraction)
        text = _("{state}: step {step}/{total}").format(state=progress.state, step=progress.step,
                                                       total=progress.iterations)
        if progress.loss is not None:
            text += _(", loss {loss:.4f}").format(loss=progress.loss)
        if progress.dice is not None:
            text += _(", validation Dice {dice:.3f}").format(dice=progress.dice)
        if progress.message:
            text += "\n" + progress.message
        self.ui.trainingStatusLabel.text = text
        if progress.state != "running":
            self.timer.stop()

    # -- 5 Segment
    def onSegment(self) -> None:
        p = self._parameterNode
        if p.segmentSource == "SAM":
            self.onRunSAM()
        else:
            self.logic.segmentWithModel(p.inputVolume, self.outputSegmentation(), p.runFolder)

    # -- 6 Review Dice
    def resultTable(self):
        p = self._parameterNode
        if not p.resultTable:
            p.resultTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "SemiSeg metrics")
        self.ui.metricsTableView.setMRMLTableNode(p.resultTable)
        return p.resultTable

    def onEvaluateScene(self) -> None:
        p = self._parameterNode
        self.logic.evaluateScene(p.inputVolume, p.outputSegmentation, p.referenceSegmentation, self.resultTable())

    def onEvaluateDataset(self) -> None:
        p = self._parameterNode
        self.logic.evaluateDataset(p.datasetFolder, p.runFolder, self.resultTable())

    def onShowPlot(self) -> None:
        chart = self.logic.dicePlot(self.resultTable())
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onMetricsRow(self, index) -> None:
        case_id = self.logic.caseOfRow(self.resultTable(), index.row())
        if case_id and given(self._parameterNode.datasetFolder) is not None:
            self.onLoadCase(case_id)


class SemiSegLogic(ScriptedLoadableModuleLogic):
    """All computation, usable without the widget (batch mode, tests). The work itself is in SemiSegLib."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.training = None
        self._engines = {}

    def getParameterNode(self):
        return SemiSegParameterNode(super().getParameterNode())

    def ensureDependencies(self) -> None:
        dependencies.ensure_dependencies(ask=not slicer.app.testingEnabled())

    # -- data
    def cases(self, folder):
        from semiseg.data import discover_cases

        return discover_cases(folder)

    def loadCase(self, folder, case_id: str):
        """Load a dataset case's image; its label (if any) becomes the reference segmentation."""
        from semiseg.io import read_label

        from SemiSegLib import nodes

        case = next((c for c in self.cases(folder) if c.id == case_id), None)
        if case is None:
            raise KeyError(f"{folder}: no case '{case_id}'")
        volume = nodes.load_volume(slicer.mrmlScene, case.image, case.id)
        volume.SetAttribute("SemiSeg.CaseId", case.id)
        reference = None
        if case.label:
            reference = nodes.segmentation_from_label(slicer.mrmlScene, read_label(case.label), volume,
                                                      f"{case.id} reference")
        return volume, reference

    def newSegmentation(self, volume):
        from SemiSegLib import nodes

        if volume is None:
            raise ValueError("select an input volume first")
        return nodes.new_segmentation(slicer.mrmlScene, volume, f"{volume.GetName()} SemiSeg")

    def currentSlice(self, volume, view: str = "Red") -> int:
        """The k index of the slice shown in a view (the Red, axial view by default)."""
        from SemiSegLib import nodes

        slice_node = slicer.app.layoutManager().sliceWidget(view).mrmlSliceNode()
        m = slice_node.GetSliceToRAS()
        center = [m.GetElement(0, 3), m.GetElement(1, 3), m.GetElement(2, 3)]
        return int(round(nodes.world_to_ijk(center, volume)[0][2]))

    # -- SAM
    def engine(self, name: str, checkpoint: str = ""):
        """One SAM engine per backend and checkpoint, kept so its embedding cache makes repeated prompts fast."""
        from semiseg.sam import SamEngine, build_backend

        key = (name, checkpoint)
        if key not in self._engines:
            self._engines[key] = SamEngine(build_backend(name, checkpoint or None, device="auto"))
        return self._engines[key]

    def runSAM(self, volume, segmentation, backend_name, checkpoint, positive, negative, roi, slices,
               model_run=None):
        """SAM into a new segment, prompted by the markups or (``model_run``) by a trained model, on ``slices``."""
        from SemiSegLib import pseudolabel

        if volume is None:
            raise ValueError("select an input volume first")
        engine = self.engine(backend_name, checkpoint)
        if model_run:
            from semiseg.infer import load_predictor

            probs = pseudolabel.model_probabilities(volume, load_predictor(str(model_run)))
            return pseudolabel.sam_segment_from_model(volume, segmentation, engine, probs, slices)
        prompts = pseudolabel.markup_prompts(volume, positive, negative, roi)
        return pseudolabel.sam_segment(volume, segmentation, engine, pseudolabel.restrict(prompts, slices))

    def segmentWithModel(self, volume, segmentation, run_folder):
        from semiseg.infer import load_predictor

        from SemiSegLib import pseudolabel

        if given(run_folder) is None or not Path(run_folder).is_dir():
            raise ValueError(f"'{run_folder}': choose a trained run folder in the Train section")
        return pseudolabel.model_segment(volume, segmentation, load_predictor(str(run_folder)))

    # -- review queue
    def queue(self, folder):
        from SemiSegLib.review import ReviewQueue

        return ReviewQueue(folder)

    def queueSegment(self, folder, volume, segmentation, segment_id: str | None = None):
        from SemiSegLib import review

        return review.queue_segment(self.queue(folder), volume, segmentation, segment_id)

    def openQueued(self, folder, case_id: str):
        from semiseg.io import read_label

        from SemiSegLib import nodes

        item = self.queue(folder).get(case_id)
        volume = nodes.load_volume(slicer.mrmlScene, item.image, case_id)
        volume.SetAttribute("SemiSeg.CaseId", case_id)
        seg = nodes.segmentation_from_label(slicer.mrmlScene, read_label(item.pseudo_label), volume,
                                            f"{case_id} pseudo-label")
        return volume, seg

    def acceptQueued(self, folder, case_id, segmentation, volume):
        from SemiSegLib import review

        return review.accept_segmentation(self.queue(folder), case_id, segmentation, volume)

    # -- training
    def startTraining(self, config, run_folder, dataset_folder, method, iterations, device, val_cases):
        from SemiSegLib.training import TrainingProcess, training_overrides

        if given(run_folder) is None:
            raise ValueError("choose a run folder for the training")
        if given(config) is None:
            raise ValueError("choose a training config (Resources/configs/*.yaml)")
        if self.training is not None and self.training.is_running():
            raise RuntimeError(f"{self.training.run_dir}: training is already running")
        folder, labelled, val, accepted = given(dataset_folder), None, None, []
        if folder is not None:  # every labelled case but the validation ones trains; accepted ones always train
            accepted = [i.case_id for i in self.queue(folder).sorted() if i.status in ("accepted", "corrected")]
            labelled = sum(1 for c in self.cases(folder) if c.label) - int(val_cases) - len(accepted)
            val = int(val_cases)
        overrides = training_overrides(str(folder) if folder else None, method, iterations, device, labelled, val,
                                       accepted)
        self.training = TrainingProcess(config, run_folder, overrides)
        self.training.start()
        return self.training

    def pollTraining(self):
        return self.training.poll() if self.training is not None else None

    def stopTraining(self) -> None:
        if self.training is not None:
            self.training.stop()

    # -- Dice review
    def evaluateScene(self, volume, prediction, reference, table):
        from SemiSegLib import evaluation

        if prediction is None or reference is None:
            raise ValueError("select an output segmentation (section 2) and a reference segmentation (section 1)")
        case_id = volume.GetAttribute("SemiSeg.CaseId") or volume.GetName()
        rows = evaluation.evaluate_segmentations(case_id, prediction, reference, volume)
        evaluation.fill_table(table, rows)
        return rows

    def evaluateDataset(self, folder, run_folder, table):
        from SemiSegLib import evaluation

        rows = evaluation.evaluate_run_on_dataset(folder, str(run_folder))
        evaluation.fill_table(table, rows)
        return rows

    def dicePlot(self, table):
        from SemiSegLib import evaluation

        return evaluation.dice_plot(slicer.mrmlScene, table)

    def caseOfRow(self, table, row: int) -> str:
        from SemiSegLib import evaluation

        return evaluation.case_of_row(table, row)


class SemiSegTest(ScriptedLoadableModuleTest):
    """The headless scenario of Testing/slicer, inside Slicer: LA volume -> SAM segment -> Dice table.

    Needs the data folder (env SEMISEG_DATA, default ``<repo>/../shared/data``) and the SAM dependencies; it skips
    with a message when either is missing (e.g. on a build machine without the data)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SAMSegmentAndDice()

    def test_SAMSegmentAndDice(self):
        import numpy as np

        data = Path(os.environ.get("SEMISEG_DATA", dependencies.MODULE_DIR.parent.parent / "shared" / "data"))
        image_path = next(iter(sorted((data / "la2018" / "imagesTr").glob("*.nii.gz"))), None)
        if image_path is None:
            self.delayDisplay(f"SemiSegTest skipped: no LA 2018 data under {data}")
            return
        logic = SemiSegLogic()
        logic.ensureDependencies()
        from semiseg.io import read_label

        from SemiSegLib import nodes

        volume = nodes.load_volume(slicer.mrmlScene, str(image_path))
        label = read_label(str(image_path).replace("imagesTr", "labelsTr"))
        reference = nodes.segmentation_from_label(slicer.mrmlScene, label, volume, "reference")
        ks = np.nonzero((label.array == 1).any(axis=(0, 1)))[0]
        k = int(ks[len(ks) // 2])
        ii, jj = np.nonzero(label.array[:, :, k] == 1)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        affine = nodes.image_from_volume(volume).affine
        lo = affine @ [ii.min() - 3, jj.min() - 3, k, 1]
        hi = affine @ [ii.max() + 3, jj.max() + 3, k, 1]
        roi.SetCenter(list((lo[:3] + hi[:3]) / 2))
        roi.SetSize(*[abs(v) + 1 for v in (hi[:3] - lo[:3])])
        self.delayDisplay("Running SAM on one slice")
        output = logic.newSegmentation(volume)
        result = logic.runSAM(volume, output, "litemedsam", "", None, None, roi, (k, k))
        self.assertGreater(result.score, 0.5)
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
        mask = nodes.segment_mask(output, result.segment_id, volume)
        ref = label.array == 1
        dice = 2 * (mask[:, :, k] & ref[:, :, k]).sum() / (mask[:, :, k].sum() + ref[:, :, k].sum())
        self.assertGreater(dice, 0.8)
        rows = logic.evaluateScene(volume, output, reference, table)
        self.assertEqual(table.GetNumberOfRows(), len(rows))
        self.delayDisplay(f"SAM slice Dice {dice:.3f}; test passed")
