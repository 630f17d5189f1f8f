"""SemiSeg: annotation-efficient segmentation in 3D Slicer (SAM pseudo-labels, review, semi-supervised training).

The widget binds ``Resources/UI/SemiSeg.ui`` to the parameter node and calls :class:`SemiSegLogic`; the logic
delegates all work to the Qt-free ``SemiSegLib`` package (tested headlessly on slicer-core). Opening the module
installs and imports nothing heavy: dependencies (torch, MONAI, SAM backends) are installed, after asking, when an
action first needs them. Long work (SAM over many slices, a model over a volume, a dataset evaluation, downloads)
runs as a task with a progress bar and Cancel; training runs in its own process tree.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTableNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import (Choice, GuiConnector, WithinRange, parameterNodeGuiConnector,
                                         parameterNodeWrapper)
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from SemiSegLib import dependencies

SCOPES = ("current slice", "slice range", "whole volume", "propagate")
VIEWS = ("Red", "Yellow", "Green")


def given(path) -> Path | None:
    """A path parameter as set by the person, or None when unset ("" or ".")."""
    return Path(path) if path is not None and str(path).strip() not in ("", ".") else None


def required_folder(path, what: str) -> Path:
    """An existing folder, or a ValueError that says which one to choose (an unset path is never Slicer's
    working directory)."""
    folder = given(path)
    if folder is None:
        raise ValueError(_("Choose {what} first.").format(what=what))
    if not folder.is_dir():
        raise ValueError(_("{path}: {what} not found.").format(path=folder, what=what))
    return folder


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
        problem = dependencies.slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion)
        if problem:
            self.parent.helpText = problem + "\n\n" + self.parent.helpText
            import logging

            logging.error(problem)
        # The effect registry is ready once Slicer has started; a module loaded later registers at once.
        mainWindow = slicer.util.mainWindow()
        if mainWindow is not None and mainWindow.isVisible():
            qt.QTimer.singleShot(0, registerSAMEffect)
        else:
            slicer.app.connect("startupCompleted()", registerSAMEffect)


def registerSAMEffect():
    """Add the SAM effect to the Segment Editor (a scripted effect defined in SemiSegLib); once per session."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    factory = slicer.qSlicerSegmentEditorEffectFactory.instance()
    if any(effect.name == "SAM" for effect in getattr(factory, "registeredEffects", list)()):
        return
    effect = effects.qSlicerSegmentEditorScriptedEffect(None)
    effect.setPythonSource(str(Path(__file__).resolve().parent / "SemiSegLib" / "SegmentEditorSAMEffect.py"))
    effect.self().register()


