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
Stage 2 (from ``unlabelled_start``; in the paper, commented out in the released code), with a labelled batch l and
an unlabelled batch u and a cube side drawn from ``cube_ratio_range``:
    L_sup as above; L_chaos_sup = L_chaos on a new labelled pair mix
    x_c = x_u M + x_l (1-M) (a labelled cube pasted into an unlabelled patch)
    L_unl  = Dice(synthetic prompt on x_c, voxelwise max over all task prompts on x_c)
    L_cube = Dice(synthetic prompt on x_c, union_l) inside the pasted cube
    L = L_sup + L_chaos_sup + unlabelled_weight * L_unl + L_cube
Dice here is VerSemi's (V-Net) loss on a foreground probability, 1 - (2 sum pg + eps) / (sum p^2 + sum g^2 + eps),
pooled over the batch separately for each task.

Data: the first dataset is the trainer's ``data:`` section (its split is the trainer's manifest); every further
dataset (``versemi.datasets``) is split with ``make_manifest`` and sampled here, all with the common
``train.patch_size`` (volumes smaller than the patch are padded, e.g. ACDC's ~10 slices to 16). Inference prompts
each task of a dataset and writes one label map per volume on its own grid (structure value = the task's label).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError, build_dataclass
from ..data.cases import LoadedCase, Manifest, discover_cases, load_case, make_manifest
from ..data.sampling import Batch, PatchSampler
from ..models.task_head import TaskPromptedHead
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
    unlabelled: Optional[float] = None
    seed: Optional[int] = None
    max_cases: Optional[int] = None
    group_pattern: Optional[str] = None
    """Keeps a group's cases (e.g. one patient's frames) in one set; see data.group_pattern."""
    intensity: Optional[str] = None
    batch_size: Optional[int] = None
    """Labelled patches of this dataset per step (default: train.batch_size)."""
    unlabelled_batch_size: Optional[int] = None
    """Unlabelled patches of this dataset per step in stage 2 (default: train.unlabelled_batch_size)."""
    val_max_cases: Optional[int] = None
    largest_component: Optional[bool] = None


_FIRST_DATASET_KEYS = {"tasks", "name", "batch_size", "unlabelled_batch_size", "largest_component", "root"}


@dataclass
class VerSemiParams:
    datasets: list = field(default_factory=list)
    """DatasetSpec mappings; the first describes the trainer's ``data`` section."""
    head_width: int = 8
    head_layers: int = 3
    norm: Optional[str] = None
    """Normalisation of the V-Net and head; default ``model.norm`` (the paper uses instance norm: batches mix
    datasets, so batch statistics would mix them too)."""
    cube_ratio: float = 0.6667
    """Stage 1: side of the pasted cube as a fraction of each patch side (2/3 in the code)."""
    cube_ratio_range: list = field(default_factory=lambda: [0.3, 0.6])
    """Stage 2: the cube side fraction is drawn uniformly from this range."""
    unlabelled_start: Optional[float] = 0.5
    """Start of stage 2: a fraction (< 1) of train.iterations or an iteration (>= 1); null: labelled only."""
    unlabelled_weight: float = 1.0
    detach_aggregate: bool = False
    """Stop gradients through the task aggregate in L_unl (the code lets them flow)."""
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
                    raise ConfigError(f"config key '{where}.{bad[0]}': the first dataset is the trainer's data "
                                      f"section; set '{bad[0]}' under data: instead")
            elif not spec.root:
                raise ConfigError(f"config key '{where}.root' is required")
            specs.append(spec)
        self.datasets = specs
        if len(self.cube_ratio_range) != 2 or not 0 < self.cube_ratio_range[0] <= self.cube_ratio_range[1] < 1:
            raise ConfigError(f"config key 'versemi.cube_ratio_range' must be [low, high] with 0 < low <= high < 1, "
                              f"got {self.cube_ratio_range}")
        if not 0 < self.cube_ratio < 1:
            raise ConfigError(f"config key 'versemi.cube_ratio' must be in (0, 1), got {self.cube_ratio}")


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
        self.unlabelled_fraction = pick(spec.unlabelled, d.unlabelled)
        self.seed = pick(spec.seed, d.seed)
        self.max_cases = pick(spec.max_cases, d.max_cases)
        self.group_pattern = spec.group_pattern if spec.root else d.group_pattern
        self.intensity = pick(spec.intensity, d.intensity)
        self.batch_size = pick(spec.batch_size, t.batch_size)
        self.unlabelled_batch_size = pick(spec.unlabelled_batch_size, t.unlabelled_batch_size)
        self.val_max_cases = pick(spec.val_max_cases, t.val_max_cases)
        self.largest_component = pick(spec.largest_component, cfg.infer.largest_component)
        self.manifest: Manifest | None = None
        self.train_cases: list[LoadedCase] = []
        self.val_cases: list[LoadedCase] = []
        self.unlabelled_cases: list[LoadedCase] = []
        self.sampler: PatchSampler | None = None
        self.unlabelled_sampler: PatchSampler | None = None

    def split(self) -> Manifest:
        cases = discover_cases(self.root, self.layout)
        return make_manifest(cases, self.labelled, self.val_fraction, 0.0, self.unlabelled_fraction, self.seed,
                             self.max_cases, group_pattern=self.group_pattern)

    def load(self, cases, with_label: bool) -> list[LoadedCase]:
        return [load_case(c, self.intensity, self.num_classes, with_label=with_label) for c in cases]


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """VerSemi's Dice loss on foreground probabilities, pooled over everything given:
    1 - (2 sum(p g) + eps) / (sum(p^2) + sum(g^2) + eps)."""
    target = target.float()
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / ((prob * prob).sum() + (target * target).sum() + eps)


def cube_masks(n: int, patch, ratio, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n, *patch) masks: 1 everywhere except a zero box of side floor(ratio * side) per axis at a random
    position (one per sample); ``ratio`` is a number or a (low, high) range to draw from."""
    masks = torch.ones((n, *patch), device=device)
    for i in range(n):
        r = ratio
        if isinstance(ratio, (list, tuple)):
            r = float(ratio[0] + (ratio[1] - ratio[0]) * torch.rand((), generator=generator))
        sl = []
        for side in patch:
            size = max(int(side * r), 1)
            start = int(torch.randint(0, side - size + 1, (), generator=generator))
            sl.append(slice(start, start + size))
        masks[(i, *sl)] = 0
    return masks


class VerSemi(Method):
    name = "versemi"
    needs_unlabelled = False  # each dataset's unlabelled cases are loaded here, not by the trainer
    uses_unlabelled_batches = False
    Params = VerSemiParams

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        p = self.params
        if cfg.model.name != "vnet":
            raise ConfigError(f"config key 'model.name': versemi needs 'vnet' (encoder/decoder access), "
                              f"got '{cfg.model.name}'")
        if not p.datasets:
            raise ConfigError("config key 'versemi.datasets' must list at least one dataset (the first is the "
                              "data section) with its tasks")
        self.data = [_Data(i, s, cfg) for i, s in enumerate(p.datasets)]
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
        self.tasks: list[Task] = []
        for d in self.data:
            for name, value in d.spec.tasks.items():
                if any(t.name == name for t in self.tasks):
                    raise ConfigError(f"config key 'versemi.datasets[{d.index}].tasks.{name}': task names must be "
                                      f"unique across datasets")
                self.tasks.append(Task(name, d.index, int(value), len(self.tasks)))
        self.synthetic = len(self.tasks)  # the id of the synthetic (union) task
        norm = p.norm or cfg.model.norm
        self.net = self.build_network(norm=norm)
        self.net.head = torch.nn.Identity()  # replaced by the task-prompted head
        self.head = TaskPromptedHead(self.net.decoder_channels, self.net.bottleneck_channels, len(self.tasks) + 1,
                                     width=p.head_width, layers=p.head_layers, norm=norm)
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

    # -- set-up (needs the trainer: its split, run directory and device) ---------------------------------------
    def on_step(self, trainer, step: int) -> None:
        if not self._ready:
            self.setup(trainer)

    def setup(self, trainer) -> None:
        """Split and load every dataset (splits of further datasets are kept in the run directory for resume)."""
        path = Path(trainer.run_dir) / "versemi_manifest.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        t = self.cfg.train
        need_unlabelled = self.stage2_from is not None and self.stage2_from < t.iterations
        ctx = getattr(trainer, "ctx", None)
        share = {"rank": getattr(ctx, "rank", 0), "world_size": getattr(ctx, "world_size", 1)}
        rank = share["rank"]
        for d in self.data:
            if d.index == 0:
                d.manifest = trainer.manifest
                d.train_cases, d.val_cases = trainer.labelled, trainer.val
            else:
                d.manifest = Manifest.from_json(json.dumps(saved[d.name])) if d.name in saved else d.split()
                d.train_cases = d.load(d.manifest.labelled, True)
                d.val_cases = d.load(d.manifest.val[: d.val_max_cases], True)
            if not d.train_cases:
                raise ValueError(f"{d.root}: no labelled training cases for versemi ({d.manifest.summary()})")
            seed = t.seed * 1000 + 100 * d.index  # under torchrun every rank draws the global batch, keeps a share
            d.sampler = PatchSampler(d.train_cases, t.patch_size, d.batch_size, seed, t.augment, t.foreground_crop,
                                     **share)
            if need_unlabelled and d.manifest.unlabelled and d.unlabelled_batch_size > 0:
                d.unlabelled_cases = d.load(d.manifest.unlabelled, False)
                d.unlabelled_sampler = PatchSampler(d.unlabelled_cases, t.patch_size, d.unlabelled_batch_size,
                                                    seed + 50, t.augment, **share)
        if need_unlabelled and not any(d.unlabelled_sampler for d in self.data):
            raise ValueError("versemi: stage 2 (versemi.unlabelled_start) needs unlabelled cases, but no dataset has "
                             "any; set versemi.unlabelled_start: null for labelled-only training")
        if rank == 0 and not saved:
            from ..utils import atomic_write_text

            atomic_write_text(path, json.dumps({d.name: json.loads(d.manifest.to_json()) for d in self.data[1:]}))
        for d in self.data:
            for kind in ("sampler", "unlabelled_sampler"):
                state = self._pending_state.get(f"{d.name}/{kind}")
                if state and getattr(d, kind):
                    getattr(d, kind).load_state_dict(state)
        self._ready = True
        trainer.log.write(event="versemi_data", datasets={
            d.name: {"split": d.manifest.summary(), "tasks": {t.name: t.value for t in self.tasks_of(d.index)}}
            for d in self.data})

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
    def _draw(self, kind: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Images, labels (raw label values) and dataset index of one patch batch drawn from every dataset."""
        images, labels, owner = [], [], []
        for d in self.data:
            sampler = getattr(d, kind)
            if sampler is None:
                continue
            b: Batch = sampler.next_batch()
            images.append(b.image)
            labels.append(b.label)
            owner += [d.index] * b.image.shape[0]
        x = torch.cat(images).to(self.device)
        y = None if any(lab is None for lab in labels) else torch.cat(labels).to(self.device)
        return x, y, torch.tensor(owner, device=self.device)

    def _union(self, y: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Foreground of the expanded label space: any task structure of the sample's dataset."""
        out = torch.zeros_like(y, dtype=torch.bool)
        for t in self.tasks:
            out |= (owner == t.dataset).reshape(-1, *[1] * (y.ndim - 1)) & (y == t.value)
        return out.float()

    # -- network ----------------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder output (B, base, *S) and bottleneck (B, 16 base, *S/16)."""
        feats = self.net.encode(x)
        return self.net.decode_features(feats), feats[-1]

    def prompt(self, dec, bott, index: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """2-class logits of sample ``index[i]`` prompted with task ``task[i]``."""
        return self.head(dec[index], bott[index], task)

    def _task_loss(self, dec, bott, index, task, target, ce: bool) -> torch.Tensor:
        """Mean over the tasks present of the per-task pooled Dice (+ CE)."""
        logits = self.prompt(dec, bott, index, task)
        prob = torch.softmax(logits, 1)[:, 1]
        losses = []
        for t in task.unique():
            sel = task == t
            loss = dice_loss(prob[sel], target[sel])
            if ce:
                loss = loss + F.cross_entropy(logits[sel], target[sel].long())
            losses.append(loss)
        return torch.stack(losses).mean()

    def _supervised(self, dec, bott, y, owner) -> torch.Tensor:
        index, task, target = [], [], []
        for i in range(y.shape[0]):
            for t in self.tasks_of(int(owner[i])):
                index.append(i)
                task.append(t.id)
                target.append(y[i] == t.value)
        return self._task_loss(dec, bott, torch.tensor(index, device=y.device), torch.tensor(task, device=y.device),
                               torch.stack(target), ce=True)

    def _pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(n).to(self.device)
        half = n // 2
        return perm[:half], perm[half:2 * half]

    def _synthetic(self, x_mix: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Foreground probability of the synthetic task on ``x_mix``, and the features (for more prompts)."""
        dec, bott = self.features(x_mix)
        n = x_mix.shape[0]
        ids = torch.full((n,), self.synthetic, device=x_mix.device, dtype=torch.long)
        return torch.softmax(self.head(dec, bott, ids), 1)[:, 1], (dec, bott)

    def _labelled_mix(self, x, y, owner, ratio):
        """CutMix of labelled pairs: the mix, its mask, pair indices and the synthetic-task loss."""
        a, b = self._pairs(x.shape[0])
        if len(a) == 0:
            raise ValueError("versemi needs at least two labelled patches per step for CutMix")
        m = cube_masks(len(a), x.shape[2:], ratio, device=x.device)
        x_mix = x[a] * m.unsqueeze(1) + x[b] * (1 - m.unsqueeze(1))
        union = self._union(y, owner)
        y_mix = union[a] * m + union[b] * (1 - m)
        prob, feats = self._synthetic(x_mix)
        return dice_loss(prob, y_mix), (a, b, m, feats)

    def _specific(self, y, owner, a, b, m, feats) -> torch.Tensor:
        """Each task of a pair's two samples on their mix; the target is its structure where it came from."""
        dec, bott = feats
        index, task, target = [], [], []
        for j in range(len(a)):
            da, db = int(owner[a[j]]), int(owner[b[j]])
            for t in self.tasks:
                if t.dataset not in (da, db):
                    continue
                tgt = torch.zeros_like(m[j])
                if t.dataset == da:
                    tgt = tgt + (y[a[j]] == t.value).float() * m[j]
                if t.dataset == db:
                    tgt = tgt + (y[b[j]] == t.value).float() * (1 - m[j])
                index.append(j)
                task.append(t.id)
                target.append(tgt)
        return self._task_loss(dec, bott, torch.tensor(index, device=m.device), torch.tensor(task, device=m.device),
                               torch.stack(target), ce=False)

    def training_step(self, labelled: Batch, unlabelled: Batch | None, step: int) -> dict[str, torch.Tensor]:
        # The trainer's own labelled batch (first dataset only) is not used: batches are drawn from every dataset.
        if not self._ready:
            raise RuntimeError("versemi: setup(trainer) must run before training (the trainer calls on_step)")
        p = self.params
        x, y, owner = self._draw("sampler")
        dec, bott = self.features(x)
        l_sup = self._supervised(dec, bott, y, owner)
        if self.stage2_from is None or step < self.stage2_from:
            l_chaos, (a, b, m, feats) = self._labelled_mix(x, y, owner, p.cube_ratio)
            l_spec = self._specific(y, owner, a, b, m, feats)
            loss = l_sup + l_chaos + l_spec
            return {"loss": loss, "sup": l_sup.detach(), "chaos": l_chaos.detach(), "spec": l_spec.detach()}
        l_chaos_sup, _ = self._labelled_mix(x, y, owner, p.cube_ratio_range)
        xu, _, _ = self._draw("unlabelled_sampler")
        n = min(xu.shape[0], x.shape[0])
        keep = torch.randperm(x.shape[0])[:n].to(self.device)
        xl, yl = x[keep], self._union(y, owner)[keep]
        m = cube_masks(n, x.shape[2:], p.cube_ratio_range, device=x.device)
        x_c = xu[:n] * m.unsqueeze(1) + xl * (1 - m.unsqueeze(1))
        syn, (dec_c, bott_c) = self._synthetic(x_c)
        tasks = torch.arange(len(self.tasks), device=x.device).repeat(n)
        index = torch.arange(n, device=x.device).repeat_interleave(len(self.tasks))
        probs = torch.softmax(self.prompt(dec_c, bott_c, index, tasks), 1)[:, 1].reshape(n, len(self.tasks),
                                                                                         *x.shape[2:])
        aggregate = probs.amax(1).clamp(0, 1)
        if p.detach_aggregate:
            aggregate = aggregate.detach()
        l_unl = dice_loss(syn, aggregate)
        l_cube = dice_loss(syn * (1 - m), yl * (1 - m))
        loss = l_sup + l_chaos_sup + p.unlabelled_weight * l_unl + l_cube
        return {"loss": loss, "sup": l_sup.detach(), "chaos": l_chaos_sup.detach(), "unl": l_unl.detach(),
                "cube": l_cube.detach()}

    # -- inference --------------------------------------------------------------------------------------------
    def task_probs(self, x: torch.Tensor, dataset: int) -> torch.Tensor:
        """Foreground probability of each task of ``dataset`` (B, T_d, *S), one backbone pass for all."""
        dec, bott = self.features(x)
        tasks = self.tasks_of(dataset)
        n = x.shape[0]
        index = torch.arange(n, device=x.device).repeat(len(tasks))
        ids = torch.tensor([t.id for t in tasks], device=x.device).repeat_interleave(n)
        prob = torch.softmax(self.prompt(dec, bott, index, ids), 1)[:, 1]
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

    def predictor(self, dataset: int | str = 0, task: str | None = None):
        """A core ``Predictor`` for one dataset: its normalisation, its tasks as one label map (or one ``task``'s
        foreground as labels 0/1)."""
        from ..infer import Predictor

        d = self.data[self.dataset_index(dataset) if isinstance(dataset, str) else dataset]
        cfg = copy.deepcopy(self.cfg)
        cfg.data = replace(cfg.data, root=d.root, intensity=d.intensity, num_classes=d.num_classes)
        cfg.infer = replace(cfg.infer, largest_component=d.largest_component)
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

    def validate(self, trainer) -> dict:
        """Mean validation Dice over every task of every dataset (so best.pt is chosen on all tasks, not LA alone)."""
        from ..metrics import dice_score

        self.eval()
        per_task = {}
        for d in self.data:
            pred = self.predictor(d.index)
            cases = d.val_cases
            labels = [pred.predict_array(lc.image).argmax(0) for lc in cases]
            for t in self.tasks_of(d.index):
                scores = [dice_score(lab == t.value, lc.label == t.value) for lab, lc in zip(labels, cases)]
                if scores:
                    per_task[t.name] = float(np.mean(scores))
        self.train()
        return {"dice": float(np.mean(list(per_task.values()))) if per_task else float("nan"),
                "dice_per_task": per_task}

    def _single_task_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        dec, bott = self.features(x)
        return self.head(dec, bott, torch.full((x.shape[0],), task, device=x.device, dtype=torch.long))


# -- per-task evaluation -------------------------------------------------------------------------------------------
def evaluate_tasks(method: VerSemi, out_dir: str | Path, quiet: bool = True) -> dict:
    """Score every task on its dataset's loaded validation cases (label maps on each case's own grid) with the core
    metrics. Writes ``out_dir/<dataset>/`` reports and ``out_dir/summary.json`` whose labels are the task names."""
    from ..infer import largest_component
    from ..report import case_rows, format_table, write_report

    out_dir = Path(out_dir)
    method.eval()
    all_rows = []
    for d in method.data:
        tasks = method.tasks_of(d.index)
        names = {t.value: t.name for t in tasks}
        pred = method.predictor(d.index)
        rows = []
        for lc in d.val_cases:
            labels = pred.predict_array(lc.image).argmax(0)
            if d.largest_component:
                labels = largest_component(labels)
            rows += case_rows(lc.id, labels, lc.label, lc.geometry.spacing, sorted(names), names)
        if rows:
            summary = write_report(rows, out_dir / d.name, title=f"{method.cfg.name}: {d.name}")
            if not quiet:
                print(format_table(summary, f"{d.name}: {len(d.val_cases)} validation cases"))
        all_rows += [{**r, "case": f"{d.name}/{r['case']}", "label": r["label_name"]} for r in rows]
    summary = write_report(all_rows, out_dir, title=f"{method.cfg.name}: all tasks")
    if not quiet:
        print(format_table(summary, "all tasks"))
    return summary


def evaluate_run(run_dir: str | Path, out_dir: str | Path | None = None, which: str = "best", device: str = "auto",
                 quiet: bool = True) -> dict:
    """Load a VerSemi run directory and evaluate every task on its validation split (see ``evaluate_tasks``);
    the report goes to ``run_dir/tasks`` by default."""
    from ..config import load_config
    from ..infer import find_checkpoint
    from ..methods import build_method
    from ..utils import pick_device

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.method != "versemi":
        raise ValueError(f"{run_dir}: a '{cfg.method}' run, not versemi")
    dev = pick_device(device)
    method: VerSemi = build_method(cfg, dev)
    state = torch.load(find_checkpoint(run_dir, which), map_location=dev, weights_only=False)
    method.load_state_dict(state["method"])
    saved = json.loads((run_dir / "versemi_manifest.json").read_text())
    for d in method.data:
        if d.index == 0:
            manifest = Manifest.from_json((run_dir / "manifest.json").read_text())
            d.val_cases = [load_case(c, cfg.data.intensity, cfg.data.num_classes)
                           for c in manifest.val[: cfg.train.val_max_cases]]
        else:
            manifest = Manifest.from_json(json.dumps(saved[d.name]))
            d.val_cases = d.load(manifest.val[: d.val_max_cases], True)
    return evaluate_tasks(method, out_dir or run_dir / "tasks", quiet=quiet)
