import numpy as np
import pytest

from semiseg.data import Case, PatchSampler, discover_cases, load_case, make_manifest
from semiseg.io import Image, ImageError, read_image, read_label, write_image


def test_discovers_real_datasets(la_dir, acdc_dir, kvasir_dir):
    la = discover_cases(la_dir)
    assert len(la) == 80 and all(c.label for c in la)
    assert len(discover_cases(acdc_dir)) == 160
    kv = discover_cases(kvasir_dir)
    assert len(kv) == 798 and kv[0].image.endswith(".jpg") and kv[0].label.endswith(".jpg")


def test_manifest_counts_fractions_and_hidden_references(la_dir):
    cases = discover_cases(la_dir)
    m = make_manifest(cases, labelled=8, val=16, seed=3)
    assert (len(m.labelled), len(m.val), len(m.unlabelled)) == (8, 16, 56)
    ids = [c.id for c in m.labelled + m.val + m.unlabelled]
    assert len(set(ids)) == 80
    assert all(c.label is None and c.reference for c in m.unlabelled)
    # validation does not depend on how many cases are labelled; the same seed gives the same split
    m16 = make_manifest(cases, labelled=16, val=16, seed=3)
    assert [c.id for c in m16.val] == [c.id for c in m.val]
    assert [c.id for c in m16.labelled[:8]] == [c.id for c in m.labelled]
    frac = make_manifest(cases, labelled=0.25, val=0.2, seed=3)
    assert (len(frac.val), len(frac.labelled)) == (16, 16)
    assert [c.id for c in make_manifest(cases, 8, 16, seed=4).val] != [c.id for c in m.val]


def test_load_case_normalises_and_validates(acdc_dir, tmp_path):
    case = discover_cases(acdc_dir)[0]
    lc = load_case(case, "minmax", num_classes=4)
    assert lc.image.shape[0] == 1 and lc.image.min() == 0 and lc.image.max() == pytest.approx(1)
    assert set(np.unique(lc.label)) <= {0, 1, 2, 3} and lc.label.max() == 3
    with pytest.raises(ImageError, match=r"patient.*unexpected label values \[2, 3\]"):
        load_case(case, "minmax", num_classes=2)


def test_shape_and_geometry_mismatch_are_errors(la_dir, tmp_path):
    cases = discover_cases(la_dir)
    other_shape = next(c for c in cases[1:] if read_image(c.image).spatial_shape != read_image(cases[0].image).spatial_shape)
    with pytest.raises(ImageError, match="label shape .* does not match"):
        load_case(Case("x", cases[0].image, other_shape.label), "none", 2)
    lab = read_label(cases[0].label)
    moved = Image(lab.array, lab.spacing, (5.0, 0.0, 0.0), lab.direction)
    path = write_image(moved, tmp_path / "moved.nii.gz")
    with pytest.raises(ImageError, match="moved.nii.gz: geometry"):
        load_case(Case("x", cases[0].image, str(path)), "none", 2)
    with pytest.raises(ImageError, match="nolabel.nii.gz: file not found"):
        load_case(Case("x", cases[0].image, str(tmp_path / "nolabel.nii.gz")), "none", 2)


def test_patch_sampler_3d_and_slices(la_dir):
    cases = [load_case(c, "none", 2) for c in discover_cases(la_dir)[:2]]
    s = PatchSampler(cases, (48, 48, 32), 3, seed=0, foreground_prob=1.0)
    b = s.next_batch()
    assert b.image.shape == (3, 1, 48, 48, 32) and b.label.shape == (3, 48, 48, 32)
    assert all(b.label[i].sum() > 0 for i in range(3))  # centred on foreground
    state = s.state_dict()
    again = s.next_batch()
    s.load_state_dict(state)
    assert np.array_equal(s.next_batch().image.numpy(), again.image.numpy())  # resumable sampling
    s2d = PatchSampler(cases, (64, 64), 4, seed=0, foreground_prob=1.0, slice_axis=-1)
    b2 = s2d.next_batch()
    assert b2.image.shape == (4, 1, 64, 64) and b2.label.shape == (4, 64, 64) and b2.label.sum() > 0


