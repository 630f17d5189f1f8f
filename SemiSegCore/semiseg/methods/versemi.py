"""VerSemi, "Segment Together" (Zeng et al., arXiv 2311.11686, IEEE TMI 2025): one network for several datasets.

Every labelled structure of every dataset is a *task*; a V-Net with a task-prompted dynamic head
(``models/task_head.py``) predicts background / structure for the prompted task. One extra *synthetic* task is
trained on CutMix composites of two labelled patches to segment the union of all structures (the "expanded label
space"); on unlabelled data it must agree with the voxelwise maximum of all task predictions.

Stage 1 (labelled only; the setting of the released code), for a labelled batch split into pairs (a, b) and a mask
M that is 1 except for a cube of side ``cube_ratio`` x patch (where b is pasted into a):
    L_sup   = Dice + CE of every sample for every task of its dataset, with that task's prompt
    L_chaos = Dice(synthetic prompt on x_a M + x_b (1-M), union_a M + union_b (1-M))
    L_spec  = Dice of each task of a or b on the mix, target = its structure where it came from (mean over tasks)
    L = L_sup + w (L_chaos + L_spec), w = ``mix_weight`` (1 as released)
Stage 2 (from ``unlabelled_start``; in the paper, commented out in the released code), with a labelled batch l and
an unlabelled batch u and a cube side drawn from ``cube_ratio_range``:
    L_sup as above; L_chaos_sup = L_chaos on a new labelled pair mix
    x_c = x_u M + x_l (1-M) (a labelled cube pasted into an unlabelled patch)
    L_unl  = Dice(synthetic prompt on x_c, voxelwise max over all task prompts on x_c)
    L_cube = Dice(synthetic prompt on x_c, union_l) inside the pasted cube
    L = L_sup + w L_chaos_sup + unlabelled_weight * L_unl + L_cube (+ w L_spec on the labelled mix, with
    ``task_mix_in_stage2``; ``detach_aggregate`` stops L_unl's gradient through the task prompts)
Dice here is VerSemi's (V-Net) loss on a foreground probability, 1 - (2 sum pg + eps) / (sum p^2 + sum g^2 + eps),
pooled over the batch separately for each task.

Data: the first dataset is the trainer's ``data:`` section (its split is the trainer's manifest); every further
dataset (``versemi.datasets``) is split with ``make_manifest`` and sampled here. Each dataset has its own patch
(``patch_size``; the first uses ``train.patch_size``) that fits its grid: a 16-slice slab of isotropic LA is 10 mm,
while 16 ACDC slices cover the heart (volumes smaller than the patch are padded, e.g. ACDC's ~10 slices to 16).
The backbone runs once per patch shape; where two patches of different shapes are mixed (CutMix across datasets),
the partner patch is resampled to the host's shape first (trilinear; labels nearest). Inference prompts each task
of a dataset and writes one label map per volume on its own grid (structure value = the task's label).

Network as released (``vnet_odod_mix.py``): no full-resolution skip (the head reads the last up-convolution's
output; ``full_res_skip: true`` restores our V-Net's last skip and convolution stage), and batch norm before the
pooled controller input and the head's 1x1 convolution (``head_norm``) whatever the backbone's norm: an instance
norm there would standardise each sample's channels on their own and leave the controller little of the image.
On a CPU the backbone may be the strided U-Net (``model.name: strided_unet3d``, the network of the CPU presets): its
first convolution is strided and its last up-convolution (convolution only) returns to full resolution, so it
already has the released layout; the head reads that up-convolution's output and the U-Net's bottom block. Each
dataset's patches may pass it with their own strides (``datasets[i].strides``, e.g. ACDC's 10 mm slice axis kept
whole for two levels while LA's isotropic patches are halved along every axis): the weights are the same.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError, build_dataclass, check_spacing, check_strides
from ..data.cases import LoadedCase, Manifest, discover_cases, load_case, make_manifest
from ..data.sampling import Augmentation, Batch, PatchSampler
from ..evaluate import mean_dice, score_case
from ..losses import pooled_dice_loss
from ..mixing import cube_masks
from ..models import bottleneck, set_strides
from ..models.task_head import TaskPromptedHead
from ..registry import STRIDED_LEVELS, level_strides
from .base import Method


@dataclass
class DatasetSpec:
    """One dataset and the tasks (structures) it contributes. Unset values come from the ``data``/``train``/
    ``infer`` sections. For the first dataset (the trainer's ``data`` section) only ``tasks``, ``name``,
    ``batch_size``, ``unlabelled_batch_size`` and ``largest_component`` may be set."""
    tasks: dict = field(default_factory=dict)
    """Structure name -> label value in this dataset's label maps, e.g. {left_atrium: 1}."""
    root: str = ""
    name: str = ""
    """Default: the folder name of ``root``."""
    layout: str = "auto"
    num_classes: Optional[int] = None
    """Largest label value + 1 in the label files (default: largest task value + 1); other values count as
    background."""
    labelled: Optional[float] = None
    val: Optional[float] = None
    test: Optional[float] = None
    """Held out for the final report only (``evaluate_run(split="test")``); counts as in data.test."""
    unlabelled: Optional[float] = None
    seed: Optional[int] = None
    max_cases: Optional[int] = None
    group_pattern: Optional[str] = None
    """Keeps a group's cases (e.g. one patient's frames) in one set; see data.group_pattern."""
    intensity: Optional[str] = None
    target_spacing: Optional[Union[float, list]] = None
    """This dataset's working grid in mm, as data.target_spacing (default: its own grid; the first dataset's is
    data.target_spacing). Predictions are resampled back to each image's own grid."""
    batch_size: Optional[int] = None
    """Labelled patches of this dataset per step (default: train.batch_size)."""
    patch_size: Optional[list] = None
    """This dataset's training patch (default: train.patch_size; the first dataset always uses train.patch_size).
    Sides must be multiples of 16."""
    infer_patch_size: Optional[list] = None
    """This dataset's sliding window (default: its patch_size if set, else infer.patch_size or train.patch_size)."""
    unlabelled_batch_size: Optional[int] = None
    """Unlabelled patches of this dataset per step in stage 2 (default: train.unlabelled_batch_size)."""
    val_max_cases: Optional[int] = None
    largest_component: Optional[bool] = None
    strides: Optional[list] = None
    """The strided U-Net's per-level strides on this dataset's patches (default: model.strides; the first dataset
    always uses model.strides), e.g. [[1,2,2],[1,2,2],[2,2,2]] for ACDC's 10 mm slices on a 2 mm grid while LA's
    isotropic patches keep 2 everywhere. The weights are shared; only the strides differ (``models.set_strides``)."""


BACKBONES = ("vnet", "strided_unet3d")
"""Networks whose decoder features and bottleneck the head can read."""

_FIRST_DATASET_KEYS = {"tasks", "name", "batch_size", "unlabelled_batch_size", "largest_component", "root"}
_FIRST_DATASET_HOMES = {"patch_size": "train", "infer_patch_size": "infer (as patch_size)", "strides": "model"}


@dataclass
class VerSemiParams:
    datasets: list = field(default_factory=list)
    """DatasetSpec mappings; the first describes the trainer's ``data`` section."""
    head_width: int = 8
    head_layers: int = 3
    head_norm: str = "batch"
    """Norm before the pooled controller input and before the head's 1x1 convolution: batch (released code),
    group (DoDNet), instance or none."""
    full_res_skip: bool = False
    """Keep the V-Net's full-resolution skip and last convolution stage (the released network has neither)."""
    norm: Optional[str] = None
    """Normalisation of the V-Net; default ``model.norm`` (the paper uses instance norm: batches mix datasets, so
    batch statistics would mix them too; the strided U-Net always has instance norm)."""
    cube_ratio: float = 0.6667
    """Stage 1: side of the pasted cube as a fraction of each patch side (2/3 in the code)."""
    cube_ratio_range: list = field(default_factory=lambda: [0.3, 0.6])
    """Stage 2: the cube side fraction is drawn uniformly from this range."""
    unlabelled_start: Optional[float] = 0.5
    """Start of stage 2: a fraction (< 1) of train.iterations or an iteration (>= 1); null: labelled only."""
    unlabelled_weight: float = 1.0
    detach_aggregate: bool = False
    """Stop gradients through the task aggregate in L_unl (the code lets them flow)."""
    task_mix_in_stage2: bool = False
    """Keep stage 1's task-specific loss on labelled CutMix (L_spec) in stage 2 too. The released code drops it, and
    then only L_sup tells the tasks apart while three losses train the synthetic (union) task."""
    mix_weight: float = 1.0
    """Weight of the labelled CutMix losses (L_chaos and L_spec; in stage 2 L_chaos_sup and, with
    ``task_mix_in_stage2``, L_spec); 0 leaves them out. 1 as released; in the CPU benchmark they slow LA's learning
    (docs/benchmarks.md)."""
    balance_datasets: bool = False
    """L_sup as the mean over datasets of each dataset's mean over its tasks, so a one-task dataset (LA) weighs as
    much as a three-task one (ACDC); default one mean over all tasks."""
    same_dataset_mix: bool = False
    """CutMix only patches of one dataset, in both stages. The code mixes any two patches of a batch, so an LA cube
    lands in an ACDC patch, resampled to its shape (16 x 64 x 64 from 48 x 48 x 32 here)."""
    infer_dataset: str = ""
    """Dataset whose tasks ``predict_logits`` (validation, ``semiseg predict``) prompts; default the first."""

    def __post_init__(self):
        specs = []
        for i, raw in enumerate(self.datasets):
            where = f"versemi.datasets[{i}]"
            if isinstance(raw, DatasetSpec):
                specs.append(raw)
                continue
            if not isinstance(raw, dict):
                raise ConfigError(f"config key '{where}' must be a mapping")
            spec = build_dataclass(DatasetSpec, raw, where)
            if not spec.tasks:
                raise ConfigError(f"config key '{where}.tasks' must name at least one structure (name: label value)")
            for name, value in spec.tasks.items():
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigError(f"config key '{where}.tasks.{name}' must be a label value >= 1, got {value!r}")
            if i == 0:
                bad = sorted(k for k in raw if k not in _FIRST_DATASET_KEYS)
                if bad:
                    home = _FIRST_DATASET_HOMES.get(bad[0], "data")
                    raise ConfigError(f"config key '{where}.{bad[0]}': the first dataset is the trainer's data "
                                      f"section; set '{bad[0]}' under {home}: instead")
            elif not spec.root:
                raise ConfigError(f"config key '{where}.root' is required")
            check_spacing(spec.target_spacing, f"{where}.target_spacing")
            for key in ("patch_size", "infer_patch_size"):
                value = getattr(spec, key)
                if value is not None and (not isinstance(value, list) or len(value) != 3
                                          or not all(isinstance(v, int) and v > 0 and v % 16 == 0 for v in value)):
                    raise ConfigError(f"config key '{where}.{key}' must be 3 positive multiples of 16, got {value!r}")
            specs.append(spec)
        self.datasets = specs
        if len(self.cube_ratio_range) != 2 or not 0 < self.cube_ratio_range[0] <= self.cube_ratio_range[1] < 1:
            raise ConfigError(f"config key 'versemi.cube_ratio_range' must be [low, high] with 0 < low <= high < 1, "
                              f"got {self.cube_ratio_range}")
        if self.mix_weight < 0:
            raise ConfigError(f"config key 'versemi.mix_weight' must be >= 0, got {self.mix_weight}")
        if not 0 < self.cube_ratio < 1:
            raise ConfigError(f"config key 'versemi.cube_ratio' must be in (0, 1), got {self.cube_ratio}")
        if self.head_norm not in ("batch", "group", "instance", "none"):
            raise ConfigError(f"config key 'versemi.head_norm' must be batch, group, instance or none, got "
                              f"'{self.head_norm}'")


@dataclass
class Task:
    name: str
    dataset: int
    value: int
    id: int


class _Data:
    """One dataset's resolved settings, split and (after setup) loaded cases and samplers."""

    def __init__(self, index: int, spec: DatasetSpec, cfg):
        d, t = cfg.data, cfg.train
        pick = lambda v, default: default if v is None else v  # noqa: E731
        self.index = index
        self.spec = spec
        self.root = spec.root or d.root
        self.name = spec.name or Path(self.root).name
        self.layout = spec.layout if spec.root else d.layout
        self.num_classes = spec.num_classes or max(spec.tasks.values()) + 1
        self.labelled = pick(spec.labelled, d.labelled)
        self.val_fraction = pick(spec.val, d.val)
        self.test_fraction = pick(spec.test, d.test)
        self.unlabelled_fraction = pick(spec.unlabelled, d.unlabelled)
        self.seed = pick(spec.seed, d.seed)
        self.max_cases = pick(spec.max_cases, d.max_cases)
        self.group_pattern = spec.group_pattern if spec.root else d.group_pattern
        self.intensity = pick(spec.intensity, d.intensity)
        self.target_spacing = spec.target_spacing if spec.root else d.target_spacing
        self.batch_size = pick(spec.batch_size, t.batch_size)
        self.patch = tuple(spec.patch_size or t.patch_size)
        default_window = cfg.infer.patch_size or t.patch_size
        self.infer_patch = list(spec.infer_patch_size or spec.patch_size or default_window)
        self.unlabelled_batch_size = pick(spec.unlabelled_batch_size, t.unlabelled_batch_size)
        self.val_max_cases = pick(spec.val_max_cases, t.val_max_cases)
        self.largest_component = pick(spec.largest_component, cfg.infer.largest_component)
        self.strides = pick(spec.strides, cfg.model.strides)
        self.manifest: Manifest | None = None
        self.train_cases: list[LoadedCase] = []
        self.val_cases: list[LoadedCase] = []
        self.unlabelled_cases: list[LoadedCase] = []
        self.sampler: PatchSampler | None = None
        self.unlabelled_sampler: PatchSampler | None = None

    def split(self) -> Manifest:
        cases = discover_cases(self.root, self.layout)
        return make_manifest(cases, self.labelled, self.val_fraction, self.test_fraction, self.unlabelled_fraction,
                             self.seed, self.max_cases, group_pattern=self.group_pattern)

    def load(self, cases, with_label: bool) -> list[LoadedCase]:
        return [load_case(c, self.intensity, self.num_classes, with_label=with_label,
                          target_spacing=self.target_spacing) for c in cases]


def resample_to(x: torch.Tensor, shape: tuple[int, ...], nearest: bool = False) -> torch.Tensor:
    """A patch (C, *S) or label patch (*S) resampled to ``shape`` (trilinear, or nearest for labels); unchanged
    when it already has that shape."""
    if tuple(x.shape[-len(shape):]) == tuple(shape):
        return x
    lead = x.ndim - len(shape)
    t = x.reshape((1,) * (2 - lead) + tuple(x.shape)).float()
    if nearest:
        out = F.interpolate(t, size=tuple(shape), mode="nearest")
    else:
        out = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)
    return out.reshape(tuple(x.shape[:lead]) + tuple(shape)).to(x.dtype)


