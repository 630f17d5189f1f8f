"""What the Segment Editor's SAM effect computes, without Qt: a box dragged and points clicked in a slice view
become a preview mask on that view's plane (any orientation); the preview can be propagated to neighbouring planes until the structure ends; Apply
adds it to the selected segment as one undoable step. ``SegmentEditorSAMEffect.py`` only forwards Slicer's events.
"""
from __future__ import annotations

import json
from typing import Generator

import numpy as np

from semiseg.sam.prompts import Prompt

from . import nodes
from .planes import Plane
from .pseudolabel import PlaneResult, engine_for, planes_steps, propagate_steps
from .tasks import Progress, run_task

MODULE = "SemiSeg"  # the module whose parameter node holds the chosen SAM backend and checkpoint


def sam_settings(scene) -> tuple[str, str]:
    """(backend, checkpoint) chosen in the SemiSeg module (its parameter node), else LiteMedSAM's defaults."""
    node = scene.GetSingletonNode(MODULE, "vtkMRMLScriptedModuleNode") if scene is not None else None
    if node is None:
        return "litemedsam", ""
    backend = node.GetParameter("samBackend") or "litemedsam"
    checkpoint = node.GetParameter("samCheckpoint") or ""
    return backend, "" if checkpoint == "." else checkpoint


def settings_engine(scene):
    """The shared engine for the module's settings; the ``sam`` backend must find its weights without a download
    (the module's Run SAM downloads them with progress)."""
    backend, checkpoint = sam_settings(scene)
    if backend == "sam" and not checkpoint:
        from semiseg.sam.backends import resolve_sam_checkpoint

        checkpoint = str(resolve_sam_checkpoint("vit_b", None, download=False))
    return engine_for(backend, checkpoint)


class ClickSession:
    """Prompts drawn in one slice view (include/exclude clicks and a box, on that view's plane) and SAM's preview.
    LiteMedSAM was trained on boxes: draw one around the structure; clicks refine it."""

    def __init__(self, engine_factory):
        self._engine_factory = engine_factory
        self.engine = None
        self.clear()

    def clear(self) -> None:
        self.view: np.ndarray | None = None  # the SliceToRAS of the view the prompts are in
        self.plane: Plane | None = None
        self.points: list[tuple[float, float]] = []  # (x, y) plane pixels
        self.labels: list[int] = []  # 1 include / 0 exclude
        self.box: tuple[float, float, float, float] | None = None
        self.preview: PlaneResult | None = None

    def _engine(self):
        if self.engine is None:
            self.engine = self._engine_factory()
        return self.engine

    def _on_view(self, volume_node, slice_to_ras) -> None:
        """Prompts in another view, or on another slice, start over."""
        slice_to_ras = np.asarray(slice_to_ras, dtype=float)
        if self.view is None or not np.allclose(self.view, slice_to_ras, atol=1e-6):
            self.clear()
            self.view = slice_to_ras
            shape = nodes.image_from_volume(volume_node).spatial_shape
            self.plane = Plane.from_view(slice_to_ras, nodes.ijk_to_ras(volume_node), shape)

    def _pixels(self, volume_node, ras) -> np.ndarray:
        return self.plane.to_pixels(nodes.world_to_ijk(ras, volume_node))

    def _update(self, volume_node) -> PlaneResult:
        prompt = Prompt(self.box, list(self.points), list(self.labels), source="effect")
        image = nodes.image_from_volume(volume_node)
        self.preview = run_task(planes_steps(self._engine(), image, [(self.plane, [prompt])], "effect"))
        return self.preview

    def click(self, volume_node, slice_to_ras, ras, include: bool = True) -> PlaneResult:
        """An include (or exclude) point at world position ``ras`` in the view whose ``SliceToRAS`` is given."""
        self._on_view(volume_node, slice_to_ras)
        if self.box is None and self._engine().backend.name == "litemedsam":
            raise nodes.NodeError("LiteMedSAM segments from a box: drag one around the structure first (clicks "
                                  "then refine it), or choose the 'sam' backend in the SemiSeg module")
        self.points.append(tuple(self._pixels(volume_node, ras)[0]))
        self.labels.append(1 if include else 0)
        return self._update(volume_node)

    def drag(self, volume_node, slice_to_ras, ras_start, ras_end) -> PlaneResult:
        """A box dragged from ``ras_start`` to ``ras_end`` in the view (it replaces an earlier box)."""
        self._on_view(volume_node, slice_to_ras)
        xy = self._pixels(volume_node, [ras_start, ras_end])
        self.box = (xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())
        return self._update(volume_node)

    def propagate_steps(self, volume_node, **options) -> Generator[Progress, None, PlaneResult]:
        """Propagate the preview to the neighbouring planes (see ``pseudolabel.propagate_steps``); the result
        replaces the preview."""
        if self.plane is None:
            raise nodes.NodeError("draw a box around the structure (or click inside it) first")
        image = nodes.image_from_volume(volume_node)
        prompt = Prompt(self.box, list(self.points), list(self.labels), source="effect")
        self.preview = yield from propagate_steps(self._engine(), image, self.plane, prompt, **options)
        return self.preview


def apply_to_segment(result: PlaneResult, volume_node, segmentation_node, segment_id: str, save_state, modify,
                     tool: str = "SAM effect") -> None:
    """Add ``result`` to a segment as one undoable step: ``save_state()`` then ``modify(oriented_labelmap)`` (in
    Slicer: the effect's ``saveStateForUndo`` and ``modifySelectedSegmentByLabelmap`` in Add mode). The segment is
    tagged as corrected by a person, with SAM's provenance."""
    if result is None or not result.mask.any():
        raise nodes.NodeError("nothing to apply: click inside the structure first")
    save_state()
    modify(nodes.oriented_mask(result.mask, nodes.ijk_to_ras(volume_node)))
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    segment.SetTag(nodes.TAG_SOURCE, "corrected")
    segment.SetTag(nodes.TAG_PROVENANCE, json.dumps({"source": "corrected", "tool": tool, "score": result.score,
                                                     "sam": result.provenance}))
