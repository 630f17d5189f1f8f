"""``semiseg pseudolabel`` through its argparse entry: mask prompts on real Kvasir images (LiteMedSAM), resuming,
a corrupt image among good ones, and prompts from a trained run directory."""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from semiseg.io import read_image, read_label
from semiseg.metrics import dice_score
from semiseg.sam.cli import add_pseudolabel_parser, main

from test_sam_backends import save_tiny_hf

DATA = Path(os.environ.get("SEMISEG_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
KVASIR = DATA / "kvasir-seg"
pytestmark = pytest.mark.skipif(not KVASIR.is_dir(), reason=f"Kvasir-SEG not found at {KVASIR}")
IDS = sorted(p.stem for p in (KVASIR / "images").glob("*.jpg"))[4:6] if KVASIR.is_dir() else []


def link_cases(tmp_path: Path, ids) -> tuple[Path, Path]:
    """An image folder and a mask folder of symlinks to the shared data (nothing copied)."""
    images, masks = tmp_path / "images_in", tmp_path / "masks_in"
    images.mkdir()
    masks.mkdir()
    for i in ids:
        (images / f"{i}.jpg").symlink_to(KVASIR / "images" / f"{i}.jpg")
        (masks / f"{i}.jpg").symlink_to(KVASIR / "masks" / f"{i}.jpg")
    return images, masks


def test_parser_registers_on_subparsers():
    parser = argparse.ArgumentParser(prog="semiseg")
    sub = parser.add_subparsers(dest="command")
    add_pseudolabel_parser(sub)
    args = parser.parse_args(["pseudolabel", "--input", "x", "--prompt-from-masks", "m", "--out", "o", "--axis", "1"])
    assert args.func.__name__ == "run_pseudolabel" and args.axis == 1 and args.backend == "litemedsam"
    with pytest.raises(SystemExit):  # the two prompt sources exclude each other
        parser.parse_args(["pseudolabel", "--input", "x", "--prompt-from-masks", "m", "--prompt-from-run", "r",
                           "--out", "o"])
    with pytest.raises(SystemExit):
        parser.parse_args(["pseudolabel", "--input", "x", "--out", "o"])


def test_pseudolabel_masks_resume_and_corrupt_image(tmp_path, capsys):
    images, masks = link_cases(tmp_path, IDS)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (masks / "broken.jpg").symlink_to(KVASIR / "masks" / f"{IDS[0]}.jpg")
    out = tmp_path / "out"
    argv = ["pseudolabel", "--input", str(images), "--prompt-from-masks", str(masks), "--out", str(out),
            "--device", "cpu"]
    assert main(argv) == 1  # one case failed, the others were written
    text = capsys.readouterr()
    assert "broken.jpg" in text.out + text.err and "2 written" in text.out
    for i in IDS:
        pl = read_label(out / f"{i}.png")
        ref = read_label(KVASIR / "masks" / f"{i}.jpg")
        assert pl.spatial_shape == ref.spatial_shape and set(np.unique(pl.array)) <= {0, 1}
        with PILImage.open(out / f"{i}.png") as pil:  # stored 0/255, as `semiseg predict` stores binary masks
            assert set(np.unique(np.asarray(pil))) == {0, 255}
        assert dice_score(pl.array, ref.array) > 0.85
        prov = json.loads((out / f"{i}.json").read_text())
        assert prov["source"] == "sam" and prov["backend"] == "litemedsam" and prov["mask"] == f"{i}.png"
        assert prov["prompt_source"].startswith("mask:") and len(prov["slices"][0]["prompts"]) == 1
    assert not (out / "broken.png").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # re-running resumes: finished cases are skipped, nothing is rewritten
    (images / "broken.jpg").unlink()
    assert main(argv) == 0
    assert "0 written, 2 skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_pseudolabel_from_run(tmp_path, capsys):
    """Prompts from a (tiny, untrained) run's probabilities, decoded by a tiny transformers SAM."""
    runs = pytest.importorskip("semiseg.runs", reason="semiseg.runs (the run predictor) is not there yet")
    import torch

    from semiseg.config import config_from_dict, save_config
    from semiseg.methods import build_method
    from semiseg.sam import SamEngine, build_backend
    from semiseg.sam.engine import pseudolabel_from_probability

    run = tmp_path / "run"
    cfg = config_from_dict({"method": "supervised", "data": {"num_classes": 2, "intensity": "rgb"},
                            "model": {"name": "unet2d", "in_channels": 3, "features": 4},
                            "train": {"patch_size": [64, 64], "device": "cpu"}})
    torch.manual_seed(0)
    method = build_method(cfg, torch.device("cpu"))
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"method": method.state_dict()}, run / "checkpoints" / "best.pt")
    save_config(cfg, run / "config.yaml")
    hf = save_tiny_hf(tmp_path / "tiny-hf")
    images, _ = link_cases(tmp_path, IDS[:1])
    out = tmp_path / "out"
    rc = main(["pseudolabel", "--input", str(images), "--prompt-from-run", str(run), "--out", str(out),
               "--backend", "hf", "--checkpoint", str(hf), "--device", "cpu", "--threshold", "0.5"])
    assert rc == 0, capsys.readouterr()
    prov = json.loads((out / f"{IDS[0]}.json").read_text())
    assert prov["backend"] == "hf" and prov["prompt_source"] == f"run:{run.resolve()}"
    assert prov["slices"] and prov["slices"][0]["prompts"][0]["source"] == "probability"
    # the prompts are exactly those the run's probabilities give
    image = read_image(images / f"{IDS[0]}.jpg")
    prob = runs.load_predictor(run, device="cpu").predict(image)
    engine = SamEngine(build_backend("hf", hf, device="cpu"))
    mask, score, expected = pseudolabel_from_probability(engine, image, prob, threshold=0.5)
    assert [s["prompts"] for s in prov["slices"]] == [s["prompts"] for s in expected["slices"]]
    assert np.array_equal(read_label(out / f"{IDS[0]}.png").array, mask)
