"""Per-case, per-segment Dice / HD95 / ASD against a reference, as a table node and a bar plot. (A trained model
over a whole dataset runs in a worker process: ``batch.evaluate_steps``.)"""
from __future__ import annotations

import math

import vtk

import slicer

from semiseg.metrics import binary_metrics

from . import nodes

COLUMNS = ("case", "segment", "reference", "dice", "jaccard", "hd95", "asd")
TEXT_COLUMNS = ("case", "segment", "reference")


def match_segments(prediction_node, reference_node) -> list[tuple[str, str]]:
    """Pairs (predicted segment id, reference segment id): same name first; a single reference segment is the
    partner of every prediction left over (the usual one-structure case, e.g. a SAM segment vs 'label 1')."""
    pred = {prediction_node.GetSegmentation().GetSegment(s).GetName(): s for s in nodes.segment_ids(prediction_node)}
    ref = {reference_node.GetSegmentation().GetSegment(s).GetName(): s for s in nodes.segment_ids(reference_node)}
    if not ref:
        raise nodes.NodeError(f"{reference_node.GetName()}: the reference segmentation has no segments")
    pairs = [(sid, ref[name]) for name, sid in pred.items() if name in ref]
    matched = {p for p, _ in pairs}
    if len(ref) == 1:
        only = next(iter(ref.values()))
        pairs += [(sid, only) for sid in pred.values() if sid not in matched]
    return pairs


def evaluate_segmentations(case_id: str, prediction_node, reference_node, volume_node,
                           pairs: list[tuple[str, str]] | None = None) -> list[dict]:
    """Metrics (mm, from the volume's spacing) of each predicted segment against its reference segment."""
    spacing = nodes.image_from_volume(volume_node).spacing
    rows = []
    for pred_id, ref_id in pairs if pairs is not None else match_segments(prediction_node, reference_node):
        pred = nodes.segment_mask(prediction_node, pred_id, volume_node)
        ref = nodes.segment_mask(reference_node, ref_id, volume_node)
        m = binary_metrics(pred, ref, spacing)
        rows.append({"case": case_id, "segment": prediction_node.GetSegmentation().GetSegment(pred_id).GetName(),
                     "reference": reference_node.GetSegmentation().GetSegment(ref_id).GetName(), **m})
    return rows


def fill_table(table_node, rows: list[dict]) -> None:
    """Replace the table's contents with ``rows`` (one row per case and segment; NaN where undefined)."""
    table = vtk.vtkTable()
    for name in COLUMNS:
        column = vtk.vtkStringArray() if name in TEXT_COLUMNS else vtk.vtkDoubleArray()
        column.SetName(name)
        for row in rows:
            value = row.get(name, "" if name in TEXT_COLUMNS else math.nan)
            if name in TEXT_COLUMNS:
                column.InsertNextValue(str(value))
            else:
                column.InsertNextValue(float(value))
        table.AddColumn(column)
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    for name in COLUMNS:
        if name in ("hd95", "asd"):
            table_node.SetColumnUnitLabel(name, "mm")
    table_node.Modified()


def table_rows(table_node) -> list[dict]:
    """Rows back from a table node (what a click on a row refers to)."""
    table = table_node.GetTable()
    out = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            column = table.GetColumn(c)
            value = column.GetValue(r)
            row[column.GetName()] = str(value) if column.GetName() in TEXT_COLUMNS else float(value)
        out.append(row)
    return out


def case_of_row(table_node, row: int) -> str:
    table = table_node.GetTable()
    if not 0 <= row < table.GetNumberOfRows():
        raise IndexError(f"{table_node.GetName()}: no row {row}")
    return str(table.GetColumnByName("case").GetValue(row))


def dice_plot(scene, table_node, name: str = "SemiSeg Dice"):
    """A bar chart of the table's Dice column, one bar per case/segment row; returns the chart node."""
    chart = scene.GetFirstNodeByName(name)
    if chart is None or not chart.IsA("vtkMRMLPlotChartNode"):
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    series = scene.GetFirstNodeByName(name + " series")
    if series is None or not series.IsA("vtkMRMLPlotSeriesNode"):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name + " series")
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
    series.SetLabelColumnName("case")
    series.SetYColumnName("dice")
    if not chart.HasPlotSeriesNodeID(series.GetID()):
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle("Dice per case and segment")
    chart.SetYAxisTitle("Dice")
    chart.SetXAxisTitle("case")
    chart.SetYAxisRangeAuto(False)
    chart.SetYAxisRange(0.0, 1.0)
    return chart

