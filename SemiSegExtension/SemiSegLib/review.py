"""The review queue: pseudo-labelled cases waiting for a person to accept, correct or reject them.

The queue lives in the dataset folder as ``semiseg_review.json``; pseudo-labels are files under
``pseudo_labels/``, each with its provenance beside it (:mod:`semiseg.io.labels`; no dataset layout reads that
folder, so they never count as labels by themselves). The output folder of ``semiseg pseudolabel`` is queued with
:meth:`ReviewQueue.import_folder`.
Accepting a case writes its label where ``semiseg.data.discover_cases`` looks for labels (``labelsTr/`` of an
MSD dataset, the masks folder of an images/masks dataset; ``dataset.json`` is updated when it lists the cases),
so the next training run sees the case as labelled. A label that is already there is never overwritten: it is
moved to ``superseded/`` beside it first, so a person's work is always kept.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from semiseg.data import discover_cases
from semiseg.data.cases import detect_layout, index_by_id
from semiseg.io import (IMAGE_2D_EXTS, PSEUDO_LABEL_DIR, Image, case_id_from_path, label_path, read_image, read_label,
                        read_sidecar, write_label)
from semiseg.utils import atomic_write_text

QUEUE_FILE = "semiseg_review.json"
STATUSES = ("pending", "accepted", "corrected", "rejected")


@dataclass
class ReviewItem:
    case_id: str
    image: str
    pseudo_label: str
    score: float
    """SAM's predicted IoU (or the model's confidence): low scores need a person's eye most."""
    provenance: dict = field(default_factory=dict)
    status: str = "pending"
    label: str | None = None
    """The label file written when the case was accepted or corrected."""
    updated: str = ""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class ReviewQueue:
    def __init__(self, dataset_root: str | Path):
        self.root = Path(dataset_root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: dataset folder not found")
        self.path = self.root / QUEUE_FILE
        self.items: dict[str, ReviewItem] = {}
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                self.items = {d["case_id"]: ReviewItem(**d) for d in raw.get("items", [])}
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.path}: not a SemiSeg review queue ({exc})") from exc

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"items": [asdict(i) for i in self.items.values()]}, indent=1))

    def sorted(self, status: str | None = None) -> list[ReviewItem]:
        """Items by ascending score (least confident first), optionally only those with ``status``."""
        items = [i for i in self.items.values() if status is None or i.status == status]
        return sorted(items, key=lambda i: (i.score, i.case_id))

    def get(self, case_id: str) -> ReviewItem:
        if case_id not in self.items:
            raise KeyError(f"{self.path}: case '{case_id}' is not in the review queue")
        return self.items[case_id]

    def add(self, case_id: str, image_path: str, label: Image, score: float, provenance: dict) -> ReviewItem:
        """Store a pseudo-label as a new file (with its provenance beside it) and queue the case (pending). Earlier
        pseudo-labels stay on disk."""
        folder = self.root / PSEUDO_LABEL_DIR
        target, n = label_path(folder, case_id, image_path), 2
        while target.exists():
            target = label_path(folder, f"{case_id}.v{n}", image_path)
            n += 1
        provenance = {"source": "unknown", **provenance, "score": float(score)}
        write_label(label, target, provenance=provenance)
        item = ReviewItem(case_id, str(image_path), str(target), float(score), dict(provenance), "pending", None,
                          _now())
        self.items[case_id] = item
        self.save()
        return item

    def import_folder(self, folder: str | Path) -> list[ReviewItem]:
        """Queue the pseudo-labels of a folder (the ``--out`` of ``semiseg pseudolabel``), matched to this dataset's
        cases by case id and scored by their provenance's ``score``. A case a person already accepted or corrected
        is left as it is."""
        folder = Path(folder)
        cases = {c.id: c for c in discover_cases(self.root)}
        found = index_by_id(folder)
        unknown = sorted(set(found) - set(cases))
        if unknown:
            raise KeyError(f"{folder}: {len(unknown)} pseudo-label(s) for cases that {self.root} does not have "
                           f"(e.g. {found[unknown[0]].name})")
        added = []
        for case_id, path in found.items():
            if case_id in self.items and self.items[case_id].status in ("accepted", "corrected"):
                continue
            label, image = read_label(path), read_image(cases[case_id].image)
            image.check_same_grid(label)
            provenance = read_sidecar(path)
            added.append(self.add(case_id, cases[case_id].image, label, provenance.get("score", float("nan")),
                                  dict(provenance, imported_from=str(path))))
        return added

    def reject(self, case_id: str) -> ReviewItem:
        item = self.get(case_id)
        item.status, item.updated = "rejected", _now()
        self.save()
        return item

    def accept(self, case_id: str, label: Image | None = None) -> ReviewItem:
        """Accept the pseudo-label as it is (``label`` None) or a person's correction of it (``label`` given)."""
        item = self.get(case_id)
        corrected = label is not None
        if label is None:
            label = read_label(item.pseudo_label)
        item.label = str(write_case_label(self.root, case_id, item.image, label))
        item.status = "corrected" if corrected else "accepted"
        item.provenance = dict(item.provenance, reviewed=item.status, reviewed_at=_now())
        item.updated = _now()
        self.save()
        return item


