"""`semiseg plan`: the working resolution, patch, network and iterations that fit a dataset into a time budget on
this machine, with the seconds per iteration measured here (nnU-Net's planning idea, sized for the machine at hand).

Rules (simple on purpose, and printed with their reasons):
- spacing: the dataset's median spacing, coarsened by a power of 2 per axis until the median image's in-plane sides
  fit ``max_side`` voxels (96 for volumes, 128 for pictures on a CPU; 160 / 256 on a GPU); an axis that is already
  much coarser than the others (ACDC's 10 mm slices) is left alone;
- patch: the median working shape rounded down to the network's size multiple, capped at ``max_patch``;
- network: the config's, except that 3D V-Nets and BasicUNets become the strided U-Net on a CPU (about 4x cheaper);
  a strided U-Net halves an axis at a level only while that axis's spacing is at most twice the finest (nnU-Net's
  rule), so a much coarser axis keeps its voxels until the others catch up, and only while the axis keeps at least 4
  voxels of the patch; it has as many levels as some axis can be halved (nnU-Net's depth);
- pictures on a CPU: coarser still (in steps of 16 pixels, down to 64) while the budget buys fewer than
  ``MIN_PICTURE_ITERATIONS`` iterations at the measured speed;
- iterations: what fits ``budget`` minutes at the measured speed, less a share for validation.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import Config
from .data.cases import discover_cases
from .data.resample import spacing_per_axis, working_shape
from .io import read_image
from .models import size_multiple, spatial_dims_of
from .registry import MAX_STRIDED_LEVELS, STRIDED_LEVELS, level_strides

CPU_LIMITS = {3: (96, [64, 64, 48]), 2: (128, [128, 128])}
GPU_LIMITS = {3: (160, [128, 128, 96]), 2: (256, [256, 256])}
VALIDATION_SHARE = 0.15
MIN_BOTTOM_SIDE = 4  # nnU-Net's smallest feature map side: a strided U-Net's bottom keeps at least 4 voxels per axis
MIN_PICTURE_ITERATIONS, MIN_PICTURE_SIDE = 5000, 64
"""On Kvasir-SEG 10% (2 CPU cores) the U-Net++ gained more from iterations than from pixels: 96 px x 5,000 iterations
(21 minutes) reached validation Dice 0.623 against 0.579 for 128 px x 2,500 (16 minutes; 20 minutes buy about 2,700
there) and 0.636 for 128 px x 5,000 (about 35 minutes), means of 3 seeds (docs/benchmarks.md). Resampling a polyp mask
to 96 px and back costs 0.2 Dice points. So on a CPU a picture's working side gives way to iterations."""


@dataclass
class Plan:
    cases: int
    median_spacing: tuple
    median_shape: tuple
    target_spacing: list | None
    working_shape: tuple
    model: str
    strides: list | None
    patch_size: list
    seconds_per_iteration: float
    iterations: int
    budget_minutes: float
    device: str
    threads: int
    reasons: list

    def overrides(self) -> list[str]:
        spacing = "null" if self.target_spacing is None else "[" + ",".join(f"{v:g}" for v in self.target_spacing) + "]"
        strides = [] if self.strides is None else [f"model.strides={self.strides}".replace(" ", "")]
        return [f"data.target_spacing={spacing}", f"model.name={self.model}", *strides,
                f"train.patch_size=[{','.join(map(str, self.patch_size))}]", f"train.iterations={self.iterations}"]

    def text(self) -> str:
        rows = [("cases", str(self.cases)),
                ("median spacing (mm)", " x ".join(f"{v:.3g}" for v in self.median_spacing)),
                ("median shape", " x ".join(map(str, self.median_shape))),
                ("target spacing (mm)", "source grid" if self.target_spacing is None
                 else " x ".join(f"{v:.3g}" for v in self.target_spacing)),
                ("working shape (median)", " x ".join(map(str, self.working_shape))),
                ("network", self.model if self.strides is None else f"{self.model}, strides {self.strides}"),
                ("patch", " x ".join(map(str, self.patch_size))),
                ("seconds / iteration", f"{self.seconds_per_iteration:.3f} (measured: {self.device}, "
                                        f"{self.threads} thread(s))"),
                ("iterations", f"{self.iterations} in {self.budget_minutes:g} min "
                               f"({100 * VALIDATION_SHARE:.0f}% kept for validation)")]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines += ["", "why:"] + [f"- {r}" for r in self.reasons]
        lines += ["", "use: " + " ".join(f"--set {o}" for o in self.overrides())]
        return "\n".join(lines)


