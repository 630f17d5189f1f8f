"""SAM checkpoint downloads with progress, cancel and a checksum check, as a step generator (see ``tasks``).

A download goes to ``<name>.part`` beside its target and becomes the checkpoint only after its published hash has
been checked; a cancelled, failed or corrupt download leaves nothing behind.
"""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Generator

from .tasks import Progress


def checkpoint_info(model_type: str = "vit_b"):
    from semiseg.sam.backends import SAM_CHECKPOINTS

    if model_type not in SAM_CHECKPOINTS:
        raise ValueError(f"unknown segment-anything model type '{model_type}' ({', '.join(SAM_CHECKPOINTS)})")
    return SAM_CHECKPOINTS[model_type]


def download_steps(info, folder: str | Path | None = None, block: int = 1 << 20, timeout: float = 30
                   ) -> Generator[Progress, None, Path]:
    """Download ``info.url`` (a ``semiseg.sam.backends.CheckpointInfo``) into ``folder`` (default: the semiseg
    cache, where the ``sam`` backend looks) one block per step, then verify it; returns the file's path. A file
    already there is verified and returned."""
    from semiseg.sam.backends import SamCheckpointError, cache_dir, verify_checkpoint

    folder = Path(folder) if folder is not None else cache_dir()
    path = folder / info.filename
    if path.is_file():
        yield Progress(None, f"checking {path}")
        verify_checkpoint(path, info)
        return path
    folder.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    finished = False
    try:
        try:
            with urllib.request.urlopen(info.url, timeout=timeout) as src, open(part, "wb") as dst:
                total = int(src.headers.get("Content-Length") or 0)
                got = 0
                while True:
                    chunk = src.read(block)
                    if not chunk:
                        break
                    dst.write(chunk)
                    got += len(chunk)
                    of = f" of {total / 1e6:.1f}" if total else ""
                    yield Progress(got / total if total else None,
                                   f"downloading {info.filename}: {got / 1e6:.1f}{of} MB")
        except OSError as exc:
            raise SamCheckpointError(f"{info.filename} could not be downloaded from {info.url} ({exc}); download it "
                                     f"by hand and put it at {path}, or choose it as the checkpoint") from exc
        if total and got != total:
            raise SamCheckpointError(f"{info.url}: the download stopped after {got} of {total} bytes; try again")
        yield Progress(None, f"checking {info.filename}")
        verify_checkpoint(part, info)
        os.replace(part, path)
        finished = True
        return path
    finally:
        if not finished:
            part.unlink(missing_ok=True)
