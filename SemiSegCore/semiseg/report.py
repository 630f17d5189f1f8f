"""Per-case metric tables, summaries, plots: what `semiseg evaluate` and the end of training write."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data.cases import index_by_id
from .evaluate import case_rows, score_case
from .io import ImageError, read_label
from .metrics import METRIC_NAMES, summarise
from .utils import atomic_write_text, make_temp

CSV_FIELDS = ["case", "label", "label_name"] + list(METRIC_NAMES)


def format_table(summary: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'label':<22}{'n':>4}{'Dice':>16}{'Jaccard':>16}{'HD95 (mm)':>16}{'ASD (mm)':>16}")
    names = summary.get("label_names", {})
    rows = [(names.get(k, k), st) for k, st in summary["per_label"].items()]
    for name, stats in rows + [("mean (all rows)", summary["overall"])]:
        cells = []
        for m in ("dice", "jaccard", "hd95", "asd"):
            s = stats[m]
            cell = "n/a" if math.isnan(s["mean"]) else f"{s['mean']:.4f}±{s['std']:.3f}"
            if s["n_undefined"]:
                cell += f"*{s['n_undefined']}"
            cells.append(cell)
        n = stats["dice"]["n"]
        lines.append(f"{name:<22}{n:>4}" + "".join(f"{c:>16}" for c in cells))
    if any(s["n_undefined"] for st in summary["per_label"].values() for s in st.values()):
        lines.append("*k: k cases where one mask is empty; their distances are undefined and left out")
    return "\n".join(lines)


def write_report(rows: list[dict], out_dir: str | Path, title: str = "", extra: dict | None = None) -> dict:
    """Write metrics.csv (one row per case and label), summary.json (with ``extra`` keys) and metrics.png; return
    the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())
    summary = summarise(rows)
    summary["n_cases"] = len({r["case"] for r in rows})
    label_of = {str(r["label"]): r.get("label_name", str(r["label"])) for r in rows}
    summary["label_names"] = label_of
    summary.update(extra or {})
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1, allow_nan=True))
    plot_metrics(rows, out_dir / "metrics.png", title)
    return summary


def plot_metrics(rows: list[dict], path: Path, title: str = "") -> None:
    """Box plots of Dice and HD95 per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["label"], r.get("label_name", "")) for r in rows}, key=lambda x: str(x[0]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("dice", "hd95")):
        data = [[r[metric] for r in rows if r["label"] == k and not math.isnan(r[metric])] for k, _ in labels]
        ax.boxplot([d if d else [math.nan] for d in data], showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), [name or str(k) for k, name in labels], rotation=20)
        ax.set_title({"dice": "Dice", "hd95": "HD95 (mm)"}[metric])
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"{len({r['case'] for r in rows})} cases")
    fig.tight_layout()
    tmp = make_temp(path, ".png")  # a unique name: two writers never share a temporary file
    try:
        fig.savefig(tmp, dpi=100, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def evaluate_cases(predictor, loaded, out_dir, label_names=None, quiet=False, split: str = "validation") -> dict:
    """Score the given loaded cases (``evaluate.score_case``) and write the report to ``out_dir``."""
    rows = [r for lc in tqdm(loaded, desc=f"evaluating ({split})", disable=quiet, leave=False)
            for r in score_case(predictor, lc, label_names=label_names)]
    summary = write_report(rows, out_dir, title=f"{predictor.config.name}: {split}", extra={"split": split})
    if not quiet:
        print(format_table(summary, f"{predictor.config.name}: {len(loaded)} {split} cases"))
    return summary


def evaluate_folders(pred_dir: str | Path, ref_dir: str | Path, out_dir: str | Path | None = None,
                     label_names=None, quiet=False, allow_missing=False) -> tuple[dict, list[dict]]:
    """Score every prediction in ``pred_dir`` against the reference with the same case id in ``ref_dir``. A reference
    without a prediction is an error unless ``allow_missing``; the summary lists such cases under ``missing``."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds, refs = index_by_id(pred_dir), index_by_id(ref_dir)
    common = sorted(set(preds) & set(refs))
    if not common:
        raise ImageError(f"{pred_dir}: no prediction matches a reference in {ref_dir} by case id")
    missing = sorted(set(refs) - set(preds))
    if missing and not allow_missing:
        raise ImageError(f"{pred_dir}: no prediction for {len(missing)} of the {len(refs)} reference cases in {ref_dir}"
                         f" (e.g. {missing[0]}); pass --allow-missing to score the others")
    pairs = []
    for cid in tqdm(common, desc="reading", disable=quiet, leave=False):
        pred, ref = read_label(preds[cid]), read_label(refs[cid])
        if pred.spatial_shape != ref.spatial_shape:
            raise ImageError(f"{preds[cid]}: shape {pred.spatial_shape} does not match reference {refs[cid]} "
                             f"shape {ref.spatial_shape}")
        if pred.spatial_ndim == 3:
            ref.check_same_grid(pred)
        pairs.append((cid, pred, ref))
    # every label present in any reference (or named) is scored in every case, so "correctly absent" counts too;
    # with no foreground anywhere, label 1 is scored (both empty: Dice 1)
    named = {int(k) for k in (label_names or {}) if int(k) != 0}
    labels = sorted({int(v) for _, _, ref in pairs for v in np.unique(ref.array) if v != 0} | named) or [1]
    rows = []
    for cid, pred, ref in tqdm(pairs, desc="evaluating", disable=quiet, leave=False):
        extra = sorted(int(v) for v in np.unique(pred.array) if v != 0 and int(v) not in labels)
        rows.extend(case_rows(cid, pred.array, ref.array, ref.spacing, labels + extra, label_names))
    if out_dir:
        summary = write_report(rows, out_dir, title=f"{pred_dir.name} vs {ref_dir.name}", extra={"missing": missing})
    else:
        summary = summarise(rows)
        summary["label_names"] = {str(r["label"]): r["label_name"] for r in rows}
        summary["missing"] = missing
    return summary, rows
