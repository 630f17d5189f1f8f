"""Segment Editor effect "SAM": draw a box (or click) in any slice view, see SAM's mask on that view's plane, propagate
it to the neighbouring slices, apply it to the selected segment.

Drag with the left button to draw a box around the structure (LiteMedSAM was trained on boxes); a left click adds an
include point, Shift + left click an exclude point; prompts on another slice start over. The
preview lives in its own temporary segmentation node, so the edited segmentation changes only on Apply (one
undoable step). The backend and checkpoint are the SemiSeg module's. The computation is in ``sam_effect`` (Qt-free,
tested headlessly); this class only connects it to Slicer. Registered by the SemiSeg module.
"""
from __future__ import annotations

import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

PREVIEW_NAME = "SemiSeg SAM preview"


class SegmentEditorSAMEffect(AbstractScriptedSegmentEditorEffect):
    """Slicer finds the class by the file name (SegmentEditorSAMEffect.py), so the two must match."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SAM"
        scriptedEffect.perSegment = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._session = None  # made on first use: Slicer creates effects at startup, when nothing may load yet
        self.task = None
        self.pressedAt = None  # where the left button went down: a drag from there draws a box
        self.timer = qt.QTimer()
        self.timer.setInterval(0)
        self.timer.timeout.connect(self.onTaskTimer)

    @property
    def session(self):
        if self._session is None:
            from SemiSegLib import dependencies

            dependencies.ensure_core_importable()
            from SemiSegLib.sam_effect import ClickSession, settings_engine

            self._session = ClickSession(lambda: settings_engine(slicer.mrmlScene))
        return self._session

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        from SemiSegLib.dependencies import resource_path

        return qt.QIcon(str(resource_path("Icons/SemiSeg.png")))

    def helpText(self):
        return ("<html>Segment with SAM (the backend chosen in the SemiSeg module) in a slice view.<p>"
                "<b>Drag</b>: a box around the structure. <b>Left click</b>: include point. <b>Shift + left "
                "click</b>: exclude point. The preview is on the plane of the view you work in. <b>Propagate</b> follows the structure to the neighbouring slices "
                "until it ends. <b>Apply</b> adds the preview to the selected segment (one undo step).</html>")

    def setupOptionsFrame(self):
        self.statusLabel = qt.QLabel("Drag a box around the structure in a slice view, or click inside it.")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        row = qt.QHBoxLayout()
        self.clearButton = qt.QPushButton("Clear points")
        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.toolTip = "Box -> mask -> box on the neighbouring slices until the structure ends"
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        for button in (self.clearButton, self.propagateButton, self.cancelButton, self.applyButton):
            row.addWidget(button)
        self.scriptedEffect.addOptionsWidget(row)
        self.clearButton.connect("clicked()", self.clear)
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.applyButton.connect("clicked()", self.onApply)

    def deactivate(self):
        self.onCancel()
        self.clear()

    def sourceVolume(self):
        return self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        """Press-drag-release draws a box; a click (no drag) adds an include point, with Shift an exclude point."""
        if viewWidget.className() != "qMRMLSliceWidget" or eventId not in (
                vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonReleaseEvent):
            return False
        if self.task is not None:
            return True  # a propagation is running
        xy = callerInteractor.GetEventPosition()
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            self.pressedAt = xy
            return True
        start, self.pressedAt = self.pressedAt, None
        if start is None:
            return False
        sliceToRAS = slicer.util.arrayFromVTKMatrix(viewWidget.sliceLogic().GetSliceNode().GetSliceToRAS())
        with slicer.util.tryWithErrorDisplay("SAM failed.", waitCursor=True):
            self.ensureDependencies()
            volume = self.sourceVolume()
            if abs(xy[0] - start[0]) + abs(xy[1] - start[1]) > 5:
                preview = self.session.drag(volume, sliceToRAS, self.xyToRas(start, viewWidget),
                                            self.xyToRas(xy, viewWidget))
            else:
                preview = self.session.click(volume, sliceToRAS, self.xyToRas(xy, viewWidget),
                                             include=not callerInteractor.GetShiftKey())
            self.showPreview()
            self.statusLabel.text = (f"Slice {self.session.plane.index}: SAM score {preview.score:.3f}. "
                                     "Propagate, or Apply to keep it.")
        return True

    def ensureDependencies(self):
        from SemiSegLib import dependencies

        dependencies.ensure_dependencies(ask=not slicer.app.testingEnabled())

    # -- propagation as a cancellable background task
    def onPropagate(self):
        from SemiSegLib.tasks import Task

        with slicer.util.tryWithErrorDisplay("SAM propagation failed.", waitCursor=False):
            self.ensureDependencies()
            self.task = Task("Propagating", self.session.propagate_steps(self.sourceVolume()))
            self.progressBar.visible, self.cancelButton.enabled = True, True
            self.propagateButton.enabled = self.applyButton.enabled = False
            self.timer.start()

    def onTaskTimer(self):
        task = self.task
        if task is None:
            self.timer.stop()
            return
        if task.step():
            fraction = task.progress.fraction
            self.progressBar.setRange(0, 0 if fraction is None else 100)
            if fraction is not None:
                self.progressBar.value = int(100 * fraction)
            self.statusLabel.text = task.progress.message
            return
        self.finishTask()
        if task.state == "failed":
            slicer.util.errorDisplay(f"SAM propagation failed: {task.error}")
        elif task.state == "done":
            self.showPreview()
            ended = task.result.provenance.get("propagation", {}).get("ended", {})
            self.statusLabel.text = (f"Propagated over {len(task.result.provenance['slices'])} slices "
                                     f"(ended: {ended}). Apply to keep it.")

    def onCancel(self):
        if self.task is not None:
            self.task.cancel()
            self.finishTask()
            self.statusLabel.text = "Propagation cancelled; the preview is the clicked slice."

    def finishTask(self):
        self.timer.stop()
        self.task = None
        self.progressBar.visible, self.cancelButton.enabled = False, False
        self.propagateButton.enabled = self.applyButton.enabled = True

    # -- preview and apply
    def previewNode(self, volume):
        node = slicer.mrmlScene.GetFirstNodeByName(PREVIEW_NAME)
        if node is None:
            from SemiSegLib import nodes

            node = nodes.new_segmentation(slicer.mrmlScene, volume, PREVIEW_NAME)
            node.SetHideFromEditors(True)
        return node

    def showPreview(self):
        from SemiSegLib import nodes

        volume = self.sourceVolume()
        node = self.previewNode(volume)
        node.GetSegmentation().RemoveAllSegments()
        if self.session.preview is not None and self.session.preview.mask.any():
            nodes.add_segment(node, self.session.preview.mask, volume, "preview", color=(1.0, 1.0, 0.3))

    def clear(self):
        self.session.clear()
        node = slicer.mrmlScene.GetFirstNodeByName(PREVIEW_NAME)
        if node is not None:
            slicer.mrmlScene.RemoveNode(node)

    def onApply(self):
        from SemiSegLib.sam_effect import apply_to_segment

        parameters = self.scriptedEffect.parameterSetNode()
        with slicer.util.tryWithErrorDisplay("SAM apply failed.", waitCursor=True):
            apply_to_segment(
                self.session.preview, self.sourceVolume(), parameters.GetSegmentationNode(),
                parameters.GetSelectedSegmentID(), self.scriptedEffect.saveStateForUndo,
                lambda labelmap: self.scriptedEffect.modifySelectedSegmentByLabelmap(
                    labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd))
            self.clear()
            self.statusLabel.text = "Applied. Click again for another structure."
