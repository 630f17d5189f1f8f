"""SAM prompts and where they come from.

A :class:`Prompt` lives in the pixel frame of one 2D slice: ``x`` is the column (second array axis of the slice),
``y`` the row (first array axis). For a 3D volume cut along ``axis`` the slice keeps the two other axes in order,
so for ``axis=2`` a slice is ``volume[:, :, k]`` with ``y = i`` and ``x = j``.

Sources: a reference or predicted mask, a probability map, a class-activation map (CAM), and user points/boxes
given in voxel (IJK) or physical RAS coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..io import Image
from ..postprocess import largest_component


@dataclass
class Prompt:
    """One object to segment on one 2D slice.

    box: ``(x0, y0, x1, y1)`` inclusive pixel corners, or None.
    points: ``[(x, y), ...]`` with ``point_labels`` 1 (inside the object) or 0 (outside).
    mask: optional (H, W) rough mask of the object (fed to the decoder as a dense prompt).
    label: the label value the resulting mask gets in the output label map.
    """

    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)
    mask: np.ndarray | None = None
    label: int = 1
    source: str = ""

    def __post_init__(self):
        if self.box is not None:
            x0, y0, x1, y1 = (float(v) for v in self.box)
            if x1 < x0 or y1 < y0:
                raise ValueError(f"prompt box {self.box} is not (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
            self.box = (x0, y0, x1, y1)
        self.points = [(float(x), float(y)) for x, y in self.points]
        self.point_labels = [int(v) for v in self.point_labels]
        if len(self.points) != len(self.point_labels):
            raise ValueError(f"{len(self.points)} prompt points but {len(self.point_labels)} point labels")
        if self.box is None and not self.points and self.mask is None:
            raise ValueError("a prompt needs a box, points or a mask")

    def to_json(self) -> dict:
        d = {"label": self.label, "source": self.source}
        if self.box is not None:
            d["box"] = [round(v, 2) for v in self.box]
        if self.points:
            d["points"] = [[round(x, 2), round(y, 2)] for x, y in self.points]
            d["point_labels"] = list(self.point_labels)
        if self.mask is not None:
            d["mask_pixels"] = int(np.count_nonzero(self.mask))
        return d


# ---------------------------------------------------------------------------------------------------- helpers

def _box_of(binary: np.ndarray, padding: float) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(binary)
    h, w = binary.shape
    return (max(0.0, cols.min() - padding), max(0.0, rows.min() - padding),
            min(w - 1.0, cols.max() + padding), min(h - 1.0, rows.max() + padding))


def _spread_points(score: np.ndarray, n: int, min_dist: float = 3.0) -> list[tuple[float, float]]:
    """Up to ``n`` (x, y) points at the highest values of ``score`` (> 0), each more than ``min_dist`` pixels away
    from the points already taken."""
    score = score.astype(np.float64).copy()
    out = []
    rr, cc = np.ogrid[: score.shape[0], : score.shape[1]]
    for _ in range(n):
        idx = int(np.argmax(score))
        r, c = divmod(idx, score.shape[1])
        if score[r, c] <= 0:
            break
        out.append((float(c), float(r)))
        score[(rr - r) ** 2 + (cc - c) ** 2 <= min_dist ** 2] = 0
    return out


def _interior_points(binary: np.ndarray, n: int) -> list[tuple[float, float]]:
    """Points at interior maxima of the distance map: deep inside the object, spread over its parts."""
    if n <= 0:
        return []
    dist = ndimage.distance_transform_edt(binary)
    radius = max(3.0, float(dist.max()) / 2)
    return _spread_points(dist, n, radius)


def _outside_points(binary: np.ndarray, box, n: int) -> list[tuple[float, float]]:
    """Negative points inside the box but outside the object, as far from the object as possible."""
    if n <= 0 or box is None:
        return []
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    region = np.zeros_like(binary, dtype=bool)
    region[y0:y1 + 1, x0:x1 + 1] = True
    region &= ~binary
    if not region.any():
        return []
    dist = ndimage.distance_transform_edt(~binary) * region
    return _spread_points(dist, n, 3.0)


# ---------------------------------------------------------------------------------------------------- sources

def prompts_from_mask(mask: np.ndarray, labels: list[int] | None = None, padding: float = 5.0, n_pos: int = 0,
                      n_neg: int = 0, min_area: int = 1, source: str = "mask") -> list[Prompt]:
    """One prompt per label present in a 2D label map: the label's bounding box grown by ``padding`` pixels
    (clipped to the slice), ``n_pos`` positive points at interior maxima of its distance map and ``n_neg`` negative
    points inside the box but outside the label. Labels with fewer than ``min_area`` pixels are skipped."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"prompts_from_mask needs a 2D mask, got shape {mask.shape}")
    values = [int(v) for v in np.unique(mask) if v != 0] if labels is None else labels
    prompts = []
    for value in values:
        binary = mask == value
        if binary.sum() < max(1, min_area):
            continue
        box = _box_of(binary, padding)
        pos, neg = _interior_points(binary, n_pos), _outside_points(binary, box, n_neg)
        prompts.append(Prompt(box, pos + neg, [1] * len(pos) + [0] * len(neg), label=int(value), source=source))
    return prompts