class VerSemi(Method):
    name = "versemi"
    needs_unlabelled = False  # each dataset's unlabelled cases are loaded here, not by the trainer
    Params = VerSemiParams

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        p = self.params
        if cfg.model.name not in BACKBONES:
            raise ConfigError(f"config key 'model.name': versemi needs {' or '.join(BACKBONES)} (decoder features "
                              f"and a bottleneck for its head), got '{cfg.model.name}'")
        if cfg.model.name != "vnet" and p.full_res_skip:
            raise ConfigError(f"config key 'versemi.full_res_skip': {cfg.model.name} has no full-resolution stage "
                              f"(its first convolution is strided); set it false")
        if not p.datasets:
            raise ConfigError("config key 'versemi.datasets' must list at least one dataset (the first is the "
                              "data section) with its tasks")
        self.data = [_Data(i, s, cfg) for i, s in enumerate(p.datasets)]
        depth = len(level_strides(cfg.model.name, cfg.model.strides)) if cfg.model.name in STRIDED_LEVELS else None
        for d in self.data[1:]:
            check_strides(d.spec.strides, cfg.model.name, f"versemi.datasets[{d.index}].strides", depth)
        self._switch_strides = len({repr(d.strides) for d in self.data}) > 1
        names = [d.name for d in self.data]
        if len(set(names)) != len(names):
            raise ConfigError(f"config key 'versemi.datasets': dataset names must differ (got {names}); set 'name'")
        first = self.data[0]
        if p.datasets[0].root and Path(p.datasets[0].root).resolve() != Path(cfg.data.root).resolve():
            raise ConfigError(f"config key 'versemi.datasets[0].root' ({p.datasets[0].root}) must be data.root "
                              f"({cfg.data.root}): the first dataset is the trainer's data section")
        if cfg.data.num_classes < max(first.spec.tasks.values()) + 1:
            raise ConfigError(f"config key 'data.num_classes' ({cfg.data.num_classes}) is too small for the tasks "
                              f"{first.spec.tasks} of the first dataset")
        small = [d.name for d in self.data if d.batch_size < 2]
        if p.same_dataset_mix and small:
            raise ConfigError(f"config key 'versemi.same_dataset_mix' needs at least 2 labelled patches per step of "
                              f"every dataset (batch_size), got fewer for {', '.join(small)}")
        self.tasks: list[Task] = []
        for d in self.data:
            for name, value in d.spec.tasks.items():
                if any(t.name == name for t in self.tasks):
                    raise ConfigError(f"config key 'versemi.datasets[{d.index}].tasks.{name}': task names must be "
                                      f"unique across datasets")
                self.tasks.append(Task(name, d.index, int(value), len(self.tasks)))
        self.synthetic = len(self.tasks)  # the id of the synthetic (union) task
        self._bottleneck: torch.Tensor | None = None
        if cfg.model.name == "vnet":
            self.net = self.build_network(norm=p.norm or cfg.model.norm)
            self.net.head = torch.nn.Identity()  # replaced by the task-prompted head
            if not p.full_res_skip:
                self.net.dec1 = torch.nn.Identity()  # the released network has no convolution stage at full resolution
            decoder_channels, bottleneck_channels = self.net.decoder_channels, self.net.bottleneck_channels
        else:
            # the strided U-Net's last up-convolution (convolution only, to full resolution) gives the head's
            # features, as many as the head is wide (the costliest layer on a CPU, so no wider); a forward hook keeps
            # its bottom block's output
            decoder_channels = p.head_width
            self.net = self.build_network(num_classes=decoder_channels)
            block, bottleneck_channels = bottleneck(self.net)
            block.register_forward_hook(self._keep_bottleneck)
        self.head = TaskPromptedHead(decoder_channels, bottleneck_channels, len(self.tasks) + 1,
                                     width=p.head_width, layers=p.head_layers, norm=p.head_norm,
                                     pool_norm=p.head_norm)
        self.infer_dataset = self.dataset_index(p.infer_dataset) if p.infer_dataset else 0
        self._ready = False
        self._pending_state: dict = {}
        start = p.unlabelled_start
        iters = cfg.train.iterations
        self.stage2_from = None if start is None else (int(round(start * iters)) if start < 1 else int(start))

    # -- tasks and datasets ----------------------------------------------------------------------------------
    def dataset_index(self, name: str) -> int:
        for d in self.data:
            if d.name == name:
                return d.index
        raise ValueError(f"no dataset named '{name}' (datasets: {', '.join(d.name for d in self.data)})")

    def tasks_of(self, dataset: int) -> list[Task]:
        return [t for t in self.tasks if t.dataset == dataset]

    # -- set-up (needs the run: its split and run directory) ----------------------------------------------------
    def streams(self, ctx) -> dict:
        """None from the trainer: every dataset has its own patch size, so each keeps its own samplers."""
        return {}

    def setup(self, ctx) -> None:
        """Split and load every dataset (splits of further datasets are kept in the run directory for resume)."""
        path = Path(ctx.run_dir) / "versemi_manifest.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        t = self.cfg.train
        need_unlabelled = self.stage2_from is not None and self.stage2_from < t.iterations
        share = {"rank": ctx.rank, "world_size": ctx.world_size}
        for d in self.data:
            if d.index == 0:
                d.manifest = ctx.manifest
                d.train_cases, d.val_cases = ctx.labelled, ctx.val
            else:
                d.manifest = Manifest.from_json(json.dumps(saved[d.name])) if d.name in saved else d.split()
                d.train_cases = d.load(d.manifest.labelled, True)
                d.val_cases = d.load(d.manifest.val[: d.val_max_cases], True)
            if not d.train_cases:
                raise ValueError(f"{d.root}: no labelled training cases for versemi ({d.manifest.summary()})")
            seed = t.seed * 1000 + 100 * d.index  # under torchrun every rank draws the global batch, keeps a share
            d.sampler = PatchSampler(d.train_cases, d.patch, d.batch_size, seed, Augmentation.of(t), t.foreground_crop,
                                     **share)
            if need_unlabelled and d.manifest.unlabelled and d.unlabelled_batch_size > 0:
                d.unlabelled_cases = d.load(d.manifest.unlabelled, False)
                d.unlabelled_sampler = PatchSampler(d.unlabelled_cases, d.patch, d.unlabelled_batch_size,
                                                    seed + 50, Augmentation.of(t), **share)
        if need_unlabelled and not any(d.unlabelled_sampler for d in self.data):
            raise ValueError("versemi: stage 2 (versemi.unlabelled_start) needs unlabelled cases, but no dataset has "
                             "any; set versemi.unlabelled_start: null for labelled-only training")
        if ctx.is_main and not saved:
            from ..utils import atomic_write_text

            atomic_write_text(path, json.dumps({d.name: json.loads(d.manifest.to_json()) for d in self.data[1:]}))
        for d in self.data:
            for kind in ("sampler", "unlabelled_sampler"):
                state = self._pending_state.get(f"{d.name}/{kind}")
                if state and getattr(d, kind):
                    getattr(d, kind).load_state_dict(state)
        self._ready = True
        ctx.log.write(event="versemi_data", datasets={
            d.name: {"split": d.manifest.summary(), "tasks": {t.name: t.value for t in self.tasks_of(d.index)},
                     "patch": list(d.patch)}
            for d in self.data}, stage2_from=self.stage2_from)

    def get_extra_state(self):
        state = dict(self._pending_state)
        for d in self.data:
            for kind in ("sampler", "unlabelled_sampler"):
                if getattr(d, kind) is not None:
                    state[f"{d.name}/{kind}"] = getattr(d, kind).state_dict()
        return state

    def set_extra_state(self, state) -> None:
        self._pending_state = dict(state or {})
        if self._ready:
            for d in self.data:
                for kind in ("sampler", "unlabelled_sampler"):
                    if getattr(d, kind) is not None and f"{d.name}/{kind}" in self._pending_state:
                        getattr(d, kind).load_state_dict(self._pending_state[f"{d.name}/{kind}"])

    # -- batches ----------------------------------------------------------------------------------------------
    def _draw(self, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[int]]:
        """One patch batch from every dataset (``sampler`` or ``unlabelled_sampler``): images (C, *P_d), labels
        (*P_d, raw label values; None for unlabelled batches) and the dataset index of each patch."""
        images, labels, owner = [], [], []
        for d in self.data:
            sampler = getattr(d, kind)
            if sampler is None:
                continue
            b: Batch = sampler.next_batch()
            images += list(b.image.to(self.device))
            labels += [None] * len(b.image) if b.label is None else list(b.label.to(self.device))
            owner += [d.index] * b.image.shape[0]
        return images, None if any(lab is None for lab in labels) else labels, owner

    def _union(self, y: torch.Tensor, dataset: int) -> torch.Tensor:
        """Foreground of the expanded label space for one patch: any task structure of its dataset."""
        out = torch.zeros_like(y, dtype=torch.bool)
        for t in self.tasks_of(dataset):
            out |= y == t.value
        return out.float()

    # -- network ----------------------------------------------------------------------------------------------
    def _keep_bottleneck(self, block: torch.nn.Module, inputs, output: torch.Tensor) -> None:
        self._bottleneck = output

    def features(self, x: torch.Tensor, dataset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder output (B, C, *S) and bottleneck (B, Cb, *s) for patches of ``dataset``. Without
        ``full_res_skip`` (the released network) the decoder output is the last up-convolution's, with no skip from
        full resolution."""
        if self.cfg.model.name != "vnet":
            if self._switch_strides:
                set_strides(self.net, self.data[dataset].strides)
            decoded = self.net(x)
            bottom, self._bottleneck = self._bottleneck, None
            return decoded, bottom
        feats = self.net.encode(x)
        if self.params.full_res_skip:
            return self.net.decode_features(feats), feats[-1]
        n = self.net
        x1, x2, x3, x4, x5 = feats
        y = n.dec4(n.up4(x5) + x4)
        y = n.dec3(n.up3(y) + x3)
        y = n.dec2(n.up2(y) + x2)
        return n.dropout(n.up1(y)), x5

    def head_inputs(self, x: torch.Tensor, dataset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's task-independent inputs for images x of ``dataset``: (B, width, *S) and the pooled bottleneck
        (B, Cb)."""
        return self.head.prepare(*self.features(x, dataset))

    def _prompts(self, images: list[torch.Tensor], requests: list[tuple[int, int]],
                 owner: list[int]) -> list[torch.Tensor]:
        """2-class logits (2, *P) for each request (image index, task id); ``owner``: each image's dataset (a
        composite's is its base patch's). One backbone pass per patch shape and dataset."""
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault((tuple(im.shape), owner[i]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(requests)
        for (_, dataset), members in groups.items():
            pos = {i: k for k, i in enumerate(members)}
            todo = [(r, pos[i], t) for r, (i, t) in enumerate(requests) if i in pos]
            if not todo:
                continue
            hx, pooled = self.head_inputs(torch.stack([images[i] for i in members]), dataset)
            index = torch.tensor([k for _, k, _ in todo], device=hx.device)
            task = torch.tensor([t for _, _, t in todo], device=hx.device)
            for (r, _, _), logits in zip(todo, self.head.run(hx[index], pooled[index], task)):
                out[r] = logits
        return out

    @staticmethod
    def _pooled_loss(logits: list[torch.Tensor], targets: list[torch.Tensor], tasks: list[int],
                     ce: bool) -> torch.Tensor:
        """Mean over the tasks present of the task's Dice pooled over all its patches (+ CE over their voxels)."""
        losses = []
        for t in sorted(set(tasks)):
            sel = [k for k, tk in enumerate(tasks) if tk == t]
            lg = torch.cat([logits[k].reshape(logits[k].shape[0], -1) for k in sel], 1)  # (2, voxels)
            tg = torch.cat([targets[k].reshape(-1) for k in sel])
            loss = pooled_dice_loss(torch.softmax(lg, 0)[1], tg)
            if ce:
                loss = loss + F.cross_entropy(lg.t(), tg.long())
            losses.append(loss)
        return torch.stack(losses).mean()

    def _supervised(self, images, labels, owner) -> torch.Tensor:
        requests, targets = [], []
        for i, y in enumerate(labels):
            for t in self.tasks_of(owner[i]):
                requests.append((i, t.id))
                targets.append(y == t.value)
        logits = self._prompts(images, requests, owner)
        tasks = [t for _, t in requests]
        if not self.params.balance_datasets:
            return self._pooled_loss(logits, targets, tasks, ce=True)
        per_dataset = []
        for d in sorted(set(owner)):
            sel = [k for k, (i, _) in enumerate(requests) if owner[i] == d]
            per_dataset.append(self._pooled_loss([logits[k] for k in sel], [targets[k] for k in sel],
                                                 [tasks[k] for k in sel], ce=True))
        return torch.stack(per_dataset).mean()

    def _pairs(self, owner: list[int]) -> tuple[list[int], list[int]]:
        """Random disjoint pairs (a, b) of patch indices; with ``same_dataset_mix`` both of a pair's patches come
        from one dataset."""
        groups = [list(range(len(owner)))]
        if self.params.same_dataset_mix:
            groups = [[i for i, o in enumerate(owner) if o == d] for d in sorted(set(owner))]
        a, b = [], []
        for group in groups:
            perm = [group[i] for i in torch.randperm(len(group)).tolist()]
            half = len(perm) // 2
            a, b = a + perm[:half], b + perm[half:2 * half]
        return a, b

    @staticmethod
    def _one_of(indices: list[int]) -> int:
        return indices[int(torch.randint(len(indices), ()))]

    def _labelled_mix(self, images, labels, owner, ratio, specific: bool):
        """CutMix of labelled pairs (b's cube pasted into a; b resampled to a's patch if they differ): the
        synthetic-task Dice against the union labels and, with ``specific``, the mean task-specific Dice (each task
        of a or b on the mix, target = its structure where it came from)."""
        a, b = self._pairs(owner)
        if not a:
            raise ValueError("versemi needs at least two labelled patches per step for CutMix")
        mixes, unions, requests, targets = [], [], [], []
        for j, (ia, ib) in enumerate(zip(a, b)):
            shape = tuple(images[ia].shape[1:])
            m = cube_masks(1, shape, ratio, device=images[ia].device)[0]
            yb = resample_to(labels[ib], shape, nearest=True)
            mixes.append(images[ia] * m + resample_to(images[ib], shape) * (1 - m))
            unions.append(self._union(labels[ia], owner[ia]) * m + self._union(yb, owner[ib]) * (1 - m))
            requests.append((j, self.synthetic))
            if not specific:
                continue
            for t in self.tasks:
                if t.dataset not in (owner[ia], owner[ib]):
                    continue
                target = torch.zeros_like(m)
                if t.dataset == owner[ia]:
                    target = target + (labels[ia] == t.value).float() * m
                if t.dataset == owner[ib]:
                    target = target + (yb == t.value).float() * (1 - m)
                requests.append((j, t.id))
                targets.append(target)
        logits = self._prompts(mixes, requests, [owner[ia] for ia in a])
        syn = [torch.softmax(lg, 0)[1].flatten() for lg, (_, t) in zip(logits, requests) if t == self.synthetic]
        l_chaos = pooled_dice_loss(torch.cat(syn), torch.cat([u.flatten() for u in unions]))
        if not specific:
            return l_chaos, None
        spec = [(lg, t) for lg, (_, t) in zip(logits, requests) if t != self.synthetic]
        return l_chaos, self._pooled_loss([lg for lg, _ in spec], targets, [t for _, t in spec], ce=False)

    def _weighted_mix(self, images, labels, owner, ratio, specific: bool):
        """(``mix_weight`` x the labelled CutMix losses, their logged values); nothing is mixed with weight 0."""
        if self.params.mix_weight == 0:
            return 0.0, {}
        l_chaos, l_spec = self._labelled_mix(images, labels, owner, ratio, specific)
        parts = {"chaos": l_chaos} if l_spec is None else {"chaos": l_chaos, "spec": l_spec}
        return self.params.mix_weight * sum(parts.values()), {k: v.detach() for k, v in parts.items()}

    def in_stage2(self, step: int) -> bool:
        return self.stage2_from is not None and step >= self.stage2_from

    def training_step(self, batches: dict[str, Batch], step: int) -> dict[str, torch.Tensor]:
        # No trainer streams (``batches`` is empty): batches are drawn from every dataset's own samplers.
        if not self._ready:
            raise RuntimeError("versemi: setup(ctx) must run before training (the trainer calls it)")
        p = self.params
        images, labels, owner = self._draw("sampler")
        l_sup = self._supervised(images, labels, owner)
        stage2 = self.in_stage2(step)
        l_mix, mix_parts = self._weighted_mix(images, labels, owner, p.cube_ratio_range if stage2 else p.cube_ratio,
                                              specific=p.task_mix_in_stage2 or not stage2)
        if not stage2:
            return {"loss": l_sup + l_mix, "sup": l_sup.detach(), **mix_parts}
        unl, _, unl_owner = self._draw("unlabelled_sampler")
        n = min(len(unl), len(images))
        keep = torch.randperm(len(images))[:n].tolist()
        if p.same_dataset_mix:  # each unlabelled patch gets a labelled patch of its own dataset
            keep = [self._one_of([i for i, o in enumerate(owner) if o == unl_owner[j]]) for j in range(n)]
        mixes, cube_labels, masks, requests = [], [], [], []
        per = len(self.tasks) + 1
        for j in range(n):  # a labelled patch's cube pasted into an unlabelled patch
            shape = tuple(unl[j].shape[1:])
            lab = keep[j]
            m = cube_masks(1, shape, p.cube_ratio_range, device=unl[j].device)[0]
            mixes.append(unl[j] * m + resample_to(images[lab], shape) * (1 - m))
            cube_labels.append(self._union(resample_to(labels[lab], shape, nearest=True), owner[lab]))
            masks.append(m)
            requests += [(j, t.id) for t in self.tasks] + [(j, self.synthetic)]
        probs = [torch.softmax(lg, 0)[1] for lg in self._prompts(mixes, requests, unl_owner[:n])]
        syn = [probs[j * per + per - 1] for j in range(n)]
        aggregate = [torch.stack(probs[j * per: j * per + per - 1]).amax(0).clamp(0, 1) for j in range(n)]
        if p.detach_aggregate:
            aggregate = [a.detach() for a in aggregate]
        l_unl = pooled_dice_loss(torch.cat([s.flatten() for s in syn]), torch.cat([a.flatten() for a in aggregate]))
        l_cube = pooled_dice_loss(torch.cat([(s * (1 - m)).flatten() for s, m in zip(syn, masks)]),
                           torch.cat([(y * (1 - m)).flatten() for y, m in zip(cube_labels, masks)]))
        loss = l_sup + l_mix + p.unlabelled_weight * l_unl + l_cube
        return {"loss": loss, "sup": l_sup.detach(), **mix_parts, "unl": l_unl.detach(), "cube": l_cube.detach(),
                "unlabelled_patches": torch.tensor(float(len(unl)))}

    # -- inference --------------------------------------------------------------------------------------------
    def task_probs(self, x: torch.Tensor, dataset: int) -> torch.Tensor:
        """Foreground probability of each task of ``dataset`` (B, T_d, *S), one backbone pass for all."""
        hx, pooled = self.head_inputs(x, dataset)
        tasks = self.tasks_of(dataset)
        n = x.shape[0]
        index = torch.arange(n, device=x.device).repeat(len(tasks))
        ids = torch.tensor([t.id for t in tasks], device=x.device).repeat_interleave(n)
        prob = torch.softmax(self.head.run(hx[index], pooled[index], ids), 1)[:, 1]
        return prob.reshape(len(tasks), n, *x.shape[2:]).transpose(0, 1)

    def structure_logits(self, x: torch.Tensor, dataset: int = 0, eps: float = 1e-6) -> torch.Tensor:
        """Multi-structure log-probabilities (B, K, *S): channel = the task's label value, background = 1 - the
        largest task probability (so argmax gives a structure where some task is above 1/2, the most probable)."""
        probs = self.task_probs(x, dataset)
        k = max(t.value for t in self.tasks_of(dataset)) + 1
        out = torch.full((x.shape[0], k, *x.shape[2:]), eps, device=x.device, dtype=probs.dtype)
        for j, t in enumerate(self.tasks_of(dataset)):
            out[:, t.value] = probs[:, j]
        out[:, 0] = 1 - probs.amax(1)
        return out.clamp_min(eps).log()

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tasks of ``versemi.infer_dataset`` (default: the first dataset), as one label map."""
        logits = self.structure_logits(x, self.infer_dataset)
        k = self.cfg.data.num_classes if self.infer_dataset == 0 else logits.shape[1]
        if logits.shape[1] < k:  # label values of data.num_classes that no task predicts
            pad = torch.full((x.shape[0], k - logits.shape[1], *x.shape[2:]), float(np.log(1e-6)), device=x.device)
            logits = torch.cat([logits, pad], 1)
        return logits

    def dataset_config(self, d: _Data, num_classes: int | None = None):
        """The run's config as one dataset's predictions are read: its root, normalisation, working grid, strides,
        window and clean-up (``num_classes``: default the dataset's)."""
        cfg = copy.deepcopy(self.cfg)
        cfg.model = replace(cfg.model, strides=d.strides)
        cfg.data = replace(cfg.data, root=d.root, intensity=d.intensity, num_classes=num_classes or d.num_classes,
                           target_spacing=d.target_spacing)
        cfg.infer = replace(cfg.infer, largest_component=d.largest_component, patch_size=list(d.infer_patch))
        return cfg

    def inference_config(self):
        """``predict_logits`` predicts ``versemi.infer_dataset``: read with that dataset's settings (so the trainer's
        reports and ``semiseg predict --run`` clean up as validation does, e.g. LA's largest component)."""
        d = self.data[self.infer_dataset]
        return self.dataset_config(d, self.cfg.data.num_classes if d.index == 0 else None)

    def predictor(self, dataset: int | str = 0, task: str | None = None):
        """A core ``Predictor`` for one dataset: its normalisation, its tasks as one label map (or one ``task``'s
        foreground as labels 0/1)."""
        from ..infer import Predictor

        d = self.data[self.dataset_index(dataset) if isinstance(dataset, str) else dataset]
        cfg = self.dataset_config(d)
        if task is None:
            net = partial(self.structure_logits, dataset=d.index)
        else:
            t = next((t for t in self.tasks_of(d.index) if t.name == task), None)
            if t is None:
                raise ValueError(f"dataset '{d.name}' has no task '{task}' "
                                 f"(tasks: {', '.join(t.name for t in self.tasks_of(d.index))})")
            cfg.data = replace(cfg.data, num_classes=2)
            net = partial(self._single_task_logits, task=t.id)
        return Predictor(net, cfg, self.device)

    def validate(self, ctx) -> dict:
        """Mean validation Dice over every task of every dataset (so best.pt is chosen on all tasks, not LA alone)."""
        self.eval()
        rows = [r for d in self.data for r in self._score(d, dice_only=True)]
        self.train()
        dice, per_task = mean_dice(rows, key="label_name")
        return {"dice": dice, "dice_per_task": per_task}

    def _score(self, d: _Data, dice_only: bool = False, cases: list[LoadedCase] | None = None) -> list[dict]:
        """Rows (``evaluate.score_case``) of every task of dataset ``d`` on ``cases`` (default: its validation
        cases); labels are the task values, label names the task names."""
        names = {t.value: t.name for t in self.tasks_of(d.index)}
        pred = self.predictor(d.index)
        cases = d.val_cases if cases is None else cases
        return [r for lc in cases for r in score_case(pred, lc, sorted(names), names, dice_only=dice_only)]

    def _single_task_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        hx, pooled = self.head_inputs(x, self.tasks[task].dataset)
        return self.head.run(hx, pooled, torch.full((x.shape[0],), task, device=x.device, dtype=torch.long))


# -- per-task evaluation -------------------------------------------------------------------------------------------
def evaluate_tasks(method: VerSemi, out_dir: str | Path, quiet: bool = True,
                   cases: dict[int, list[LoadedCase]] | None = None, split: str = "validation") -> dict:
    """Score every task on its dataset's loaded cases (``cases``: dataset index -> cases; default each dataset's
    validation cases), label maps on each case's own grid, with the core metrics. Writes ``out_dir/<dataset>/``
    reports and ``out_dir/summary.json`` whose labels are the task names and whose cases are ``<dataset>/<id>``."""
    from ..report import format_table, write_report

    out_dir = Path(out_dir)
    method.eval()
    all_rows = []
    for d in method.data:
        rows = method._score(d, cases=None if cases is None else cases[d.index])
        if rows:
            summary = write_report(rows, out_dir / d.name, title=f"{method.cfg.name}: {d.name}")
            if not quiet:
                print(format_table(summary, f"{d.name}: {len({r['case'] for r in rows})} {split} cases"))
        all_rows += [{**r, "case": f"{d.name}/{r['case']}", "label": r["label_name"]} for r in rows]
    summary = write_report(all_rows, out_dir, title=f"{method.cfg.name}: all tasks")
    if not quiet:
        print(format_table(summary, "all tasks"))
    return summary


def evaluate_run(run_dir: str | Path, out_dir: str | Path | None = None, which: str = "best", device: str = "auto",
                 quiet: bool = True, split: str = "val") -> dict:
    """Load a VerSemi run directory and evaluate every task on its ``val`` or ``test`` split (see
    ``evaluate_tasks``); the report goes to ``run_dir/tasks`` (``run_dir/tasks_test``) by default. (A run-level
    entry point kept beside VerSemi for its callers: ``runs`` builds methods, so it is imported here, not by the
    module.)"""
    from ..runs import load_cases, load_method, read_config, read_manifest

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if cfg.method != "versemi":
        raise ValueError(f"{run_dir}: a '{cfg.method}' run, not versemi")
    method, _ = load_method(run_dir, which, device)
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got '{split}'")
    saved = json.loads((run_dir / "versemi_manifest.json").read_text())
    cases = {}
    for d in method.data:
        if d.index == 0:  # the trainer's data section: loaded as training loaded it (working grid, native reference)
            manifest = read_manifest(run_dir)
            cases[0] = load_cases(manifest.val[: cfg.train.val_max_cases] if split == "val" else manifest.test, cfg,
                                  True)
        else:
            manifest = Manifest.from_json(json.dumps(saved[d.name]))
            cases[d.index] = d.load(manifest.val[: d.val_max_cases] if split == "val" else manifest.test, True)
    out = out_dir or run_dir / ("tasks" if split == "val" else "tasks_test")
    return evaluate_tasks(method, out, quiet=quiet, cases=cases, split="validation" if split == "val" else "test")
