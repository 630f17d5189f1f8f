"""SAM and trained-model segmentation of a volume node into NEW segments that carry provenance and a score.

SAM works on planes (:mod:`SemiSegLib.planes`): the plane a slice view shows, in any orientation; the voxel slices
of a range or of the whole volume along the axis normal to that view; or the planes reached by propagating one
prompt (box -> mask -> box) until the structure ends. Each is a generator that does one plane per step and yields a
:class:`~SemiSegLib.tasks.Progress`, so the GUI can show progress and cancel; :func:`~SemiSegLib.tasks.run_task`
runs one to its end. Nothing in a segmentation is overwritten: each result is a new segment
(see :func:`nodes.add_segment`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Generator

import numpy as np

from semiseg.io import Image
from semiseg.sam.engine import SamEngine, to_uint8
from semiseg.sam.prompts import Prompt, prompt_from_probability

from . import nodes
from .planes import Plane, box_of, plane_prompt
from .tasks import Progress

PlanePrompts = list[tuple[Plane, list[Prompt]]]

_ENGINES: dict[tuple[str, str], SamEngine] = {}


def engine_for(backend: str, checkpoint: str = "", device: str = "auto") -> SamEngine:
    """One SAM engine per backend and checkpoint for the whole session (module and Segment Editor effect), so that
    its embedding cache makes repeated prompts on a slice fast."""
    from semiseg.sam import build_backend

    key = (backend, str(checkpoint or ""))
    if key not in _ENGINES:
        _ENGINES[key] = SamEngine(build_backend(backend, checkpoint or None, device=device))
    return _ENGINES[key]


@dataclass
class PlaneResult:
    labels: np.ndarray
    """(i, j, k) uint8 label map on the volume's grid."""
    score: float
    """Mean predicted IoU of the decoded prompts."""
    provenance: dict = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0


@dataclass
class SegmentResult:
    segment_id: str
    score: float
    mask: np.ndarray  # (i, j, k) bool on the volume's grid
    provenance: dict = field(default_factory=dict)


def working_image(volume_node) -> Image:
    """The volume as the models take it: a single-slice volume (a picture loaded into Slicer) is 2D again."""
    image = nodes.image_from_volume(volume_node)
    if image.spatial_shape[2] == 1:
        arr = image.array[:, :, 0]
        return Image(arr, image.spacing[:2], image.origin[:2], image.direction[:2, :2], channels=image.channels,
                     path=image.path)
    return image


# ---- SAM on planes ---------------------------------------------------------------------------------------------

def segment_plane(engine: SamEngine, scaled: np.ndarray, plane: Plane, prompts: list[Prompt], channels: int = 1,
                  prompt_source: str = "") -> tuple[np.ndarray, float, dict]:
    """SAM on one plane of an intensity-scaled (uint8) volume: (label map of the plane, mean predicted IoU, record)."""
    if channels == 3:  # a colour picture: one slice, its own RGB pixels
        if plane.oblique or plane.axis != 2:
            raise nodes.NodeError("a colour image has a single slice; segment it in its own (axial) view")
        pixels = scaled[:, :, plane.index]
    else:
        pixels = plane.sample(scaled)
    image = Image(pixels, (1.0, 1.0), (0.0, 0.0), np.eye(2), channels=channels)
    result = engine.segment(image, list(prompts), prompt_source=prompt_source)
    decoded = result.provenance["slices"][0]["prompts"] if result.provenance["slices"] else []
    return result.label.array, result.score, {**plane.describe(), "prompts": decoded}


def _provenance(engine: SamEngine, image: Image, axis, prompt_source: str, records: list[dict], scores: list[float]
                ) -> tuple[float, dict]:
    ious = [p["iou"] for r in records for p in r["prompts"]] or scores
    score = float(np.mean(ious)) if ious else 0.0
    provenance = engine.provenance(image, axis, "auto", prompt_source)
    provenance.update(score=round(score, 4), slices=records)
    return score, provenance


