"""MRML nodes <-> ``semiseg.io.Image``, segments with provenance, and markups -> prompts in voxel coordinates.

Slicer keeps voxel arrays in (k, j, i) order (slowest axis first); ``semiseg`` images are (i, j, k). Every
conversion here goes through the node's IJK-to-RAS matrix (including a linear parent transform), so geometry
is never dropped. Only MRML and VTK are used, so this runs in Slicer and on slicer-core without Qt.
"""
from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from semiseg.io import Image

# Segment tags that record where a segment came from (see DESIGN.md "Labels carry provenance").
TAG_SOURCE = "SemiSeg.Source"  # reference | sam | model | corrected
TAG_SCORE = "SemiSeg.Score"
TAG_PROVENANCE = "SemiSeg.Provenance"  # JSON
TAG_LABEL = "SemiSeg.LabelValue"  # the value the segment has in a label map file


class NodeError(ValueError):
    """A node cannot be used as asked; the message names the node and the problem."""


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _world_transform(node) -> np.ndarray:
    """The node's linear transform to world (identity when untransformed)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise NodeError(f"{node.GetName()}: is under a non-linear transform ({parent.GetName()}); harden it first")
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return numpy_matrix(m)


def ijk_to_ras(volume_node) -> np.ndarray:
    """4x4 index-to-world matrix of a volume, its parent transform included."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return _world_transform(volume_node) @ numpy_matrix(m)


def image_from_volume(volume_node) -> Image:
    """The voxels and geometry of a scalar (or RGB vector) volume node as an ``Image``."""
    if volume_node is None:
        raise NodeError("no volume selected")
    data = volume_node.GetImageData()
    if data is None or data.GetPointData().GetScalars() is None:
        raise NodeError(f"{volume_node.GetName()}: the volume has no voxels")
    dims = data.GetDimensions()
    comps = data.GetNumberOfScalarComponents()
    flat = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars())
    kji = flat.reshape(dims[::-1] + ((comps,) if comps > 1 else ()))
    arr = np.ascontiguousarray(np.swapaxes(kji, 0, 2))  # (k,j,i[,c]) -> (i,j,k[,c])
    img = Image.from_affine(arr, ijk_to_ras(volume_node), channels=comps, path=volume_node.GetName())
    return img


def _set_voxels(volume_node, array_ijk: np.ndarray, affine: np.ndarray) -> None:
    arr = np.asarray(array_ijk)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    comps = arr.shape[3] if arr.ndim == 4 else 1
    kji = np.ascontiguousarray(np.swapaxes(arr, 0, 2))
    data = vtk.vtkImageData()
    data.SetDimensions(*arr.shape[:3])
    scalars = numpy_support.numpy_to_vtk(kji.reshape(-1, comps) if comps > 1 else kji.ravel(), deep=True)
    data.GetPointData().SetScalars(scalars)
    volume_node.SetIJKToRASMatrix(_vtk_matrix(affine))
    volume_node.SetAndObserveImageData(data)


def volume_from_image(scene, image: Image, name: str, labelmap: bool = False):
    """Add a new volume node (scalar, or label map) holding ``image`` on its own grid."""
    if image.spatial_ndim == 2:  # a 2D picture becomes a single-slice volume
        arr = image.array[:, :, None] if image.channels == 1 else image.array[:, :, None, :]
        affine = np.eye(4)
        affine[:2, :2] = image.affine[:2, :2]
        affine[:2, 3] = image.affine[:2, 2]
    else:
        arr, affine = image.array, image.affine
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    _set_voxels(node, arr, affine)
    node.CreateDefaultDisplayNodes()
    return node


def load_volume(scene, path: str, name: str | None = None):
    """Read an image file with ``semiseg.io`` and add it as a volume node (used by tests and the Data panel)."""
    from pathlib import Path

    from semiseg.io import case_id_from_path, read_image

    img = read_image(path)
    node = volume_from_image(scene, img, name or case_id_from_path(path))
    node.SetAttribute("SemiSeg.Path", str(Path(path).resolve()))
    return node


