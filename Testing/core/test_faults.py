"""Bad input and faults (issue 14): each probe ends in one clear line naming the file or key, or in a correct result;
nothing is silently wrong and nothing is lost. Tiny real data: three LA cases, a V-Net with 4 features, 2 steps."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from semiseg.cli import error_line, main
from semiseg.config import ConfigError, apply_overrides, config_from_dict, save_config
from semiseg.data.cases import Case, discover_cases, load_case
from semiseg.errors import RunDirError, TrainingError
from semiseg.io import ImageError
from semiseg.report import evaluate_folders, format_table, write_report
from semiseg.methods import with_method_defaults
from semiseg.train import Trainer
from semiseg.train.rundir import prepare_run_dir


def la_files(la_dir, n=3):
    names = sorted(p.name for p in (la_dir / "imagesTr").iterdir())[:n]
    return [(la_dir / "imagesTr" / f, la_dir / "labelsTr" / f) for f in names]


def write_config(path: Path, root, **train) -> Path:
    t = {"iterations": 2, "patch_size": [32, 32, 32], "batch_size": 1, "val_every": 2, "checkpoint_every": 1,
         "lr": 0.01, **train}
    raw = {"name": "faults", "data": {"root": str(root), "labelled": 2, "val": 0, "max_cases": 3},
           "model": {"name": "vnet", "features": 4}, "train": t,
           "infer": {"patch_size": [96, 96, 96], "overlap": 0.0}}
    path.write_text(yaml.safe_dump(raw))
    return path


def nifti_like(src: Path, dst: Path, array=None, affine=None) -> Path:
    """A copy of a NIfTI file with another array or affine (written to a temporary folder, never to the data)."""
    img = nib.load(str(src))
    arr = np.asarray(img.dataobj) if array is None else array
    nib.save(nib.Nifti1Image(arr, img.affine if affine is None else affine), str(dst))
    return dst


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(la_dir, tmp_path_factory):
    """(config, run directory) of a finished 2-step run; tests that change it work on a copy."""
    base = tmp_path_factory.mktemp("tiny")
    cfg = write_config(base / "c.yaml", la_dir)
    assert main(["train", str(cfg), "--out", str(base / "run"), "--quiet"]) == 0
    return cfg, base / "run"


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    shutil.copytree(tiny_run[1], tmp_path / "run")
    return tiny_run[0], tmp_path / "run"


# -- silently wrong ---------------------------------------------------------------------------------------------------

def test_1_non_finite_image_is_an_error_naming_the_file(la_dir, tiny_run, tmp_path, capsys):
    image, label = la_files(la_dir, 1)[0]
    arr = nib.load(str(image)).get_fdata(dtype=np.float32)
    arr[10:20, 10:20, 10:20] = np.nan
    bad = nifti_like(image, tmp_path / "nan.nii.gz", arr)
    with pytest.raises(ImageError, match=r"nan.nii.gz: 1000 of .* values are NaN or infinite"):  # train loads this way
        load_case(Case("nan", str(bad), str(label)), "zscore", 2)
    code, _, err = run_cli(capsys, "predict", "--run", tiny_run[1], "--input", bad, "--out", tmp_path / "pred")
    assert code == 2 and "nan.nii.gz: 1000 of" in one_error_line(err)
    assert not list((tmp_path / "pred").glob("*.nii.gz"))
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "nan.nii.gz").symlink_to(label)
    code, out, err = run_cli(capsys, "pseudolabel", "--input", bad, "--prompt-from-masks", tmp_path / "masks",
                             "--out", tmp_path / "pl", "--device", "cpu")
    assert code == 1 and "nan.nii.gz: 1000 of" in out + err and "1 failed" in out


def test_2_dataset_json_listing_missing_files_is_an_error(la_dir, tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    entries = []
    for image, label in la_files(la_dir, 2):
        (tmp_path / "imagesTr" / image.name).symlink_to(image)
        (tmp_path / "labelsTr" / label.name).symlink_to(label)
        entries.append({"image": f"./imagesTr/{image.name}", "label": f"./labelsTr/{label.name}"})
    ds = {"training": entries + [{"image": "./imagesTr/ghost.nii.gz"}]}  # would land among the unlabelled cases
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ImageError, match=r"dataset.json: 1 listed file\(s\) not found, e.g. .*ghost.nii.gz"):
        discover_cases(tmp_path)
    ds["training"] = entries[:1] + [{"image": entries[1]["image"], "label": "./labelsTr/lost.nii.gz"}]
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ImageError, match="lost.nii.gz"):
        discover_cases(tmp_path)


def test_3_changed_config_never_resumes_silently(la_dir, run_copy, tmp_path, capsys):
    cfg, run = run_copy
    before = (run / "config.yaml").read_text()
    code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--quiet", "--set", "train.lr=0.02")
    line = one_error_line(err)
    assert code == 2 and "train.lr: 0.01 -> 0.02" in line and "--force-new" in line
    assert (run / "config.yaml").read_text() == before
    # --force-new starts over; the old run is moved aside, not lost
    code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--quiet", "--set", "train.lr=0.02", "--force-new")
    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.02
    (old,) = run.glob("replaced-*")
    assert yaml.safe_load((old / "config.yaml").read_text())["train"]["lr"] == 0.01
    assert (old / "checkpoints" / "last.pt").exists() and (old / "log.jsonl").exists()
    # a first start that failed (a label with a value the config does not allow) is redone by the fixed command
    bad_root = tmp_path / "bad"
    for d in ("imagesTr", "labelsTr"):
        (bad_root / d).mkdir(parents=True)
    for image, label in la_files(la_dir, 3):
        (bad_root / "imagesTr" / image.name).symlink_to(image)
        nifti_like(label, bad_root / "labelsTr" / label.name, np.asarray(nib.load(str(label)).dataobj) * 2)
    fresh = tmp_path / "fresh"
    code, _, err = run_cli(capsys, "train", write_config(tmp_path / "bad.yaml", bad_root), "--out", fresh, "--quiet")
    assert code == 2 and "unexpected label values [2]" in one_error_line(err)
    assert (fresh / "manifest.json").exists()  # the failed start had written its split
    code, _, err = run_cli(capsys, "train", cfg, "--out", fresh, "--quiet")
    assert code == 0, err
    assert str(la_dir) in (fresh / "manifest.json").read_text() and str(bad_root) not in (fresh / "manifest.json"
                                                                                          ).read_text()


def test_3b_iterations_may_change_on_resume_and_are_recorded(run_copy, capsys):
    cfg, run = run_copy
    code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--quiet", "--set", "train.iterations=3")
    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["iterations"] == 3
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert any(r["event"] == "config_changed" and r["keys"] == ["train.iterations"] for r in log)
    assert any(r["event"] == "resumed" and r["step"] == 2 for r in log) and log[-1]["event"] == "done"


def test_3c_a_run_saved_without_its_method_defaults_still_resumes(tmp_path):
    """config.yaml keeps the method's defaults since training fills them in; a run saved before resumes with the
    same config, and a changed value is still refused."""
    raw = {"method": "knowledge_mining", "data": {"root": str(tmp_path)}, "knowledge_mining": {"warmup": 5}}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    save_config(config_from_dict(raw), run / "config.yaml")
    assert prepare_run_dir(with_method_defaults(config_from_dict(raw)), run) == []
    lighter = with_method_defaults(config_from_dict(apply_overrides(raw, ["knowledge_mining.weight=0.5"])))
    with pytest.raises(RunDirError, match=r"knowledge_mining.weight: 1.0 -> 0.5"):
        prepare_run_dir(lighter, run)


def test_4_predict_refuses_an_output_folder_inside_the_input(la_dir, tiny_run, tmp_path, capsys):
    image = la_files(la_dir, 1)[0][0]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / image.name).symlink_to(image)
    for out, extra in ((inp, []), (inp, ["--overwrite"]), (inp / "pred", [])):
        code, _, err = run_cli(capsys, "predict", "--run", tiny_run[1], "--input", inp, "--out", out, *extra)
        assert code == 2 and "is inside --input" in one_error_line(err)
    code, _, err = run_cli(capsys, "predict", "--run", tiny_run[1], "--input", inp / image.name, "--out", inp,
                           "--overwrite")
    assert code == 2 and "is inside --input" in one_error_line(err)
    assert sorted(p.name for p in inp.iterdir()) == [image.name] and (inp / image.name).resolve() == image.resolve()


def test_5_evaluate_with_missing_predictions(la_dir, tmp_path, capsys):
    (pred := tmp_path / "pred").mkdir()
    (ref := tmp_path / "ref").mkdir()
    labels = [label for _, label in la_files(la_dir, 2)]
    for label in labels:
        (ref / label.name).symlink_to(label)
    (pred / labels[0].name).symlink_to(labels[0])
    code, out, err = run_cli(capsys, "evaluate", "--pred", pred, "--ref", ref, "--out", tmp_path / "ev", "--quiet")
    assert code == 2 and "no prediction for 1 of the 2 reference cases" in one_error_line(err)
    assert "--allow-missing" in err and not (tmp_path / "ev").exists()
    code, out, err = run_cli(capsys, "evaluate", "--pred", pred, "--ref", ref, "--out", tmp_path / "ev", "--quiet",
                             "--allow-missing")
    missing = labels[1].name.replace(".nii.gz", "")
    assert code == 0 and "1 reference case(s) have no prediction" in err and missing in err
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["missing"] == [missing] and summary["n_cases"] == 1


def test_6_pseudolabel_checks_the_prompt_mask_grid(la_dir, tmp_path, capsys):
    image, label = la_files(la_dir, 1)[0]
    (images := tmp_path / "images").mkdir()
    (masks := tmp_path / "masks").mkdir()
    (images / image.name).symlink_to(image)
    affine = nib.load(str(label)).affine.copy()
    affine[0, 3] += 10.0  # the mask's grid is 10 mm away from the image's
    nifti_like(label, masks / label.name, affine=affine)
    code, out, err = run_cli(capsys, "pseudolabel", "--input", images, "--prompt-from-masks", masks, "--out",
                             tmp_path / "pl", "--device", "cpu")
    assert code == 1 and "1 failed" in out
    assert f"{masks / label.name}: geometry does not match" in out + err and "origin" in out + err
    assert not (tmp_path / "pl" / label.name).exists()


def test_7_a_run_directory_is_locked_by_its_process(la_dir, tmp_path, capsys, repo_dir):
    cfg = write_config(tmp_path / "c.yaml", la_dir)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(repo_dir / "SemiSegCore")}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from semiseg.train.rundir import RunLock; lock = RunLock(sys.argv[1]); "
         "lock.__enter__(); print('locked', flush=True); sys.stdin.read()", str(run)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--quiet")
        line = one_error_line(err)
        assert code == 2 and f"in use by another training process (pid {holder.pid}" in line and ".lock" in line
        assert not (run / "manifest.json").exists()
    finally:
        holder.kill()  # the system releases its lock
        holder.wait(timeout=120)


def test_7b_temporary_files_have_unique_names(la_dir, tmp_path):
    """Another writer's temporary file (a fixed name before) is left alone."""
    out = tmp_path / "report"
    out.mkdir()
    (out / ".tmp-metrics.png").write_bytes(b"another process is writing this")
    label = la_files(la_dir, 1)[0][1]
    (ref := tmp_path / "ref").mkdir()
    (ref / label.name).symlink_to(label)
    _, rows = evaluate_folders(ref, ref, quiet=True)
    write_report(rows, out)
    assert (out / "metrics.png").stat().st_size > 0
    assert (out / ".tmp-metrics.png").read_bytes() == b"another process is writing this"
    assert sorted(p.name for p in out.iterdir()) == [".tmp-metrics.png", "metrics.csv", "metrics.png", "summary.json"]


