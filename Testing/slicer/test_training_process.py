"""A real (tiny) training run of the semiseg CLI in a background process: progress, stop, resume."""
import time

import pytest

from conftest import LA, la_cases
from SemiSegLib.training import TrainingProcess, training_overrides

TINY = ["data.max_cases=4", "data.val=1", "data.labelled=2", "model.features=4", "train.patch_size=[32,32,32]",
        "train.batch_size=1", "train.unlabelled_batch_size=1", "train.val_every=1000", "train.checkpoint_every=1",
        "train.device=cpu", "infer.patch_size=[32,32,32]"]


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
    overrides = training_overrides(str(LA), iterations=40) + TINY
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
    assert progress.iterations == 40 and 0 < stopped_at < 40

    process.start()  # resume: same command, same run folder
    progress = _wait(process, lambda p: p.state != "running", timeout=300)
    assert progress.state == "done", process.last_output()
    assert progress.step == 40 and progress.fraction == 1.0
    assert progress.losses[-1][0] > stopped_at  # it continued rather than restarting


def test_failure_is_reported_with_the_output(tmp_path):
    config = _config(tmp_path)
    process = TrainingProcess(config, tmp_path / "bad", ["data.root=" + str(tmp_path / "missing")])
    process.start()
    progress = _wait(process, lambda p: p.state != "running", timeout=120)
    assert progress.state == "failed" and progress.returncode != 0
    assert "missing" in progress.message