def oriented_mask(mask_ijk: np.ndarray, affine: np.ndarray) -> "slicer.vtkOrientedImageData":
    oriented = slicer.vtkOrientedImageData()
    mask = np.ascontiguousarray(np.swapaxes(np.asarray(mask_ijk, dtype=np.uint8), 0, 2))
    oriented.SetDimensions(*mask_ijk.shape)
    oriented.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.ravel(), deep=True))
    oriented.SetImageToWorldMatrix(_vtk_matrix(affine))
    return oriented


def new_segmentation(scene, reference_volume, name: str):
    """An empty segmentation node whose geometry follows ``reference_volume``."""
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    return seg


def unique_segment_name(segmentation_node, base: str) -> str:
    names = {segmentation_node.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation_node.GetSegmentation().GetNumberOfSegments())}
    if base not in names:
        return base
    n = 2
    while f"{base} {n}" in names:
        n += 1
    return f"{base} {n}"


def add_segment(segmentation_node, mask_ijk: np.ndarray, reference_volume, name: str,
                tags: dict | None = None, color=None) -> str:
    """Add ``mask_ijk`` (on the reference volume's grid) as a NEW segment and return its id.

    Existing segments are never modified: the name is made unique and the segment is appended. ``tags`` are
    stored as segment tags (provenance, score), readable in Slicer's Segmentations module.
    """
    img_shape = tuple(reference_volume.GetImageData().GetDimensions())
    if tuple(mask_ijk.shape) != img_shape:
        raise NodeError(f"{segmentation_node.GetName()}: mask shape {tuple(mask_ijk.shape)} does not match "
                        f"{reference_volume.GetName()} shape {img_shape}")
    oriented = oriented_mask(mask_ijk, ijk_to_ras(reference_volume))
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    name = unique_segment_name(segmentation_node, name)
    rgb = color if color is not None else (0.9, 0.6, 0.1)
    segment_id = segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(oriented, name, rgb)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    for key, value in (tags or {}).items():
        segment.SetTag(key, str(value))
    return segment_id


def segment_tags(segmentation_node, segment_id: str) -> dict:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise NodeError(f"{segmentation_node.GetName()}: has no segment '{segment_id}'")
    out = {}
    for key in (TAG_SOURCE, TAG_SCORE, TAG_PROVENANCE, TAG_LABEL):
        if segment.HasTag(key):
            out[key] = _get_tag(segment, key)
    return out


def _get_tag(segment, key: str) -> str:
    # vtkSegment.GetTag(key, value&) has a C++ out-parameter; the Python wrapping returns it through a reference.
    ref = vtk.reference("")
    segment.GetTag(key, ref)
    return str(ref)


