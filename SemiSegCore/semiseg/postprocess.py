"""Post-processing of label maps. Kept free of torch: the SAM prompt builders use it as well as inference."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep, for each foreground label, only its largest connected component."""
    out = np.zeros_like(labels)
    for k in np.unique(labels):
        if k == 0:
            continue
        comp, n = ndimage.label(labels == k)
        if n:
            sizes = ndimage.sum_labels(np.ones_like(comp), comp, index=range(1, n + 1))
            out[comp == (int(np.argmax(sizes)) + 1)] = k
    return out
