"""Label maps on disk (semiseg.io.labels): the path rule, 0/255 binary pictures read back as 0/1, geometry of
volumes, the provenance sidecar and the pseudo-label folder name."""
import json

import numpy as np
import pytest
from PIL import Image as PILImage

from semiseg.io import (Image, ImageError, label_path, pseudo_label_dir, read_label, read_sidecar, write_label,
                        write_sidecar)


def test_label_path_rule(tmp_path):
    assert label_path(tmp_path, "a", "/d/images/a.jpg") == tmp_path / "a.png"
    assert label_path(tmp_path, "a", "a.TIFF").name == "a.png"
    assert label_path(tmp_path, "a", "a.nrrd").name == "a.seg.nrrd"
    assert label_path(tmp_path, "a", "a.seg.nrrd").name == "a.seg.nrrd"
    assert label_path(tmp_path, "a", "a.nii.gz").name == "a.nii.gz"
    assert label_path(tmp_path, "a", "la/mri_norm2.h5").name == "a.nii.gz"
    assert label_path(tmp_path, "a", None, ndim=2).name == "a.png"  # an image held in memory only
    assert label_path(tmp_path, "a", None, ndim=3).name == "a.nii.gz"


def test_binary_2d_mask_is_stored_0_255_and_read_back_0_1(kvasir_dir, tmp_path):
    name = sorted((kvasir_dir / "masks").iterdir())[0].name
    mask = read_label(kvasir_dir / "masks" / name)  # a 0/255 JPEG read as 0/1, as data loading reads it
    assert set(np.unique(mask.array)) == {0, 1}
    out = write_label(mask, label_path(tmp_path, "k", name))
    with PILImage.open(out) as pil:
        stored = np.asarray(pil)
    assert set(np.unique(stored)) == {0, 255}
    np.testing.assert_array_equal(stored == 255, mask.array == 1)
    back = read_label(out)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask.array)


def test_multiclass_2d_keeps_indices_and_values_above_127_are_refused(tmp_path):
    arr = np.zeros((8, 9), np.uint8)
    arr[2:4, 2:4], arr[5:7, 5:8] = 1, 2
    out = write_label(Image(arr, (1.0, 1.0)), tmp_path / "m.png")
    with PILImage.open(out) as pil:
        assert set(np.unique(np.asarray(pil))) == {0, 1, 2}
    np.testing.assert_array_equal(read_label(out).array, arr)
    arr[0, 0] = 200
    with pytest.raises(ImageError, match=r"bad\.png.*above 127"):
        write_label(Image(arr, (1.0, 1.0)), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_volume_label_keeps_values_and_geometry(la_case, tmp_path):
    lab = read_label(la_case[1])
    oblique = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    lab = Image(lab.array, (0.7, 0.8, 1.5), (10.0, -20.0, 5.0), oblique)
    assert set(np.unique(lab.array)) == {0, 1}  # binary, but a volume: kept 0/1
    for image_name in ("case.nii.gz", "case.nrrd"):
        out = write_label(lab, label_path(tmp_path, "case", image_name))
        back = read_label(out)
        np.testing.assert_array_equal(back.array, lab.array)
        np.testing.assert_allclose(back.affine, lab.affine, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz", "case.seg.nrrd"]


def test_sidecar_schema(tmp_path):
    mask = Image(np.eye(6, dtype=np.uint8), (1.0, 1.0))
    out = write_label(mask, tmp_path / "c1.png", provenance={"source": "sam", "score": 0.75, "mask": "stale.png"})
    record = json.loads((tmp_path / "c1.json").read_text())
    assert record == {"source": "sam", "score": 0.75, "mask": "c1.png"}
    assert read_sidecar(out) == record
    # an existing label is refused before anything is written, the sidecar included
    with pytest.raises(FileExistsError, match="c1.png"):
        write_label(mask, out, provenance={"source": "model"})
    assert read_sidecar(out)["source"] == "sam"
    # a case whose mask was not kept still gets its record
    write_sidecar(tmp_path / "c2.nii.gz", {"source": "sam"}, has_mask=False)
    assert read_sidecar(tmp_path / "c2.nii.gz") == {"source": "sam", "mask": None}
    # files of older versions named the source "kind"
    (tmp_path / "old.json").write_text(json.dumps({"kind": "sam", "mask": "old.png"}))
    assert read_sidecar(tmp_path / "old.png") == {"source": "sam", "mask": "old.png"}
    assert read_sidecar(tmp_path / "none.png") == {}
    with pytest.raises(ValueError, match=r"c3\.json.*'source'"):
        write_sidecar(tmp_path / "c3.png", {"score": 1.0})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ImageError, match=r"broken\.json: not valid JSON"):
        read_sidecar(tmp_path / "broken.png")


def test_pseudo_label_folder_name(tmp_path):
    assert pseudo_label_dir(tmp_path) == tmp_path / "pseudo_labels"
    (tmp_path / "pseudolabels").mkdir()  # a run of an older version: it keeps its folder
    assert pseudo_label_dir(tmp_path) == tmp_path / "pseudolabels"
    (tmp_path / "pseudo_labels").mkdir()
    assert pseudo_label_dir(tmp_path) == tmp_path / "pseudo_labels"
