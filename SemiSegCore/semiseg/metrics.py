"""Overlap and surface-distance metrics in millimetres.

Definitions (binary masks; for label maps each foreground label is scored on its own):
- Dice = 2|P∩R| / (|P|+|R|); Jaccard = |P∩R| / |P∪R|.
- Surfaces are the mask voxels that touch the background in a face-connected (6- or 4-) neighbourhood.
  Distances use the image spacing, so they are in mm.
- HD95: 95th percentile of the distances from each surface to the other, both directions pooled (as medpy's hd95).
- ASD: average distance from the prediction's surface to the reference's surface (as medpy's ``asd``, the
  convention of the UA-MT / SSL4MIS literature). ASSD, the symmetric average, is reported too.

Empty masks: both empty -> Dice 1, Jaccard 1, distances 0 (a correct "absent"). Exactly one empty -> Dice 0,
Jaccard 0 and distances NaN (undefined), which summaries skip and count under ``n_undefined``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("dice", "jaccard", "hd95", "asd", "assd")


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _distances_to(surface_from: np.ndarray, mask_to: np.ndarray, spacing) -> np.ndarray:
    dist_map = ndimage.distance_transform_edt(~_surface(mask_to), sampling=spacing)
    return dist_map[surface_from]


def _crop_to(pred: np.ndarray, ref: np.ndarray, margin: int = 2):
    """Crop both masks to the bounding box of their union (plus a margin): same distances, far less work."""
    union = pred | ref
    idx = np.nonzero(union)
    sl = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)
    return pred[sl], ref[sl]


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing=None) -> dict[str, float]:
    """Dice, Jaccard, HD95, ASD and ASSD of two binary masks on the same grid."""
    pred = np.asarray(pred).astype(bool)
    ref = np.asarray(ref).astype(bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * pred.ndim))
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred == 0 and n_ref == 0:
        return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0}
    inter = int((pred & ref).sum())
    dice = 2.0 * inter / (n_pred + n_ref)
    jaccard = inter / (n_pred + n_ref - inter)
    if n_pred == 0 or n_ref == 0:
        return {"dice": dice, "jaccard": jaccard, "hd95": math.nan, "asd": math.nan, "assd": math.nan}
    pred_c, ref_c = _crop_to(pred, ref)
    d_pr = _distances_to(_surface(pred_c), ref_c, spacing)
    d_rp = _distances_to(_surface(ref_c), pred_c, spacing)
    both = np.concatenate([d_pr, d_rp])
    return {"dice": dice, "jaccard": jaccard, "hd95": float(np.percentile(both, 95)), "asd": float(d_pr.mean()),
            "assd": float(both.mean())}


def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing=None, labels=None) -> dict[int, dict[str, float]]:
    """Metrics per foreground label of two label maps; ``labels`` defaults to every label in either map."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0)
    return {int(k): binary_metrics(pred == k, ref == k, spacing) for k in labels}


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice alone (cheap, for validation during training)."""
    pred = np.asarray(pred).astype(bool)
    ref = np.asarray(ref).astype(bool)
    denom = pred.sum() + ref.sum()
    return 1.0 if denom == 0 else float(2.0 * (pred & ref).sum() / denom)


def summarise(rows: list[dict]) -> dict:
    """Mean / std / count of each metric per label and over all rows (NaN values skipped and counted)."""
    def stats(group):
        out = {}
        for m in METRIC_NAMES:
            vals = np.array([r[m] for r in group if m in r], dtype=float)
            ok = vals[~np.isnan(vals)]
            out[m] = {"mean": float(ok.mean()) if ok.size else math.nan, "std": float(ok.std()) if ok.size else math.nan,
                      "n": int(ok.size), "n_undefined": int(np.isnan(vals).sum())}
        return out

    labels = sorted({str(r["label"]) for r in rows})
    return {"per_label": {k: stats([r for r in rows if str(r["label"]) == k]) for k in labels},
            "overall": stats(rows)}
