"""The run directory between two starts: one training process at a time (an advisory lock), resume only with the
config the run was started with, and no temporary files left by a killed run."""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..config import Config, ConfigError, config_changes, describe_changes, save_config
from ..errors import RunDirError
from ..methods import get_method_class, with_method_defaults
from ..runs import read_config

RESUMABLE = ("name", "train.iterations", "train.val_every", "train.checkpoint_every", "train.device",
             "train.threads")
"""Config keys that may change when a run resumes: how long and where it runs, not what it learns."""


class RunLock:
    """An advisory lock on ``<run>/.lock``, which holds the owner's pid. The system releases it when the owner exits,
    however it ends, so a killed run never leaves a stale lock."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            _lock(f)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise RunDirError(f"{self.path.parent}: in use by another training process (pid {owner}, lock file "
                              f"{self.path}); wait for it, stop it, or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


def _lock(f) -> None:
    """Lock the open file without waiting; OSError when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def prepare_run_dir(cfg: Config, run_dir: str | Path, force_new: bool = False) -> list[str]:
    """Get ``run_dir`` ready for a (re)start; call it with the lock held. Removes ``.tmp-*`` files a killed run left
    behind. An existing run resumes only if its ``config.yaml`` matches ``cfg`` up to the RESUMABLE keys and the
    method's ``inference_only_params`` (which are then updated there, and returned); otherwise a RunDirError shows
    the differences. ``force_new`` moves an existing run into ``<run>/replaced-<time>/`` and starts over; a run that
    never wrote a checkpoint (a failed first start) simply starts over."""
    run_dir = Path(run_dir)
    for tmp in [*run_dir.glob(".tmp-*"), *(run_dir / "checkpoints").glob(".tmp-*")]:
        tmp.unlink(missing_ok=True)
    started = any((run_dir / "checkpoints" / n).exists() for n in ("last.pt", "best.pt"))
    if force_new and started:
        aside = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
        aside.mkdir()
        for p in run_dir.iterdir():
            if p.name != ".lock" and not p.name.startswith("replaced-"):
                p.rename(aside / p.name)
        print(f"the previous run was moved to {aside}")
        return []
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return []
    changes = changes_since_saved(run_dir, cfg)
    if not changes:
        return []
    if not started:  # nothing trained yet: the split and config of the failed start are simply redone
        saved_path.unlink()
        (run_dir / "manifest.json").unlink(missing_ok=True)
        return []
    inference_only = {f"{cfg.method}.{k}" for k in get_method_class(cfg.method).inference_only_params}
    fixed = [k for k in changes if k not in RESUMABLE and k not in inference_only]
    if fixed:
        shown = describe_changes({k: changes[k] for k in fixed}, limit=6)
        raise RunDirError(f"{run_dir}: was started with another config ({shown}); to resume use the config in "
                          f"{saved_path}, to start over pass --force-new (the old run is moved aside), or use another "
                          f"--out")
    save_config(cfg, saved_path)
    return list(changes)


def changes_since_saved(run_dir: str | Path, cfg: Config) -> dict[str, tuple]:
    """``config_changes`` from the run's config.yaml to ``cfg``, both with their method's defaults filled in as
    ``train`` fills them. A run saved before config.yaml kept them reads today's defaults for the keys it lacks (all
    that is known of them), so it still resumes; a config.yaml that no longer loads is a RunDirError."""
    try:
        saved = with_method_defaults(read_config(run_dir))
    except ConfigError as exc:
        raise RunDirError(f"{Path(run_dir) / 'config.yaml'}: no longer a valid config ({exc}); start over with "
                          f"--force-new or use another --out") from None
    return config_changes(saved.to_dict(), with_method_defaults(cfg))
