"""Where the module's resources and the ``semiseg`` core are, and installing Python dependencies on first use.

Nothing here runs at import time. Inside Slicer, :func:`ensure_dependencies` asks before installing anything:
torch through the PyTorch extension's ``PyTorchUtils`` when that extension is present (it picks the CUDA build
that fits the driver), everything else from ``Resources/requirements.txt`` with ``slicer.packaging.pip_ensure``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent  # SemiSegExtension/ in a checkout, qt-scripted-modules/ built


def resources_dir() -> Path:
    """``Resources/`` beside the module when built or installed; the repository's top-level one from a checkout."""
    for candidate in (MODULE_DIR / "Resources", MODULE_DIR.parent / "Resources"):
        if (candidate / "UI" / "SemiSeg.ui").exists():
            return candidate
    raise FileNotFoundError(f"SemiSeg resources (UI/SemiSeg.ui) not found beside {MODULE_DIR} or in its parent")


def resource_path(relative: str) -> Path:
    return resources_dir() / relative


def requirements_file() -> Path:
    return resource_path("requirements.txt")


def read_requirements() -> list[str]:
    """The requirement lines (comments and blank lines dropped)."""
    lines = requirements_file().read_text().splitlines()
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def ensure_core_importable() -> None:
    """Make ``import semiseg`` work: installed or built extensions carry it; a checkout has ``SemiSegCore/``."""
    if importlib.util.find_spec("semiseg") is not None:
        return
    core = MODULE_DIR.parent / "SemiSegCore"
    if (core / "semiseg" / "__init__.py").exists():
        sys.path.insert(0, str(core))
        return
    raise ModuleNotFoundError(f"the semiseg core package is neither installed nor at {core}")


def missing_packages() -> list[str]:
    """Requirements whose distribution is not installed (versions are left to pip_ensure)."""
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for req in ["torch>=2.4"] + read_requirements():
        name = req.replace(">", "=").replace("<", "=").replace("~", "=").replace("!", "=").split("=")[0].strip()
        try:
            version(name.split("[")[0])
        except PackageNotFoundError:
            missing.append(req)
    return missing


def ensure_dependencies(ask: bool = True) -> None:
    """Inside Slicer: install what is missing, after asking. Raises if the person declines."""
    ensure_core_importable()
    if importlib.util.find_spec("torch") is None:
        _install_torch(ask)
    from slicer.packaging import load_requirements, pip_ensure

    pip_ensure(load_requirements(str(requirements_file())), requester="SemiSeg", prompt_install=ask)
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError("SemiSeg needs PyTorch, which is not installed")


def _install_torch(ask: bool) -> None:
    try:
        import PyTorchUtils  # the PyTorch extension's module
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask, torchVersionRequirement=">=2.4")
        if torch is None:
            raise RuntimeError("PyTorch was not installed; SemiSeg cannot run without it")
        return
    from packaging.requirements import Requirement
    from slicer.packaging import pip_ensure

    pip_ensure([Requirement("torch>=2.4")], requester="SemiSeg (install the PyTorch extension for a GPU build)",
               prompt_install=ask)
