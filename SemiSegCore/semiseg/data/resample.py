"""Resolution planning: resample images (linear) and labels (nearest) to a working grid, and probabilities back.

The working grid covers the same physical extent as the image (voxel corners stay where they were, as
``align_corners=False`` interpolation assumes): with ``n`` voxels of spacing ``s`` resampled to ``m`` voxels, the new
spacing is ``s * n / m`` and the first voxel centre moves by half the difference of the spacings. Resampling to the
working grid and back therefore gives the original grid exactly (shape, spacing, origin and direction).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..io import Image


def spacing_per_axis(target_spacing, ndim: int, where: str = "data.target_spacing") -> tuple[float, ...] | None:
    """``target_spacing`` as one value per spatial axis (a single number means isotropic); None stays None."""
    if target_spacing is None:
        return None
    values = [float(target_spacing)] * ndim if np.isscalar(target_spacing) else [float(v) for v in target_spacing]
    if len(values) != ndim:
        raise ConfigError(f"config key '{where}' has {len(values)} values for a {ndim}D image")
    if any(v <= 0 for v in values):
        raise ConfigError(f"config key '{where}' must be positive, got {list(target_spacing)}")
    return tuple(values)


def working_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing) -> tuple[int, ...]:
    """The shape of ``shape`` voxels of ``spacing`` mm resampled to ``target_spacing`` (at least 1 voxel per axis)."""
    target = spacing_per_axis(target_spacing, len(shape))
    if target is None:
        return tuple(int(s) for s in shape)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resampled_grid(image: Image, shape: Sequence[int]) -> Image:
    """The geometry of ``image`` resampled to ``shape`` voxels (a zero-memory placeholder array, like ``grid_of``)."""
    from .cases import placeholder

    old = np.asarray(image.spatial_shape, dtype=float)
    new = np.asarray(shape, dtype=float)
    old_spacing = np.asarray(image.spacing)
    new_spacing = old_spacing * old / new
    origin = np.asarray(image.origin) + image.direction @ ((new_spacing - old_spacing) / 2)
    return Image(placeholder(shape), tuple(new_spacing), tuple(origin), image.direction.copy(), path=image.path)


def _interpolate(arr: np.ndarray, shape: Sequence[int], mode: str) -> np.ndarray:
    """Resize the trailing len(shape) axes of a channels-first array (C, *spatial)."""
    shape = tuple(int(s) for s in shape)
    if tuple(arr.shape[1:]) == shape:
        return arr
    x = torch.from_numpy(np.ascontiguousarray(arr))[None]
    if mode == "linear":
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
        out = F.interpolate(x.float(), size=shape, mode=mode, align_corners=False)
    else:
        out = F.interpolate(x.float(), size=shape, mode="nearest-exact")
    return out[0].numpy()


def resample_image(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A channels-first float image (C, *spatial) resampled linearly to ``shape``."""
    return _interpolate(arr, shape, "linear").astype(np.float32, copy=False)


def resample_label(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A label map (*spatial) resampled by nearest neighbour (no new label values)."""
    if tuple(label.shape) == tuple(shape):
        return label
    return _interpolate(label[None].astype(np.float32), shape, "nearest")[0].astype(label.dtype)


def resample_probabilities(probs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Class probabilities (K, *spatial) resampled linearly to ``shape`` (still summing to 1 per voxel), so that the
    argmax is taken on the target grid, as nnU-Net does."""
    return _interpolate(probs, shape, "linear").astype(np.float32, copy=False)