def planes_steps(engine: SamEngine, image: Image, items: PlanePrompts, prompt_source: str = "markups"
                 ) -> Generator[Progress, None, PlaneResult]:
    """SAM on each (plane, prompts) of ``items``, one plane per step; where prompts overlap, the higher IoU wins."""
    if not items:
        raise nodes.NodeError(f"{image.path or 'the volume'}: no prompt falls on the selected slices")
    scaled = to_uint8(image)  # the whole volume scaled once, so that its slices stay comparable
    out = np.zeros(image.spatial_shape, dtype=np.uint8)
    records, scores = [], []
    for n, (plane, prompts) in enumerate(items):
        yield Progress(n / len(items), f"SAM: slice {plane.index} ({n + 1} of {len(items)})")
        labels, score, record = segment_plane(engine, scaled, plane, prompts, image.channels, prompt_source)
        for value in (int(v) for v in np.unique(labels) if v):
            plane.paint(labels == value, out, value)
        records.append(record)
        scores.append(score)
    score, provenance = _provenance(engine, image, items[0][0].axis, prompt_source, records, scores)
    return PlaneResult(out, score, provenance)


def propagate_steps(engine: SamEngine, image: Image, plane: Plane, prompt: Prompt, directions=(1, -1),
                    limits: tuple[int, int] | None = None, padding: float = 2.0, min_area: int = 10,
                    min_score: float = 0.6, shrink: float = 0.25) -> Generator[Progress, None, PlaneResult]:
    """From ``prompt`` on ``plane``, go to the neighbouring planes (``directions``: +1 and/or -1 voxel along
    ``plane.axis``), each prompted by the box of the previous plane's mask grown by ``padding`` pixels, until the
    structure ends: the mask has fewer than ``min_area`` pixels or less than ``shrink`` times the previous one, or
    SAM's predicted IoU drops below ``min_score``; or until the volume ends or the slice index along the axis leaves
    ``limits`` (inclusive; an ROI's extent, as MedSAM-Lite's Slicer module bounds it)."""
    lo, hi = (min(limits), max(limits)) if limits is not None else (-np.inf, np.inf)
    scaled = to_uint8(image)
    out = np.zeros(image.spatial_shape, dtype=np.uint8)
    yield Progress(None, f"SAM: slice {plane.index}")
    labels, score, record = segment_plane(engine, scaled, plane, [prompt], image.channels, "propagation start")
    start = labels > 0
    if start.sum() < min_area:
        raise nodes.NodeError(f"SAM found nothing at the prompt on slice {plane.index}; place the prompt inside "
                              f"the structure")
    plane.paint(start, out)
    records, scores, ends = [record], [score], {}
    for step in directions:
        previous, current = start, plane
        while True:
            current = current.shifted(step)
            if current is None or not lo <= current.index <= hi:
                ends[step] = "volume edge" if current is None else f"limit at slice {current.index - step}"
                break
            yield Progress(None, f"SAM: propagating {'+' if step > 0 else '-'}: slice {current.index}")
            box = box_of(previous, padding)
            labels, score, record = segment_plane(engine, scaled, current, [Prompt(box, source="propagated")],
                                                  image.channels, "propagated")
            mask = labels > 0
            area = int(mask.sum())
            if area < max(min_area, shrink * previous.sum()) or score < min_score:
                ends[step] = f"structure ends at slice {current.index} (area {area} px, predicted IoU {score:.2f})"
                break
            current.paint(mask, out)
            records.append(record)
            scores.append(score)
            previous = mask
    score, provenance = _provenance(engine, image, plane.axis, "propagation", records, scores)
    provenance["propagation"] = {"directions": list(directions), "limits": list(limits) if limits else None,
                                 "padding": padding, "min_area": min_area, "min_score": min_score, "shrink": shrink,
                                 "ended": {("+" if k > 0 else "-"): v for k, v in ends.items()}}
    return PlaneResult(out, score, provenance)


# ---- prompts from markups and from a model --------------------------------------------------------------------

