"""The SAM engine: a real LA 2018 3D pseudo-label written as NIfTI on the input grid, empty-slice skipping, the
embedding cache, intensity handling and pseudo-labels from probability maps."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from semiseg.io import Image, read_image, read_label
from semiseg.metrics import dice_score
from semiseg.sam import (SamEngine, SegmentAnythingBackend, SliceEmbeddingCache, build_backend,
                         pseudolabel_from_mask, pseudolabel_from_probability, to_uint8)
from semiseg.sam.prompts import Prompt

from test_sam_backends import tiny_sam

DATA = Path(os.environ.get("SEMISEG_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
LA = DATA / "la2018"


def crop(img: Image, lo, hi) -> Image:
    """A sub-volume with its geometry (the origin moves to the first kept voxel)."""
    arr = img.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    origin = img.affine[:3, :3] @ np.asarray(lo, float) + img.affine[:3, 3]
    return Image(np.ascontiguousarray(arr), img.spacing, tuple(origin), img.direction, path=img.path)


@pytest.mark.skipif(not LA.is_dir(), reason=f"LA 2018 data not found at {LA}")
def test_la_volume_pseudolabel_nifti_on_input_grid(tmp_path):
    case = sorted((LA / "imagesTr").glob("*.nii.gz"))[0]
    img, ref = read_image(case), read_label(LA / "labelsTr" / case.name)
    ks = np.nonzero(ref.array.any(axis=(0, 1)))[0]
    mid = int(ks[len(ks) // 2])
    # five slices along axis 2: two empty ones (label cleared) around three labelled ones, cropped in-plane
    lo, hi = (20, 15, mid - 2), (img.spatial_shape[0] - 20, img.spatial_shape[1] - 15, mid + 3)
    vol, lab = crop(img, lo, hi), crop(ref, lo, hi)
    lab.array = lab.array.copy()
    lab.array[:, :, [0, 4]] = 0
    vol.path = str(case)
    engine = SamEngine(build_backend("litemedsam", device="cpu"))
    result = pseudolabel_from_mask(engine, vol, lab.array, axis=2, prompt_source=f"mask:{case.name}")
    assert engine.timing.embedded == 3 and engine.timing.decoded == 3  # empty slices cost nothing
    assert not result.label.array[:, :, [0, 4]].any()
    out = result.write(tmp_path, "la_case")
    assert out.name == "la_case.nii.gz"
    back = read_label(out)
    assert back.same_grid(vol) and np.allclose(back.affine, vol.affine)
    assert np.array_equal(back.array, result.label.array)
    dices = [dice_score(back.array[:, :, k], lab.array[:, :, k]) for k in (1, 2, 3)]
    # measured on this crop: 0.928, 0.923, 0.921 (MR, boxes from the reference)
    assert min(dices) > 0.85, dices
    prov = json.loads((tmp_path / "la_case.json").read_text())
    assert prov["backend"] == "litemedsam" and prov["checkpoint_sha256"].startswith("79d8c9dc")
    assert prov["axis"] == 2 and prov["mask"] == "la_case.nii.gz" and prov["image"] == str(case)
    assert [s["index"] for s in prov["slices"]] == [1, 2, 3]
    assert all(0 < p["iou"] <= 1.2 and len(p["box"]) == 4 for s in prov["slices"] for p in s["prompts"])
    with pytest.raises(FileExistsError):
        result.write(tmp_path, "la_case")


def test_cache_hits_lru_bound_and_identical_slices():
    backend = SegmentAnythingBackend(model=tiny_sam(), device="cpu")
    engine = SamEngine(backend, batch_size=2, cache_size=3)
    rng = np.random.default_rng(0)
    vol = Image(rng.normal(size=(40, 30, 6)).astype(np.float32), (1.0, 1.0, 2.0))
    prompts = {k: [Prompt(box=(5, 5, 20, 25))] for k in (0, 2, 3)}
    first = engine.segment(vol, prompts)
    assert engine.timing.embedded == 3 and engine.cache.misses == 3 and engine.cache.hits == 0
    second = engine.segment(vol, prompts)
    assert engine.timing.embedded == 3 and engine.cache.hits == 3  # nothing re-encoded
    assert np.array_equal(first.label.array, second.label.array)
    engine.segment(vol, {5: [Prompt(box=(1, 1, 9, 9))]})  # a fourth slice pushes out the least recently used
    assert len(engine.cache) == 3 and engine.timing.embedded == 4
    engine.segment(vol, {0: [Prompt(box=(5, 5, 20, 25))]})
    assert engine.timing.embedded == 5  # slice 0 was evicted
    # identical slices in one embedding call are encoded once, even without a cache
    rgb = np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    fresh = SamEngine(backend, cache_size=0)
    embs = fresh.embed_slices([rgb, rgb.copy(), rgb, rgb])
    assert fresh.timing.embedded == 1 and len(fresh.cache) == 0 and all(e is embs[0] for e in embs)
    cache = SliceEmbeddingCache(1)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") is None and cache.get("b") == 2 and (cache.hits, cache.misses) == (1, 1)


def test_embedding_cache_on_disk_is_shared_between_caches(tmp_path):
    """With a directory, a put embedding survives clearing memory and is found by another cache (another run)
    reading the same folder, bit for bit; without one, nothing is written."""
    import torch

    from semiseg.sam.backends import Embedding

    batch = torch.randn(16, 8, 4, 4)
    emb = Embedding(batch[3:4], (30, 40), (24, 32))  # one slice of a batch, as the encoder returns it
    cache = SliceEmbeddingCache(4, directory=tmp_path / "emb")
    cache.put("backend:slice", emb)
    (saved,) = (tmp_path / "emb").iterdir()
    assert saved.stat().st_size < 2 * emb.features.numel() * 4 + 2000  # the slice only, not the batch it came from
    cache.clear()
    for reader in (cache, SliceEmbeddingCache(4, directory=tmp_path / "emb")):
        got = reader.get("backend:slice")
        assert torch.equal(got.features, emb.features)
        assert (got.original_size, got.resized_size) == ((30, 40), (24, 32))
    assert cache.get("backend:other") is None and len(list((tmp_path / "emb").iterdir())) == 1
    SliceEmbeddingCache(4).put("x", emb)
    assert len(list((tmp_path / "emb").iterdir())) == 1


def test_overlaps_go_to_the_higher_score_and_errors():
    backend = SegmentAnythingBackend(model=tiny_sam(), device="cpu")
    engine = SamEngine(backend)
    img = Image(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8), (1.0, 1.0), channels=3)
    prompts = [Prompt(box=(0, 0, 63, 63), label=1), Prompt(box=(0, 0, 63, 63), label=2)]
    res = engine.segment(img, prompts)
    masks, scores = backend.decode(backend.embed([img.array])[0], prompts)
    winner = 2 - int(np.argmax(scores[::-1]))  # the higher score wins; on a tie, the later prompt (painted last)
    both = masks[0] & masks[1]
    assert np.all(res.label.array[both] == winner)
    assert res.label.array.shape == (64, 64) and res.provenance["axis"] is None
    assert np.isclose(res.score, scores.mean(), atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        engine.segment(img, {3: prompts})
    vol = Image(np.zeros((8, 8, 4), np.float32), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="axis"):
        engine.segment(vol, {}, axis=3)
    empty = engine.segment(vol, {})
    assert not empty.label.array.any() and empty.score == 0.0 and empty.provenance["slices"] == []


def test_intensity_handling():
    vol = Image(np.linspace(-1000, 1000, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4), (1.0, 1.0, 1.0))
    w = to_uint8(vol, "window:40,400")  # CT soft-tissue window: -160..240 HU
    assert w.dtype == np.uint8 and w.min() == 0 and w.max() == 255
    assert w[vol.array <= -160].max() == 0 and w[vol.array >= 240].min() == 255
    mm = to_uint8(vol, "minmax")
    assert mm.min() == 0 and mm.max() == 255 and mm.flat[0] == 0
    p = to_uint8(vol, "percentile:10,90")
    lo, hi = np.percentile(vol.array, [10, 90])
    assert np.all(p[vol.array <= lo] == 0) and np.all(p[vol.array >= hi] == 255)
    assert np.array_equal(to_uint8(vol), to_uint8(vol, "percentile:0.5,99.5"))
    rgb = Image(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), (1.0, 1.0), channels=3)
    assert np.array_equal(to_uint8(rgb), rgb.array)  # RGB passes through
    with pytest.raises(ValueError, match="not understood"):
        to_uint8(vol, "window:40")
    with pytest.raises(ValueError, match="not understood"):
        to_uint8(vol, "gamma")


def test_pseudolabel_from_probability_2d_and_3d():
    backend = SegmentAnythingBackend(model=tiny_sam(), device="cpu")
    engine = SamEngine(backend)
    rng = np.random.default_rng(4)
    vol = Image(rng.normal(size=(48, 40, 5)).astype(np.float32), (0.5, 0.5, 1.0), origin=(3.0, 4.0, 5.0))
    prob = np.zeros((3, 48, 40, 5), np.float32)
    prob[0] = 1
    prob[1, 10:30, 8:20, 1:3] = 0.97
    prob[2, 30:40, 25:35, 2] = 0.8
    prob[0] -= prob[1] + prob[2]
    mask, score, prov = pseudolabel_from_probability(engine, vol, prob, axis=2, min_area=5)
    assert mask.shape == vol.spatial_shape and mask.dtype == np.uint8
    assert [s["index"] for s in prov["slices"]] == [1, 2] and engine.timing.embedded == 2
    assert [p["label"] for p in prov["slices"][1]["prompts"]] == [1, 2]
    # 5 px padding around cols 8..19, rows 10..29
    assert prov["slices"][0]["prompts"][0]["box"] == [3.0, 5.0, 24.0, 34.0]
    assert not mask[:, :, [0, 3, 4]].any()
    assert np.isclose(score, np.mean([p["iou"] for s in prov["slices"] for p in s["prompts"]]), atol=1e-3)
    # a 2D foreground map without a class axis
    img2 = Image(rng.integers(0, 255, (32, 32), dtype=np.uint8), (1.0, 1.0))
    fg = np.zeros((32, 32), np.float32)
    m2, s2, p2 = pseudolabel_from_probability(engine, img2, fg)
    assert not m2.any() and s2 == 0.0 and p2["slices"] == []
    fg[5:15, 5:15] = 0.99
    m2, s2, p2 = pseudolabel_from_probability(engine, img2, fg, n_pos=2)
    assert len(p2["slices"]) == 1 and p2["slices"][0]["prompts"][0]["point_labels"] == [1, 1]
    with pytest.raises(ValueError, match="does not match"):
        pseudolabel_from_probability(engine, img2, np.zeros((2, 16, 16)))
