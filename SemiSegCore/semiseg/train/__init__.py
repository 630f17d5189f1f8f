"""Training loop, checkpoints and resume, torchrun support."""
from .trainer import Trainer, train

__all__ = ["Trainer", "train"]
