"""A run directory as training leaves it (``config.yaml``, ``manifest.json``, ``checkpoints/best.pt`` and
``last.pt``), read back: its config and split, cases loaded as training loads them, the method restored from a
checkpoint, and a predictor. Checkpoints are only ever read here. Errors name the run directory and what is
missing."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from .checkpoint import load_checkpoint, restore
from .config import Config, load_config
from .data.cases import LoadedCase, Manifest, load_case
from .errors import RunDirError
from .infer import Predictor
from .methods import build_method
from .utils import pick_device

CHECKPOINTS = ("best", "last")


def read_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no config.yaml in it)")
    return load_config(path)


def read_manifest(run_dir: str | Path) -> Manifest:
    """The run's split (the cases it trained and validated on)."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no manifest.json (the run's split) in it; was it trained?")
    return Manifest.from_json(path.read_text())


def find_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """``checkpoints/<which>.pt``; ``best`` falls back to ``last.pt`` (a run stopped before its first
    validation)."""
    if which not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint '{which}' ({', '.join(CHECKPOINTS)})")
    ckpt_dir = Path(run_dir) / "checkpoints"
    for name in [f"{which}.pt"] + (["last.pt"] if which == "best" else []):
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise RunDirError(f"{run_dir}: no checkpoint ({which}.pt{' or last.pt' if which == 'best' else ''}) under "
                      f"{ckpt_dir}; was it trained?")


def load_cases(cases, cfg: Config, with_label: bool, desc: str = "cases", quiet: bool = True) -> list[LoadedCase]:
    """Cases read, normalised and resampled (``data.target_spacing``) as training reads them."""
    return [load_case(c, cfg.data.intensity, cfg.data.num_classes, with_label=with_label,
                      target_spacing=cfg.data.target_spacing)
            for c in tqdm(cases, desc=f"loading {desc}", leave=False, disable=quiet or not cases)]


def load_weights(method, path: str | Path) -> None:
    """Restore a built method's weights from a checkpoint file; errors name the file (unreadable, or written for
    another architecture)."""
    state = load_checkpoint(path, method.device)
    restore(method, state["method"], path, method.cfg.model.name)


def load_method(run_dir: str | Path, which: str = "best", device: str = "auto"):
    """(method, checkpoint path): the run's method built from its config and restored from its checkpoint, in eval
    mode."""
    cfg = read_config(run_dir)
    ckpt = find_checkpoint(run_dir, which)
    method = build_method(cfg, pick_device(device))
    load_weights(method, ckpt)
    method.eval()
    return method, ckpt


def load_predictor(run_dir: str | Path, which: str = "best", device: str = "auto") -> Predictor:
    """The predictor of a run directory (``config.yaml`` + ``checkpoints/best.pt``, falling back to ``last.pt``)."""
    method, ckpt = load_method(run_dir, which, device)
    return Predictor.of(method, run_dir=str(run_dir), checkpoint=str(ckpt))
