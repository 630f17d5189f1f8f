"""``semiseg pseudolabel``: SAM pseudo-labels for a folder of images, a volume or an MSD dataset.

Prompts come from masks (``--prompt-from-masks DIR``, matched to images by case id) or from a trained run's
predictions (``--prompt-from-run RUN_DIR``). Each case is written as ``<out>/<case>.nii.gz`` (3D; ``.seg.nrrd``
for NRRD input) or ``<out>/<case>.png`` (2D, 0/255 when binary) with its provenance in ``<out>/<case>.json`` (the
rules of :mod:`semiseg.io.labels`); cases whose mask already exists are skipped, so an interrupted run resumes where
it stopped. The Slicer review queue takes such a folder (``ReviewQueue.import_folder``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .backends import BACKENDS, SAM_CHECKPOINTS


def add_pseudolabel_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``pseudolabel`` on an argparse subparsers object; its ``func`` runs it and returns an exit code."""
    p = subparsers.add_parser("pseudolabel", help="SAM pseudo-labels from mask or model prompts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="image folder, NIfTI/NRRD volume or image file, or MSD dataset")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-from-masks", metavar="DIR", help="folder of masks named like the images (case id)")
    src.add_argument("--prompt-from-run", metavar="RUN_DIR", help="a training run whose predictions give prompts")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backend", default="litemedsam", choices=BACKENDS)
    p.add_argument("--model-type", default="vit_b", choices=sorted(SAM_CHECKPOINTS),
                   help="segment-anything model (sam backend)")
    p.add_argument("--checkpoint", help="weights file (litemedsam, sam) or model folder (hf)")
    p.add_argument("--axis", type=int, default=2, help="slicing axis of 3D volumes (0, 1, 2; default 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--intensity", default="auto",
                   help="auto, percentile[:lo,hi], window:center,width, minmax (grey images to 0..255)")
    p.add_argument("--padding", type=float, default=5.0, help="box padding in pixels")
    p.add_argument("--points", type=int, default=0,
                   help="positive points per prompt besides the box (default none: LiteMedSAM and MedSAM learned "
                        "from boxes)")
    p.add_argument("--negative-points", type=int, default=0, help="negative points per prompt")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (run prompts)")
    p.add_argument("--batch-size", type=int, help="slices per encoder call (default: 8 on a GPU, 1 on a CPU)")
    p.add_argument("--multimask", action=argparse.BooleanOptionalAction, default=None,
                   help="decode 3 candidates and keep the highest predicted IoU (default: the backend's choice)")
    p.add_argument("--limit", type=int, help="only the first N cases")
    p.set_defaults(func=run_pseudolabel)
    return p


def shard() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise. Sharding needs no process group: cases are split by
    index, and each rank works alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_pseudolabel(args) -> int:
    from tqdm import tqdm

    from ..data.cases import discover_cases, index_by_id
    from ..io import ImageError, label_path, read_image, read_label
    from .backends import build_backend
    from .engine import PseudoLabel, SamEngine, pseudolabel_from_mask, pseudolabel_from_probability

    out = Path(args.out)
    cases = discover_cases(args.input)
    if args.limit:
        cases = cases[: args.limit]
    if not cases:
        print(f"{args.input}: no images found", file=sys.stderr)
        return 2
    rank, world = shard()
    cases = cases[rank::world]  # under torchrun each rank writes its own share: every case exactly once
    device = args.device
    if world > 1 and device == "auto":
        import torch

        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    masks = index_by_id(args.prompt_from_masks) if args.prompt_from_masks else None
    predictor = None
    if args.prompt_from_run:
        from ..runs import load_predictor

        predictor = load_predictor(args.prompt_from_run, device=device)
    engine = None
    written = skipped = failed = 0
    scores = []
    for case in tqdm(cases, desc="pseudolabel" if world == 1 else f"pseudolabel rank {rank}", unit="case"):
        if label_path(out, case.id, case.image).exists():
            skipped += 1
            continue
        try:
            image = read_image(case.image)
            if masks is not None:
                if case.id not in masks:
                    tqdm.write(f"{case.id}: no mask in {args.prompt_from_masks}; skipped")
                    skipped += 1
                    continue
                mask = read_label(masks[case.id])
                image.check_same_grid(mask)  # shape, spacing, origin and direction, as training checks labels
            engine = engine or SamEngine(build_backend(args.backend, args.checkpoint, device, args.model_type),
                                         batch_size=args.batch_size, multimask=args.multimask)
            if masks is not None:
                result = pseudolabel_from_mask(engine, image, mask.array, axis=args.axis, padding=args.padding,
                                               n_pos=args.points, n_neg=args.negative_points,
                                               intensity=args.intensity, prompt_source=f"mask:{mask.path}")
            else:
                prob = predictor.predict(image)
                label, score, prov = pseudolabel_from_probability(
                    engine, image, prob, axis=args.axis, threshold=args.threshold, n_pos=args.points,
                    n_neg=args.negative_points, padding=args.padding, intensity=args.intensity,
                    prompt_source=f"run:{Path(args.prompt_from_run).resolve()}")
                result = PseudoLabel(image.with_array(label), score, prov)
            if world > 1:
                result.provenance["rank"] = rank
            result.write(out, case.id)
            scores.append(result.score)
            written += 1
        except (ImageError, ValueError) as exc:
            tqdm.write(f"{case.id}: {exc}")
            failed += 1
    mean = f", mean predicted IoU {sum(scores) / len(scores):.3f}" if scores else ""
    print(f"pseudolabel: {written} written, {skipped} skipped, {failed} failed -> {out}{mean}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="semiseg")
    add_pseudolabel_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
