"""Post-processing of label maps. Kept free of torch: the SAM prompt builders use it as well as inference."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(labels: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray:
    """Keep, for each foreground label, only its largest connected component: the one with the most voxels, or,
    given the class probabilities ``probs`` (K, *spatial) the labels were taken from, the one holding the most of that
    label's probability. The second keeps a confident structure over a larger but unsure false one (an LA baseline
    lost a whole atrium to a bigger, less confident blob elsewhere)."""
    out = np.zeros_like(labels)
    for k in np.unique(labels):
        if k == 0:
            continue
        comp, n = ndimage.label(labels == k)
        if n:
            weight = np.ones_like(comp) if probs is None else probs[int(k)]
            mass = ndimage.sum_labels(weight, comp, index=range(1, n + 1))
            out[comp == (int(np.argmax(mass)) + 1)] = k
    return out