@dataclass
class MarkupInputs:
    """Markups in the volume's voxel coordinates."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None  # (2, 3) corners, or None

    def prompt_on(self, plane: Plane) -> Prompt | None:
        return plane_prompt(plane, self.points, self.labels, self.box, source="markups")


def markup_inputs(volume_node, positive=None, negative=None, roi=None) -> MarkupInputs:
    points, labels = nodes.points_prompt(volume_node, positive, negative)
    box = nodes.roi_box_ijk(roi, volume_node) if roi is not None else None
    if not len(points) and box is None:
        raise nodes.NodeError(f"{volume_node.GetName()}: place SAM points or an ROI box first")
    return MarkupInputs(points, labels, box)


def markup_items(inputs: MarkupInputs, planes: list[Plane]) -> PlanePrompts:
    """(plane, [prompt]) for every plane that a point or the box falls on."""
    items = []
    for plane in planes:
        prompt = inputs.prompt_on(plane)
        if prompt is not None:
            items.append((plane, [prompt]))
    return items


def aligned_planes(shape, axis: int, slices: tuple[int, int] | None = None) -> list[Plane]:
    """The voxel slices ``lo..hi`` (all of them for None) along ``axis``."""
    lo, hi = (0, shape[axis] - 1) if slices is None else (max(0, min(slices)), min(shape[axis] - 1, max(slices)))
    return [Plane.aligned(shape, axis, k) for k in range(lo, hi + 1)]


def model_items(probabilities: np.ndarray, planes: list[Plane], threshold: float = 0.5, confident: float = 0.9,
                n_pos: int = 0, padding: float = 5.0, min_area: int = 10) -> PlanePrompts:
    """Per plane, one prompt per foreground class from a model's (K, i, j, k) probabilities: the box of the class's
    largest confident component and ``n_pos`` points where the model is sure (:func:`prompt_from_probability`; none
    by default, since LiteMedSAM learned from boxes)."""
    items = []
    for plane in planes:
        prompts = []
        for c in range(1, probabilities.shape[0]):
            prompt = prompt_from_probability(plane.sample(probabilities[c]), threshold, confident, n_pos, 0, padding,
                                             min_area, label=c)
            if prompt is not None:
                prompts.append(prompt)
        if prompts:
            items.append((plane, prompts))
    return items


# ---- results as segments -----------------------------------------------------------------------------------------

def add_sam_segment(volume_node, segmentation_node, result: PlaneResult, name: str = "SAM",
                    color=(0.2, 0.75, 0.95)) -> SegmentResult:
    """The result as a new segment tagged with its source, score and provenance."""
    mask = result.mask
    if not mask.any():
        raise nodes.NodeError(f"{volume_node.GetName()}: SAM found nothing to add")
    tags = {nodes.TAG_SOURCE: "sam", nodes.TAG_SCORE: f"{result.score:.4f}",
            nodes.TAG_PROVENANCE: json.dumps(result.provenance)}
    segment_id = nodes.add_segment(segmentation_node, mask, volume_node, name, tags, color)
    return SegmentResult(segment_id, result.score, mask, result.provenance)


def model_segment(volume_node, segmentation_node, probabilities: np.ndarray, provenance: dict,
                  names: dict[int, str] | None = None) -> list[SegmentResult]:
    """A trained model's (K, i, j, k) probabilities on the volume as new segments, one per foreground class, each
    scored by the mean probability inside it."""
    dims = tuple(volume_node.GetImageData().GetDimensions())
    probs = np.asarray(probabilities, dtype=np.float32).reshape((-1,) + dims)
    labels = probs.argmax(axis=0)
    results = []
    for k in range(1, probs.shape[0]):
        mask = labels == k
        score = float(probs[k][mask].mean()) if mask.any() else 0.0
        prov = {"source": "model", **provenance, "class": k}
        tags = {nodes.TAG_SOURCE: "model", nodes.TAG_SCORE: f"{score:.4f}", nodes.TAG_PROVENANCE: json.dumps(prov)}
        sid = nodes.add_segment(segmentation_node, mask, volume_node, (names or {}).get(k, f"model label {k}"), tags)
        results.append(SegmentResult(sid, score, mask, prov))
    return results
