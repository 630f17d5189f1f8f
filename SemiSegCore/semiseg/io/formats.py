"""Read and write images with their geometry (label maps: their values, paths and provenance are in :mod:`.labels`).

Supported: NIfTI (.nii, .nii.gz), NRRD (.nrrd) and Slicer segmentations (.seg.nrrd), the UA-MT / SSL4MIS HDF5
layout (.h5 with ``image`` and ``label`` datasets), and 2D PNG/JPEG/TIFF/BMP.
Writes are atomic (temporary file, then rename) and never replace an existing file unless asked to.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .image import Image, ImageError

IMAGE_2D_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXTS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".h5")
ALL_EXTS = VOLUME_EXTS + IMAGE_2D_EXTS

# NRRD stores LPS (or other) spaces; Slicer and nibabel work in RAS.
_SPACE_TO_RAS = {
    "left-posterior-superior": np.diag([-1.0, -1.0, 1.0]),
    "right-anterior-superior": np.eye(3),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0]),
}


def _ext(path: str | Path) -> str:
    name = str(path).lower()
    for ext in ALL_EXTS:
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def is_image_file(path: str | Path) -> bool:
    return _ext(path) in ALL_EXTS and not Path(path).name.startswith(".")


def read_image(path: str | Path, h5_key: str = "image") -> Image:
    """Read an intensity image. Colour 2D images keep 3 channels; volumes come back as float32.
    NaN or infinite values are an error."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    ext = _ext(path)
    if ext not in ALL_EXTS:
        raise ImageError(f"{path}: unsupported file type '{ext}' (supported: {', '.join(ALL_EXTS)})")
    try:
        if ext in (".nii", ".nii.gz"):
            img = _read_nifti(path)
        elif ext in (".nrrd", ".seg.nrrd"):
            img = _read_nrrd(path)
        elif ext == ".h5":
            img = _read_h5(path, h5_key)
        else:
            img = _read_2d(path)
    except ImageError:
        raise
    except Exception as exc:  # corrupt or truncated files surface here from the format libraries
        raise ImageError(f"{path}: cannot be read as {ext} ({type(exc).__name__}: {exc})") from exc
    if np.issubdtype(img.array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(img.array)))
        if bad:
            raise ImageError(f"{path}: {bad} of {img.array.size} values are NaN or infinite")
    return img


def _read_nifti(path: Path) -> Image:
    import nibabel as nib

    nii = nib.load(str(path))
    arr = np.asarray(nii.get_fdata(dtype=np.float32))
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ImageError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    return Image.from_affine(arr, nii.affine, path=str(path))


def _read_nrrd(path: Path) -> Image:
    import nrrd

    arr, header = nrrd.read(str(path))
    arr = np.asarray(arr)
    space = header.get("space", "right-anterior-superior")
    to_ras = _SPACE_TO_RAS.get(space)
    if to_ras is None:
        raise ImageError(f"{path}: NRRD space '{space}' is not supported")
    dirs = header.get("space directions")
    if dirs is None:
        raise ImageError(f"{path}: NRRD has no 'space directions'")
    dirs = [d for d in dirs if d is not None and not np.any(np.isnan(np.asarray(d, dtype=float)))]
    if arr.ndim == 4:  # a segmentation with overlapping layers: axis 0 is the layer
        if str(path).lower().endswith(".seg.nrrd"):
            arr = _flatten_seg_layers(arr, header, path)
        else:
            raise ImageError(f"{path}: 4D NRRD is not supported")
    m = to_ras @ np.asarray(dirs, dtype=float).T  # columns are axis vectors
    origin = to_ras @ np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = m
    affine[:3, 3] = origin
    img = Image.from_affine(arr.astype(np.float32), affine, path=str(path))
    if str(path).lower().endswith(".seg.nrrd"):
        img.meta["segments"] = _seg_segments(header)
    return img


