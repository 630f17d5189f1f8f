"""What a method sees of a training run: the ``TrainingContext`` the trainer gives to ``Method.setup``,
``on_step``, ``streams`` and ``validate``, and ``Stream``, one batch stream a method declares and the trainer
draws (and checkpoints) for it every step."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class _NoLog:
    def write(self, **record) -> None:
        pass


@dataclass(frozen=True, eq=False)
class Stream:
    """``batch_size`` random patches per step from ``cases`` (loaded cases), with the cases' labels or ``labels``
    (case id -> label map, e.g. pseudo-labels), centred on foreground with probability ``foreground_crop``. The
    sampler's seed is ``train.seed * 1000 + seed``; patch size, augmentation and slice axis come from ``train``."""
    cases: list
    batch_size: int
    seed: int
    foreground_crop: float = 0.0
    labels: dict | None = None


@dataclass(frozen=True, eq=False)
class TrainingContext:
    """The run as a method may use it. ``log.write(event=..., ...)`` appends to ``log.jsonl`` (main process
    only); ``predictor()`` is a whole-image predictor of the method's current weights; ``refresh_stream(name)``
    asks the trainer to rebuild that stream from ``Method.streams`` (when the cases behind it changed)."""
    cfg: Any
    labelled: list = field(default_factory=list)
    unlabelled: list = field(default_factory=list)
    val: list = field(default_factory=list)
    manifest: Any = None
    run_dir: Path | None = None
    log: Any = field(default_factory=_NoLog)
    predictor: Callable[[], Any] | None = None
    rank: int = 0
    world_size: int = 1
    quiet: bool = False
    refresh_stream: Callable[[str], None] = lambda name: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0
