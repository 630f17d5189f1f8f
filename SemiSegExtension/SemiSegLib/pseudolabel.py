"""SAM and trained-model segmentation of a volume node into NEW segments that carry provenance and a score.

Prompts come from markups (positive / negative points, an ROI box) in the volume's voxel frame, or from the
current model's probability map. Slices are cut along ``axis`` (2 = k, the axial view of an RAS-aligned volume).
Nothing in the segmentation is overwritten: each result is a new segment (see :func:`nodes.add_segment`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from semiseg.io import Image
from semiseg.sam import SamEngine, pseudolabel_from_probability, prompts_from_user
from semiseg.sam.prompts import Prompt

from . import nodes


@dataclass
class SegmentResult:
    segment_id: str
    score: float
    mask: np.ndarray  # (i, j, k) bool on the volume's grid
    provenance: dict = field(default_factory=dict)


def working_image(volume_node) -> Image:
    """The volume as SAM and the models take it: a single-slice volume (a picture loaded into Slicer) is 2D again."""
    image = nodes.image_from_volume(volume_node)
    if image.spatial_shape[2] == 1:
        arr = image.array[:, :, 0]
        return Image(arr, image.spacing[:2], image.origin[:2], image.direction[:2, :2], channels=image.channels,
                     path=image.path)
    return image


def restrict(prompts: dict[int, list[Prompt]], slices: tuple[int, int] | None) -> dict[int, list[Prompt]]:
    """Only the prompts on slices ``lo..hi`` (inclusive); all of them for ``None``."""
    if slices is None:
        return prompts
    lo, hi = min(slices), max(slices)
    return {k: p for k, p in prompts.items() if lo <= k <= hi}


def markup_prompts(volume_node, positive=None, negative=None, roi=None, axis: int = 2) -> dict[int, list[Prompt]]:
    """Per-slice prompts from markups: points on a slice join the ROI's box on that slice."""
    points, labels = nodes.points_prompt(volume_node, positive, negative)
    boxes = [nodes.roi_box_ijk(roi, volume_node)] if roi is not None else None
    if not len(points) and boxes is None:
        raise nodes.NodeError(f"{volume_node.GetName()}: place SAM points or an ROI box first")
    image = nodes.image_from_volume(volume_node)
    return prompts_from_user(image, points if len(points) else None, labels, boxes, space="ijk", axis=axis)


def _add_result(volume_node, segmentation_node, mask: np.ndarray, score: float, provenance: dict, name: str,
                color) -> SegmentResult:
    mask = np.asarray(mask).reshape(tuple(volume_node.GetImageData().GetDimensions())) > 0
    tags = {nodes.TAG_SOURCE: "sam", nodes.TAG_SCORE: f"{score:.4f}", nodes.TAG_PROVENANCE: json.dumps(provenance)}
    segment_id = nodes.add_segment(segmentation_node, mask, volume_node, name, tags, color)
    return SegmentResult(segment_id, score, mask, provenance)


def sam_segment(volume_node, segmentation_node, engine: SamEngine, prompts: dict[int, list[Prompt]],
                axis: int = 2, name: str = "SAM", color=(0.2, 0.75, 0.95)) -> SegmentResult:
    """Run SAM on the prompted slices and add the result as a new, tagged segment (score: mean predicted IoU)."""
    if not prompts:
        raise nodes.NodeError(f"{volume_node.GetName()}: no prompt falls on the selected slices")
    result = engine.segment(working_image(volume_node), prompts, axis=axis, prompt_source="markups")
    return _add_result(volume_node, segmentation_node, result.label.array, result.score, result.provenance, name,
                       color)


def sam_segment_from_model(volume_node, segmentation_node, engine: SamEngine, probabilities: np.ndarray,
                           slices: tuple[int, int] | None = None, axis: int = 2, name: str = "SAM (model prompts)",
                           color=(0.6, 0.4, 0.95)) -> SegmentResult:
    """SAM prompted by a model's class probabilities (K, i, j, k) on the volume's grid, on slices ``lo..hi``."""
    image = working_image(volume_node)
    prob = np.asarray(probabilities, dtype=np.float32).reshape((-1,) + image.spatial_shape)
    if slices is not None and image.spatial_ndim == 3:
        keep = np.zeros(image.spatial_shape[axis], dtype=bool)
        keep[min(slices):max(slices) + 1] = True
        shape = [1, 1, 1, 1]
        shape[axis + 1] = -1
        prob = prob * keep.reshape(shape)  # no probability, no prompt: slices outside the range stay untouched
    mask, score, provenance = pseudolabel_from_probability(engine, image, prob, axis=axis, prompt_source="model")
    if not mask.any():
        raise nodes.NodeError(f"{volume_node.GetName()}: the model finds no foreground on the selected slices")
    return _add_result(volume_node, segmentation_node, mask, score, provenance, name, color)


def model_segment(volume_node, segmentation_node, predictor, names: dict[int, str] | None = None
                  ) -> list[SegmentResult]:
    """Run a trained model (``semiseg.infer`` predictor) on the volume; one new segment per foreground class,
    scored by the mean probability inside it."""
    probs = model_probabilities(volume_node, predictor)
    labels = probs.argmax(axis=0)
    results = []
    for k in range(1, probs.shape[0]):
        mask = labels == k
        score = float(probs[k][mask].mean()) if mask.any() else 0.0
        provenance = {"source": "model", "run": str(getattr(predictor, "run_dir", "")),
                      "checkpoint": str(getattr(predictor, "checkpoint", "")), "class": k}
        tags = {nodes.TAG_SOURCE: "model", nodes.TAG_SCORE: f"{score:.4f}",
                nodes.TAG_PROVENANCE: json.dumps(provenance)}
        name = (names or {}).get(k, f"model label {k}")
        sid = nodes.add_segment(segmentation_node, mask, volume_node, name, tags)
        results.append(SegmentResult(sid, score, mask, provenance))
    return results


def model_probabilities(volume_node, predictor) -> np.ndarray:
    """(K, i, j, k) class probabilities of a trained model on the volume's own grid."""
    dims = tuple(volume_node.GetImageData().GetDimensions())
    probs = predictor.predict(working_image(volume_node))
    return probs.reshape((probs.shape[0],) + dims)