def _seg_segments(header: dict) -> list[dict]:
    segs = []
    i = 0
    while f"Segment{i}_ID" in header:
        segs.append({"id": header[f"Segment{i}_ID"], "name": header.get(f"Segment{i}_Name", f"Segment_{i}"),
                     "label": int(header.get(f"Segment{i}_LabelValue", i + 1)),
                     "layer": int(header.get(f"Segment{i}_Layer", 0))})
        i += 1
    return segs


def _flatten_seg_layers(arr: np.ndarray, header: dict, path: Path) -> np.ndarray:
    segs = _seg_segments(header)
    if not segs:
        raise ImageError(f"{path}: layered segmentation without segment metadata")
    out = np.zeros(arr.shape[1:], dtype=np.int32)
    for k, s in enumerate(segs, start=1):
        out[arr[s["layer"]] == s["label"]] = k
    return out


def _read_h5(path: Path, key: str) -> Image:
    import h5py

    with h5py.File(str(path), "r") as f:
        if key not in f:
            raise ImageError(f"{path}: HDF5 file has no '{key}' dataset (has: {', '.join(f.keys())})")
        arr = np.asarray(f[key][()])
        spacing = tuple(f[key].attrs.get("spacing", (1.0,) * arr.ndim))
    return Image(arr.astype(np.float32) if key == "image" else arr, spacing, path=str(path))


def _read_2d(path: Path) -> Image:
    from PIL import Image as PILImage

    with PILImage.open(str(path)) as pil:
        pil.load()
        if pil.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
            arr = np.asarray(pil.convert("RGB"))
            return Image(arr, (1.0, 1.0), channels=3, path=str(path))
        arr = np.asarray(pil.convert("L") if pil.mode not in ("I", "I;16", "F") else pil)
    return Image(arr, (1.0, 1.0), path=str(path))


def _atomic_target(path: Path, overwrite: bool) -> tuple[Path, Path]:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; refusing to overwrite it")
    from ..utils import make_temp

    return path, make_temp(path, _ext(path))


def write_image(img: Image, path: str | Path, overwrite: bool = False, segment_names: list[str] | None = None) -> Path:
    """Write atomically in the format named by the extension, keeping the geometry."""
    path, tmp = _atomic_target(Path(path), overwrite)
    ext = _ext(path)
    try:
        if ext in (".nii", ".nii.gz"):
            import nibabel as nib

            arr = img.array
            nib.save(nib.Nifti1Image(arr, img.affine), str(tmp))
        elif ext in (".nrrd", ".seg.nrrd"):
            _write_nrrd(img, tmp, seg=ext == ".seg.nrrd", segment_names=segment_names)
        elif ext == ".h5":
            import h5py

            with h5py.File(str(tmp), "w") as f:
                f.create_dataset("image" if not np.issubdtype(img.array.dtype, np.integer) else "label",
                                 data=img.array, compression="gzip")
        elif ext in IMAGE_2D_EXTS:
            from PIL import Image as PILImage

            arr = img.array
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            PILImage.fromarray(arr).save(str(tmp), format="PNG" if ext == ".png" else None)
        else:
            raise ImageError(f"{path}: unsupported output type '{ext}'")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_nrrd(img: Image, path: Path, seg: bool, segment_names: list[str] | None) -> None:
    import nrrd

    if img.spatial_ndim != 3:
        raise ImageError(f"{path}: NRRD output needs a 3D image")
    to_lps = _SPACE_TO_RAS["left-posterior-superior"]  # its own inverse
    m = img.direction * np.asarray(img.spacing)[None, :]
    header = {"space": "left-posterior-superior", "space directions": (to_lps @ m).T,
              "space origin": to_lps @ np.asarray(img.origin), "kinds": ["domain"] * 3,
              "encoding": "gzip"}
    if seg:
        labels = [int(v) for v in np.unique(img.array) if v != 0]
        names = segment_names or []
        for i, v in enumerate(labels):
            name = names[v - 1] if v - 1 < len(names) else f"Segment_{v}"
            header.update({f"Segment{i}_ID": f"Segment_{v}", f"Segment{i}_Name": name, f"Segment{i}_LabelValue": v,
                           f"Segment{i}_Layer": 0})
    nrrd.write(str(path), np.ascontiguousarray(img.array), header)
