"""Cases, dataset discovery, manifests (labelled / unlabelled / val / test) and validated loading."""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..io import Image, ImageError, case_id_from_path, is_image_file, read_image, read_label
from .intensity import normalise


@dataclass
class Case:
    id: str
    image: str
    label: str | None = None
    """The label used for training; None for an unlabelled case."""
    reference: str | None = None
    """A reference kept for evaluation only (e.g. the hidden mask of an 'unlabelled' case). Training never reads it."""
    h5: bool = False


@dataclass
class Manifest:
    labelled: list[Case] = field(default_factory=list)
    unlabelled: list[Case] = field(default_factory=list)
    val: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({k: [asdict(c) for c in getattr(self, k)] for k in ("labelled", "unlabelled", "val", "test")},
                          indent=1)

    @staticmethod
    def from_json(text: str) -> "Manifest":
        d = json.loads(text)
        return Manifest(**{k: [Case(**c) for c in d.get(k, [])] for k in ("labelled", "unlabelled", "val", "test")})

    def summary(self) -> str:
        return (f"{len(self.labelled)} labelled, {len(self.unlabelled)} unlabelled, {len(self.val)} validation, "
                f"{len(self.test)} test")


def index_by_id(folder: str | Path) -> dict[str, Path]:
    """Case id -> file for every image file in a folder (nnU-Net's ``_0000`` channel suffix dropped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_image_file(p):
            cid = case_id_from_path(p)
            if cid.endswith("_0000"):  # nnU-Net channel suffix
                cid = cid[:-5]
            out[cid] = p
    return out


def detect_layout(root: Path) -> str:
    if (root / "dataset.json").exists() or (root / "imagesTr").is_dir():
        return "msd"
    if (root / "images").is_dir():
        return "folders"
    if root.is_dir() and (any(root.glob("*.h5")) or any(root.glob("*/*.h5"))):
        return "h5"
    if root.is_file():
        return "file"
    if root.is_dir() and any(is_image_file(p) for p in root.iterdir()):
        return "images"
    raise ImageError(f"{root}: not a dataset (expected dataset.json or imagesTr/, images/ + masks/, .h5 files, "
                     f"or image files)")


def discover_cases(root: str | Path, layout: str = "auto") -> list[Case]:
    """All cases of a dataset folder, labelled where a label exists."""
    root = Path(root)
    if not root.exists():
        raise ImageError(f"{root}: dataset path not found")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "msd":
        return _msd_cases(root)
    if layout == "folders":
        mask_dir = next((root / d for d in ("masks", "labels", "labelsTr") if (root / d).is_dir()), None)
        images = index_by_id(root / "images")
        masks = index_by_id(mask_dir) if mask_dir else {}
        return [Case(cid, str(p), str(masks[cid]) if cid in masks else None) for cid, p in images.items()]
    if layout == "h5":
        files = sorted(root.glob("*.h5")) or sorted(root.glob("*/*.h5"))
        return [Case(p.stem if p.parent == root else p.parent.name, str(p), str(p), h5=True) for p in files]
    if layout == "file":
        return [Case(case_id_from_path(root), str(root))]
    if layout == "images":
        return [Case(cid, str(p)) for cid, p in index_by_id(root).items()]
    raise ImageError(f"{root}: unknown dataset layout '{layout}'")


def _msd_cases(root: Path) -> list[Case]:
    ds = root / "dataset.json"
    cases = []
    if ds.exists():
        try:
            meta = json.loads(ds.read_text())
        except json.JSONDecodeError as exc:
            raise ImageError(f"{ds}: not valid JSON ({exc})") from exc
        for entry in meta.get("training", []):
            img = root / entry["image"]
            lab = root / entry["label"] if entry.get("label") else None
            cases.append(Case(case_id_from_path(img), str(img), str(lab) if lab else None))
        for entry in meta.get("test", []):
            img = root / (entry if isinstance(entry, str) else entry["image"])
            cases.append(Case(case_id_from_path(img), str(img)))
        missing = [p for c in cases for p in (c.image, c.label) if p and not Path(p).is_file()]
        if missing:
            raise ImageError(f"{ds}: {len(missing)} listed file(s) not found, e.g. {missing[0]}")
    if not cases:
        images = index_by_id(root / "imagesTr")
        labels = index_by_id(root / "labelsTr") if (root / "labelsTr").is_dir() else {}
        cases = [Case(cid, str(p), str(labels[cid]) if cid in labels else None) for cid, p in images.items()]
    return cases


def dataset_labels(root: str | Path) -> dict[int, str]:
    """Label value -> name from dataset.json, when there is one."""
    ds = Path(root) / "dataset.json"
    if ds.exists():
        labels = json.loads(ds.read_text()).get("labels", {})
        out = {}
        for k, v in labels.items():
            if str(k).isdigit():
                out[int(k)] = str(v)
            elif isinstance(v, int):
                out[int(v)] = str(k)
        return out
    return {}


def _count(x: float | None, n: int, default: int) -> int:
    if x is None:
        return default
    if x < 0:
        raise ValueError(f"a case count or fraction cannot be negative ({x})")
    return int(round(x * n)) if x < 1 else min(int(x), n)


def _group_key(case_id: str, pattern: str | None) -> str:
    if not pattern:
        return case_id
    m = re.match(pattern, case_id)
    return m.group(1) if m and m.groups() else (m.group(0) if m else case_id)


def make_manifest(cases: list[Case], labelled: float, val: float = 0.0, test: float = 0.0,
                  unlabelled: float | None = None, seed: int = 0, max_cases: int | None = None,
                  labelled_ids: list[str] | None = None, group_pattern: str | None = None) -> Manifest:
    """Split cases reproducibly. Validation and test come first (from all labelled cases) so that they stay the
    same whatever the labelled count; labelled cases are then drawn from the rest, the others become unlabelled
    (their labels kept as hidden references only). Cases named in ``labelled_ids`` (e.g. labels a person accepted
    or corrected) are always labelled, on top of the ``labelled`` count, and never used for validation.

    ``group_pattern`` (a regex whose first group, or whole match, names the group, e.g. ``^(patient\\d+)`` for
    ACDC's ED/ES frames) keeps the cases of one group (patient) in one set; counts and fractions then count groups.
    """
    rng = random.Random(seed)
    forced_ids = set(labelled_ids or [])
    missing = forced_ids - {c.id for c in cases if c.label}
    if missing:
        raise ImageError(f"data.labelled_ids names cases without a label file: {', '.join(sorted(missing)[:5])}")
    forced = sorted((c for c in cases if c.id in forced_ids), key=lambda c: c.id)
    groups: dict[str, list[Case]] = {}
    for c in sorted(cases, key=lambda c: c.id):
        groups.setdefault(_group_key(c.id, group_pattern), []).append(c)
    keys = sorted(groups)
    rng.shuffle(keys)  # shuffle everything first, so naming a case moves no other case between the sets
    units = [[c for c in groups[k] if c.id not in forced_ids] for k in keys]
    units = [u for u in units if u]
    if max_cases:
        units = units[:max_cases]
    with_label = [u for u in units if all(c.label for c in u)]
    without = [c for u in units if not all(c.label for c in u) for c in u]
    n = len(with_label)
    n_val, n_test = _count(val, n, 0), _count(test, n, 0)
    val_units, test_units = with_label[:n_val], with_label[n_val:n_val + n_test]
    pool = with_label[n_val + n_test:]
    n_lab = _count(labelled, len(pool), 0)
    if n_lab == 0 and labelled > 0:
        n_lab = 1
    flat = lambda us: [c for u in us for c in u]  # noqa: E731
    rest = [Case(c.id, c.image, None, reference=c.label, h5=c.h5) for c in flat(pool[n_lab:])]
    unl = rest + [Case(c.id, c.image, None, reference=c.label, h5=c.h5) for c in without]
    n_unl = _count(unlabelled, len(unl), len(unl))
    return Manifest(forced + flat(pool[:n_lab]), unl[:n_unl], flat(val_units), flat(test_units))


def to_channels_first(img: Image) -> np.ndarray:
    arr = np.asarray(img.array, dtype=np.float32)
    return np.moveaxis(arr, -1, 0) if img.channels > 1 else arr[None]


@dataclass
class LoadedCase:
    id: str
    image: np.ndarray  # (C, *spatial) float32, normalised, on the working grid
    label: np.ndarray | None  # (*spatial) integer, on the working grid
    geometry: Image  # the source image's grid (its array is not kept), for writing and scoring results
    reference: np.ndarray | None = None
    """The label on the source grid, for scoring (the same array as ``label`` when no resampling happened)."""
    grid: Image | None = None
    """The working grid (``data.target_spacing``); the source grid when there is no resampling."""


def placeholder(shape) -> np.ndarray:
    """A zero-memory uint8 array of ``shape``: stands in for the voxels where only a grid's geometry is kept."""
    return np.broadcast_to(np.zeros((), dtype=np.uint8), tuple(int(s) for s in shape))


def grid_of(img: Image) -> Image:
    """The geometry of ``img`` with a zero-memory placeholder array (keeps shape, spacing, origin, direction)."""
    return Image(placeholder(img.array.shape), img.spacing, img.origin, img.direction, channels=img.channels,
                 path=img.path)


def check_label(label: Image, image: Image, num_classes: int) -> None:
    """Raise an ImageError naming the label file if it does not fit the image or the label set."""
    if label.spatial_shape != image.spatial_shape:
        raise ImageError(f"{label.path}: label shape {label.spatial_shape} does not match image {image.path} "
                         f"shape {image.spatial_shape}")
    if label.spatial_ndim == 3 and not str(label.path).endswith(".h5"):
        image.check_same_grid(label)
    values = np.unique(label.array)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise ImageError(f"{label.path}: unexpected label values {bad.tolist()[:5]} (expected 0..{num_classes - 1})")


def load_case(case: Case, intensity: str, num_classes: int, with_label: bool = True,
              label_path: str | None = None, target_spacing=None) -> LoadedCase:
    """Read, validate and normalise one case, resampled to ``target_spacing`` (mm; None keeps the source grid):
    the image linearly, the label by nearest neighbour. ``label_path`` overrides the case's label (e.g. a
    reference)."""
    from .resample import resample_image, resample_label, resampled_grid, working_shape

    img = read_image(case.image, h5_key="image")
    native = None
    path = label_path or (case.label if with_label else None)
    if path:
        lab = read_label(path, h5_key="label")
        check_label(lab, img, num_classes)
        native = lab.array.astype(np.int64)
    geometry = grid_of(img)
    shape = working_shape(img.spatial_shape, img.spacing, target_spacing)
    arr = resample_image(normalise(to_channels_first(img), intensity).astype(np.float32), shape)
    label = None if native is None else resample_label(native, shape)
    grid = geometry if shape == img.spatial_shape else resampled_grid(geometry, shape)
    return LoadedCase(case.id, arr, label, geometry, reference=native, grid=grid)