def segment_ids(segmentation_node) -> list[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def segment_mask(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """One segment as a boolean (i, j, k) mask resampled onto the reference volume's grid."""
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise NodeError(f"{segmentation_node.GetName()}: has no segment '{segment_id}'")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    labelmap = segmentation_node.GetScene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__semiseg_export")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_volume)
        if not ok:
            raise NodeError(f"{segmentation_node.GetName()}: exporting segment '{segment_id}' onto "
                            f"{reference_volume.GetName()} failed")
        return image_from_volume(labelmap).array > 0
    finally:
        segmentation_node.GetScene().RemoveNode(labelmap)


def label_values(segmentation_node, names: dict[int, str] | None = None) -> dict[str, int]:
    """The label value of every segment: its ``SemiSeg.LabelValue`` tag (set when it was made from a label map),
    else its name when that is a label's name (``names``, or "label N"), else 1 when it is the only segment.
    Raises NodeError naming the segments whose value cannot be told."""
    by_name = {name: value for value, name in (names or {}).items()}
    ids = segment_ids(segmentation_node)
    values, unknown = {}, []
    for sid in ids:
        segment = segmentation_node.GetSegmentation().GetSegment(sid)
        name = segment.GetName()
        if segment.HasTag(TAG_LABEL):
            values[sid] = int(_get_tag(segment, TAG_LABEL))
        elif name in by_name:
            values[sid] = int(by_name[name])
        elif name.startswith("label ") and name[6:].isdigit():
            values[sid] = int(name[6:])
        elif len(ids) == 1:
            values[sid] = 1
        else:
            unknown.append(name)
    if unknown:
        raise NodeError(f"{segmentation_node.GetName()}: cannot tell which label value the segment(s) "
                        f"{', '.join(unknown)} have; name each after its label (e.g. 'label 2'"
                        + (f" or one of {', '.join(by_name)}" if by_name else "") + ") or remove it")
    return values


def label_from_segmentation(segmentation_node, reference_volume, values: dict[str, int] | None = None) -> Image:
    """A label map on the reference grid: each segment painted with its label value (``values``: segment id ->
    value, default :func:`label_values`); where segments overlap, the later one wins."""
    values = label_values(segmentation_node) if values is None else values
    grid = image_from_volume(reference_volume)
    labels = np.zeros(grid.spatial_shape, dtype=np.uint8 if max(values.values(), default=0) < 256 else np.int32)
    for sid, value in values.items():
        labels[segment_mask(segmentation_node, sid, reference_volume)] = value
    return grid.with_array(labels, path=segmentation_node.GetName())


def segmentation_from_label(scene, label: Image, reference_volume, name: str, names: dict[int, str] | None = None,
                            source: str = "reference"):
    """A segmentation node with one segment per non-zero value of ``label`` (on the reference volume's grid), each
    tagged with its value and ``source``."""
    seg = new_segmentation(scene, reference_volume, name)
    arr = label.array if label.spatial_ndim == 3 else label.array[:, :, None]
    for value in (int(v) for v in np.unique(arr) if v != 0):
        add_segment(seg, arr == value, reference_volume, (names or {}).get(value, f"label {value}"),
                    tags={TAG_SOURCE: source, TAG_LABEL: value})
    return seg


# ---- markups -> prompts ---------------------------------------------------------------------------------------

def world_to_ijk(points_ras: np.ndarray, volume_node) -> np.ndarray:
    """(N, 3) world RAS points -> (N, 3) continuous voxel coordinates (i, j, k) of the volume."""
    pts = np.atleast_2d(np.asarray(points_ras, dtype=float))
    homog = np.c_[pts, np.ones(len(pts))]
    return (np.linalg.inv(ijk_to_ras(volume_node)) @ homog.T).T[:, :3]


def markup_points_ras(markups_node) -> np.ndarray:
    """World positions of a markups node's control points (N, 3); empty when there is no node."""
    if markups_node is None:
        return np.zeros((0, 3))
    out = []
    for i in range(markups_node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(i, p)
        out.append(p)
    return np.array(out, dtype=float).reshape(-1, 3)


def points_prompt(volume_node, positive_node=None, negative_node=None) -> tuple[np.ndarray, np.ndarray]:
    """Point prompts in the volume's voxel coordinates: ``(points (N, 3) ijk, labels (N,) 1 / 0)``."""
    pos = world_to_ijk(markup_points_ras(positive_node), volume_node) if positive_node else np.zeros((0, 3))
    neg = world_to_ijk(markup_points_ras(negative_node), volume_node) if negative_node else np.zeros((0, 3))
    points = np.concatenate([pos, neg]).reshape(-1, 3)
    labels = np.r_[np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), dtype=np.int64)]
    return points, labels


def roi_box_ijk(roi_node, volume_node) -> np.ndarray:
    """An ROI's world-aligned box as voxel bounds ``[[i0, j0, k0], [i1, j1, k1]]`` (min corner, max corner)."""
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    if bounds[0] > bounds[1]:
        raise NodeError(f"{roi_node.GetName()}: the ROI is empty or not placed")
    corners = np.array([[x, y, z] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
    ijk = world_to_ijk(corners, volume_node)
    return np.stack([ijk.min(axis=0), ijk.max(axis=0)])
