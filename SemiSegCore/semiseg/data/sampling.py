"""Patch sampling with light augmentation, drawn from cases held in memory.

Sampling uses its own numpy Generator, so a run is reproducible from its seed and resumable from the generator
state saved in the checkpoint. Under torchrun every rank draws the same global batch (batch_size x world_size
patches) and keeps its own share, so the data a run sees does not depend on how many processes share it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cases import LoadedCase
from .resample import resample_image, resample_label


def _rotation_plane(patch: tuple[int, ...]) -> tuple[int, int] | None:
    """First pair of spatial axes with equal patch size (in-plane for LA (x, y) and ACDC (row, col))."""
    nd = len(patch)
    for a, b in ((0, 1), (1, 2), (0, 2)):
        if b < nd and patch[a] == patch[b]:
            return a, b
    return None


def _rotated_extent(patch: tuple[int, ...], plane: tuple[int, int], degrees: float) -> tuple[int, ...]:
    """Patch size whose rotation by ``degrees`` in ``plane`` still covers ``patch`` (the plane's axes are equal)."""
    rad = np.deg2rad(degrees)
    side = int(np.ceil(patch[plane[0]] * (abs(np.cos(rad)) + abs(np.sin(rad))))) + 1
    return tuple(side if axis in plane else p for axis, p in enumerate(patch))


def _rotate_and_centre(img: np.ndarray, lab: np.ndarray | None, plane: tuple[int, int], degrees: float,
                       patch: tuple[int, ...]):
    """Rotate a channels-first image (linear) and its label (nearest) about their centre; keep the central patch.

    Done with torch's grid_sample, the other axes folded into channels: scipy's rotate costs most of a step here."""
    rad = np.deg2rad(degrees)
    theta = torch.tensor([[[np.cos(rad), -np.sin(rad), 0.0], [np.sin(rad), np.cos(rad), 0.0]]], dtype=torch.float32)
    centre = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(img.shape[1:], patch))

    def turn(arr: np.ndarray, mode: str) -> np.ndarray:
        lead = arr.ndim - len(patch)
        axes = (lead + plane[0], lead + plane[1])
        moved = np.moveaxis(arr, axes, (-2, -1))
        planes = torch.from_numpy(np.ascontiguousarray(moved, dtype=np.float32)).reshape(1, -1, *moved.shape[-2:])
        grid = torch.nn.functional.affine_grid(theta, list(planes.shape), align_corners=False)
        out = torch.nn.functional.grid_sample(planes, grid, mode=mode, padding_mode="border", align_corners=False)
        out = np.moveaxis(out.reshape(moved.shape).numpy(), (-2, -1), axes)
        return out[(slice(None),) * lead + centre]

    img = turn(img, "bilinear").astype(img.dtype, copy=False)
    lab = None if lab is None else turn(lab, "nearest").astype(lab.dtype, copy=False)
    return img, lab


