"""An image is an array plus the geometry that places it in the world.

Conventions (the same as nibabel and Slicer):
- ``array`` is indexed in voxel order ``(i, j, k)`` for 3D and ``(row, col)`` for 2D images, with an optional
  trailing channel axis for colour images (``(row, col, 3)``).
- Geometry is in RAS millimetres: ``world = origin + direction @ (spacing * index)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SemiSegError


class ImageError(SemiSegError, ValueError):
    """Bad input data; the message always names the file and the problem."""


@dataclass
class Image:
    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...] = None  # type: ignore[assignment]
    direction: np.ndarray = None  # type: ignore[assignment]
    channels: int = 1
    path: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        nd = self.spatial_ndim
        self.spacing = tuple(float(s) for s in self.spacing)
        if len(self.spacing) != nd:
            raise ImageError(f"{self.path or 'image'}: {len(self.spacing)} spacings for {nd} spatial axes")
        self.origin = tuple(float(o) for o in (self.origin if self.origin is not None else (0.0,) * nd))
        self.direction = np.eye(nd) if self.direction is None else np.asarray(self.direction, dtype=float)

    @property
    def spatial_ndim(self) -> int:
        return self.array.ndim - (1 if self.channels > 1 else 0)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[: self.spatial_ndim])

    @property
    def affine(self) -> np.ndarray:
        """Homogeneous index-to-RAS matrix (ndim+1 square)."""
        nd = self.spatial_ndim
        a = np.eye(nd + 1)
        a[:nd, :nd] = self.direction * np.asarray(self.spacing)[None, :]
        a[:nd, nd] = self.origin
        return a

    def with_array(self, array: np.ndarray, channels: int = 1, path: str | None = None) -> "Image":
        """A new image on the same grid (same geometry), e.g. a label map predicted for this image."""
        img = Image(array, self.spacing, self.origin, self.direction.copy(), channels=channels, path=path)
        if img.spatial_shape != self.spatial_shape:
            raise ImageError(f"{path or 'array'}: shape {img.spatial_shape} does not match the grid {self.spatial_shape}"
                             f" of {self.path or 'the image'}")
        return img

    def grid_differences(self, other: "Image", atol: float = 1e-3) -> list[str]:
        """How ``other``'s grid differs from this one, e.g. ``["origin [10.0, 0.0, 0.0] vs [0.0, 0.0, 0.0]"]``."""
        if self.spatial_shape != other.spatial_shape:
            return [f"shape {other.spatial_shape} vs {self.spatial_shape}"]
        close = {"spacing": np.allclose(self.spacing, other.spacing, atol=atol, rtol=1e-4),
                 "origin": np.allclose(self.origin, other.origin, atol=max(atol, 1e-3 * max(self.spacing))),
                 "direction": np.allclose(self.direction, other.direction, atol=1e-3)}

        def show(value) -> str:
            return str((np.round(np.asarray(value, dtype=float), 4) + 0.0).tolist())  # + 0.0: no "-0.0"

        return [f"{k} {show(getattr(other, k))} vs {show(getattr(self, k))}" for k, ok in close.items() if not ok]

    def same_grid(self, other: "Image", atol: float = 1e-3) -> bool:
        return not self.grid_differences(other, atol)

    def check_same_grid(self, other: "Image") -> None:
        """Raise an ImageError naming both files and what differs when ``other`` is not on this image's grid."""
        if self.spatial_shape != other.spatial_shape:
            raise ImageError(f"{other.path}: shape {other.spatial_shape} does not match {self.path} "
                             f"shape {self.spatial_shape}")
        diffs = self.grid_differences(other)
        if diffs:
            raise ImageError(f"{other.path}: geometry does not match {self.path} ({'; '.join(diffs)})")

    @staticmethod
    def from_affine(array: np.ndarray, affine: np.ndarray, channels: int = 1, path: str | None = None) -> "Image":
        nd = affine.shape[0] - 1
        m = np.asarray(affine[:nd, :nd], dtype=float)
        spacing = np.linalg.norm(m, axis=0)
        spacing[spacing == 0] = 1.0
        return Image(array, tuple(spacing), tuple(affine[:nd, nd]), m / spacing[None, :], channels=channels,
                     path=path)


def case_id_from_path(path: str | Path) -> str:
    """File name without any of the known image extensions (``a.nii.gz`` -> ``a``, ``b.seg.nrrd`` -> ``b``)."""
    name = Path(path).name
    for ext in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".h5", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem
