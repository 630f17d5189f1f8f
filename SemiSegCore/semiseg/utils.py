"""Small shared helpers: atomic writes, device choice, seeding."""
from __future__ import annotations

import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp(path: Path, suffix: str = "") -> Path:
    """A temporary file beside ``path`` (same file system, so a rename replaces it atomically), with the usual
    permissions for new files (mkstemp alone would leave it readable by its owner only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


@contextmanager
def naming(path: str | Path):
    """Re-raise an OSError of writing ``path`` with the path in it (a full disk says only "No space left")."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = make_temp(path)
    try:
        with naming(path), open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save through a temporary file and a rename: a kill mid-write leaves the old checkpoint intact."""
    import torch

    path = Path(path)
    tmp = make_temp(path, ".pt")
    try:
        with naming(path), open(tmp, "wb") as f:  # a file object: write errors come back as OSError
            torch.save(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from .errors import SemiSegError

        raise SemiSegError(f"device '{name}' was asked for but CUDA is not available on this machine")
    return torch.device(name)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under ``taskset``), not all the machine's cores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int = 0, processes: int = 1) -> int:
    """The one place that sets torch's CPU thread count: ``threads``, or (0) the usable cores shared by the
    ``processes`` of a torchrun job. Returns the count set."""
    import torch

    n = threads or max(1, usable_cores() // max(processes, 1))
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def device_name(device) -> str:
    import platform

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