def test_rotation_augmentation_keeps_image_and_label_aligned(la_dir):
    """LA cases whose image is their own mask: after a random in-plane rotation (and zoom) the linearly rotated
    image thresholded at 0.5 must match the nearest-rotated label; a quarter turn equals numpy's rot90."""
    import dataclasses

    from semiseg.data.sampling import Augmentation, _rotate_and_centre

    real = [load_case(c, "none", 2) for c in discover_cases(la_dir)[:2]]
    cases = [dataclasses.replace(c, image=c.label[None].astype(np.float32)) for c in real]
    rotated = PatchSampler(cases, (48, 48, 32), 4, seed=3, foreground_prob=1.0,
                           augment=Augmentation(flips=False, scale=0.25, rotation=30))
    b = rotated.next_batch()
    assert b.image.shape == (4, 1, 48, 48, 32) and set(np.unique(b.label.numpy())) <= {0, 1}
    assert all(b.label[i].sum() > 0 for i in range(4))
    agree = ((b.image[:, 0] > 0.5).long() == b.label).float().mean().item()
    assert agree > 0.98, agree

    volume = np.arange(10 * 10 * 3, dtype=np.float32).reshape(1, 10, 10, 3)
    img, lab = _rotate_and_centre(volume, volume[0].astype(np.int64), (0, 1), 90.0, (6, 6, 3))
    expected = np.rot90(volume[0], 1, axes=(0, 1))[2:8, 2:8]
    assert np.allclose(img[0], expected, atol=1e-3) and np.array_equal(lab, expected)


def test_named_cases_are_always_labelled(la_dir):
    cases = discover_cases(la_dir)
    m = make_manifest(cases, labelled=2, val=10, seed=0)
    chosen = [m.val[0].id, m.unlabelled[0].id]
    forced = make_manifest(cases, labelled=2, val=10, seed=0, labelled_ids=chosen)
    assert {c.id for c in forced.labelled} >= set(chosen) and len(forced.labelled) == 4
    assert not set(chosen) & {c.id for c in forced.val + forced.unlabelled}
    with pytest.raises(ImageError, match="labelled_ids.*nonexistent"):
        make_manifest(cases, labelled=2, labelled_ids=["nonexistent"])


def test_group_pattern_keeps_a_patients_frames_together(acdc_dir):
    import re

    cases = discover_cases(acdc_dir)
    m = make_manifest(cases, labelled=7, val=10, seed=0, group_pattern=r"^(patient\d+)")
    patient = lambda cs: {re.match(r"^(patient\d+)", c.id).group(1) for c in cs}  # noqa: E731
    assert (len(m.labelled), len(m.val)) == (14, 20) and len(patient(m.labelled)) == 7
    assert not patient(m.labelled) & patient(m.val) and not patient(m.val) & patient(m.unlabelled)
    assert not patient(m.labelled) & patient(m.unlabelled)