def labels_folder(root: Path) -> Path:
    """Where ``discover_cases`` looks for labels of this dataset."""
    layout = detect_layout(root)
    if layout == "msd":
        return root / "labelsTr"
    if layout == "folders":
        return next((root / d for d in ("masks", "labels", "labelsTr") if (root / d).is_dir()), root / "masks")
    raise ValueError(f"{root}: accepted labels can be added to MSD (imagesTr/labelsTr) or images/masks datasets, "
                     f"not to a '{layout}' dataset")


def write_case_label(root: Path, case_id: str, image_path: str, label: Image) -> Path:
    """Write ``label`` as the training label of ``case_id`` without destroying any label already there."""
    root = Path(root)
    known = {c.id: c for c in discover_cases(root)}
    if case_id not in known:
        raise KeyError(f"{root}: no case '{case_id}' in the dataset")
    folder = labels_folder(root)
    target = label_path(folder, case_id, image_path)
    existing = [p for p in ([Path(known[case_id].label)] if known[case_id].label else []) + [target] if p.exists()]
    for old in dict.fromkeys(existing):
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
        keep = old.parent / "superseded" / f"{stamp}-{old.name}"
        while keep.exists():  # rename would replace it
            n += 1
            keep = old.parent / "superseded" / f"{stamp}.{n}-{old.name}"
        keep.parent.mkdir(parents=True, exist_ok=True)
        old.rename(keep)
    write_label(label, target)
    _register_in_dataset_json(root, case_id, target)
    return target


def _register_in_dataset_json(root: Path, case_id: str, label_path: Path) -> None:
    """Point the case's dataset.json entry at its new label (dataset.json, when present, is what lists cases)."""
    ds = root / "dataset.json"
    if not ds.exists():
        return
    meta = json.loads(ds.read_text())
    training, tests = meta.setdefault("training", []), meta.get("test", [])
    if not training and not tests:
        return  # the cases come from the folders, where the file is already in place
    rel = "./" + label_path.relative_to(root).as_posix()
    for entry in training:
        if case_id_from_path(entry["image"]) == case_id:
            entry["label"] = rel
            break
    else:
        for entry in list(tests):
            image = entry if isinstance(entry, str) else entry["image"]
            if case_id_from_path(image) == case_id:
                tests.remove(entry)
                training.append({"image": image, "label": rel})
                break
    meta["numTraining"] = len(training)
    atomic_write_text(ds, json.dumps(meta, indent=4))


# ---- the same operations on scene nodes (what the Review panel calls) -------------------------------------------

