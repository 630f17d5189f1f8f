"""Intensity preprocessing of training and inference inputs (``data.intensity`` in a config). SAM's own mapping of
intensities to 0..255 is :func:`semiseg.sam.engine.to_uint8`."""
from __future__ import annotations

import numpy as np


def normalise(arr: np.ndarray, mode: str) -> np.ndarray:
    """Per-case intensity normalisation of a channels-first float array."""
    if mode == "none":
        return arr
    if mode == "rgb":
        return arr / 255.0
    if mode == "zscore":
        return (arr - arr.mean()) / max(float(arr.std()), 1e-6)
    if mode == "minmax":
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / max(hi - lo, 1e-6)
    if mode == "percentile":
        lo, hi = np.percentile(arr, [0.5, 99.5])
        return (np.clip(arr, lo, hi) - lo) / max(float(hi - lo), 1e-6)
    raise ValueError(f"unknown intensity normalisation '{mode}' (none, rgb, zscore, minmax, percentile)")
