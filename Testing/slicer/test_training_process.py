"""A real (tiny) training run of the semiseg CLI in a background process tree: progress, stop, resume, kill; then the
trained run segments a volume and is evaluated on a dataset, each in a worker process that Cancel ends.

Inside Slicer the command is the PythonSlicer launcher, which starts the real Python as its child and forwards no
signal. The tests start training through a launcher that does the same (a Python that runs the command as its
child), so stopping must reach the trainer through the launcher, and killing must end both."""
import sys
import time
from pathlib import Path

import pytest

from conftest import LA, la_cases
from SemiSegLib.tasks import Task, worker_steps
from SemiSegLib.training import STOP_FILE, TrainingProcess, training_overrides

# The trainer logs a train event every 10 steps (and at the last); validation (one case, a few large windows)
# runs at the last step and once more at the end (best checkpoint). Stop comes at the first train event
# (step 10), so 20 iterations leave the run ten steps of margin to receive it before it would finish.
TINY = ["data.max_cases=3", "data.val=1", "data.labelled=1", "model.features=4", "train.patch_size=[32,32,32]",
        "train.batch_size=1", "train.unlabelled_batch_size=1", "train.val_every=100", "train.checkpoint_every=1",
        "train.device=cpu", "infer.patch_size=[96,96,96]", "infer.overlap=0.0"]


def _config():
    la_cases(1)  # skips without data
    from semiseg.resources import config_path

    return config_path("la2018_supervised")


def _launcher(tmp_path) -> Path:
    """A launcher like PythonSlicer: runs the real Python as a child, waits for it, forwards no signal."""
    path = tmp_path / "PythonLauncher"
    path.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                    f"sys.exit(subprocess.call([{sys.executable!r}] + sys.argv[1:]))\n")
    path.chmod(0o755)
    return path


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rfind(")") + 2:].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2] != "Z"


def _trainer_of(process, timeout=60) -> int:
    end = time.time() + timeout
    while time.time() < end:
        children = _children(process.pid)
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError(f"no trainer under the launcher: {process.last_output()}")


def _wait(process, condition, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        progress = process.poll()
        if condition(progress):
            return progress
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"timed out; state {process.progress.state}; output: {process.last_output()}")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="follows the process tree through /proc")
def test_train_stop_resume_segment_evaluate(tmp_path, scene, slicer_app):
    config = _config()
    run = tmp_path / "run"
    launcher = _launcher(tmp_path)
    process = TrainingProcess(config, run, training_overrides(str(LA), iterations=20) + TINY, python=str(launcher))
    process.start()
    assert process.is_running()  # start() returned while training goes on: the GUI is not blocked
    trainer = _trainer_of(process)
    progress = _wait(process, lambda p: p.losses or p.state != "running")
    assert progress.state == "running", process.last_output()
    with pytest.raises(RuntimeError, match="already running"):
        process.start()
    process.stop()  # reaches the trainer under the launcher: it saves, logs "stopped" and exits
    progress = _wait(process, lambda p: p.state != "running")
    assert progress.state == "stopped", process.last_output()
    assert not _alive(trainer) and not _alive(process.pid) and not (run / STOP_FILE).exists()
    assert (run / "checkpoints" / "last.pt").exists()
    stopped_at = progress.step
    assert progress.iterations == 20 and 0 < stopped_at < 20

    process.start()  # resume: same command, same run folder
    progress = _wait(process, lambda p: p.state != "running", timeout=300)
    assert progress.state == "done", process.last_output()
    assert progress.step == 20 and progress.fraction == 1.0
    assert progress.losses[-1][0] > stopped_at  # it continued rather than restarting
    assert progress.dices and progress.dices[-1][0] == 20 and 0.0 <= progress.dice <= 1.0

    # the trained run segments a volume node (Segment section), its model running in a worker process
    from SemiSeg import SemiSegLogic
    from semiseg.io import read_label
    from SemiSegLib import nodes
    from SemiSegLib.tasks import run_task

    logic = SemiSegLogic()
    image_path, label_path = la_cases(1)[0]
    volume = nodes.load_volume(scene, str(image_path))
    seg = nodes.new_segmentation(scene, volume, "model")
    (result,) = run_task(logic.segmentSteps(volume, seg, str(run)))
    tags = nodes.segment_tags(seg, result.segment_id)
    assert tags[nodes.TAG_SOURCE] == "model" and str(run) in tags[nodes.TAG_PROVENANCE]
    assert result.mask.shape == read_label(label_path).array.shape

    # ... and is evaluated on a dataset (Review Dice section), one case per progress step
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
    rows = run_task(worker_steps({"kind": "evaluate", "args": {"dataset": str(LA), "run": str(run),
                                                               "max_cases": 1}}, tmp_path / "evaluate"))
    assert len(rows) >= 1 and all(0.0 <= r["dice"] <= 1.0 for r in rows)
    from SemiSegLib import evaluation

    evaluation.fill_table(table, rows)
    assert table.GetNumberOfRows() == len(rows)

    # Cancel ends the evaluation worker's process tree
    task = Task("Evaluating", logic.evaluateDatasetSteps(str(LA), str(run), table))
    worker = None
    end = time.time() + 60
    while worker is None and time.time() < end:
        task.step()
        worker = _worker_pid()
        time.sleep(0.05)
    assert worker is not None and _alive(worker)
    task.cancel()
    assert task.state == "cancelled" and not _alive(worker)


def _worker_pid() -> int | None:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"SemiSegLib.worker" in args and _alive(int(cmdline.parent.name)):
            return int(cmdline.parent.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="follows the process tree through /proc")
def test_kill_ends_the_launcher_and_the_trainer(tmp_path):
    config = _config()
    process = TrainingProcess(config, tmp_path / "run", training_overrides(str(LA), iterations=100000) + TINY,
                              python=str(_launcher(tmp_path)))
    process.start()
    trainer = _trainer_of(process)
    process.kill()
    assert not _alive(trainer) and not _alive(process.pid) and not process.is_running()
    progress = process.poll()
    assert progress.state == "stopped" and "last checkpoint" in progress.message


def test_failure_is_reported_with_the_output(tmp_path):
    config = _config()
    process = TrainingProcess(config, tmp_path / "bad", ["data.root=" + str(tmp_path / "missing")])
    process.start()
    progress = _wait(process, lambda p: p.state != "running", timeout=300)
    assert progress.state == "failed" and progress.returncode != 0
    assert "missing" in progress.message


def test_the_stop_file_is_the_one_the_trainer_polls():
    from semiseg.train import trainer

    assert trainer.STOP_FILE == STOP_FILE


def test_overrides_count_every_labelled_case_and_keep_the_config_root():
    assert training_overrides("/d", "sam_mix", 100, "cpu", labelled=7, val=2) == [
        "data.root=/d", "method=sam_mix", "train.iterations=100", "train.device=cpu", "data.labelled=7", "data.val=2"]
    assert training_overrides(None, iterations=5) == ["train.iterations=5"]
