"""A real (tiny) training run of the semiseg CLI in a background process: progress, stop, resume."""
import time

import pytest

from conftest import LA, la_cases
from SemiSegLib.training import TrainingProcess, training_overrides

# The trainer logs a train event every 10 steps (and at the last); validation (one case, a few large windows)
# runs at the last step and once more at the end (best checkpoint). Stop comes at the first train event
# (step 10), so 20 iterations leave the run ten steps of margin to receive it before it would finish.
TINY = ["data.max_cases=3", "data.val=1", "data.labelled=1", "model.features=4", "train.patch_size=[32,32,32]",
        "train.batch_size=1", "train.unlabelled_batch_size=1", "train.val_every=100", "train.checkpoint_every=1",
        "train.device=cpu", "infer.patch_size=[96,96,96]", "infer.overlap=0.0"]


def _config(tmp_path):
    la_cases(1)  # skips without data
    from conftest import REPO

    config = REPO / "Resources" / "configs" / "la2018_supervised.yaml"
    if not config.exists():
        pytest.skip(f"{config} not found")
    return config


def _wait(process, condition, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        progress = process.poll()
        if condition(progress):
            return progress
        time.sleep(0.2)
    process.stop()
    raise AssertionError(f"timed out; state {process.progress.state}; output: {process.last_output()}")


def test_train_stop_resume(tmp_path):
    config = _config(tmp_path)
    run = tmp_path / "run"
    overrides = training_overrides(str(LA), iterations=20) + TINY
    process = TrainingProcess(config, run, overrides)
    process.start()
    assert process.is_running()  # start() returned while training goes on: the GUI is not blocked
    progress = _wait(process, lambda p: p.losses or p.state != "running")
    assert progress.state == "running", process.last_output()
    process.stop()
    progress = _wait(process, lambda p: p.state != "running")
    assert progress.state == "stopped", process.last_output()
    assert (run / "checkpoints" / "last.pt").exists()
    stopped_at = progress.step
    assert progress.iterations == 20 and 0 < stopped_at < 20

    process.start()  # resume: same command, same run folder
    progress = _wait(process, lambda p: p.state != "running", timeout=300)
    assert progress.state == "done", process.last_output()
    assert progress.step == 20 and progress.fraction == 1.0
    assert progress.losses[-1][0] > stopped_at  # it continued rather than restarting
    assert progress.dices and progress.dices[-1][0] == 20 and 0.0 <= progress.dice <= 1.0

    # the trained run segments a volume node (Segment panel) and is evaluated on a dataset (Review Dice panel)
    import slicer

    from semiseg.infer import load_predictor
    from SemiSegLib import evaluation, nodes, pseudolabel

    scene = slicer.vtkMRMLScene()
    image_path, label_path = la_cases(1)[0]
    volume = nodes.load_volume(scene, str(image_path))
    seg = nodes.new_segmentation(scene, volume, "model")
    (result,) = pseudolabel.model_segment(volume, seg, load_predictor(run))
    assert nodes.segment_tags(seg, result.segment_id)[nodes.TAG_SOURCE] == "model"
    assert str(run) in nodes.segment_tags(seg, result.segment_id)[nodes.TAG_PROVENANCE]
    rows = evaluation.evaluate_run_on_dataset(str(LA), str(run), max_cases=1)
    assert len(rows) >= 1 and all(0.0 <= r["dice"] <= 1.0 for r in rows)


def test_failure_is_reported_with_the_output(tmp_path):
    config = _config(tmp_path)
    process = TrainingProcess(config, tmp_path / "bad", ["data.root=" + str(tmp_path / "missing")])
    process.start()
    progress = _wait(process, lambda p: p.state != "running", timeout=120)
    assert progress.state == "failed" and progress.returncode != 0
    assert "missing" in progress.message


def test_overrides_count_every_labelled_case_and_keep_the_config_root():
    assert training_overrides("/d", "sam_mix", 100, "cpu", labelled=7, val=2) == [
        "data.root=/d", "method=sam_mix", "train.iterations=100", "train.device=cpu", "data.labelled=7", "data.val=2"]
    assert training_overrides(None, iterations=5) == ["train.iterations=5"]
