"""Task knowledge texts: editable files, one structure each, named by file stem (``left_atrium``) or given by path."""
from __future__ import annotations

import os
from pathlib import Path


class KnowledgeError(ValueError):
    pass


def knowledge_dir() -> Path:
    """``$SEMISEG_KNOWLEDGE_DIR`` if set, else the texts shipped with semiseg (package data when installed, the
    repository's ``Resources/knowledge`` in a source checkout; see :mod:`semiseg.resources`)."""
    env = os.environ.get("SEMISEG_KNOWLEDGE_DIR")
    if env:
        return Path(env)
    from ..resources import resource_dir

    return resource_dir("knowledge")


def available_knowledge() -> list[str]:
    folder = knowledge_dir()
    return sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []


def resolve_knowledge(name_or_path: str) -> Path:
    """A text file given by path, or by name in :func:`knowledge_dir` (``left_atrium`` -> ``left_atrium.txt``)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    named = knowledge_dir() / f"{name_or_path}.txt"
    if named.is_file():
        return named
    known = ", ".join(available_knowledge()) or "none"
    raise KnowledgeError(f"task knowledge '{name_or_path}' not found: not a file, and not a name in "
                         f"{knowledge_dir()} (available: {known})")


def read_knowledge(name_or_path: str) -> str:
    """The description text: comment lines (``#``) dropped, whitespace collapsed to single spaces."""
    path = resolve_knowledge(name_or_path)
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.lstrip().startswith("#")]
    text = " ".join(" ".join(lines).split())
    if not text:
        raise KnowledgeError(f"{path}: the knowledge file has no text (only comments or blank lines)")
    return text