def test_8_both_empty_reference_and_prediction_give_dice_1(la_dir, tmp_path, capsys):
    label = la_files(la_dir, 1)[0][1]
    empty = np.zeros(nib.load(str(label)).shape, dtype=np.uint8)
    for d in ("pred", "ref"):
        (tmp_path / d).mkdir()
        nifti_like(label, tmp_path / d / "case.nii.gz", empty)
    summary, rows = evaluate_folders(tmp_path / "pred", tmp_path / "ref", quiet=True)
    assert [(r["label"], r["dice"], r["jaccard"], r["hd95"]) for r in rows] == [(1, 1.0, 1.0, 0.0)]
    assert "n/a" not in format_table(summary)
    code, out, _ = run_cli(capsys, "evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--quiet")
    assert code == 0 and "1.0000" in out and "n/a" not in out


# -- tracebacks or vague messages -------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to fill a disk")
def test_os_errors_name_the_path_and_say_the_disk_is_full(la_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").symlink_to("/dev/full")  # every write to it fails as on a full disk
    code, _, err = run_cli(capsys, "train", write_config(tmp_path / "c.yaml", la_dir), "--out", run, "--quiet")
    assert code == 2 and one_error_line(err).endswith(f"{run / 'log.jsonl'}: the disk is full (no space left on device)")
    # an output folder that cannot be made: the path and the reason
    (tmp_path / "file").write_text("not a folder")
    label = la_files(la_dir, 1)[0][1]
    (ref := tmp_path / "ref").mkdir()
    (ref / label.name).symlink_to(label)
    code, _, err = run_cli(capsys, "evaluate", "--pred", ref, "--ref", ref, "--out", tmp_path / "file" / "ev")
    assert code == 2 and one_error_line(err).endswith(f"{tmp_path / 'file' / 'ev'}: Not a directory")
    assert error_line(OSError(errno.EROFS, "Read-only file system", "/mnt/x")) == "/mnt/x: read-only file system"


def test_sam_checkpoint_error_is_one_line(la_dir, tmp_path, capsys):
    image, label = la_files(la_dir, 1)[0]
    (images := tmp_path / "images").mkdir()
    (masks := tmp_path / "masks").mkdir()
    (images / image.name).symlink_to(image)
    (masks / label.name).symlink_to(label)
    code, _, err = run_cli(capsys, "pseudolabel", "--input", images, "--prompt-from-masks", masks, "--out",
                           tmp_path / "pl", "--device", "cpu", "--checkpoint", tmp_path / "missing.pth")
    assert code == 2 and "missing.pth: LiteMedSAM checkpoint not found" in one_error_line(err)


def test_corrupt_checkpoints_are_named_with_the_other_one(la_dir, run_copy, tmp_path, capsys):
    cfg, run = run_copy
    for name in ("best.pt", "last.pt"):
        path = run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy of the run: truncate in place
    image = la_files(la_dir, 1)[0][0]
    code, _, err = run_cli(capsys, "predict", "--run", run, "--input", image, "--out", tmp_path / "pred")
    line = one_error_line(err)
    assert code == 2 and f"{run / 'checkpoints' / 'best.pt'}: cannot be read, truncated or corrupt" in line
    assert "last.pt beside it may still be good" in line
    code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--quiet")  # resuming reads last.pt
    assert code == 2 and f"{run / 'checkpoints' / 'last.pt'}: cannot be read" in one_error_line(err)


def test_a_checkpoint_of_another_architecture_is_named(la_dir, run_copy, tmp_path, capsys):
    cfg, run = run_copy
    code, _, err = run_cli(capsys, "train", cfg, "--out", run, "--quiet", "--set", "model.features=8")
    assert code == 2 and "model.features: 4 -> 8" in one_error_line(err)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["features"] = 8  # the run's own config edited by hand: it no longer fits its checkpoints
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    image = la_files(la_dir, 1)[0][0]
    code, _, err = run_cli(capsys, "predict", "--run", run, "--input", image, "--out", tmp_path / "pred")
    assert code == 2 and "best.pt: does not fit the configured model 'vnet'" in one_error_line(err)
    code, _, err = run_cli(capsys, "train", run / "config.yaml", "--out", run, "--quiet")
    assert code == 2 and "last.pt: does not fit the configured model 'vnet'" in one_error_line(err)


@pytest.mark.parametrize("key, value, message", [
    ("train.iterations", 0, "'train.iterations' must be >= 1, got 0"),
    ("train.val_every", 0, "'train.val_every' must be >= 1"),
    ("train.checkpoint_every", -1, "'train.checkpoint_every' must be >= 1"),
    ("train.batch_size", 0, "'train.batch_size' must be >= 1"),
    ("train.lr", 0, "'train.lr' must be > 0"),
    ("train.lr", -0.1, "'train.lr' must be > 0"),
    ("train.optimizer", "sgdm", "'train.optimizer': unknown value 'sgdm' \\(sgd, adam, adamw\\)"),
    ("model.name", "vnet2", "'model.name': unknown model 'vnet2'"),
    ("data.intensity", "z-score", "'data.intensity': unknown value 'z-score'"),
    ("train.patch_size", [32, 32, 40], "'train.patch_size' must be 3 sizes, multiples of 16x16x16 .*'vnet'"),
    ("infer.patch_size", [96, 96, 90], "'infer.patch_size' must be 3 sizes, multiples of 16x16x16"),
])
def test_config_value_ranges_are_checked_at_load(key, value, message):
    section, name = key.split(".")
    raw = {"model": {"name": "vnet"}, "train": {"patch_size": [32, 32, 32]}}
    raw.setdefault(section, {})[name] = value
    with pytest.raises(ConfigError, match="config key " + message):
        config_from_dict(raw)


def test_a_label_with_one_axis_flipped_shows_both_directions(la_dir, tmp_path):
    image, label = la_files(la_dir, 1)[0]
    affine = nib.load(str(label)).affine.copy()
    affine[:3, 0] *= -1  # same origin and spacing, the first axis points the other way
    flipped = nifti_like(label, tmp_path / "flipped.nii.gz", affine=affine)
    with pytest.raises(ImageError) as info:
        load_case(Case("c", str(image), str(flipped)), "none", 2)
    text = str(info.value)
    assert "flipped.nii.gz: geometry does not match" in text and str(image) in text
    assert "direction [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]] vs [[1.0, 0.0, 0.0]," in text


def test_a_non_finite_loss_names_the_step_and_the_cases(la_dir, tmp_path):
    cfg = config_from_dict(yaml.safe_load(write_config(tmp_path / "c.yaml", la_dir).read_text()))
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    for case in trainer.labelled:  # the data went bad after loading (load itself refuses NaN)
        case.image[:] = np.nan
    with pytest.raises(TrainingError, match=r"loss is nan at step 1 \(batch of cases (\w+)\)") as info:
        trainer.fit()
    assert info.match("|".join(c.id for c in trainer.labelled))
