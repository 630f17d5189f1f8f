"""The review queue on a small real MSD folder: queue, accept, correct (keeping the old label), reject; and the
output folder of `semiseg pseudolabel` on Kvasir-SEG pictures, queued and accepted."""
import json

import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import DATA
from semiseg.cli import main
from semiseg.data import discover_cases
from semiseg.io import read_label
from SemiSegLib import nodes, review


def _load_case(scene, root, case_id):
    case = next(c for c in discover_cases(root) if c.id == case_id)
    volume = nodes.load_volume(scene, case.image, case_id)
    volume.SetAttribute("SemiSeg.CaseId", case_id)
    return volume


def test_accepted_pseudo_label_joins_the_labelled_set(scene, msd_dataset):
    root, cases = msd_dataset
    unlabelled = [c for c in discover_cases(root) if not c.label]
    assert len(unlabelled) == 1
    case_id = unlabelled[0].id
    reference = read_label(cases[2][1]).array

    volume = _load_case(scene, root, case_id)
    seg = nodes.new_segmentation(scene, volume, "pseudo")
    nodes.add_segment(seg, reference == 1, volume, "SAM", {nodes.TAG_SOURCE: "sam", nodes.TAG_SCORE: "0.81",
                                                           nodes.TAG_PROVENANCE: json.dumps({"backend": "x"})})
    queue = review.ReviewQueue(root)
    item = review.queue_segment(queue, volume, seg)
    assert item.status == "pending" and abs(item.score - 0.81) < 1e-9 and item.provenance["backend"] == "x"
    assert review.ReviewQueue(root).get(case_id).pseudo_label == item.pseudo_label  # persisted as JSON

    accepted = review.accept_segmentation(review.ReviewQueue(root), case_id, seg, volume)
    assert accepted.status == "accepted"
    now = {c.id: c for c in discover_cases(root)}
    assert now[case_id].label == accepted.label
    np.testing.assert_array_equal(read_label(accepted.label).array, reference)

    # a person corrects it: the new label is written, the accepted one is kept under superseded/
    edited = reference.copy()
    edited[:, :, : edited.shape[2] // 2] = 0
    seg2 = nodes.new_segmentation(scene, volume, "edited")
    nodes.add_segment(seg2, edited == 1, volume, "label 1")
    corrected = review.accept_segmentation(review.ReviewQueue(root), case_id, seg2, volume)
    assert corrected.status == "corrected"
    np.testing.assert_array_equal(read_label(corrected.label).array, edited)
    kept = list((root / "labelsTr" / "superseded").iterdir())
    assert len(kept) == 1
    np.testing.assert_array_equal(read_label(kept[0]).array, reference)


def test_queue_sorted_by_score_and_reject(scene, msd_dataset):
    root, cases = msd_dataset
    queue = review.ReviewQueue(root)
    grid = nodes.image_from_volume(_load_case(scene, root, discover_cases(root)[0].id))
    for n, c in enumerate(discover_cases(root)):
        queue.add(c.id, c.image, grid.with_array(np.zeros(grid.spatial_shape, np.uint8)), [0.9, 0.2, 0.5][n], {})
    assert [i.score for i in queue.sorted()] == [0.2, 0.5, 0.9]
    low = queue.sorted()[0].case_id
    queue.reject(low)
    assert review.ReviewQueue(root).get(low).status == "rejected"
    # a second pseudo-label for the same case is a new file; the first stays
    first = queue.get(low).pseudo_label
    second = queue.add(low, queue.get(low).image, grid.with_array(np.zeros(grid.spatial_shape, np.uint8)), 0.3, {})
    assert second.pseudo_label != first and (root / review.PSEUDO_LABEL_DIR / first.split("/")[-1]).exists()


def test_accept_updates_dataset_json(scene, msd_dataset):
    root, cases = msd_dataset
    entries = [{"image": f"./imagesTr/{img.name}", "label": f"./labelsTr/{lab.name}"} for img, lab in cases[:2]]
    (root / "dataset.json").write_text(json.dumps({"training": entries, "test": [f"./imagesTr/{cases[2][0].name}"]}))
    case_id = cases[2][0].name[: -len(".nii.gz")]
    assert case_id not in {c.id for c in discover_cases(root) if c.label}
    volume = _load_case(scene, root, case_id)
    queue = review.ReviewQueue(root)
    label = nodes.image_from_volume(volume).with_array(read_label(cases[2][1]).array)
    queue.add(case_id, str(root / "imagesTr" / cases[2][0].name), label, 0.7, {})
    queue.accept(case_id)
    labelled = {c.id: c for c in discover_cases(root) if c.label}
    assert case_id in labelled and len(labelled) == 3


def test_errors_name_the_problem(tmp_path, msd_dataset):
    root, _ = msd_dataset
    with pytest.raises(KeyError, match="not in the review queue"):
        review.ReviewQueue(root).accept("nope")
    (root / review.QUEUE_FILE).write_text("{broken")
    with pytest.raises(ValueError, match="semiseg_review.json"):
        review.ReviewQueue(root)


def test_pseudolabel_output_folder_is_queued(tmp_path):
    """`semiseg pseudolabel` on two Kvasir-SEG pictures, its output folder queued for review, one case accepted."""
    kvasir = DATA / "kvasir-seg"
    if not kvasir.is_dir():
        pytest.skip(f"Kvasir-SEG not found at {kvasir}")
    ids = sorted(p.stem for p in (kvasir / "images").glob("*.jpg"))[4:6]
    root, prompts = tmp_path / "polyps", tmp_path / "prompt_masks"
    for folder in (root / "images", root / "masks", prompts):
        folder.mkdir(parents=True)
    for i in ids:
        (root / "images" / f"{i}.jpg").symlink_to(kvasir / "images" / f"{i}.jpg")
        (prompts / f"{i}.jpg").symlink_to(kvasir / "masks" / f"{i}.jpg")
    (root / "masks" / f"{ids[0]}.jpg").symlink_to(kvasir / "masks" / f"{ids[0]}.jpg")  # the other is unlabelled
    out = tmp_path / "pseudo_out"
    assert main(["pseudolabel", "--input", str(root / "images"), "--prompt-from-masks", str(prompts),
                 "--out", str(out), "--device", "cpu"]) == 0

    queue = review.ReviewQueue(root)
    items = queue.import_folder(out)
    assert sorted(i.case_id for i in items) == ids
    for item in items:
        written = json.loads((out / f"{item.case_id}.json").read_text())
        assert item.status == "pending" and item.score == written["score"] and item.provenance["source"] == "sam"
        assert item.pseudo_label == str(root / review.PSEUDO_LABEL_DIR / f"{item.case_id}.png")
        np.testing.assert_array_equal(read_label(item.pseudo_label).array, read_label(out / f"{item.case_id}.png")
                                      .array)
        assert json.loads((root / review.PSEUDO_LABEL_DIR / f"{item.case_id}.json").read_text())["source"] == "sam"

    accepted = review.ReviewQueue(root).accept(ids[1])
    assert accepted.label == str(root / "masks" / f"{ids[1]}.png")
    with PILImage.open(accepted.label) as pil:
        assert set(np.unique(np.asarray(pil))) == {0, 255}
    assert {c.id: c.label for c in discover_cases(root)}[ids[1]] == accepted.label
    # importing again leaves the accepted case alone and re-queues the other
    again = review.ReviewQueue(root).import_folder(out)
    assert [i.case_id for i in again] == [ids[0]] and review.ReviewQueue(root).get(ids[1]).status == "accepted"

    (out / "elsewhere.png").write_bytes((out / f"{ids[0]}.png").read_bytes())
    with pytest.raises(KeyError, match="elsewhere.png"):
        review.ReviewQueue(root).import_folder(out)
