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
from semiseg.sam.prompts import Prompt, prompt_from_probability, prompts_from_user

from . import nodes


@dataclass
class SegmentResult:
    segment_id: str
    score: float
    mask: np.ndarray  # (i, j, k) bool on the volume's grid
    provenance: dict = field(default_factory=dict)


def _rgb_slices(image: Image, axis: int, ks) -> dict[int, np.ndarray]:
    """(H, W, 3) uint8 slices for SAM: intensities scaled by the volume's 0.5-99.5 percentiles (one window for
    every slice, so neighbouring slices look alike)."""
    arr = image.array
    if image.channels == 3:
        return {k: np.clip(np.take(arr, k, axis=axis), 0, 255).astype(np.uint8) for k in ks}
    lo, hi = np.percentile(arr, [0.5, 99.5])
    scale = 255.0 / max(float(hi - lo), 1e-6)
    out = {}
    for k in ks:
        s = np.clip((np.take(arr, k, axis=axis) - lo) * scale, 0, 255).astype(np.uint8)
        out[k] = np.repeat(s[:, :, None], 3, axis=2)
    return out


def run_sam(image: Image, backend, prompts: dict[int, list[Prompt]], axis: int = 2
            ) -> tuple[np.ndarray, dict[int, float]]:
    """Decode per-slice prompts into one (i, j, k) mask; returns the mask and SAM's predicted IoU per slice."""
    mask = np.zeros(image.spatial_shape, dtype=bool)
    scores: dict[int, float] = {}
    slices = _rgb_slices(image, axis, sorted(prompts))
    for k, rgb in slices.items():
        embedding = backend.embed([rgb])[0]
        masks, ious = backend.decode(embedding, prompts[k])
        index = [slice(None)] * 3
        index[axis] = k
        mask[tuple(index)] |= masks.any(axis=0)
        scores[k] = float(np.mean(ious))
    return mask, scores


def restrict(prompts: dict[int, list[Prompt]], slices: tuple[int, int] | None) -> dict[int, list[Prompt]]:
    if slices is None:
        return prompts
    lo, hi = min(slices), max(slices)
    return {k: p for k, p in prompts.items() if lo <= k <= hi}


def markup_prompts(volume_node, image: Image, positive=None, negative=None, roi=None, axis: int = 2
                   ) -> dict[int, list[Prompt]]:
    """Per-slice prompts from markups: points on a slice join the ROI's box on that slice."""
    points, labels = nodes.points_prompt(volume_node, positive, negative)
    boxes = [nodes.roi_box_ijk(roi, volume_node)] if roi is not None else None
    if not len(points) and boxes is None:
        raise nodes.NodeError(f"{volume_node.GetName()}: place SAM points or an ROI box first")
    return prompts_from_user(image, points if len(points) else None, labels, boxes, space="ijk", axis=axis)


def model_prompts(probabilities: np.ndarray, axis: int = 2, foreground: int = 1) -> dict[int, list[Prompt]]:
    """Per-slice prompts from a model's class probabilities (K, i, j, k): box and confident points of class
    ``foreground`` on every slice where the model sees it."""
    prob = probabilities[foreground]
    out = {}
    for k in range(prob.shape[axis]):
        p = prompt_from_probability(np.take(prob, k, axis=axis), label=foreground)
        if p is not None:
            out[k] = [p]
    return out


def sam_segment(volume_node, segmentation_node, backend, prompts: dict[int, list[Prompt]], axis: int = 2,
                name: str = "SAM", source: str = "sam", color=(0.2, 0.75, 0.95)) -> SegmentResult:
    """Run SAM on the prompted slices and add the result as a new, tagged segment."""
    if not prompts:
        raise nodes.NodeError(f"{volume_node.GetName()}: no prompt falls on the selected slices")
    image = nodes.image_from_volume(volume_node)
    mask, scores = run_sam(image, backend, prompts, axis)
    score = float(np.mean(list(scores.values())))
    provenance = {"source": source, **backend.describe(), "axis": axis,
                  "slices": sorted(scores), "score_per_slice": {str(k): round(v, 4) for k, v in scores.items()},
                  "prompts": {str(k): [p.to_json() for p in ps] for k, ps in prompts.items()}}
    tags = {nodes.TAG_SOURCE: "sam", nodes.TAG_SCORE: f"{score:.4f}", nodes.TAG_PROVENANCE: json.dumps(provenance)}
    segment_id = nodes.add_segment(segmentation_node, _to_volume_shape(mask, volume_node), volume_node, name,
                                   tags, color)
    return SegmentResult(segment_id, score, mask, provenance)


def model_segment(volume_node, segmentation_node, predictor, names: dict[int, str] | None = None
                  ) -> list[SegmentResult]:
    """Run a trained model (``semiseg.infer`` predictor) on the volume; one new segment per foreground class,
    scored by the mean probability inside it."""
    image = nodes.image_from_volume(volume_node)
    probs = predictor.predict(_model_input(image))
    labels = probs.argmax(axis=0)
    results = []
    for k in range(1, probs.shape[0]):
        mask = (labels == k).reshape(image.spatial_shape)
        score = float(probs[k][labels == k].mean()) if mask.any() else 0.0
        provenance = {"source": "model", "run": str(getattr(predictor, "run_dir", "")),
                      "checkpoint": str(getattr(predictor, "checkpoint", "")), "class": k}
        tags = {nodes.TAG_SOURCE: "model", nodes.TAG_SCORE: f"{score:.4f}",
                nodes.TAG_PROVENANCE: json.dumps(provenance)}
        name = (names or {}).get(k, f"model label {k}")
        sid = nodes.add_segment(segmentation_node, _to_volume_shape(mask, volume_node), volume_node, name, tags)
        results.append(SegmentResult(sid, score, mask, provenance))
    return results


def model_probabilities(volume_node, predictor) -> np.ndarray:
    """(K, i, j, k) probabilities of a trained model on the volume's own grid."""
    image = nodes.image_from_volume(volume_node)
    probs = predictor.predict(_model_input(image))
    return probs.reshape((probs.shape[0],) + image.spatial_shape)


def _model_input(image: Image) -> Image:
    """A single-slice volume made from a 2D picture goes back to 2D for 2D models."""
    if image.spatial_shape[2] == 1 and image.channels == 3:
        return Image(image.array[:, :, 0], image.spacing[:2], image.origin[:2], image.direction[:2, :2], channels=3)
    return image


def _to_volume_shape(mask: np.ndarray, volume_node) -> np.ndarray:
    dims = tuple(volume_node.GetImageData().GetDimensions())
    return mask.reshape(dims)
