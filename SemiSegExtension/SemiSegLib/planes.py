"""Slice planes through a volume, in any orientation: what SAM sees when a person works in a slice view.

A :class:`Plane` comes from a slice view's ``SliceToRAS`` matrix and the volume's ``IJKToRAS`` matrix. When the view
is normal to a voxel axis (within ``tolerance_deg``), the plane is that voxel slice and nothing is interpolated.
Otherwise the volume is resampled on the plane (linear, at the finest voxel spacing) and a mask drawn on the plane
is painted back as a one-voxel-thick "digital plane": one voxel per column along the voxel axis closest to the
plane's normal, so that neighbouring planes (:meth:`Plane.shifted`) tile the volume without gaps.

Only numpy and scipy: no Slicer, no Qt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semiseg.sam.prompts import Prompt


class PlaneError(ValueError):
    """A plane cannot be used as asked (outside the volume, oblique where a voxel axis is needed)."""


@dataclass
class Plane:
    """One plane through a volume of ``shape`` (i, j, k).

    ``axis``/``index``: the voxel axis closest to the normal and, for an aligned plane, the slice index along it.
    ``oblique`` planes carry their pixel grid in voxel coordinates: pixel (row, col) sits at
    ``corner + row * row_step + col * col_step``; ``normal`` is the plane normal in voxel coordinates and
    ``point`` a voxel-space point on the plane.
    """

    shape: tuple[int, int, int]
    axis: int
    index: int
    oblique: bool = False
    corner: np.ndarray | None = None
    row_step: np.ndarray | None = None
    col_step: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)
    normal: np.ndarray | None = None
    point: np.ndarray | None = None
    slice_to_ras: np.ndarray | None = None
    ijk_to_ras: np.ndarray | None = None

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def aligned(cls, shape, axis: int, index: int) -> "Plane":
        if not 0 <= index < shape[axis]:
            raise PlaneError(f"slice {index} along axis {axis} is outside the volume (0..{shape[axis] - 1})")
        return cls(tuple(int(s) for s in shape), int(axis), int(index))

    @classmethod
    def from_view(cls, slice_to_ras, ijk_to_ras, shape, tolerance_deg: float = 0.5) -> "Plane":
        """The plane a slice view shows (``slice_to_ras``: 4x4, columns x, y, normal, origin) on a volume."""
        s = np.asarray(slice_to_ras, dtype=float)
        a = np.asarray(ijk_to_ras, dtype=float)
        inv = np.linalg.inv(a)
        axis, aligned, normal_ijk = view_axis(s, a, tolerance_deg)
        origin_ijk = inv[:3, :3] @ s[:3, 3] + inv[:3, 3]
        shape = tuple(int(v) for v in shape)
        if aligned:
            index = int(round(origin_ijk[axis]))
            if not 0 <= index < shape[axis]:
                raise PlaneError(f"the view's slice (voxel {origin_ijk[axis]:.1f} along axis {axis}) is outside "
                                 f"the volume (0..{shape[axis] - 1})")
            return cls(shape, axis, index, slice_to_ras=s, ijk_to_ras=a)
        return cls._oblique(s, a, shape, axis, normal_ijk, origin_ijk)

    @classmethod
    def _oblique(cls, s, a, shape, axis, normal_ijk, origin_ijk) -> "Plane":
        inv = np.linalg.inv(a)
        x, y, origin = s[:3, 0], s[:3, 1], s[:3, 3]
        step = float(min(np.linalg.norm(a[:3, :3], axis=0)))  # the finest voxel spacing, mm
        corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                            for k in (0, shape[2] - 1)], dtype=float)
        ras = corners @ a[:3, :3].T + a[:3, 3]
        px, py = (ras - origin) @ x, (ras - origin) @ y
        x0, y1 = np.floor(px.min() / step) * step, np.ceil(py.max() / step) * step
        size = (int(np.ceil((y1 - py.min()) / step)) + 1, int(np.ceil((px.max() - x0) / step)) + 1)
        corner = inv[:3, :3] @ (origin + x0 * x + y1 * y) + inv[:3, 3]
        plane = cls(shape, axis, int(round(origin_ijk[axis])), True, corner, -step * (inv[:3, :3] @ y),
                    step * (inv[:3, :3] @ x), size, normal_ijk, origin_ijk, s, a)
        if not plane._columns()[1].any():
            raise PlaneError("the view's slice does not cross the volume")
        return plane

    # -- pixels ----------------------------------------------------------------------------------------------------
    def sample(self, volume: np.ndarray) -> np.ndarray:
        """The plane's pixels of an (i, j, k) array: the voxel slice, or a linear resampling (0 outside)."""
        if not self.oblique:
            return np.take(volume, self.index, axis=self.axis)
        from scipy import ndimage

        rows, cols = np.mgrid[: self.size[0], : self.size[1]]
        coords = (self.corner[:, None, None] + rows[None] * self.row_step[:, None, None]
                  + cols[None] * self.col_step[:, None, None])
        out = ndimage.map_coordinates(volume.astype(np.float32), coords, order=1, cval=0.0)
        return np.clip(np.rint(out), 0, 255).astype(volume.dtype) if volume.dtype == np.uint8 else out

    def to_pixels(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel coordinates (n, 3) -> (n, 2) plane pixel coordinates ``(x = column, y = row)``."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        if not self.oblique:
            rest = [d for d in range(3) if d != self.axis]
            return np.c_[ijk[:, rest[1]], ijk[:, rest[0]]]
        basis = np.c_[self.row_step, self.col_step]  # (3, 2)
        rc = np.linalg.lstsq(basis, (ijk - self.corner).T, rcond=None)[0].T
        return rc[:, ::-1]

    def offset(self, ijk: np.ndarray) -> np.ndarray:
        """Signed distance (n,) of voxel points from the plane, in voxels along :attr:`axis`."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        if not self.oblique:
            return ijk[:, self.axis] - self.index
        return ((ijk - self.point) @ self.normal) / self.normal[self.axis]

    def _columns(self):
        """Oblique planes: (voxel indices (n, 3), inside (n,)) of the digital plane, one voxel per column."""
        a = self.axis
        b, c = [d for d in range(3) if d != a]
        ib, ic = np.meshgrid(np.arange(self.shape[b]), np.arange(self.shape[c]), indexing="ij")
        n, p = self.normal, self.point
        ia = np.rint(p[a] - (n[b] * (ib - p[b]) + n[c] * (ic - p[c])) / n[a]).astype(np.int64)
        ijk = np.zeros(ib.shape + (3,), dtype=np.int64)
        ijk[..., a], ijk[..., b], ijk[..., c] = ia, ib, ic
        ijk = ijk.reshape(-1, 3)
        return ijk, (ijk[:, a] >= 0) & (ijk[:, a] < self.shape[a])

    def paint(self, mask: np.ndarray, out: np.ndarray, value: int = 1) -> None:
        """Set ``out`` (i, j, k) to ``value`` where the plane's 2D ``mask`` is true."""
        mask = np.asarray(mask, dtype=bool)
        if not self.oblique:
            idx = [slice(None)] * 3
            idx[self.axis] = self.index
            view = out[tuple(idx)]
            view[mask] = value
            return
        ijk, inside = self._columns()
        ijk = ijk[inside]
        xy = np.rint(self.to_pixels(ijk)).astype(np.int64)
        ok = (xy[:, 1] >= 0) & (xy[:, 1] < mask.shape[0]) & (xy[:, 0] >= 0) & (xy[:, 0] < mask.shape[1])
        ijk, xy = ijk[ok], xy[ok]
        hit = mask[xy[:, 1], xy[:, 0]]
        out[tuple(ijk[hit].T)] = value

    # -- neighbours and description ---------------------------------------------------------------------------------
    def shifted(self, step: int) -> "Plane | None":
        """The parallel plane ``step`` voxels further along :attr:`axis`; None once it leaves the volume."""
        if not self.oblique:
            index = self.index + step
            return Plane(self.shape, self.axis, index, slice_to_ras=self.slice_to_ras,
                         ijk_to_ras=self.ijk_to_ras) if 0 <= index < self.shape[self.axis] else None
        moved = self.point.copy()
        moved[self.axis] += step
        s = self.slice_to_ras.copy()
        s[:3, 3] = self.ijk_to_ras[:3, :3] @ moved + self.ijk_to_ras[:3, 3]
        try:
            return Plane._oblique(s, self.ijk_to_ras, self.shape, self.axis, self.normal, moved)
        except PlaneError:
            return None

    def describe(self) -> dict:
        if not self.oblique:
            return {"axis": self.axis, "index": self.index}
        return {"axis": self.axis, "index": self.index, "oblique": True,
                "normal_ijk": [round(float(v), 4) for v in self.normal],
                "point_ijk": [round(float(v), 2) for v in self.point]}


def view_axis(slice_to_ras, ijk_to_ras, tolerance_deg: float = 0.5) -> tuple[int, bool, np.ndarray]:
    """(voxel axis closest to the view's normal, whether the view is normal to it, the normal in voxel space)."""
    s = np.asarray(slice_to_ras, dtype=float)
    a = np.asarray(ijk_to_ras, dtype=float)
    normal = a[:3, :3].T @ s[:3, 2]  # a plane's normal maps with the transpose
    normal /= np.linalg.norm(normal)
    axis = int(np.argmax(np.abs(normal)))
    return axis, bool(abs(normal[axis]) >= np.cos(np.radians(tolerance_deg))), normal


def plane_prompt(plane: Plane, points_ijk=None, labels=None, box_corners_ijk=None, source: str = "user"
                 ) -> Prompt | None:
    """A prompt on ``plane`` from voxel-space points (those within half a voxel of the plane) and a box (the
    projection of its corners, when the box reaches into the plane's one-voxel slab). None when nothing falls on
    the plane."""
    pts, labs = [], []
    if points_ijk is not None and len(points_ijk):
        points_ijk = np.atleast_2d(np.asarray(points_ijk, dtype=float))
        labels = np.ones(len(points_ijk), dtype=int) if labels is None else np.asarray(labels, dtype=int)
        offset = plane.offset(points_ijk)
        near = (offset >= -0.5) & (offset < 0.5)  # each point on one plane
        pts = [tuple(p) for p in plane.to_pixels(points_ijk[near])]
        labs = [int(v) for v in labels[near]]
    box = None
    if box_corners_ijk is not None:
        lo, hi = np.min(box_corners_ijk, axis=0), np.max(box_corners_ijk, axis=0)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        off = plane.offset(corners)
        if off.min() < 0.5 and off.max() > -0.5:  # the box reaches into the plane's voxel slab
            xy = plane.to_pixels(corners)
            box = (xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())
    if box is None and not pts:
        return None
    return Prompt(box, pts, labs, source=source)


def box_of(mask: np.ndarray, padding: float = 0.0) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` of a 2D mask's pixels grown by ``padding`` (clipped); None for an empty mask."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    h, w = mask.shape
    return (max(0.0, cols.min() - padding), max(0.0, rows.min() - padding),
            min(w - 1.0, cols.max() + padding), min(h - 1.0, rows.max() + padding))
