"""``semiseg evaluate``: Dice, Jaccard, HD95 and ASD (mm) of a folder of predictions against references."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("evaluate", help="Dice, Jaccard, HD95, ASD (mm) of predictions against references")
    e.add_argument("--pred", required=True, help="folder of predicted label maps")
    e.add_argument("--ref", required=True, help="folder of reference label maps (matched by case id)")
    e.add_argument("--out", help="folder for metrics.csv, summary.json and metrics.png")
    e.add_argument("--labels-from", help="a dataset folder whose dataset.json names the labels")
    e.add_argument("--allow-missing", action="store_true",
                   help="score the cases that have a prediction when some have none (listed in summary.json)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=run)


def run(args) -> int:
    from ..data.cases import dataset_labels
    from ..report import evaluate_folders, format_table

    names = dataset_labels(args.labels_from) if args.labels_from else None
    summary, rows = evaluate_folders(args.pred, args.ref, args.out, label_names=names, quiet=args.quiet,
                                     allow_missing=args.allow_missing)
    if summary.get("missing"):
        missing = summary["missing"]
        print(f"warning: {len(missing)} reference case(s) have no prediction and are left out (e.g. {missing[0]})",
              file=sys.stderr)
    print(format_table(summary, f"{args.pred} vs {args.ref}: {len({r['case'] for r in rows})} cases"))
    if args.out:
        print(f"wrote {Path(args.out) / 'metrics.csv'}, summary.json, metrics.png")
    return 0