@parameterNodeGuiConnector
class PathLineEditToStrConnector(GuiConnector):
    """ctkPathLineEdit <-> str parameter: an unset path is "" and shows empty (a Path parameter would show ".")."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        if typing.get_origin(datatype) is Annotated:
            datatype = typing.get_args(datatype)[0]
        return datatype is str and widget.className() == "ctkPathLineEdit"

    @staticmethod
    def create(widget, datatype):
        return PathLineEditToStrConnector(widget) if PathLineEditToStrConnector.canRepresent(widget, datatype) \
            else None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _connect(self):
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return self._widget.currentPath.strip()

    def write(self, value: str) -> None:
        if self._widget.currentPath != value:
            self._widget.currentPath = value


@parameterNodeWrapper
class SemiSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    datasetFolder: str = ""
    referenceSegmentation: vtkMRMLSegmentationNode
    samBackend: Annotated[str, Choice(["litemedsam", "sam", "hf"])] = "litemedsam"
    samCheckpoint: str = ""
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    promptBox: vtkMRMLMarkupsROINode
    promptFromModel: bool = False
    sliceView: Annotated[str, Choice(list(VIEWS))] = "Red"
    sliceScope: Annotated[str, Choice(list(SCOPES))] = "current slice"
    firstSlice: Annotated[int, WithinRange(0, 100000)] = 0
    lastSlice: Annotated[int, WithinRange(0, 100000)] = 0
    outputSegmentation: vtkMRMLSegmentationNode
    trainConfig: str = ""
    method: Annotated[str, Choice(["supervised", "knowledge_mining", "sam_mix", "llm_segnet", "versemi"])] = \
        "supervised"
    iterations: Annotated[int, WithinRange(1, 1000000)] = 6000
    valCases: Annotated[int, WithinRange(0, 10000)] = 2
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    runFolder: str = ""
    segmentSource: Annotated[str, Choice(["trained model", "SAM"])] = "trained model"
    resultTable: vtkMRMLTableNode


class SemiSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.task = None
        self.onTaskDone = None
        self.trainingTimer = qt.QTimer()
        self.trainingTimer.setInterval(1000)
        self.trainingTimer.timeout.connect(self.onTrainingTimer)
        self.taskTimer = qt.QTimer()
        self.taskTimer.setInterval(0)
        self.taskTimer.timeout.connect(self.onTaskTimer)
        self.datasetTimer = qt.QTimer()  # the dataset summary follows typing in the path field, once it pauses
        self.datasetTimer.setSingleShot(True)
        self.datasetTimer.setInterval(500)
        self.datasetTimer.timeout.connect(lambda: self.guarded(self.refreshDataset))

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

        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", lambda _p: self.datasetTimer.start())
        self.ui.loadCaseButton.connect("clicked(bool)", lambda: self.action(self.onLoadCase))
        self.ui.samApplyButton.connect("clicked(bool)", lambda: self.action(self.onRunSAM))
        self.ui.queueButton.connect("clicked(bool)", lambda: self.action(self.onQueue))
        self.ui.refreshQueueButton.connect("clicked(bool)", lambda: self.guarded(self.refreshQueue))
        self.ui.openCaseButton.connect("clicked(bool)", lambda: self.action(self.onOpenQueued))
        self.ui.reviewTableWidget.connect("cellDoubleClicked(int,int)", lambda r, c: self.action(self.onOpenQueued))
        self.ui.correctButton.connect("clicked(bool)", lambda: self.action(self.onCorrect))
        self.ui.acceptButton.connect("clicked(bool)", lambda: self.action(self.onAccept))
        self.ui.rejectButton.connect("clicked(bool)", lambda: self.guarded(self.onReject))
        self.ui.startTrainingButton.connect("clicked(bool)", lambda: self.action(self.onStartTraining))
        self.ui.resumeTrainingButton.connect("clicked(bool)", lambda: self.action(self.onStartTraining))
        self.ui.stopTrainingButton.connect("clicked(bool)", lambda: self.guarded(self.onStopTraining))
        self.ui.segmentButton.connect("clicked(bool)", lambda: self.action(self.onSegment))
        self.ui.evaluateSceneButton.connect("clicked(bool)", lambda: self.action(self.onEvaluateScene))
        self.ui.evaluateDatasetButton.connect("clicked(bool)", lambda: self.action(self.onEvaluateDataset))
        self.ui.showPlotButton.connect("clicked(bool)", lambda: self.guarded(self.onShowPlot))
        self.ui.metricsTableView.connect("clicked(QModelIndex)", lambda index: self.action(self.onMetricsRow, index))
        self.ui.cancelTaskButton.connect("clicked(bool)", self.onCancelTask)
        self.showTask(None)
        self.initializeParameterNode()

    # -- parameter node
    def cleanup(self) -> None:
        self.trainingTimer.stop()
        self.datasetTimer.stop()
        if self.task is not None:
            self.task.cancel()
        self.taskTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.logic.openCase = None  # its nodes go with the scene

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputVolume:
            p.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not p.trainConfig:
            p.trainConfig = self.logic.defaultConfig()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.datasetTimer.start()

    def guarded(self, function, *args) -> None:
        """An action that needs no extra packages: errors shown in a dialog."""
        with slicer.util.tryWithErrorDisplay(_("SemiSeg failed."), waitCursor=True):
            function(*args)

    def action(self, function, *args) -> None:
        """An action that needs SemiSeg's packages: installed first (after asking), errors shown in a dialog."""
        with slicer.util.tryWithErrorDisplay(_("SemiSeg failed."), waitCursor=True):
            self.logic.ensureDependencies()
            function(*args)

    # -- long work: one task at a time, stepped from a timer, with progress and Cancel
    def startTask(self, name: str, steps, onDone) -> None:
        from SemiSegLib.tasks import Task

        if self.task is not None:
            steps.close()
            raise RuntimeError(_("{task} is still running: wait for it or cancel it.").format(task=self.task.name))
        self.task, self.onTaskDone = Task(name, steps), onDone
        self.showTask(self.task)
        self.taskTimer.start()

    def onTaskTimer(self) -> None:
        task = self.task
        if task is None:
            self.taskTimer.stop()
            return
        if task.step():
            self.taskTimer.setInterval(100 if task.progress.waiting else 0)
            self.showTask(task)
            return
        self.taskTimer.stop()
        self.task, onDone = None, self.onTaskDone
        self.showTask(None, task)
        if task.state == "done":
            self.guarded(onDone, task.result)
        elif task.state == "failed":
            self.guarded(self.raiseTaskError, task)

    @staticmethod
    def raiseTaskError(task):
        raise task.error

    def onCancelTask(self) -> None:
        if self.task is not None:
            task, self.task = self.task, None
            task.cancel()
            self.taskTimer.stop()
            self.showTask(None, task)

    def showTask(self, task, finished=None) -> None:
        busy = task is not None
        self.ui.taskProgressBar.visible = busy
        self.ui.cancelTaskButton.enabled = busy
        if busy:
            fraction = task.progress.fraction
            self.ui.taskProgressBar.setRange(0, 0 if fraction is None else 100)
            if fraction is not None:
                self.ui.taskProgressBar.value = int(100 * fraction)
            self.ui.taskStatusLabel.text = task.progress.message or task.name
        elif finished is not None:
            self.ui.taskStatusLabel.text = {"done": _("{task}: done."), "cancelled": _("{task}: cancelled."),
                                            "failed": _("{task}: failed.")}[finished.state].format(task=finished.name)

    # -- 1 Data
    def refreshDataset(self) -> None:
        self.ui.caseComboBox.clear()
        folder = given(self._parameterNode.datasetFolder) if self._parameterNode else None
        if folder is None or not folder.is_dir():
            self.ui.datasetSummaryLabel.text = _("No dataset folder selected.")
            self.ui.labelledSetLabel.text = ""
            self.ui.reviewTableWidget.setRowCount(0)
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
        if not case_id:
            raise ValueError(_("Choose a dataset folder and a case first."))
        volume, reference = self.logic.loadCase(self._parameterNode.datasetFolder, case_id)
        self._parameterNode.inputVolume = volume
        if reference is not None:
            self._parameterNode.referenceSegmentation = reference
        self.logic.showVolume(volume)
        self.reportKept()

    def reportKept(self) -> None:
        if self.logic.keptNodes:
            self.ui.samStatusLabel.text = _("Kept the previous case's edited {names} in the scene.").format(
                names=", ".join(self.logic.keptNodes))

    # -- 2 SAM
    def sliceRange(self):
        p = self._parameterNode
        return (p.firstSlice, p.lastSlice) if p.sliceScope == "slice range" else None

    def outputSegmentation(self):
        p = self._parameterNode
        if not p.outputSegmentation:
            p.outputSegmentation = self.logic.newSegmentation(p.inputVolume)
        return p.outputSegmentation

    def onRunSAM(self) -> None:
        p = self._parameterNode
        steps = self.logic.samSteps(p.inputVolume, self.outputSegmentation(), p.samBackend, p.samCheckpoint,
                                    p.positivePoints, p.negativePoints, p.promptBox, p.sliceScope, p.sliceView,
                                    self.sliceRange(), p.runFolder if p.promptFromModel else None)

        def done(result):
            self.ui.samStatusLabel.text = _("New segment, SAM score {score:.3f}").format(score=result.score)

        self.startTask(_("SAM"), steps, done)

    def onQueue(self) -> None:
        p = self._parameterNode
        item = self.logic.queueSegment(p.datasetFolder, p.inputVolume, p.outputSegmentation)
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
        self.logic.showVolume(volume)
        self.reportKept()

    def onCorrect(self) -> None:
        case_id = self.selectedQueuedCase()
        if not self.logic.isOpen(case_id):
            self.onOpenQueued()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(self._parameterNode.outputSegmentation)
        editor.setSourceVolumeNode(self._parameterNode.inputVolume)

    def onAccept(self) -> None:
        p = self._parameterNode
        case_id = self.selectedQueuedCase()
        if not self.logic.isOpen(case_id):
            raise ValueError(_("Open {case} (Open or Correct) before accepting it.").format(case=case_id))
        item = self.logic.acceptQueued(p.datasetFolder, case_id, p.outputSegmentation, p.inputVolume)
        slicer.util.showStatusMessage(_("{case} {status}: {label}").format(case=item.case_id, status=item.status,
                                                                           label=item.label), 5000)
        self.refreshDataset()

    def onReject(self) -> None:
        self.logic.queue(required_folder(self._parameterNode.datasetFolder, _("a dataset folder"))).reject(
            self.selectedQueuedCase())
        self.refreshQueue()

    # -- 4 Train
    def onStartTraining(self) -> None:
        p = self._parameterNode
        self.logic.startTraining(p.trainConfig, p.runFolder, p.datasetFolder, p.method, p.iterations, p.device,
                                 p.valCases)
        self.ui.stopTrainingButton.text = _("Stop")
        self.trainingTimer.start()

    def onStopTraining(self) -> None:
        """First click: the trainer saves and stops at its next step. Again, after asking: end it at once."""
        training = self.logic.training
        if training is None or not training.is_running():
            return
        if not training.stop_requested():
            self.logic.stopTraining()
            self.ui.trainingStatusLabel.text = _("Stopping: the trainer saves a checkpoint at its next step.")
            self.ui.stopTrainingButton.text = _("Stop now")
        elif slicer.util.confirmOkCancelDisplay(_("End training now? Steps since the last checkpoint are lost.")):
            self.logic.killTraining()

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
            self.trainingTimer.stop()
            self.ui.stopTrainingButton.text = _("Stop")

    # -- 5 Segment
    def onSegment(self) -> None:
        p = self._parameterNode
        if p.segmentSource == "SAM":
            self.onRunSAM()
            return
        steps = self.logic.segmentSteps(p.inputVolume, self.outputSegmentation(), p.runFolder)
        self.startTask(_("Segmenting"), steps, lambda results: None)

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
        steps = self.logic.evaluateDatasetSteps(p.datasetFolder, p.runFolder, self.resultTable())
        self.startTask(_("Evaluating the dataset"), steps, lambda rows: None)

    def onShowPlot(self) -> None:
        chart = self.logic.dicePlot(self.resultTable())
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onMetricsRow(self, index) -> None:
        case_id = self.logic.caseOfRow(self.resultTable(), index.row())
        if case_id and given(self._parameterNode.datasetFolder) is not None and not self.logic.isOpen(case_id):
            self.onLoadCase(case_id)


