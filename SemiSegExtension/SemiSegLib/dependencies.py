"""Where the module's resources and the ``semiseg`` core are, and installing Python dependencies when an action
needs them.

Nothing here runs at import time, and nothing is installed or imported (torch included) until a person asks for
an action that needs it. :func:`ensure_dependencies` then asks before installing: torch through the PyTorch
extension's ``PyTorchUtils`` when that extension is present (it picks the CUDA build that fits the driver), the
rest of ``Resources/requirements.txt`` with ``pip_ensure`` where the Slicer has it (``slicer.pydeps`` or
``slicer.packaging``, 5.11 and later) and with ``slicer.util.pip_install`` after a confirmation otherwise.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent  # SemiSegExtension/ in a checkout, qt-scripted-modules/ built
MINIMUM_SLICER = (5, 8)  # Python 3.12 (the core needs 3.10+), parameterNodeWrapper with Annotated validators
TORCH_REQUIREMENTS = ["torch>=2.4", "torchvision>=0.19"]  # PyTorchUtils installs both, matched to the driver


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


def slicer_version_problem(major: int, minor: int) -> str | None:
    """A message when this Slicer is older than :data:`MINIMUM_SLICER`, else None."""
    if (major, minor) >= MINIMUM_SLICER:
        return None
    need = ".".join(map(str, MINIMUM_SLICER))
    return f"SemiSeg needs 3D Slicer {need} or later; this is {major}.{minor}. Please install a newer Slicer."


def ensure_core_importable() -> None:
    """Make ``import semiseg`` work: installed or built extensions carry it; a checkout has ``SemiSegCore/``."""
    if importlib.util.find_spec("semiseg") is not None:
        return
    core = MODULE_DIR.parent / "SemiSegCore"
    if (core / "semiseg" / "__init__.py").exists():
        sys.path.insert(0, str(core))
        return
    raise ModuleNotFoundError(f"the semiseg core package is neither installed nor at {core}")


def missing_packages(requirements: list[str] | None = None) -> list[str]:
    """Requirements (default: torch, torchvision and requirements.txt) not installed at an acceptable version."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    missing = []
    lines = TORCH_REQUIREMENTS + read_requirements() if requirements is None else requirements
    for line in lines:
        req = Requirement(line)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            missing.append(line)
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def ensure_dependencies(ask: bool = True, requirements: list[str] | None = None, confirm=None, pip_install=None
                        ) -> list[str]:
    """Install what is missing (asking first when ``ask``); returns what was installed, [] when nothing was
    missing. Raises RuntimeError when the person declines or the install leaves something missing.

    ``confirm(text) -> bool`` and ``pip_install(requirements)`` default to Slicer's dialog and pip."""
    ensure_core_importable()
    missing = missing_packages(requirements)
    if not missing:
        return []
    torch = [r for r in missing if _name(r) in ("torch", "torchvision")]
    others = [r for r in missing if r not in torch]
    if torch and _install_torch_with_pytorchutils(ask):
        torch = missing_packages(torch)  # what PyTorchUtils left (torchvision, when torch was already there)
    todo = torch + others
    if todo:
        _pip_ensure(todo, ask, confirm, pip_install)
    still = missing_packages(missing)
    if still:
        raise RuntimeError("SemiSeg could not install " + ", ".join(still) + "; install them from Slicer's Python "
                           "console with slicer.util.pip_install(...) and try again")
    return missing


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower()


def _install_torch_with_pytorchutils(ask: bool) -> bool:
    """torch through the PyTorch extension (a CUDA build that fits the driver); False when it is not installed."""
    try:
        import PyTorchUtils  # the PyTorch extension's module
    except ImportError:
        return False
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask,
                                                          torchVersionRequirement=TORCH_REQUIREMENTS[0][5:])
    if torch is None:
        raise RuntimeError("PyTorch was not installed; SemiSeg needs it for this action")
    return True


def _pip_ensure(requirements: list[str], ask: bool, confirm=None, pip_install=None) -> None:
    """``pip_ensure`` of newer Slicers (it asks and shows progress); else ask, then ``slicer.util.pip_install``."""
    if confirm is None and pip_install is None:
        for name in ("slicer.pydeps", "slicer.packaging"):
            try:
                module = importlib.import_module(name)
                pip_ensure = module.pip_ensure
            except (ImportError, AttributeError):
                continue
            from packaging.requirements import Requirement

            pip_ensure([Requirement(r) for r in requirements], requester="SemiSeg", prompt_install=ask)
            return
    text = ("SemiSeg needs these Python packages for this action:\n\n" + "\n".join(requirements)
            + "\n\nInstall them now? This can take several minutes.")
    if confirm is None:
        import slicer

        def confirm(message):
            return slicer.util.confirmOkCancelDisplay(message, "SemiSeg: install Python packages")
    if ask and not confirm(text):
        raise RuntimeError("SemiSeg needs " + ", ".join(requirements) + " for this action; the installation was "
                           "declined")
    if pip_install is None:
        import slicer

        pip_install = slicer.util.pip_install
    pip_install(requirements)
    importlib.invalidate_caches()