def pad_to(arr: np.ndarray, shape: tuple[int, ...], value: float = 0.0) -> np.ndarray:
    """Pad the trailing len(shape) axes of ``arr`` symmetrically so that each is at least ``shape``."""
    lead = arr.ndim - len(shape)
    pads = [(0, 0)] * lead
    for s, p in zip(arr.shape[lead:], shape):
        extra = max(p - s, 0)
        pads.append((extra // 2, extra - extra // 2))
    if any(p != (0, 0) for p in pads):
        arr = np.pad(arr, pads, mode="constant", constant_values=value)
    return arr


@dataclass(frozen=True)
class Augmentation:
    """What a sampler may change in a patch.

    ``flips``: random 90-degree rotations in the first square plane and flips along every axis. ``scale``: zoom by a
    factor drawn log-uniformly from [1/(1+scale), 1+scale] (a patch of patch/zoom voxels is cut and resized:
    linear for the image, nearest for the label). ``intensity``: each channel multiplied by a factor from
    [1-intensity, 1+intensity] and the contrast about the patch mean by another, like nnU-Net's brightness and
    contrast transforms; for RGB it also shifts the colour balance. ``rotation``: rotate in the first square plane
    by an angle drawn uniformly from [-rotation, rotation] degrees (a larger patch is cut, rotated about its centre,
    linear for the image and nearest for the label, and its centre kept), as nnU-Net does; it fills in the angles
    between the 90-degree turns; a patch with no two equal sides (no square plane) is not rotated. ``gamma``: for a
    share ``GAMMA_PROBABILITY`` of patches, each channel is mapped to [0, 1] by its range in the patch, raised to a
    power drawn log-uniformly from [1/(1+gamma), 1+gamma], mapped back, and given its mean and standard deviation
    again (nnU-Net's gamma transform with retained statistics): it bends contrast, which brightness and contrast
    factors cannot. ``invert``: the share of patches whose channels are reflected about their patch mean
    (x -> 2 mean - x), so bright structures turn dark with mean and standard deviation kept: it teaches shape over
    polarity, for images whose structure is sometimes darker than its surroundings. With few labelled images these
    matter more than anything else the sampler does.
    """
    flips: bool = True
    scale: float = 0.0
    intensity: float = 0.0
    rotation: float = 0.0
    gamma: float = 0.0
    invert: float = 0.0

    GAMMA_PROBABILITY = 0.3  # nnU-Net's

    @classmethod
    def of(cls, train_cfg) -> "Augmentation":
        if not train_cfg.augment:
            return cls(flips=False)
        return cls(True, float(train_cfg.scale_augment), float(train_cfg.intensity_augment),
                   float(train_cfg.rotate_augment), float(train_cfg.gamma_augment),
                   float(train_cfg.invert_augment))

    @property
    def any(self) -> bool:
        return (self.flips or self.scale > 0 or self.intensity > 0 or self.rotation > 0 or self.gamma > 0
                or self.invert > 0)


@dataclass
class Batch:
    image: torch.Tensor  # (B, C, *patch) float
    label: torch.Tensor | None  # (B, *patch) long
    case_ids: list[str]

    def to(self, device) -> "Batch":
        return Batch(self.image.to(device, non_blocking=True),
                     None if self.label is None else self.label.to(device, non_blocking=True), self.case_ids)


class PatchSampler:
    """Draws random patches (with labels when the cases have them) from a list of loaded cases."""

    def __init__(self, cases: list[LoadedCase], patch_size, batch_size: int, seed: int,
                 augment: bool | Augmentation = True,
                 foreground_prob: float = 0.0, labels: dict[str, np.ndarray] | None = None, slice_axis: int = -1,
                 rank: int = 0, world_size: int = 1):
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        self.cases = cases
        self.patch = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.augment = augment if isinstance(augment, Augmentation) else Augmentation(flips=bool(augment))
        self.foreground_prob = foreground_prob
        self.labels = labels  # overrides case.label (e.g. pseudo-labels)
        self.rng = np.random.default_rng(seed)
        self._fg_index: dict[str, np.ndarray] = {}
        self.rank, self.world_size = rank, world_size
        self.slice_axis = slice_axis
        """Used when 2D patches are drawn from 3D volumes (a 2D network trained slice by slice)."""

    def label_of(self, case: LoadedCase) -> np.ndarray | None:
        if self.labels is not None:
            return self.labels.get(case.id)
        return case.label

    def _foreground_voxels(self, case: LoadedCase, label: np.ndarray) -> np.ndarray:
        if case.id not in self._fg_index:
            fg = np.argwhere(label > 0)
            if len(fg) > 20000:  # a subsample is enough to pick centres
                fg = fg[np.random.default_rng(0).choice(len(fg), 20000, replace=False)]
            self._fg_index[case.id] = fg
        return self._fg_index[case.id]

    def _pick_slice(self, case: LoadedCase, label: np.ndarray | None):
        """A 2D slice (channels-first image, label) of a 3D case, centred on foreground with foreground_prob."""
        axis = self.slice_axis % (case.image.ndim - 1)
        n = case.image.shape[axis + 1]
        idx = int(self.rng.integers(n))
        if label is not None and self.rng.random() < self.foreground_prob:
            fg = self._foreground_voxels(case, label)
            if len(fg):
                idx = int(fg[self.rng.integers(len(fg))][axis])
        image = np.take(case.image, idx, axis=axis + 1)
        return image, None if label is None else np.take(label, idx, axis=axis)

    def sample_one(self, case: LoadedCase):
        image, label = case.image, self.label_of(case)
        if image.ndim - 1 == len(self.patch) + 1:
            image, label = self._pick_slice(case, label)
        angle, plane = 0.0, _rotation_plane(self.patch)
        if self.augment.rotation > 0 and plane is not None:
            angle = float(self.rng.uniform(-1, 1) * self.augment.rotation)
        target = _rotated_extent(self.patch, plane, angle) if angle else self.patch
        crop = target
        if self.augment.scale > 0:
            zoom = self._log_uniform_factor(self.augment.scale)
            crop = tuple(max(1, int(round(p / zoom))) for p in target)
        image = pad_to(image, crop, value=float(image.min()))
        if label is not None:
            label = pad_to(label, crop)
        shape = image.shape[1:]
        starts = [int(self.rng.integers(0, s - p + 1)) for s, p in zip(shape, crop)]
        if label is not None and self.rng.random() < self.foreground_prob:
            fg = np.argwhere(label > 0) if label.ndim != case.image.ndim - 1 else self._foreground_voxels(case, label)
            if len(fg):
                centre = fg[self.rng.integers(len(fg))]
                starts = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, crop, shape)]
        sl = tuple(slice(st, st + p) for st, p in zip(starts, crop))
        img = image[(slice(None),) + sl]
        lab = label[sl] if label is not None else None
        if crop != target:
            img = resample_image(img, target).astype(img.dtype, copy=False)
            lab = None if lab is None else resample_label(lab, target)
        if angle:
            img, lab = _rotate_and_centre(img, lab, plane, angle, self.patch)
        if self.augment.flips:
            img, lab = self._flip(img, lab)
        if self.augment.intensity > 0:
            img = self._jitter_intensity(img)
        if self.augment.gamma > 0 and self.rng.random() < Augmentation.GAMMA_PROBABILITY:
            img = self._bend_gamma(img)
        if self.augment.invert > 0 and self.rng.random() < self.augment.invert:
            img = 2 * img.mean(axis=tuple(range(1, img.ndim)), keepdims=True) - img
        return np.ascontiguousarray(img), None if lab is None else np.ascontiguousarray(lab)

    def _jitter_intensity(self, img: np.ndarray) -> np.ndarray:
        s = self.augment.intensity
        per_channel = self.rng.uniform(1 - s, 1 + s, size=(img.shape[0],) + (1,) * (img.ndim - 1))
        img = img * per_channel.astype(img.dtype)
        mean = img.mean()
        return ((img - mean) * np.float32(self.rng.uniform(1 - s, 1 + s)) + mean).astype(img.dtype, copy=False)

    def _log_uniform_factor(self, spread: float) -> float:
        """A factor drawn log-uniformly from [1/(1+spread), 1+spread] (a zoom or a gamma)."""
        return float(np.exp(self.rng.uniform(-1, 1) * np.log1p(spread)))

    def _bend_gamma(self, img: np.ndarray) -> np.ndarray:
        gamma = self._log_uniform_factor(self.augment.gamma)
        out = np.empty_like(img)
        for c, channel in enumerate(img):
            low, span = channel.min(), np.ptp(channel)
            if span == 0:  # a constant channel has no contrast to bend
                out[c] = channel
                continue
            bent = ((channel - low) / span) ** gamma * span + low  # strictly monotone, so its std is not 0
            out[c] = (bent - bent.mean()) * (channel.std() / bent.std()) + channel.mean()
        return out

    def _flip(self, img, lab):
        plane = _rotation_plane(self.patch)
        if plane is not None:
            k = int(self.rng.integers(4))
            img = np.rot90(img, k, axes=(plane[0] + 1, plane[1] + 1))
            lab = None if lab is None else np.rot90(lab, k, axes=plane)
        for axis in range(len(self.patch)):
            if self.rng.random() < 0.5:
                img = np.flip(img, axis=axis + 1)
                lab = None if lab is None else np.flip(lab, axis=axis)
        return img, lab

    def next_batch(self) -> Batch:
        idx = self.rng.integers(0, len(self.cases), size=self.batch_size * self.world_size)
        pairs = [self.sample_one(self.cases[i]) for i in idx]  # every rank draws all, to keep the streams equal
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        idx, pairs = idx[mine], pairs[mine]
        images = torch.from_numpy(np.stack([p[0] for p in pairs]))
        labels = None
        if all(p[1] is not None for p in pairs):
            labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
        return Batch(images, labels, [self.cases[i].id for i in idx])

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
