"""Tasks step by step with cancel, SAM checkpoint downloads over real HTTP (progress, checksum, cancel), and the
first-use installer's decisions (nothing missing: nothing asked; declined: nothing installed)."""
import hashlib
import http.server
import threading
from functools import partial

import pytest

from semiseg.sam.backends import CheckpointInfo, SamCheckpointError
from SemiSegLib import dependencies
from SemiSegLib.downloads import download_steps
from SemiSegLib.tasks import Cancelled, Progress, Task, run_task


def _counting(n, log):
    try:
        for i in range(n):
            yield Progress(i / n, f"item {i}")
            log.append(i)
        return "finished"
    finally:
        log.append("cleaned up")


def test_a_task_steps_reports_and_cancels():
    log = []
    assert run_task(_counting(3, log)) == "finished" and log == [0, 1, 2, "cleaned up"]
    log.clear()
    task = Task("count", _counting(10, log))
    assert task.step() and task.progress.message == "item 0"
    assert task.step() and task.progress.fraction == 0.1
    task.cancel()
    assert task.state == "cancelled" and log == [0, "cleaned up"] and not task.step()
    with pytest.raises(Cancelled):
        task.run()

    def failing():
        yield Progress(0.0, "start")
        raise ValueError("the volume has no voxels")

    task = Task("fail", failing())
    while task.step():
        pass
    assert task.state == "failed" and "no voxels" in str(task.error)


@pytest.fixture
def served(tmp_path):
    """A real HTTP server on localhost serving a 3 MB file."""
    folder = tmp_path / "www"
    folder.mkdir()
    payload = bytes(range(256)) * (3 * 4096)
    (folder / "weights.pth").write_bytes(payload)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/weights.pth", payload
    server.shutdown()


def test_download_shows_progress_and_verifies_the_checksum(tmp_path, served):
    url, payload = served
    info = CheckpointInfo("weights.pth", url, sha256=hashlib.sha256(payload).hexdigest())
    fractions = []
    path = Task("download", download_steps(info, tmp_path / "cache")).run(lambda p: fractions.append(p.fraction))
    assert path.read_bytes() == payload
    known = [f for f in fractions if f is not None]
    assert len(known) >= 3 and known == sorted(known) and known[-1] == 1.0
    assert run_task(download_steps(info, tmp_path / "cache")) == path  # already there: verified, not fetched

    bad = CheckpointInfo("other.pth", url, sha256="0" * 64)
    with pytest.raises(SamCheckpointError, match="does not match"):
        run_task(download_steps(bad, tmp_path / "cache"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["weights.pth"]  # nothing corrupt is kept

    task = Task("download", download_steps(CheckpointInfo("third.pth", url, sha256=info.sha256), tmp_path / "cache"))
    task.step()
    task.step()
    task.cancel()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["weights.pth"]  # no partial file

    with pytest.raises(SamCheckpointError, match="could not be downloaded"):
        run_task(download_steps(CheckpointInfo("x.pth", url.replace("weights", "missing")), tmp_path / "cache"))


def test_installer_asks_first_and_installs_nothing_when_declined():
    asked, installed = [], []

    def confirm(text):
        asked.append(text)
        return False

    assert dependencies.ensure_dependencies(confirm=confirm, pip_install=installed.append) == []  # all present
    assert asked == [] and installed == []
    missing = ["semiseg-no-such-package>=1.0"]
    with pytest.raises(RuntimeError, match="declined"):
        dependencies.ensure_dependencies(requirements=missing, confirm=confirm, pip_install=installed.append)
    assert len(asked) == 1 and "semiseg-no-such-package" in asked[0] and installed == []
    with pytest.raises(RuntimeError, match="could not install semiseg-no-such-package"):
        dependencies.ensure_dependencies(requirements=missing, confirm=lambda t: True, pip_install=installed.append)
    assert installed == [missing]  # asked pip for exactly what was missing
    assert dependencies.missing_packages(["numpy>=1.0", "numpy>=999"]) == ["numpy>=999"]


def test_minimum_slicer_version():
    assert dependencies.slicer_version_problem(5, 8) is None and dependencies.slicer_version_problem(6, 0) is None
    assert "5.8 or later" in dependencies.slicer_version_problem(5, 6)