def prompt_from_probability(prob: np.ndarray, threshold: float = 0.5, confident: float = 0.9, n_pos: int = 0,
                            n_neg: int = 0, padding: float = 5.0, min_area: int = 1, label: int = 1,
                            use_box: bool = True) -> Prompt | None:
    """A prompt from a 2D foreground probability map: the box of the largest component above ``threshold``,
    positive points where the model is confident (prob >= ``confident``; the most probable pixels otherwise), and
    negative points inside the box where it is confident of background (prob <= 1 - ``confident``).
    None when nothing passes the threshold."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"prompt_from_probability needs a 2D map, got shape {prob.shape}")
    component = largest_component(prob > threshold)
    if component.sum() < max(1, min_area):
        return None
    box = _box_of(component, padding)
    sure = component & (prob >= confident)
    if sure.any():
        pos = _interior_points(sure, n_pos)
    else:
        pos = _spread_points(np.where(component, prob, 0), n_pos, 3.0)
    neg = []
    if n_neg > 0:
        background = prob <= 1 - confident
        neg = _outside_points(~background, box, n_neg)
    return Prompt(box if use_box else None, pos + neg, [1] * len(pos) + [0] * len(neg), label=label,
                  source="probability")


def prompt_from_cam(cam: np.ndarray, threshold: float = 0.5, padding: float = 0.0, min_area: int = 1,
                    label: int = 1) -> Prompt | None:
    """A box prompt from a class-activation map: the map is min-max scaled to [0, 1] and the box drawn around the
    largest component at or above ``threshold``. None for a flat map."""
    cam = np.asarray(cam, dtype=np.float32)
    lo, hi = float(cam.min()), float(cam.max())
    if hi - lo <= 1e-12:
        return None
    component = largest_component((cam - lo) / (hi - lo) >= threshold)
    if component.sum() < max(1, min_area):
        return None
    return Prompt(_box_of(component, padding), label=label, source="cam")


# ---------------------------------------------------------------------------------------------------- geometry

def ras_to_ijk(image: Image, ras: np.ndarray) -> np.ndarray:
    """Physical (RAS mm) coordinates, shape (n, ndim), to continuous voxel indices on ``image``'s grid."""
    ras = np.atleast_2d(np.asarray(ras, dtype=float))
    inv = np.linalg.inv(image.affine)
    return (inv[:-1, :-1] @ ras.T).T + inv[:-1, -1]


def ijk_to_ras(image: Image, ijk: np.ndarray) -> np.ndarray:
    ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
    a = image.affine
    return (a[:-1, :-1] @ ijk.T).T + a[:-1, -1]


