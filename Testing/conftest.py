"""Shared test fixtures: the real data beside the repository (../shared/data, or $SEMISEG_DATA)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SemiSegCore"))
DATA = Path(os.environ.get("SEMISEG_DATA", REPO.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"test data not found: {path} (expected ../shared/data beside the repository, "
                                f"or set SEMISEG_DATA)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA)


@pytest.fixture(scope="session")
def la_dir(data_dir) -> Path:
    return _require(data_dir / "la2018")


@pytest.fixture(scope="session")
def acdc_dir(data_dir) -> Path:
    return _require(data_dir / "acdc")


@pytest.fixture(scope="session")
def kvasir_dir(data_dir) -> Path:
    return _require(data_dir / "kvasir-seg")


@pytest.fixture(scope="session")
def la_case(la_dir):
    """(image path, label path) of the first LA case."""
    name = sorted((la_dir / "imagesTr").iterdir())[0].name
    return la_dir / "imagesTr" / name, la_dir / "labelsTr" / name


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO
