"""``semiseg predict``: segment images with a trained run; label maps are written by :mod:`semiseg.io.labels`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm import tqdm

from ..evaluate import LARGEST_COMPONENT_CHOICES


def add_parser(subparsers) -> None:
    pr = subparsers.add_parser("predict", help="segment images with a trained run")
    pr.add_argument("--run", required=True, help="run directory")
    pr.add_argument("--input", required=True, help="image file, image folder or dataset")
    pr.add_argument("--out", required=True, help="output folder for label maps")
    pr.add_argument("--checkpoint", default="best", choices=["best", "last"])
    pr.add_argument("--device", default="auto")
    pr.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    pr.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                    help="test-time mirroring (mean over the image's flips along every axis; 8x the time in 3D); "
                         "default: the run's infer.mirror")
    pr.add_argument("--largest-component", choices=LARGEST_COMPONENT_CHOICES, default=None,
                    help="clean-up: keep each label's largest connected component by voxels ('size') or by summed "
                         "probability ('probability'), or not at all ('off'); default: the run's "
                         "infer.largest_component and infer.component_by")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=run)


def check_out_apart(inp: Path, out: Path) -> None:
    """Refuse an output folder that is the input (or inside it, or the folder of an input file): label maps must
    never mix with, or replace, the images they were made from."""
    from ..errors import SemiSegError

    for i, o in ((Path(os.path.abspath(inp)), Path(os.path.abspath(out))), (inp.resolve(), out.resolve())):
        if o == i or i in o.parents or (i.is_file() and o == i.parent):  # as given, and with links followed
            raise SemiSegError(f"--out {out} is inside --input {inp}: label maps would mix with (or replace) the "
                               f"input images; choose another output folder")


def run(args) -> int:
    from ..data.cases import discover_cases
    from ..evaluate import set_largest_component
    from ..runs import load_predictor
    from ..io import label_path, read_image, write_label

    out = Path(args.out)
    check_out_apart(Path(args.input), out)
    predictor = load_predictor(args.run, which=args.checkpoint, device=args.device)
    if args.mirror is not None:
        predictor.config.infer.mirror = args.mirror
    if args.largest_component is not None:
        set_largest_component(predictor.config, args.largest_component)
    out.mkdir(parents=True, exist_ok=True)
    cases = discover_cases(Path(args.input))  # a file, an image folder, or a dataset (MSD, images/ + masks/, h5)
    for case in tqdm(cases, desc="predicting", disable=args.quiet):
        target = label_path(out, case.id, case.image)
        if target.exists() and not args.overwrite:
            continue  # a re-run resumes; an existing result is never replaced unless asked
        write_label(predictor.segment(read_image(case.image)), target, overwrite=args.overwrite)
    print(f"{len(cases)} case(s) -> {out}")
    return 0
