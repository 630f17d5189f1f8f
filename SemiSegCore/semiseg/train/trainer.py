"""The training loop: iterations over the patch batches a method declares (``Method.streams``), validation by
sliding-window Dice, atomic checkpoints, resume, a JSONL log, a tqdm bar, graceful stop on SIGINT/SIGTERM, and
torchrun support. A method sees the run only through the ``TrainingContext`` built here.

The run directory holds ``config.yaml``, ``manifest.json`` (the split, reused on resume), ``log.jsonl``,
``checkpoints/last.pt`` and ``best.pt``, and after training ``metrics.csv``, ``summary.json`` and a plot of the
validation cases.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import load_checkpoint, restore
from ..config import Config, ConfigError, save_config
from ..data.cases import Manifest, dataset_labels, discover_cases, make_manifest
from ..data.sampling import Augmentation, PatchSampler
from ..errors import TrainingError
from ..evaluate import mean_dice, score_case
from ..infer import Predictor
from ..methods import build_method, with_method_defaults
from ..methods.context import TrainingContext
from ..report import evaluate_cases
from ..runs import find_checkpoint, load_cases, load_weights
from ..utils import atomic_torch_save, atomic_write_text, device_name, naming, pick_device, seed_everything, set_threads
from . import distributed as dist
from .rundir import RunLock, prepare_run_dir

STOP_FILE = "STOP"
"""Creating ``<run>/STOP`` asks a running trainer to save ``last.pt`` and stop (polled every step)."""


class JsonlLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        with naming(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, quiet: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ctx = dist.setup()
        self.is_main = self.ctx.rank == 0
        self.quiet = quiet or not self.is_main
        self.device = self.ctx.device or pick_device(cfg.train.device)
        set_threads(cfg.train.threads, self.ctx.world_size)
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.stop_requested = False
        self.stop_signal: int | None = None
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.log = JsonlLog(self.run_dir / "log.jsonl", enabled=self.is_main)
        seed_everything(cfg.train.seed + self.ctx.rank)
        self.manifest = self._manifest()
        self.labelled = load_cases(self.manifest.labelled, cfg, True, "labelled", self.quiet)
        self.val = load_cases(self.manifest.val[: cfg.train.val_max_cases], cfg, True, "validation", self.quiet)
        self.method = build_method(cfg, self.device)
        self.unlabelled = (load_cases(self.manifest.unlabelled, cfg, False, "unlabelled", self.quiet)
                           if self.method.needs_unlabelled else [])
        if not self.labelled:
            raise ConfigError(f"{cfg.data.root}: no labelled training cases ({self.manifest.summary()})")
        if self.method.needs_unlabelled and not self.unlabelled:
            raise ConfigError(f"method '{cfg.method}' needs unlabelled cases but the split has none "
                              f"({self.manifest.summary()})")
        self.context = TrainingContext(cfg, self.labelled, self.unlabelled, self.val, self.manifest, self.run_dir,
                                       self.log, self.predictor, self.ctx.rank, self.ctx.world_size, self.quiet,
                                       self.refresh_stream)
        self.method.setup(self.context)
        self.samplers: dict[str, PatchSampler] = {}
        self._build_streams()
        self.model = dist.wrap(self.method, self.ctx)
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.step = 0
        self.best_dice = -1.0

    # -- set-up -------------------------------------------------------------------------------------------------
    def _manifest(self) -> Manifest:
        path = self.run_dir / "manifest.json"
        if path.exists():  # resume: keep the split of the first start
            return Manifest.from_json(path.read_text())
        d = self.cfg.data
        cases = discover_cases(d.root, d.layout)
        manifest = make_manifest(cases, d.labelled, d.val, d.test, d.unlabelled, d.seed, d.max_cases, d.labelled_ids,
                                 d.group_pattern)
        if self.is_main:
            atomic_write_text(path, manifest.to_json())
            save_config(self.cfg, self.run_dir / "config.yaml")
        return manifest

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        groups = self.method.parameter_groups()
        if t.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
        if t.optimizer == "adam":
            return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
        if t.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        raise ValueError(f"config key 'train.optimizer': unknown optimizer '{t.optimizer}' (sgd, adam, adamw)")

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        frac = step / max(t.iterations, 1)
        if t.schedule == "poly":
            return t.lr * (1 - frac) ** 0.9
        if t.schedule == "cosine":
            return t.lr * 0.5 * (1 + math.cos(math.pi * frac))
        return t.lr

    # -- batch streams ------------------------------------------------------------------------------------------
    def refresh_stream(self, name: str, state: dict | None = None) -> None:
        """(Re)build the sampler of one stream from the method's current declaration (removed when it declares
        none of that name), continuing from a checkpointed sampler ``state`` when given."""
        stream = self.method.streams(self.context).get(name)
        self.samplers.pop(name, None)
        if stream is None:
            return
        t = self.cfg.train
        sampler = PatchSampler(stream.cases, t.patch_size, stream.batch_size, t.seed * 1000 + stream.seed,
                               Augmentation.of(t), stream.foreground_crop, labels=stream.labels,
                               slice_axis=t.slice_axis, rank=self.ctx.rank, world_size=self.ctx.world_size)
        if state:
            sampler.load_state_dict(state)
        self.samplers[name] = sampler

    def _build_streams(self, states: dict | None = None) -> None:
        self.samplers = {}
        for name in self.method.streams(self.context):
            self.refresh_stream(name, (states or {}).get(name))

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "best_dice": self.best_dice,
                "streams": {name: s.state_dict() for name, s in self.samplers.items()},
                "torch_rng": torch.get_rng_state(), "config": self.cfg.to_dict()}

    def save(self, name: str) -> None:
        if self.is_main:
            atomic_torch_save(self.state(), self.ckpt_dir / name)

    def init_weights(self) -> None:
        """``train.init_from``: the network weights of another run or checkpoint (fresh optimizer and schedule)."""
        source = Path(self.cfg.train.init_from)
        path = find_checkpoint(source) if source.is_dir() else source
        if not path.exists():
            raise FileNotFoundError(f"{path}: train.init_from checkpoint not found")
        state = load_checkpoint(path, self.device)
        n = self.method.load_initial_weights(state["method"], str(path))
        self.log.write(event="init_from", checkpoint=str(path), tensors=n)

    def try_resume(self) -> bool:
        path = self.ckpt_dir / "last.pt"
        if not path.exists():
            if self.cfg.train.init_from:
                self.init_weights()
            return False
        state = load_checkpoint(path, self.device)
        restore(self.method, state["method"], path, self.cfg.model.name)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_dice = float(state["best_dice"])
        streams = state.get("streams")
        if streams is None:  # a checkpoint from before streams: the trainer's two samplers
            streams = {"labelled": state.get("labelled_sampler"), "unlabelled": state.get("unlabelled_sampler")}
        self._build_streams(streams)  # after the method's state: its streams may depend on it
        torch.set_rng_state(state["torch_rng"].cpu())
        self.log.write(event="resumed", step=self.step)
        return True

    # -- validation -----------------------------------------------------------------------------------------------
    def predictor(self) -> Predictor:
        return Predictor.of(self.method)

    def validate(self) -> dict:
        """Mean foreground Dice over the validation cases (per label and overall), scored as ``semiseg predict``
        + ``semiseg evaluate`` would score them."""
        self.method.eval()
        pred = self.predictor()
        rows = [r for case in self.val for r in score_case(pred, case, dice_only=True)]
        self.method.train()
        dice, per_label = mean_dice(rows)
        return {"dice": dice, "dice_per_label": per_label}

    # -- the loop -------------------------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def request_stop(signum, frame):
            self.stop_requested = True
            self.stop_signal = signum

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            try:
                signal.signal(s, request_stop)
            except ValueError:  # not in the main thread: stop only by self.stop_requested
                return {}
        return previous

    def fit(self) -> dict:
        t = self.cfg.train
        resumed = self.try_resume()
        if not resumed:
            self.log.write(event="start", iterations=t.iterations, device=device_name(self.device),
                           world_size=self.ctx.world_size, manifest=self.manifest.summary())
        previous = self._install_signal_handlers()
        self.method.train()
        bar = tqdm(total=t.iterations, initial=self.step, desc=f"{self.cfg.name} [{self.cfg.method}]",
                   disable=self.quiet, dynamic_ncols=True)
        t0 = time.time()
        try:
            while self.step < t.iterations:
                stop_file = self.run_dir / STOP_FILE  # another way to stop: works where signals do not reach
                if dist.any_rank(self.stop_requested or stop_file.exists(), self.ctx):
                    self.save("last.pt")
                    self.log.write(event="stopped", step=self.step)
                    stop_file.unlink(missing_ok=True)  # so that resuming is not stopped again
                    return {"stopped": True, "step": self.step, "signal": self.stop_signal}
                self.method.on_step(self.context, self.step)
                losses = self.train_step()
                self.step += 1
                bar.update(1)
                if self.step % 10 == 0 or self.step == t.iterations:
                    record = {k: round(float(v), 5) for k, v in losses.items()}
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    self.log.write(event="train", step=self.step, iterations=t.iterations,
                                   lr=self.optimizer.param_groups[0]["lr"], elapsed=round(time.time() - t0, 2),
                                   **record)
                if self.step % t.val_every == 0 or self.step == t.iterations:
                    self._validate_and_keep_best()
                if self.step % t.checkpoint_every == 0 or self.step == t.iterations:
                    self.save("last.pt")
        finally:
            bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
        self.log.write(event="done", step=self.step, best_dice=self.best_dice)
        return {"stopped": False, "step": self.step, "best_dice": self.best_dice}

    def _validate_and_keep_best(self) -> None:
        if self.is_main and self.val:
            result = self.method.validate(self.context) or self.validate()
            self.log.write(event="val", step=self.step, **result)
            if result["dice"] > self.best_dice:
                self.best_dice = result["dice"]
                self.save("best.pt")
        elif self.is_main and not self.val:
            self.save("best.pt")
        dist.barrier(self.ctx)

    def train_step(self) -> dict:
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        batches = {name: s.next_batch().to(self.device) for name, s in self.samplers.items()}
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            losses = self.model(batches, self.step)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            cases = [c for b in batches.values() for c in b.case_ids]
            raise TrainingError(f"loss is {loss.item()} at step {self.step + 1} (batch of cases {', '.join(cases)}): "
                                f"lower train.lr or check these cases")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {k: v.detach() for k, v in losses.items()}


def train(cfg: Config, run_dir: str | Path, quiet: bool = False, evaluate_val: bool = True,
          force_new: bool = False) -> dict:
    """Train (or resume) a run in ``run_dir``, locked against other processes for the whole run, after checking it
    (see ``rundir.prepare_run_dir``; ``force_new`` moves an existing run aside and starts over)."""
    cfg = with_method_defaults(cfg)  # checks the method's own section before the run directory or data is touched
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 locks and prepares; the others meet it at setup
        return _train(cfg, run_dir, quiet, evaluate_val)
    with RunLock(run_dir):
        changed = prepare_run_dir(cfg, run_dir, force_new)
        if changed:
            JsonlLog(Path(run_dir) / "log.jsonl").write(event="config_changed", keys=changed)
        return _train(cfg, run_dir, quiet, evaluate_val)


def _train(cfg: Config, run_dir: str | Path, quiet: bool = False, evaluate_val: bool = True) -> dict:
    """Train (or resume) a run and, at the end, evaluate the best checkpoint on the validation split (the report in
    the run directory) and on the test split, if the manifest has one (``<run>/test/``: cases that neither
    training nor the choice of ``best.pt`` saw)."""
    trainer = Trainer(cfg, run_dir, quiet=quiet)
    result = trainer.fit()
    if not result["stopped"] and evaluate_val and trainer.is_main and (trainer.val or trainer.manifest.test):
        load_weights(trainer.method, trainer.ckpt_dir / "best.pt")
        trainer.method.eval()
        names = cfg.data.labels or dataset_labels(cfg.data.root)
        predictor = trainer.predictor()
        if trainer.val:
            result["summary"] = evaluate_cases(predictor, trainer.val, trainer.run_dir, label_names=names,
                                               quiet=quiet)
        if trainer.manifest.test:
            test = load_cases(trainer.manifest.test, cfg, True, "test", trainer.quiet)
            result["test_summary"] = evaluate_cases(predictor, test, trainer.run_dir / "test", label_names=names,
                                                    quiet=quiet, split="test")
    dist.cleanup(trainer.ctx)
    return result
