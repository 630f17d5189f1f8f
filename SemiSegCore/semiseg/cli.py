"""The `semiseg` command: train, predict, evaluate, pseudolabel (and method-specific tools)."""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm


def _default_run_dir(cfg) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.set)
    run_dir = Path(args.out) if args.out else _default_run_dir(cfg)
    print(f"run directory: {run_dir}")
    result = train(cfg, run_dir, quiet=args.quiet, force_new=args.force_new)
    if result["stopped"]:
        print(f"stopped at step {result['step']}; run the same command again to resume")
        return 128 + result["signal"] if result.get("signal") else 1  # 130 after SIGINT, 143 after SIGTERM
    return 0


def check_out_apart(inp: Path, out: Path) -> None:
    """Refuse an output folder that is the input (or inside it, or the folder of an input file): label maps must
    never mix with, or replace, the images they were made from."""
    from .errors import SemiSegError

    for i, o in ((Path(os.path.abspath(inp)), Path(os.path.abspath(out))), (inp.resolve(), out.resolve())):
        if o == i or i in o.parents or (i.is_file() and o == i.parent):  # as given, and with links followed
            raise SemiSegError(f"--out {out} is inside --input {inp}: label maps would mix with (or replace) the "
                               f"input images; choose another output folder")


def _input_images(path: Path):
    """(case id, image path) for a file, an image folder, or a dataset (MSD, images/ + masks/, h5)."""
    from .data.cases import discover_cases

    return [(c.id, c.image) for c in discover_cases(path)]


def output_name(case_id: str, image_path: str) -> str:
    """Labels of volumes are written as NIfTI (or NRRD for NRRD input); labels of 2D pictures as PNG."""
    low = image_path.lower()
    if low.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
        return f"{case_id}.png"
    if low.endswith(".nrrd"):
        return f"{case_id}.seg.nrrd"
    return f"{case_id}.nii.gz"


def write_label(label_img, path: Path, num_classes: int, overwrite: bool = False) -> Path:
    """Binary 2D masks are written 0/255 (viewable, and read back as 0/1); everything else keeps label values."""
    from .io import write_image

    if label_img.spatial_ndim == 2 and num_classes == 2:
        label_img = label_img.with_array((label_img.array > 0).astype("uint8") * 255)
    return write_image(label_img, path, overwrite=overwrite)


def cmd_predict(args) -> int:
    from .io import read_image
    from .runs import load_predictor

    out = Path(args.out)
    check_out_apart(Path(args.input), out)
    predictor = load_predictor(args.run, which=args.checkpoint, device=args.device)
    out.mkdir(parents=True, exist_ok=True)
    items = _input_images(Path(args.input))
    for cid, image_path in tqdm(items, desc="predicting", disable=args.quiet):
        target = out / output_name(cid, image_path)
        if target.exists() and not args.overwrite:
            continue  # a re-run resumes; an existing result is never replaced unless asked
        image = read_image(image_path)
        write_label(predictor.segment(image), target, predictor.config.data.num_classes, overwrite=args.overwrite)
    print(f"{len(items)} case(s) -> {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .data.cases import dataset_labels
    from .report import evaluate_folders, format_table

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


def cmd_plan(args) -> int:
    from .config import load_config
    from .plan import make_plan

    plan = make_plan(load_config(args.config, args.set), args.budget_minutes, args.device)
    print(plan.text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semiseg", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run from a YAML config")
    t.add_argument("config", help="YAML config (see Resources/configs)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.iterations=100 (repeatable)")
    t.add_argument("--out", help="run directory (default runs/<name>-<time>); an existing one resumes if its "
                                 "config is the same")
    t.add_argument("--force-new", action="store_true",
                   help="start over in an existing run directory (the old run is moved to <out>/replaced-<time>/)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="segment images with a trained run")
    pr.add_argument("--run", required=True, help="run directory")
    pr.add_argument("--input", required=True, help="image file, image folder or dataset")
    pr.add_argument("--out", required=True, help="output folder for label maps")
    pr.add_argument("--checkpoint", default="best", choices=["best", "last"])
    pr.add_argument("--device", default="auto")
    pr.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_predict)

    e = sub.add_parser("evaluate", help="Dice, Jaccard, HD95, ASD (mm) of predictions against references")
    e.add_argument("--pred", required=True, help="folder of predicted label maps")
    e.add_argument("--ref", required=True, help="folder of reference label maps (matched by case id)")
    e.add_argument("--out", help="folder for metrics.csv, summary.json and metrics.png")
    e.add_argument("--labels-from", help="a dataset folder whose dataset.json names the labels")
    e.add_argument("--allow-missing", action="store_true",
                   help="score the cases that have a prediction when some have none (listed in summary.json)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    pl = sub.add_parser("plan", help="spacing, patch, network and iterations that fit a time budget here "
                                     "(measured)")
    pl.add_argument("config", help="YAML config to plan for")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    pl.add_argument("--budget-minutes", type=float, default=20.0, help="training time to fill (default 20)")
    pl.add_argument("--device", help="plan for this device (default: the config's train.device)")
    pl.set_defaults(func=cmd_plan)

    for module, adder in (("semiseg.sam.cli", "add_pseudolabel_parser"),
                          ("semiseg.knowledge.cli", "add_knowledge_parser")):
        try:
            getattr(__import__(module, fromlist=[adder]), adder)(sub)
        except (ImportError, AttributeError):
            pass  # optional front-end not installed
    return p


_OS_ERRORS = {errno.ENOSPC: "the disk is full (no space left on device)", errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def error_line(exc: BaseException) -> str:
    """One line for an error; an OSError says which path and what happened to it (disk full, read-only ...)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{_OS_ERRORS.get(exc.errno, exc.strerror)}"
    return " ".join(str(exc).split())


def main(argv=None) -> int:
    from .errors import SemiSegError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (SemiSegError, OSError) as exc:
        print(f"semiseg {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