def _case_of(volume_node) -> tuple[str, str]:
    case_id, path = volume_node.GetAttribute("SemiSeg.CaseId"), volume_node.GetAttribute("SemiSeg.Path")
    if not case_id or not path:
        raise ValueError(f"{volume_node.GetName()}: not a dataset case; load it from the Data section first")
    return case_id, path


def _label_image(mask_or_labels, volume_node, image_path: str) -> Image:
    """A label map on the volume's grid, 2D again for a picture loaded as a single-slice volume."""
    import numpy as np

    from . import nodes

    grid = nodes.image_from_volume(volume_node)
    arr = np.asarray(mask_or_labels).astype(np.uint8)
    if image_path.lower().endswith(IMAGE_2D_EXTS):
        return Image(arr[:, :, 0], grid.spacing[:2], grid.origin[:2], grid.direction[:2, :2])
    return Image(arr, grid.spacing, grid.origin, grid.direction)


def queue_segment(queue: ReviewQueue, volume_node, segmentation_node, segment_id: str | None = None
                  ) -> ReviewItem:
    """Queue one segment (default: the last one added) as the pseudo-label of the loaded case."""
    from . import nodes

    case_id, image_path = _case_of(volume_node)
    ids = nodes.segment_ids(segmentation_node)
    if not ids:
        raise ValueError(f"{segmentation_node.GetName()}: has no segment to queue")
    segment_id = segment_id or ids[-1]
    tags = nodes.segment_tags(segmentation_node, segment_id)
    provenance = json.loads(tags.get(nodes.TAG_PROVENANCE, "{}"))
    provenance.setdefault("source", tags.get(nodes.TAG_SOURCE, "unknown"))
    score = float(tags.get(nodes.TAG_SCORE, "nan"))
    mask = nodes.segment_mask(segmentation_node, segment_id, volume_node)
    return queue.add(case_id, image_path, _label_image(mask, volume_node, image_path), score, provenance)


def accept_segmentation(queue: ReviewQueue, case_id: str, segmentation_node, volume_node) -> ReviewItem:
    """Accept what the segmentation now holds: unchanged -> "accepted", edited by a person -> "corrected". Each
    segment keeps its own label value (see :func:`nodes.label_values`)."""
    import numpy as np

    from semiseg.data import dataset_labels

    from . import nodes

    item = queue.get(case_id)
    values = nodes.label_values(segmentation_node, dataset_labels(queue.root))
    labels = nodes.label_from_segmentation(segmentation_node, volume_node, values).array
    label = _label_image(labels, volume_node, item.image)
    if np.array_equal(label.array, read_label(item.pseudo_label).array):
        return queue.accept(case_id)
    return queue.accept(case_id, label)


@dataclass
class OpenCase:
    """The nodes SemiSeg loaded for one case, and what their segments looked like then: :meth:`close` removes them
    unless a person has edited a segmentation since (their work stays in the scene)."""

    case_id: str
    nodes: list
    snapshot: dict = field(default_factory=dict)

    def __post_init__(self):
        self.snapshot = {n.GetID(): _fingerprint(n) for n in self.nodes if n.IsA("vtkMRMLSegmentationNode")}

    def edited(self) -> list:
        """Segmentation nodes whose segments were added, removed or painted since the case was opened."""
        return [n for n in self.nodes if n.GetID() in self.snapshot and n.GetScene() is not None
                and _fingerprint(n) != self.snapshot[n.GetID()]]

    def close(self, scene) -> list[str]:
        """Remove the case's nodes; returns the names of edited segmentations, which are kept with the volume."""
        kept = [n.GetName() for n in self.edited()]
        if not kept:
            for node in self.nodes:
                if node.GetScene() is scene:
                    scene.RemoveNode(node)
        return kept


def _fingerprint(segmentation_node) -> tuple:
    import slicer

    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for i in range(segmentation.GetNumberOfSegments()):
        representation = segmentation.GetNthSegment(i).GetRepresentation(name)
        out.append((segmentation.GetNthSegmentID(i), representation.GetMTime() if representation else 0))
    return tuple(out)
