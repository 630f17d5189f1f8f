import numpy as np
import pytest

from semiseg.io import Image, ImageError, read_image, read_label, write_image


def test_nifti_keeps_values_and_geometry(la_case, tmp_path):
    img = read_image(la_case[0])
    assert img.spacing == pytest.approx((0.625, 0.625, 0.625))
    assert img.array.dtype == np.float32 and img.spatial_ndim == 3
    # UA-MT stores z-scored values through the NIfTI scale slope: they must not come back as uint8 levels
    assert img.array.min() < 0 and not np.allclose(img.array, np.round(img.array))
    out = write_image(img, tmp_path / "copy.nii.gz")
    back = read_image(out)
    np.testing.assert_allclose(back.array, img.array, rtol=1e-6)
    np.testing.assert_allclose(back.affine, img.affine)


@pytest.mark.parametrize("ext", [".nrrd", ".seg.nrrd"])
def test_nrrd_round_trip_in_ras(la_case, tmp_path, ext):
    lab = read_label(la_case[1])
    oblique = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    lab = Image(lab.array, (0.7, 0.8, 1.5), (10.0, -20.0, 5.0), oblique, path="x")
    out = write_image(lab, tmp_path / f"lab{ext}", segment_names=["left_atrium"])
    back = read_label(out)
    np.testing.assert_array_equal(back.array, lab.array)
    np.testing.assert_allclose(back.affine, lab.affine, atol=1e-6)
    if ext == ".seg.nrrd":
        assert back.meta["segments"][0]["name"] == "left_atrium"


def test_multilabel_ct_segmentation_round_trip(data_dir, tmp_path):
    seg = read_label(data_dir / "totalseg-example" / "example_seg.nii.gz")
    ct = read_image(data_dir / "totalseg-example" / "example_ct_sm.nii.gz")
    assert ct.same_grid(seg)
    assert len(np.unique(seg.array)) > 10
    back = read_label(write_image(seg, tmp_path / "seg.seg.nrrd"))
    np.testing.assert_array_equal(back.array, seg.array)
    assert ct.same_grid(back)


def test_h5_ua_mt_layout(la_case, tmp_path):
    import h5py

    img, lab = read_image(la_case[0]), read_label(la_case[1])
    with h5py.File(tmp_path / "mri_norm2.h5", "w") as f:
        f["image"], f["label"] = img.array, lab.array
    np.testing.assert_allclose(read_image(tmp_path / "mri_norm2.h5").array, img.array)
    np.testing.assert_array_equal(read_label(tmp_path / "mri_norm2.h5").array, lab.array)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["volume"] = img.array
    with pytest.raises(ImageError, match=r"bad\.h5.*no 'image'"):
        read_image(tmp_path / "bad.h5")


def test_2d_rgb_image_and_jpeg_mask(kvasir_dir):
    name = sorted((kvasir_dir / "images").iterdir())[0].name
    img = read_image(kvasir_dir / "images" / name)
    assert img.channels == 3 and img.array.shape == (256, 256, 3) and img.spatial_shape == (256, 256)
    mask = read_label(kvasir_dir / "masks" / name)
    assert mask.array.shape == (256, 256) and set(np.unique(mask.array)) == {0, 1}


def test_errors_name_the_file(tmp_path, la_case):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(ImageError, match="broken.nii.gz"):
        read_image(bad)
    with pytest.raises(ImageError, match="missing.nii.gz.*not found"):
        read_image(tmp_path / "missing.nii.gz")
    img = read_image(la_case[0])
    with pytest.raises(ImageError, match="non-integer"):
        write_image(img, tmp_path / "float.nii.gz")
        read_label(tmp_path / "float.nii.gz")


def test_writes_never_overwrite_unless_asked(la_case, tmp_path):
    lab = read_label(la_case[1])
    target = write_image(lab, tmp_path / "lab.nii.gz")
    before = target.read_bytes()
    with pytest.raises(FileExistsError):
        write_image(lab.with_array(np.zeros_like(lab.array)), target)
    assert target.read_bytes() == before
    write_image(lab.with_array(np.zeros_like(lab.array)), target, overwrite=True)
    assert read_label(target).array.max() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["lab.nii.gz"]  # no temporary files left behind
