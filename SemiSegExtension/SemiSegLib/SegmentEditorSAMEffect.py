"""Segment Editor effect "SAM": click points on a slice, see SAM's mask as a preview, apply it to the segment.

Left click adds an include point, Shift + left click an exclude point. The preview lives in its own temporary
segmentation node, so the edited segmentation changes only on Apply (which is undoable like any other effect).
Registered by the SemiSeg module on startup (``SemiSeg.registerSAMEffect``). Needs the Slicer application.
"""
from __future__ import annotations

import json

import numpy as np
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
        self.points = []  # (ras, 1 include / 0 exclude)
        self.previewMask = None
        self.previewScore = None
        self.engine = None  # built on the first click; its embedding cache makes further clicks fast

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        from SemiSegLib.dependencies import resource_path

        return qt.QIcon(str(resource_path("Icons/SemiSeg.png")))

    def helpText(self):
        return ("<html>Segment with SAM (LiteMedSAM by default) by clicking on a slice.<p>"
                "<b>Left click</b>: include point. <b>Shift + left click</b>: exclude point. The preview updates "
                "after each click; <b>Apply</b> adds it to the selected segment.</html>")

    def setupOptionsFrame(self):
        self.statusLabel = qt.QLabel("Click inside the structure on a slice view.")
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        row = qt.QHBoxLayout()
        self.clearButton = qt.QPushButton("Clear points")
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        row.addWidget(self.clearButton)
        row.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(row)
        self.clearButton.connect("clicked()", self.clear)
        self.applyButton.connect("clicked()", self.onApply)

    def deactivate(self):
        self.clear()

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if eventId != vtk.vtkCommand.LeftButtonPressEvent or viewWidget.className() != "qMRMLSliceWidget":
            return False
        ras = self.scriptedEffect.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
        self.points.append(([ras[0], ras[1], ras[2]], 0 if callerInteractor.GetShiftKey() else 1))
        with slicer.util.tryWithErrorDisplay("SAM failed.", waitCursor=True):
            self.updatePreview()
        return True

    def updatePreview(self):
        from SemiSegLib import dependencies

        dependencies.ensure_dependencies(ask=not slicer.app.testingEnabled())
        from semiseg.sam import SamEngine, build_backend, prompts_from_user

        from SemiSegLib import nodes, pseudolabel

        volume = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        image = nodes.image_from_volume(volume)
        ijk = nodes.world_to_ijk(np.array([p for p, _ in self.points]), volume)
        k = int(round(ijk[-1][2]))  # the slice of the latest click
        keep = [n for n, c in enumerate(ijk) if int(round(c[2])) == k]
        prompts = prompts_from_user(image, ijk[keep], [self.points[n][1] for n in keep], space="ijk", axis=2)
        if self.engine is None:
            self.engine = SamEngine(build_backend("litemedsam", device="auto"))
        result = self.engine.segment(pseudolabel.working_image(volume), prompts, axis=2, prompt_source="clicks")
        self.previewMask = result.label.array.reshape(image.spatial_shape) > 0
        self.previewScore = result.score
        self.showPreview(volume)
        self.statusLabel.text = f"Slice {k}: SAM score {self.previewScore:.3f}. Apply to keep it."

    def previewNode(self, volume):
        node = slicer.mrmlScene.GetFirstNodeByName(PREVIEW_NAME)
        if node is None:
            from SemiSegLib import nodes

            node = nodes.new_segmentation(slicer.mrmlScene, volume, PREVIEW_NAME)
            node.SetHideFromEditors(True)
        return node

    def showPreview(self, volume):
        from SemiSegLib import nodes

        node = self.previewNode(volume)
        node.GetSegmentation().RemoveAllSegments()
        nodes.add_segment(node, self.previewMask, volume, "preview", color=(1.0, 1.0, 0.3))

    def clear(self):
        self.points, self.previewMask, self.previewScore = [], None, None
        node = slicer.mrmlScene.GetFirstNodeByName(PREVIEW_NAME)
        if node is not None:
            slicer.mrmlScene.RemoveNode(node)

    def onApply(self):
        if self.previewMask is None:
            return
        from SemiSegLib import nodes

        volume = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        self.scriptedEffect.saveStateForUndo()
        oriented = nodes.oriented_mask(self.previewMask, nodes.ijk_to_ras(volume))
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            oriented, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd)
        segment_id = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        segmentation = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        segment.SetTag(nodes.TAG_SOURCE, "corrected")
        segment.SetTag(nodes.TAG_PROVENANCE, json.dumps({"source": "corrected", "tool": "SAM effect",
                                                         "score": self.previewScore}))
        self.clear()