def slice_axes(ndim: int, axis: int) -> tuple[int, int]:
    """The (row, column) axes of a slice: the two axes other than ``axis`` for a volume, (0, 1) in 2D."""
    if ndim == 2:
        return 0, 1
    rest = [a for a in range(3) if a != axis]
    return rest[0], rest[1]


def prompts_from_user(image: Image, points=None, point_labels=None, boxes=None, space: str = "ijk", axis: int = 2,
                      label: int = 1) -> dict[int, list[Prompt]]:
    """User clicks and boxes as per-slice prompts.

    points: (n, ndim) coordinates; point_labels: n values (1 include, 0 exclude; default all 1).
    boxes: (m, 2, ndim) pairs of opposite corners. A 3D box yields a 2D box on every slice it spans along ``axis``;
    points on a slice join that slice's box prompt, or make a points-only prompt.
    space: "ijk" (voxel indices of ``image``) or "ras" (physical mm, converted with the image geometry).
    Returns {slice index: [Prompt]} (slice 0 for a 2D image).
    """
    if space not in ("ijk", "ras"):
        raise ValueError(f"unknown coordinate space '{space}' (ijk or ras)")
    nd = image.spatial_ndim
    shape = image.spatial_shape
    conv = (lambda c: ras_to_ijk(image, c)) if space == "ras" else (lambda c: np.atleast_2d(np.asarray(c, float)))
    row_ax, col_ax = slice_axes(nd, axis)

    def slice_of(ijk):
        k = 0 if nd == 2 else int(round(ijk[axis]))
        if nd == 3 and not 0 <= k < shape[axis]:
            raise ValueError(f"{image.path or 'image'}: prompt at {ijk.round(2).tolist()} ({space}) lies outside "
                             f"the volume (shape {shape})")
        return k

    by_slice_pts: dict[int, list[tuple[tuple[float, float], int]]] = {}
    if points is not None and len(points):
        ijk = conv(points)
        if ijk.shape[1] != nd:
            raise ValueError(f"points need {nd} coordinates each, got shape {ijk.shape}")
        labels = [1] * len(ijk) if point_labels is None else list(point_labels)
        for p, lab in zip(ijk, labels):
            by_slice_pts.setdefault(slice_of(p), []).append(((p[col_ax], p[row_ax]), int(lab)))

    by_slice_box: dict[int, tuple] = {}
    for corners in ([] if boxes is None else boxes):
        c = conv(np.asarray(corners, dtype=float).reshape(2, nd))
        lo, hi = c.min(axis=0), c.max(axis=0)
        box2d = (lo[col_ax], lo[row_ax], hi[col_ax], hi[row_ax])
        ks = [0] if nd == 2 else range(max(0, int(round(lo[axis]))), min(shape[axis] - 1, int(round(hi[axis]))) + 1)
        for k in ks:
            by_slice_box[k] = box2d

    out: dict[int, list[Prompt]] = {}
    for k in sorted(set(by_slice_pts) | set(by_slice_box)):
        pts = by_slice_pts.get(k, [])
        out[k] = [Prompt(by_slice_box.get(k), [p for p, _ in pts], [lab for _, lab in pts], label=label,
                         source=f"user-{space}")]
    return out


def slice_prompts(volume: np.ndarray, axis: int, make) -> dict[int, list[Prompt]]:
    """Apply ``make(slice2d) -> list[Prompt]`` to every slice of a 3D array along ``axis`` (or to a 2D array as
    slice 0); slices without prompts are left out."""
    volume = np.asarray(volume)
    if volume.ndim == 2:
        prompts = make(volume)
        return {0: prompts} if prompts else {}
    out = {}
    for k in range(volume.shape[axis]):
        prompts = make(np.take(volume, k, axis=axis))
        if prompts:
            out[k] = prompts
    return out