class SemiSegLogic(ScriptedLoadableModuleLogic):
    """All computation, usable without the widget (batch mode, tests). The work itself is in SemiSegLib. Long work
    comes as step generators (``*Steps``): run one with ``SemiSegLib.tasks.run_task`` or step it from a timer."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        dependencies.ensure_core_importable()  # semiseg itself: beside the module when installed, or the checkout's
        self.training = None
        self.openCase = None  # SemiSegLib.review.OpenCase: the nodes of the case loaded last
        self.keptNodes: list[str] = []

    def getParameterNode(self):
        return SemiSegParameterNode(super().getParameterNode())

    def ensureDependencies(self) -> None:
        dependencies.ensure_dependencies(ask=not slicer.app.testingEnabled())

    def defaultConfig(self) -> str:
        """The example supervised LA config shipped with semiseg, or "" when it cannot be found."""
        from semiseg.resources import config_path

        try:
            return str(config_path("la2018_supervised"))
        except FileNotFoundError:
            return ""

    def showVolume(self, volume) -> None:
        if slicer.app.layoutManager() is not None:
            slicer.util.setSliceViewerLayers(background=volume, fit=True)

    # -- data
    def cases(self, folder):
        from semiseg.data import discover_cases

        return discover_cases(required_folder(folder, _("a dataset folder")))

    def _openCase(self, case_id: str, nodes_loaded: list) -> None:
        """Record the nodes of a newly opened case; the previous case's nodes leave the scene unless edited."""
        from SemiSegLib.review import OpenCase

        self.keptNodes = self.openCase.close(slicer.mrmlScene) if self.openCase is not None else []
        self.openCase = OpenCase(case_id, [n for n in nodes_loaded if n is not None])

    def isOpen(self, case_id: str) -> bool:
        return self.openCase is not None and self.openCase.case_id == case_id and all(
            n.GetScene() is slicer.mrmlScene for n in self.openCase.nodes)

    def loadCase(self, folder, case_id: str):
        """Load a dataset case's image; its label (if any) becomes the reference segmentation. The previously
        loaded case leaves the scene (unless a person edited its segmentation)."""
        from semiseg.data import dataset_labels
        from semiseg.io import read_label

        from SemiSegLib import nodes

        folder = required_folder(folder, _("a dataset folder"))
        case = next((c for c in self.cases(folder) if c.id == case_id), None)
        if case is None:
            raise KeyError(f"{folder}: no case '{case_id}'")
        volume = nodes.load_volume(slicer.mrmlScene, case.image, case.id)
        volume.SetAttribute("SemiSeg.CaseId", case.id)
        reference = None
        if case.label:
            reference = nodes.segmentation_from_label(slicer.mrmlScene, read_label(case.label), volume,
                                                      f"{case.id} reference", dataset_labels(folder))
        self._openCase(case.id, [volume, reference])
        return volume, reference

    def newSegmentation(self, volume):
        from SemiSegLib import nodes

        if volume is None:
            raise ValueError(_("Select an input volume first."))
        return nodes.new_segmentation(slicer.mrmlScene, volume, f"{volume.GetName()} SemiSeg")

    def sliceNode(self, view: str):
        """The slice node of a view by its layout name (Red, Yellow, Green)."""
        for node in slicer.util.getNodesByClass("vtkMRMLSliceNode", slicer.mrmlScene):
            if node.GetLayoutName() == view:
                return node
        raise ValueError(_("No {view} slice view in this layout.").format(view=view))

    def sliceToRAS(self, view: str):
        from SemiSegLib import nodes

        return nodes.numpy_matrix(self.sliceNode(view).GetSliceToRAS())

    def viewPlane(self, volume, view: str = "Red"):
        """The plane the view shows through the volume (any orientation)."""
        from SemiSegLib import nodes
        from SemiSegLib.planes import Plane

        return Plane.from_view(self.sliceToRAS(view), nodes.ijk_to_ras(volume),
                               nodes.image_from_volume(volume).spatial_shape)

    # -- SAM
    def samSteps(self, volume, segmentation, backend, checkpoint, positive, negative, roi, scope="current slice",
                 view="Red", slices=None, modelRun=None):
        """SAM into a new segment, one slice per step: on the view's slice ("current slice"), on the voxel slices
        ``slices`` or all of them along the axis normal to the view, or propagated from the view's slice until the
        structure ends ("propagate"). Prompts come from the markups or (``modelRun``) from a trained model."""
        from SemiSegLib import nodes, pseudolabel
        from SemiSegLib.downloads import checkpoint_info, download_steps
        from SemiSegLib.planes import PlaneError, view_axis
        from SemiSegLib.tasks import Progress

        if volume is None:
            raise ValueError(_("Select an input volume first."))
        if segmentation is None:
            raise ValueError(_("Select an output segmentation first."))
        checkpoint = str(given(checkpoint) or "")
        if backend == "sam" and not checkpoint:
            checkpoint = str((yield from download_steps(checkpoint_info("vit_b"))))
        image = nodes.image_from_volume(volume)
        if scope in ("slice range", "whole volume"):
            axis, aligned, _normal = view_axis(self.sliceToRAS(view), nodes.ijk_to_ras(volume))
            if not aligned:
                raise PlaneError(_("The {view} view is oblique: SAM over a range or the whole volume works on voxel "
                                   "slices. Use 'current slice' or 'propagate'.").format(view=view))
            planes = pseudolabel.aligned_planes(image.spatial_shape, axis, slices)
        else:
            planes = [self.viewPlane(volume, view)]
        yield Progress(None, _("Loading SAM ({backend})").format(backend=backend))
        engine = pseudolabel.engine_for(backend, checkpoint)
        if modelRun:
            probabilities, _info = yield from self.modelSteps(volume, modelRun)
            items = pseudolabel.model_items(probabilities, planes)
            if not items:
                raise ValueError(_("The model finds no foreground on the selected slices."))
            result = yield from pseudolabel.planes_steps(engine, image, items, "model")
            return pseudolabel.add_sam_segment(volume, segmentation, result, "SAM (model prompts)", (0.6, 0.4, 0.95))
        inputs = pseudolabel.markup_inputs(volume, positive, negative, roi)
        if scope == "propagate":
            plane = planes[0]
            prompt = inputs.prompt_on(plane)
            if prompt is None:
                raise ValueError(_("No SAM point or box is on the {view} view's slice.").format(view=view))
            result = yield from pseudolabel.propagate_steps(engine, image, plane, prompt,
                                                            limits=self._boxLimits(inputs, plane))
        else:
            result = yield from pseudolabel.planes_steps(engine, image, pseudolabel.markup_items(inputs, planes))
        return pseudolabel.add_sam_segment(volume, segmentation, result)

    @staticmethod
    def _boxLimits(inputs, plane):
        """An ROI box bounds propagation to the slices it spans (as MedSAM-Lite does); without one, no bound."""
        if inputs.box is None or plane.oblique:
            return None
        return int(round(inputs.box[0][plane.axis])), int(round(inputs.box[1][plane.axis]))

    def modelSteps(self, volume, runFolder):
        """(K, i, j, k) class probabilities of a trained run's model on the volume, computed in a worker process;
        returns (probabilities, {"run", "checkpoint", "classes"})."""
        import numpy as np

        from SemiSegLib import batch, pseudolabel
        from SemiSegLib.tasks import worker_steps

        run = required_folder(runFolder, _("a trained run folder (section 4)"))
        if not (run / "config.yaml").is_file():
            raise ValueError(_("{run}: not a trained run folder (no config.yaml).").format(run=run))
        folder = Path(tempfile.mkdtemp(prefix="semiseg-"))
        try:
            batch.save_image(pseudolabel.working_image(volume), folder / "image.npz")
            info = yield from worker_steps({"kind": "predict", "args": {
                "run": str(run), "image": str(folder / "image.npz"), "out": str(folder / "probs.npy")}}, folder)
            dims = tuple(volume.GetImageData().GetDimensions())
            probabilities = np.load(folder / "probs.npy").astype(np.float32)
            return probabilities.reshape((probabilities.shape[0],) + dims), info
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def segmentSteps(self, volume, segmentation, runFolder):
        """The trained model on the volume (in a worker process), as new segments."""
        from SemiSegLib import pseudolabel

        if volume is None:
            raise ValueError(_("Select an input volume first."))
        probabilities, info = yield from self.modelSteps(volume, runFolder)
        return pseudolabel.model_segment(volume, segmentation, probabilities,
                                         {"run": info["run"], "checkpoint": info["checkpoint"]})

    # -- review queue
    def queue(self, folder):
        from SemiSegLib.review import ReviewQueue

        return ReviewQueue(required_folder(folder, _("a dataset folder")))

    def queueSegment(self, folder, volume, segmentation, segment_id: str | None = None):
        from SemiSegLib import review

        if volume is None or segmentation is None:
            raise ValueError(_("Select the input volume and the output segmentation first."))
        return review.queue_segment(self.queue(folder), volume, segmentation, segment_id)

    def openQueued(self, folder, case_id: str):
        """Load a queued case with its pseudo-label (once: an open case is reused)."""
        from semiseg.data import dataset_labels
        from semiseg.io import read_label

        from SemiSegLib import nodes

        if self.isOpen(case_id) and len(self.openCase.nodes) == 2 and \
                self.openCase.nodes[1].GetAttribute("SemiSeg.PseudoLabel") == "1":
            return tuple(self.openCase.nodes)
        queue = self.queue(folder)
        item = queue.get(case_id)
        volume = nodes.load_volume(slicer.mrmlScene, item.image, case_id)
        volume.SetAttribute("SemiSeg.CaseId", case_id)
        seg = nodes.segmentation_from_label(slicer.mrmlScene, read_label(item.pseudo_label), volume,
                                            f"{case_id} pseudo-label", dataset_labels(queue.root), source="sam")
        seg.SetAttribute("SemiSeg.PseudoLabel", "1")
        self._openCase(case_id, [volume, seg])
        return volume, seg

    def acceptQueued(self, folder, case_id, segmentation, volume):
        from SemiSegLib import review

        if segmentation is None or volume is None:
            raise ValueError(_("Open the case first."))
        return review.accept_segmentation(self.queue(folder), case_id, segmentation, volume)

    # -- training
    def startTraining(self, config, run_folder, dataset_folder, method, iterations, device, val_cases):
        from SemiSegLib.training import TrainingProcess, training_overrides

        if given(run_folder) is None:
            raise ValueError(_("Choose a run folder for the training."))
        if given(config) is None or not Path(config).is_file():
            raise ValueError(_("Choose a training config (a YAML file; examples ship with SemiSeg)."))
        if self.training is not None and self.training.is_running():
            raise RuntimeError(_("{run}: training is already running.").format(run=self.training.run_dir))
        folder, labelled, val, accepted = given(dataset_folder), None, None, []
        if folder is None:
            root = self._configRoot(config)
            if root is None:
                raise ValueError(_("Choose a dataset folder (section 1): the config's data.root is not an absolute "
                                   "folder that exists."))
        else:  # every labelled case but the validation ones trains; accepted ones always train
            folder = required_folder(folder, _("a dataset folder"))
            accepted = [i.case_id for i in self.queue(folder).sorted() if i.status in ("accepted", "corrected")]
            labelled = sum(1 for c in self.cases(folder) if c.label) - int(val_cases) - len(accepted)
            val = int(val_cases)
        overrides = training_overrides(str(folder) if folder else None, method, iterations, device, labelled, val,
                                       accepted)
        self.training = TrainingProcess(config, run_folder, overrides)
        self.training.start()
        return self.training

    @staticmethod
    def _configRoot(config) -> str | None:
        """The config's data.root when it is an absolute, existing folder (Slicer's working directory is no
        place to resolve a relative one)."""
        import yaml

        root = ((yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}).get("root") or ""
        return root if root and os.path.isabs(root) and os.path.isdir(root) else None

    def pollTraining(self):
        return self.training.poll() if self.training is not None else None

    def stopTraining(self) -> None:
        if self.training is not None:
            self.training.stop()

    def killTraining(self) -> None:
        if self.training is not None:
            self.training.kill()

    # -- Dice review
    def evaluateScene(self, volume, prediction, reference, table):
        from SemiSegLib import evaluation

        if volume is None or prediction is None or reference is None:
            raise ValueError(_("Select the input volume, an output segmentation (section 2) and a reference "
                               "segmentation (section 1)."))
        case_id = volume.GetAttribute("SemiSeg.CaseId") or volume.GetName()
        rows = evaluation.evaluate_segmentations(case_id, prediction, reference, volume)
        evaluation.fill_table(table, rows)
        return rows

    def evaluateDatasetSteps(self, folder, run_folder, table):
        """The trained model on every labelled case of the dataset (in a worker process, one case per progress
        step); the rows fill ``table``."""
        from SemiSegLib import evaluation
        from SemiSegLib.tasks import worker_steps

        dataset = required_folder(folder, _("a dataset folder"))
        run = required_folder(run_folder, _("a trained run folder (section 4)"))
        work = Path(tempfile.mkdtemp(prefix="semiseg-"))
        try:
            rows = yield from worker_steps({"kind": "evaluate", "args": {"dataset": str(dataset), "run": str(run)}},
                                           work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
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

    Needs the data folder (env SEMISEG_DATA, default ``<repo>/../shared/data``) and the SAM dependencies; without the
    data it fails and says where it looked."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SAMSegmentAndDice()

    def test_SAMSegmentAndDice(self):
        import numpy as np

        from SemiSegLib.tasks import run_task

        data = Path(os.environ.get("SEMISEG_DATA", dependencies.MODULE_DIR.parent.parent / "shared" / "data"))
        image_path = next(iter(sorted((data / "la2018" / "imagesTr").glob("*.nii.gz"))), None)
        self.assertIsNotNone(image_path, f"no LA 2018 data under {data}/la2018/imagesTr: set SEMISEG_DATA to the "
                                         f"folder that holds la2018/")
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
        roi.SetSize(*[abs(v) + 0.1 for v in (hi[:3] - lo[:3])])
        self.delayDisplay("Running SAM on one slice")
        output = logic.newSegmentation(volume)
        result = run_task(logic.samSteps(volume, output, "litemedsam", "", None, None, roi, "slice range", "Red",
                                         (k, k)))
        self.assertGreater(result.score, 0.5)
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
        mask = nodes.segment_mask(output, result.segment_id, volume)
        ref = label.array == 1
        dice = 2 * (mask[:, :, k] & ref[:, :, k]).sum() / (mask[:, :, k].sum() + ref[:, :, k].sum())
        self.assertGreater(dice, 0.8)
        rows = logic.evaluateScene(volume, output, reference, table)
        self.assertEqual(table.GetNumberOfRows(), len(rows))
        self.delayDisplay(f"SAM slice Dice {dice:.3f}; test passed")
