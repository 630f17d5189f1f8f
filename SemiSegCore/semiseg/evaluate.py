"""Scoring a model on cases: predict a loaded case on its source grid, turn the probabilities into the label map
``semiseg predict`` writes (argmax, then the configured clean-up), and score it against the case's own reference
(Dice, Jaccard, HD95 and ASD in mm). Validation during training, the reports after training, VerSemi's per-task
scores and the Slicer module's dataset evaluation all go through here, so they give the same numbers for the same
model and case."""
from __future__ import annotations

import numpy as np

from .config import CHOICES
from .metrics import dice_score, label_metrics
from .postprocess import largest_component


LARGEST_COMPONENT_CHOICES = ("off", *CHOICES["infer.component_by"])
"""The clean-up a user may ask for at prediction time (``semiseg predict --largest-component``): none, or keep each
label's component with the most voxels, or the one with the most of the label's probability."""


def set_largest_component(config, choice: str) -> None:
    """Set ``config.infer``'s clean-up to one of ``LARGEST_COMPONENT_CHOICES``, overriding what the run trained with."""
    if choice not in LARGEST_COMPONENT_CHOICES:
        raise ValueError(f"largest component: unknown choice '{choice}' ({', '.join(LARGEST_COMPONENT_CHOICES)})")
    config.infer.largest_component = choice != "off"
    if choice != "off":
        config.infer.component_by = choice


def labels_from(probs: np.ndarray, config) -> np.ndarray:
    """The label map of class probabilities (K, *spatial): argmax, then the largest component of each label where
    ``infer.largest_component`` asks for it (by voxels or by probability, ``infer.component_by``)."""
    labels = probs.argmax(0).astype(np.uint8)
    if not config.infer.largest_component:
        return labels
    return largest_component(labels, probs if config.infer.component_by == "probability" else None)


def segment_case(predictor, case) -> np.ndarray:
    """Label map of a loaded case (``semiseg.data.LoadedCase``) on its source grid, as ``semiseg predict`` writes
    it."""
    return labels_from(predictor.predict_case(case), predictor.config)


def case_rows(case_id: str, pred: np.ndarray, ref: np.ndarray, spacing, labels, label_names=None,
              dice_only: bool = False) -> list[dict]:
    """One row per label of two label maps on one grid: case, label, label_name and the metrics (only Dice with
    ``dice_only``, the cheap score validation during training needs)."""
    names = label_names or {}
    if dice_only:
        scores = {int(k): {"dice": dice_score(pred == k, ref == k)} for k in labels}
    else:
        scores = label_metrics(pred, ref, spacing, labels)
    return [{"case": case_id, "label": k, "label_name": names.get(k, names.get(str(k), f"label_{k}")), **m}
            for k, m in scores.items()]


def score_case(predictor, case, labels=None, label_names=None, dice_only: bool = False) -> list[dict]:
    """Predict a loaded case, clean the label map up and score it against the case's reference on its source grid.
    ``labels`` defaults to every foreground label of the predictor's config (1 .. data.num_classes - 1), so a
    structure absent from both maps counts as correctly absent."""
    if case.reference is None:
        raise ValueError(f"case {case.id}: no reference label to score against")
    labels = list(range(1, predictor.config.data.num_classes)) if labels is None else labels
    return case_rows(case.id, segment_case(predictor, case), case.reference, case.geometry.spacing, labels,
                     label_names, dice_only)


def mean_dice(rows: list[dict], key: str = "label") -> tuple[float, dict[str, float]]:
    """Mean Dice over the cases of each ``key`` (label or label_name), and the mean of those means (NaN without
    rows): the validation score that picks ``best.pt``."""
    per: dict[str, list[float]] = {}
    for r in rows:
        per.setdefault(str(r[key]), []).append(r["dice"])
    means = {k: float(np.mean(v)) for k, v in per.items()}
    return (float(np.mean(list(means.values()))) if means else float("nan")), means
