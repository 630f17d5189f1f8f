"""Example configs and task knowledge texts that ship with ``semiseg``.

The one editable copy lives in the repository's ``Resources/configs`` and ``Resources/knowledge``. Wheels
(``SemiSegCore/setup.py``) and the Slicer extension (CMake) copy them into this package, as
``semiseg/resources/configs`` and ``semiseg/resources/knowledge``, so an installed ``semiseg`` finds them without
the repository.
"""
from __future__ import annotations

from pathlib import Path

KINDS = ("configs", "knowledge")
_HERE = Path(__file__).resolve().parent


def resource_dir(kind: str) -> Path:
    """The folder of one kind of resource: the package's copy when installed, the repository's from a checkout."""
    if kind not in KINDS:
        raise ValueError(f"unknown semiseg resource kind '{kind}' ({', '.join(KINDS)})")
    for candidate in (_HERE / kind, _HERE.parents[2] / "Resources" / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"semiseg {kind} not found: neither {_HERE / kind} (installed package) nor "
                            f"{_HERE.parents[2] / 'Resources' / kind} (source checkout)")


def config_path(name: str) -> Path:
    """An example config by name (``la2018_supervised``) or file name (``la2018_supervised.yaml``)."""
    folder = resource_dir("configs")
    path = folder / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise FileNotFoundError(f"no example config '{name}' in {folder} (available: {known})")
    return path
