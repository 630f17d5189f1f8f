"""A task-prompted dynamic segmentation head (DoDNet-style, as used by VerSemi).

One network serves several segmentation tasks: a small *controller* maps the task prompt (a one-hot vector) and
the globally pooled bottleneck features of each sample to the weights and biases of a few 1x1x1 convolutions, which
are then applied to that sample's decoder features. Each task therefore gets its own binary (background /
structure) classifier while sharing the whole encoder-decoder.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vnet import _norm


def head_norm(kind: str, channels: int) -> nn.Module:
    """batch | group (GroupNorm with up to 16 groups, as DoDNet) | instance | none."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(16, channels), channels)
    return _norm(kind, channels)


class TaskPromptedHead(nn.Module):
    """(decoder features (B, C, *S), bottleneck (B, Cb, *s), task ids (B,)) -> 2-class logits (B, 2, *S).

    ``layers`` dynamic 1x1x1 convolutions of width ``width`` (ReLU between them), the last one mapping to
    ``out_channels``. The controller is a single linear map (the paper's 1x1x1 convolution on a 1x1x1 tensor) from
    [one-hot(task), GAP(ReLU(pool_norm(bottleneck)))] to all of their parameters.

    ``pool_norm`` (default ``norm``) must keep what differs between samples: instance norm standardises each
    channel of each sample on its own, so GAP(ReLU(.)) of it depends only on the shape of each channel's
    distribution and the controller sees nearly the same vector for every image; the released VerSemi code uses
    batch norm there (DoDNet group norm), and batch norm before the decoder-side 1x1 convolution (``norm``).

    ``prepare`` (the norms, the pre-convolution and the pooling, once per sample) and ``run`` (the per-sample
    dynamic convolutions for a prompt) split ``forward`` so that one sample can be prompted with several tasks.
    """

    def __init__(self, decoder_channels: int, bottleneck_channels: int, num_tasks: int, width: int = 8,
                 layers: int = 3, out_channels: int = 2, norm: str = "instance", pool_norm: str | None = None):
        super().__init__()
        if layers < 1:
            raise ValueError("a task-prompted head needs at least one dynamic layer")
        self.num_tasks = num_tasks
        self.shapes = [(width, width)] * (layers - 1) + [(out_channels, width)]  # (out, in) of each dynamic conv
        self.pre = nn.Sequential(head_norm(norm, decoder_channels), nn.ReLU(inplace=True),
                                 nn.Conv3d(decoder_channels, width, 1))
        self.pool = nn.Sequential(head_norm(pool_norm or norm, bottleneck_channels), nn.ReLU(inplace=True),
                                  nn.AdaptiveAvgPool3d(1))
        n_params = sum(o * i + o for o, i in self.shapes)
        self.controller = nn.Linear(num_tasks + bottleneck_channels, n_params)

    @property
    def num_parameters_per_sample(self) -> int:
        return self.controller.out_features

    def dynamic_parameters(self, bottleneck: torch.Tensor, task: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-sample (weight (B, out, in), bias (B, out)) of each dynamic layer."""
        return self.parameters_from_pooled(self.pool(bottleneck).flatten(1), task)

    def parameters_from_pooled(self, pooled: torch.Tensor, task: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """As ``dynamic_parameters``, from the pooled bottleneck (B, Cb) of ``prepare``."""
        if task.min() < 0 or task.max() >= self.num_tasks:
            raise ValueError(f"task ids must be in 0..{self.num_tasks - 1}, got {task.tolist()}")
        code = torch.cat([F.one_hot(task, self.num_tasks).to(pooled.dtype), pooled], 1)
        flat = self.controller(code)
        out, pos = [], 0
        for o, i in self.shapes:
            w = flat[:, pos:pos + o * i].reshape(-1, o, i)
            pos += o * i
            out.append((w, flat[:, pos:pos + o]))
            pos += o
        return out

    def prepare(self, features: torch.Tensor, bottleneck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head input (B, width, *S), pooled bottleneck (B, Cb)): the task-independent part, once per sample."""
        return self.pre(features), self.pool(bottleneck).flatten(1)

    def forward(self, features: torch.Tensor, bottleneck: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        if not (features.shape[0] == bottleneck.shape[0] == task.shape[0]):
            raise ValueError(f"batch sizes differ: features {features.shape[0]}, bottleneck {bottleneck.shape[0]}, "
                             f"tasks {task.shape[0]}")
        return self.run(*self.prepare(features, bottleneck), task)

    def run(self, x: torch.Tensor, pooled: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """2-class logits (B, 2, *S) from ``prepare``'s outputs (rows may repeat a sample) and task ids (B,)."""
        if not (x.shape[0] == pooled.shape[0] == task.shape[0]):
            raise ValueError(f"batch sizes differ: head input {x.shape[0]}, pooled {pooled.shape[0]}, "
                             f"tasks {task.shape[0]}")
        params = self.parameters_from_pooled(pooled, task)
        for n, (w, b) in enumerate(params):
            # a per-sample 1x1x1 convolution (the grouped convolution of DoDNet, written as an einsum)
            x = torch.einsum("boi,bi...->bo...", w, x) + b.reshape(b.shape + (1,) * (x.ndim - 2))
            if n < len(params) - 1:
                x = F.relu(x)
        return x
