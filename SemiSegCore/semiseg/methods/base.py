"""The method interface. A method owns its networks (it is an ``nn.Module``), declares the batch streams it draws
each step (``streams``), computes its losses from one batch of each, and predicts logits for whole-image inference.
It sees the run only through the ``TrainingContext`` the trainer gives it; the trainer knows nothing else about it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import Config, build_dataclass
from ..data.sampling import Batch
from ..models import build_model
from .context import Stream, TrainingContext


@dataclass
class NoParams:
    pass


class Method(nn.Module):
    name: str = ""
    needs_unlabelled: bool = False
    """Load the unlabelled cases (``ctx.unlabelled``); by default also draw an ``unlabelled`` batch every step."""
    Params = NoParams
    inference_only_params: tuple = ()
    """Keys of the method's config section that change only how a trained model predicts, so a finished run may
    resume (and be evaluated again) with other values (``train.rundir.prepare_run_dir``)."""
    whole_image_inference: bool = False
    """``predict_logits`` takes whole images (or slices) and resizes them itself, so the predictor gives it one
    window per image instead of sliding windows of ``infer.patch_size``."""

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.device = device
        self.params = self.params_from(cfg.method_params)

    @classmethod
    def params_from(cls, raw: dict | None):
        """The method's own config section as a validated dataclass (errors name the key)."""
        return build_dataclass(cls.Params, raw or {}, cls.name)

    def build_network(self, **overrides) -> nn.Module:
        m = self.cfg.model
        kwargs = dict(name=m.name, in_channels=m.in_channels, num_classes=self.cfg.data.num_classes,
                      features=m.features, dropout=m.dropout, norm=m.norm, strides=m.strides)
        kwargs.update(overrides)
        return build_model(**kwargs)

    # -- what the trainer calls ----------------------------------------------------------------------------------
    def setup(self, ctx: TrainingContext) -> None:
        """Called once when the trainer is built, before a resume restores the state. Default: nothing."""

    def labelled_stream(self, ctx: TrainingContext) -> Stream:
        t = self.cfg.train
        return Stream(ctx.labelled, t.batch_size, seed=0, foreground_crop=t.foreground_crop)

    def unlabelled_stream(self, ctx: TrainingContext) -> Stream:
        return Stream(ctx.unlabelled, self.cfg.train.unlabelled_batch_size, seed=500)

    def streams(self, ctx: TrainingContext) -> dict[str, Stream]:
        """The batches ``training_step`` gets each step, by name; the trainer samples, draws and checkpoints them.
        Default: ``labelled`` and, when the method ``needs_unlabelled``, ``unlabelled``."""
        streams = {"labelled": self.labelled_stream(ctx)}
        if self.needs_unlabelled:
            streams["unlabelled"] = self.unlabelled_stream(ctx)
        return streams

    def forward(self, batches: dict[str, Batch], step: int) -> dict[str, torch.Tensor]:
        """One training step's losses; must contain ``loss``. (``forward`` so that DistributedDataParallel wraps it.)"""
        return self.training_step(batches, step)

    def training_step(self, batches: dict[str, Batch], step: int) -> dict[str, torch.Tensor]:
        """Losses from one batch of each declared stream (``batches[name]``, on the method's device)."""
        raise NotImplementedError

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inference_config(self) -> Config:
        """The config ``predict_logits``'s outputs are read with (normalisation, working grid, windows, clean-up):
        the run's, unless a method predicts for a part of it with settings of its own (VerSemi's datasets)."""
        return self.cfg

    def on_step(self, ctx: TrainingContext, step: int) -> None:
        """Called by the trainer before each step (e.g. to re-mine pseudo-labels). Default: nothing."""

    def validate(self, ctx: TrainingContext) -> dict | None:
        """Validation Dice for choosing ``best.pt``: ``{"dice": mean, ...}``, or None for the trainer's default
        (sliding-window Dice on ``ctx.val``). Methods over several datasets override it."""
        return None

    def load_initial_weights(self, state: dict, source: str) -> int:
        """Copy every tensor of another method's ``state_dict`` whose name and shape match ours (e.g. a supervised
        run's ``net.*`` into knowledge mining's ``net``); returns how many. An error when nothing matches."""
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own and hasattr(v, "shape") and v.shape == own[k].shape}
        if not matched:
            raise ValueError(f"{source}: no network weights match this run's '{self.cfg.model.name}' network "
                             f"(was it trained with another model.name or model.features?)")
        self.load_state_dict(matched, strict=False)
        return len(matched)

    def parameter_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]
