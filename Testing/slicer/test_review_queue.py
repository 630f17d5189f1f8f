"""The review queue on a small real MSD folder: queue, accept, correct (keeping the old label), reject."""
import json

import numpy as np
import pytest

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
    assert second.pseudo_label != first and (root / review.PSEUDO_DIR / first.split("/")[-1]).exists()


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
