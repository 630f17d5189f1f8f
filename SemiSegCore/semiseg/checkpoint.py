"""Reading checkpoints (``best.pt`` / ``last.pt``) with errors that name the file and what to do instead."""
from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError


def _first_line(exc: Exception) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def load_checkpoint(path: str | Path, device="cpu") -> dict:
    """The saved state; a truncated or corrupt file is a CheckpointError naming it (and the other checkpoint)."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except OSError:
        raise
    except Exception as exc:  # torch reports a truncated zip or pickle in several ways
        other = path.with_name("last.pt" if path.name == "best.pt" else "best.pt")
        hint = f"; {other.name} beside it may still be good" if other.exists() else ""
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt ({_first_line(exc)}){hint}") from exc


def restore(module, state: dict, path: str | Path, model_name: str) -> None:
    """``module.load_state_dict(state)``; a checkpoint of another architecture is a CheckpointError naming it."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        detail = [s.strip() for s in str(exc).splitlines() if s.strip()][1:2] or [_first_line(exc)]
        raise CheckpointError(f"{path}: does not fit the configured model '{model_name}' (the architecture changed "
                              f"since it was written: {detail[0]}); start a new run (--force-new or another --out)"
                              ) from exc
