"""Label maps on disk: where a case's label goes, how its values are stored, and the provenance beside it.

Every writer of label maps goes through here (``semiseg predict``, ``semiseg pseudolabel``, knowledge mining, the
Slicer review queue), so a label file looks the same whoever wrote it:

- path: ``<case>.png`` for a 2D picture, ``<case>.seg.nrrd`` for an NRRD volume, ``<case>.nii.gz`` otherwise
  (:func:`label_path`);
- values: a 2D mask holding only 0 and 1 is stored 0/255 in its picture, so that it can be viewed; :func:`read_label`
  maps anything above 127 back to 1, as it reads the 0/255 JPEG masks of Kvasir-SEG. Everything else keeps its label
  values;
- writes are atomic (temporary file, then rename) and never replace a file unless asked to (:func:`write_image`);
- provenance: ``<case>.json`` beside the label, ``{"source": <who made it: sam, model, ...>, "mask": <label file name,
  or null when no mask was kept>, ...}``. Files of older versions named the source ``kind``; readers accept both;
- folders of pseudo-labels are called ``pseudo_labels/`` (older runs: ``pseudolabels/``, still used where present).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..utils import atomic_write_text
from .formats import IMAGE_2D_EXTS, _ext, read_image, write_image
from .image import Image, ImageError, case_id_from_path

PSEUDO_LABEL_DIR = "pseudo_labels"
_OLD_PSEUDO_LABEL_DIRS = ("pseudolabels",)


def label_path(folder: str | Path, case_id: str, image_path: str | Path | None, ndim: int | None = None) -> Path:
    """Where the label map of ``case_id`` goes in ``folder``, from its image's file name (or, for an image held in
    memory only, ``ndim``): PNG for 2D pictures, a Slicer segmentation beside NRRD volumes, NIfTI otherwise."""
    name = str(image_path or "").lower()
    if name.endswith(IMAGE_2D_EXTS) or ndim == 2:
        ext = ".png"
    elif name.endswith(".nrrd"):
        ext = ".seg.nrrd"
    else:
        ext = ".nii.gz"
    return Path(folder) / f"{case_id}{ext}"


def pseudo_label_dir(parent: str | Path) -> Path:
    """``<parent>/pseudo_labels``, or the ``pseudolabels/`` an older run or dataset already has (and the new name
    does not), so that a resumed run keeps writing, and reading, where it started."""
    parent = Path(parent)
    new = parent / PSEUDO_LABEL_DIR
    if not new.exists():
        for old in _OLD_PSEUDO_LABEL_DIRS:
            if (parent / old).is_dir():
                return parent / old
    return new


def read_label(path: str | Path, h5_key: str = "label") -> Image:
    """Read a label map as integers.

    2D masks saved as 8-bit pictures (0/255, often JPEG with compression noise) are binarised at > 127 when their
    maximum exceeds 127; otherwise values are kept. Non-integer values in a volume are an error.
    """
    img = read_image(path, h5_key=h5_key)
    arr = img.array
    if img.channels > 1:  # an RGB mask: any channel above half
        arr = arr.max(axis=-1)
        img = Image(arr, img.spacing, img.origin, img.direction, path=img.path)
    if _ext(path) in IMAGE_2D_EXTS and arr.max() > 127:
        arr = (arr > 127).astype(np.uint8)
    else:
        rounded = np.rint(arr)
        if not np.allclose(arr, rounded, atol=1e-3):
            raise ImageError(f"{path}: label map has non-integer values (e.g. {arr[np.abs(arr - rounded) > 1e-3][:3]})")
        if rounded.min() < 0:
            raise ImageError(f"{path}: label map has negative values (min {rounded.min():g})")
        arr = rounded.astype(np.uint8 if rounded.max() < 256 else np.int32)
    img.array = arr
    return img


def _stored(label: Image, path: Path) -> Image:
    """The label as its file holds it: a binary 2D mask in a picture as 0/255, anything else unchanged."""
    if label.spatial_ndim != 2 or _ext(path) not in IMAGE_2D_EXTS:
        return label
    arr = np.asarray(label.array)
    if arr.size and arr.min() >= 0 and arr.max() <= 1:
        return label.with_array((arr > 0).astype(np.uint8) * 255)
    if arr.size and arr.max() > 127:
        raise ImageError(f"{path}: a 2D label map with values up to {arr.max():g} cannot be stored in a picture "
                         f"(values above 127 read back as a binary mask)")
    return label


def write_label(label: Image, path: str | Path, overwrite: bool = False, provenance: dict | None = None) -> Path:
    """Write a label map by the rules above; with ``provenance``, its sidecar first, so that the label file, written
    last, marks a finished case. An existing label is never replaced unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; refusing to overwrite it")
    if provenance is not None:
        write_sidecar(path, provenance)
    return write_image(_stored(label, path), path, overwrite=overwrite)


def sidecar_path(label_path: str | Path) -> Path:
    """``<case>.json`` beside ``<case>.png`` / ``<case>.nii.gz`` / ``<case>.seg.nrrd``."""
    return Path(label_path).with_name(f"{case_id_from_path(label_path)}.json")


def _with_source(record: dict) -> dict:
    record = dict(record)
    if "source" not in record and "kind" in record:  # the name older versions used
        record["source"] = record.pop("kind")
    return record


def write_sidecar(label_path: str | Path, provenance: dict, has_mask: bool = True) -> Path:
    """Write the provenance of the label at ``label_path`` (``has_mask`` False: a case whose mask was not kept)."""
    record = _with_source(provenance)
    if not isinstance(record.get("source"), str) or not record["source"]:
        raise ValueError(f"{sidecar_path(label_path)}: provenance needs a 'source' (who made the label), got keys "
                         f"{sorted(record)}")
    record["mask"] = Path(label_path).name if has_mask else None
    return atomic_write_text(sidecar_path(label_path), json.dumps(record, indent=1))


def read_sidecar(label_path: str | Path) -> dict:
    """The provenance beside a label file (``{}`` when there is none), with ``source`` also for files that named it
    ``kind``."""
    path = sidecar_path(label_path)
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ImageError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise ImageError(f"{path}: expected a JSON object with the label's provenance")
    return _with_source(record)