def dataset_geometry(cfg: Config, max_cases: int = 12) -> tuple[int, np.ndarray, np.ndarray]:
    """(number of cases, median spacing, median shape) over up to ``max_cases`` labelled cases."""
    cases = [c for c in discover_cases(cfg.data.root, cfg.data.layout) if c.label]
    if not cases:
        raise ValueError(f"{cfg.data.root}: no labelled cases to plan from")
    step = max(1, len(cases) // max_cases)
    images = [read_image(c.image, h5_key="image") for c in cases[::step][:max_cases]]
    spacing = np.median([im.spacing for im in images], axis=0)
    shape = np.median([im.spatial_shape for im in images], axis=0).astype(int)
    return len(cases), spacing, shape


def plan_spacing(spacing: np.ndarray, shape: np.ndarray, max_side: int) -> tuple[list | None, list[str]]:
    """Coarsen the finer axes by powers of 2 until the in-plane sides fit ``max_side``."""
    finest = spacing.min()
    inplane = spacing <= 3 * finest  # axes within 3x of the finest; a much coarser axis is left alone
    factor = 1
    while max(shape[inplane] * spacing[inplane] / (finest * factor)) > max_side:
        factor *= 2
    if factor == 1:
        return None, [f"the median image already fits {max_side} voxels per side: keep each image's own grid"]
    target = [float(s * factor) if ip else float(s) for s, ip in zip(spacing, inplane)]
    return target, [f"in-plane sides of {max(shape[inplane])} voxels: {factor}x coarser to fit {max_side}"]


def plan_model(cfg: Config, cpu: bool) -> tuple[str, list[str]]:
    name = cfg.model.name
    if cpu and name in ("vnet", "unet3d"):
        return "strided_unet3d", [f"'{name}' convolves at full resolution; on a CPU the strided U-Net (first "
                                  f"convolution strided) costs about a quarter per iteration"]
    return name, [f"the config's network '{name}'"]


def plan_strides(spacing, model: str, patch=None) -> list | None:
    """Per-level strides for a strided U-Net on a grid of this spacing (one value per network axis): an axis is halved
    while its spacing is at most twice the finest. With ``patch`` the depth is planned too (nnU-Net): an axis is
    halved only while it keeps an even count of at least ``MIN_BOTTOM_SIDE`` voxels, and levels are added while some
    axis can be halved; without it the network keeps its default depth. None where that is the network's default
    (its depth, 2 everywhere)."""
    if model not in STRIDED_LEVELS:
        return None
    current = np.asarray(spacing, dtype=float)
    sides = None if patch is None else np.asarray(patch, dtype=int)
    levels = []
    while len(levels) < (STRIDED_LEVELS[model] if sides is None else MAX_STRIDED_LEVELS):
        level = [2 if s <= 2 * current.min() else 1 for s in current]
        if sides is not None:
            level = [2 if h == 2 and n % 2 == 0 and n // 2 >= MIN_BOTTOM_SIDE else 1 for h, n in zip(level, sides)]
            if max(level) == 1:
                break
            sides = sides // level
        current = current * level
        levels.append(level)
    return None if levels == level_strides(model) else levels


def plan_patch(work: tuple, model: str, max_patch: list) -> list[int]:
    return [max(m, min(cap, (int(s) // m) * m)) for s, cap, m in zip(work, max_patch, size_multiple(model))]


def seconds_per_iteration(cfg: Config, device: torch.device, steps: int = 6) -> float:
    """Time full training steps (forward, loss, backward, update) of the config's method on random patches."""
    from .data.sampling import Batch
    from .methods import build_method

    method = build_method(cfg, device).to(device).train()
    opt = torch.optim.SGD(method.parameter_groups(), lr=1e-4, momentum=0.9)
    t = cfg.train
    shape = (t.batch_size, cfg.model.in_channels, *t.patch_size)
    batch = Batch(torch.randn(shape, device=device),
                  torch.randint(0, cfg.data.num_classes, (t.batch_size, *t.patch_size), device=device), ["plan"])
    unl = Batch(torch.randn((t.unlabelled_batch_size, *shape[1:]), device=device), None, ["plan"])
    batches = {"labelled": batch, "unlabelled": unl} if method.needs_unlabelled else {"labelled": batch}
    elapsed = []
    for i in range(steps + 2):
        start = time.perf_counter()
        loss = method(batches, 0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first steps warm up allocators and kernels
            elapsed.append(time.perf_counter() - start)
    return float(np.median(elapsed))


def make_plan(cfg: Config, budget_minutes: float = 20.0, device: str | None = None) -> Plan:
    from .utils import pick_device, set_threads

    dev = pick_device(device or cfg.train.device)
    threads = set_threads(cfg.train.threads)
    cpu = dev.type == "cpu"
    dims = spatial_dims_of(cfg.model.name)
    max_side, max_patch = (CPU_LIMITS if cpu else GPU_LIMITS)[dims]
    n, spacing, shape = dataset_geometry(cfg)
    reasons = []
    if cfg.data.target_spacing is not None:
        target = list(spacing_per_axis(cfg.data.target_spacing, len(spacing)))
        reasons.append("data.target_spacing is set in the config: kept")
    else:
        target, why = plan_spacing(spacing, shape, max_side)
        reasons += why
    work = working_shape(tuple(shape), tuple(spacing), target)
    model, why = plan_model(cfg, cpu)
    reasons += why

    def network_axes(values) -> tuple:
        """Per-axis values on the network's axes (a 2D network on volumes: the slice plane)."""
        if len(values) <= dims:
            return tuple(values)
        return tuple(v for a, v in enumerate(values) if a != cfg.train.slice_axis % len(values))

    def planned_strides(patch: list, target) -> list | None:
        return plan_strides(network_axes(spacing if target is None else target), model, patch)

    patch = plan_patch(network_axes(work), model, max_patch)
    strides = planned_strides(patch, target)
    reasons.append(f"patch: the median working shape rounded down to multiples of {size_multiple(model)[0]}, at most "
                   f"{'x'.join(map(str, max_patch))}")
    sec = seconds_per_iteration(_trial(cfg, model, patch, strides), dev)
    iterations = fitting_iterations(budget_minutes, sec)
    if cpu and len(shape) == 2 and cfg.data.target_spacing is None and iterations < MIN_PICTURE_ITERATIONS:
        planned_side, planned_iterations = max(patch), iterations
        side = planned_side
        while side > MIN_PICTURE_SIDE and iterations < MIN_PICTURE_ITERATIONS:
            side -= 16
            target = [float(max(shape * spacing)) / side] * 2
            work = working_shape(tuple(shape), tuple(spacing), target)
            patch = plan_patch(work, model, max_patch)
            strides = planned_strides(patch, target)
            sec = seconds_per_iteration(_trial(cfg, model, patch, strides), dev)
            iterations = fitting_iterations(budget_minutes, sec)
        reasons.append(f"at {planned_side} px the budget buys {planned_iterations} iterations, fewer than "
                       f"{MIN_PICTURE_ITERATIONS}: {side} px buys {iterations}")
    if strides is not None:
        reasons.append(f"strides {strides}: an axis is halved only while its spacing is at most twice the finest "
                       f"and it keeps at least {MIN_BOTTOM_SIDE} voxels; {len(strides)} levels")
    return Plan(n, tuple(spacing), tuple(int(s) for s in shape), target, work, model, strides, patch, sec,
                max(iterations, 100), budget_minutes, str(dev), threads, reasons)


def _trial(cfg: Config, model: str, patch: list, strides: list | None) -> Config:
    trial = copy.deepcopy(cfg)
    trial.model.name, trial.model.strides, trial.train.patch_size = model, strides, patch
    return trial


def fitting_iterations(budget_minutes: float, seconds_per_iteration: float) -> int:
    """Iterations (a multiple of 100) that fit the budget, less its validation share."""
    return int(budget_minutes * 60 * (1 - VALIDATION_SHARE) / seconds_per_iteration) // 100 * 100