def test_scale_and_intensity_augmentation_keep_image_and_label_aligned(kvasir_dir):
    """A case whose image is its own mask: after zooming, the linearly resized image thresholded at 0.5 must match
    the nearest-resized label, and intensity jitter must leave labels untouched."""
    import dataclasses

    from semiseg.data.sampling import Augmentation

    real = [load_case(c, "rgb", 2) for c in discover_cases(kvasir_dir)[:3]]
    cases = [dataclasses.replace(c, image=np.repeat(c.label[None].astype(np.float32), 3, axis=0)) for c in real]
    zoomed = PatchSampler(cases, (128, 128), 8, seed=1, augment=Augmentation(flips=True, scale=0.5))
    plain = PatchSampler(cases, (128, 128), 8, seed=1, augment=Augmentation(flips=False))
    b, p = zoomed.next_batch(), plain.next_batch()
    assert b.image.shape == (8, 3, 128, 128) and set(np.unique(b.label.numpy())) <= {0, 1}
    agree = ((b.image[:, 0] > 0.5).long() == b.label).float().mean().item()
    assert agree > 0.98, agree
    fg_share = lambda batch: batch.label.float().mean(dim=(1, 2)).numpy()  # noqa: E731
    assert not np.allclose(np.sort(fg_share(b)), np.sort(fg_share(p)))  # zoom changed how much of a case a patch sees

    jitter = PatchSampler(real, (128, 128), 4, seed=2, augment=Augmentation(flips=False, intensity=0.3))
    same = PatchSampler(real, (128, 128), 4, seed=2, augment=Augmentation(flips=False))
    j, s = jitter.next_batch(), same.next_batch()  # the first patch is cut at the same place; later ones differ
    assert bool((j.label[0] == s.label[0]).all()) and not bool((j.image[0] == s.image[0]).all())
    ratio = (j.image[0].mean(dim=(1, 2)) / s.image[0].mean(dim=(1, 2))).numpy()
    assert np.ptp(ratio) > 0.02  # channels scaled differently: the colour balance moves


def _changed_patches(cases, augment):
    """The first patch of each of 20 seeds with and without ``augment`` (cut at the same place, as the draws before
    the intensity changes are the same), as (augmented, plain) channel rows where the augmentation changed the
    patch; every pair keeps its label and each channel's mean and standard deviation."""
    import torch
    from semiseg.data.sampling import Augmentation

    changed = []
    for seed in range(20):
        v = PatchSampler(cases, (128, 128), 1, seed=seed, augment=augment).next_batch()
        p = PatchSampler(cases, (128, 128), 1, seed=seed, augment=Augmentation(flips=False)).next_batch()
        assert bool((v.label == p.label).all())
        a, b = v.image[0].flatten(1).double(), p.image[0].flatten(1).double()
        assert torch.allclose(a.mean(1), b.mean(1), atol=1e-3) and torch.allclose(a.std(1), b.std(1), rtol=1e-3)
        if not torch.equal(a, b):
            changed.append((a, b))
    return changed


def test_gamma_augmentation_bends_contrast_and_keeps_statistics(kvasir_dir):
    """A gamma-bent patch keeps its label, each channel's mean and standard deviation, and the order of its
    values, but is not an affine map of the plain patch (which brightness and contrast alone would give); about 30%
    of patches are bent."""
    import torch
    from semiseg.data.sampling import Augmentation

    real = [load_case(c, "rgb", 2) for c in discover_cases(kvasir_dir)[:3]]
    bent = _changed_patches(real, Augmentation(flips=False, gamma=1.0))
    for a, b in bent:
        for x, y in zip(a, b):
            fit = torch.linalg.lstsq(torch.stack([y, torch.ones_like(y)], 1), x[:, None]).solution[:, 0]
            assert (x - (fit[0] * y + fit[1])).abs().max() > 0.02 * y.std()  # not affine
            order = torch.argsort(y)
            assert (x[order].diff() >= -1e-4).all()  # monotone in the plain values
    assert 0 < len(bent) < 20, len(bent)  # some patches bent, not all (12 of these 20 seeds draw below 0.3)


def test_invert_augmentation_reverses_contrast_and_keeps_statistics(kvasir_dir):
    """An inverted patch keeps its label and each channel's mean and standard deviation, and its values are the
    plain patch's reflected about that mean (bright turns dark); about the asked-for share of patches is inverted."""
    import torch
    from semiseg.data.sampling import Augmentation

    real = [load_case(c, "rgb", 2) for c in discover_cases(kvasir_dir)[:3]]
    inverted = _changed_patches(real, Augmentation(flips=False, invert=0.5))
    for a, b in inverted:
        assert torch.allclose(a, 2 * b.mean(1, keepdim=True) - b, atol=1e-4)
    assert 3 < len(inverted) < 17, len(inverted)
