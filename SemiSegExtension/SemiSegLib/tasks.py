"""Long work that keeps Slicer responsive, shows progress and can be cancelled.

A :class:`Task` wraps a generator that does one chunk of work per ``next()`` and yields a :class:`Progress`; the
widget calls :meth:`Task.step` from a timer, so the event loop runs between chunks, and Cancel closes the
generator (its ``finally`` blocks clean up). Work that cannot be cut into chunks (a model over a whole volume, a
dataset evaluation, training) runs in a :class:`ProcessTree`: a child process in its own process group, so that
stopping it ends everything it started (``PythonSlicer`` is a launcher that runs the real Python as its child).
:func:`worker_steps` runs a ``SemiSegLib.worker`` job that way and follows its progress file.

No Slicer and no Qt here.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator


@dataclass
class Progress:
    fraction: float | None = None
    """0..1, or None when unknown (a busy indicator)."""
    message: str = ""
    waiting: bool = False
    """True while only waiting on another process: the caller may sleep before the next step."""


class Cancelled(Exception):
    """The person cancelled the task."""


class Task:
    """One cancellable piece of work driven step by step. ``state``: running, done, failed or cancelled."""

    def __init__(self, name: str, steps: Generator):
        self.name = name
        self._steps = steps
        self.state = "running"
        self.progress = Progress(0.0, name)
        self.result = None
        self.error: BaseException | None = None

    def step(self) -> bool:
        """Do one chunk; True while there is more to do."""
        if self.state != "running":
            return False
        try:
            self.progress = next(self._steps)
        except StopIteration as stop:
            self.result, self.state = stop.value, "done"
            self.progress = Progress(1.0, f"{self.name}: done")
        except Exception as exc:  # reported by the caller (an error dialog in Slicer)
            self.error, self.state = exc, "failed"
            self._steps.close()
        return self.state == "running"

    def cancel(self) -> None:
        if self.state == "running":
            self._steps.close()  # GeneratorExit inside the work: its finally blocks stop processes, remove files
            self.state = "cancelled"
            self.progress = Progress(None, f"{self.name}: cancelled")

    def run(self, on_progress=None, poll_s: float = 0.1):
        """Run to the end here (batch mode, tests); returns the result or raises the task's error."""
        while self.step():
            if on_progress is not None:
                on_progress(self.progress)
            if self.progress.waiting:
                time.sleep(poll_s)
        if self.state == "failed":
            raise self.error
        if self.state == "cancelled":
            raise Cancelled(self.name)
        return self.result


def run_task(steps: Generator, name: str = "task"):
    """Run a step generator to its end and return its result (what the Logic does outside the GUI)."""
    return Task(name, steps).run()


# ---- processes ----------------------------------------------------------------------------------------------------

class ProcessTree:
    """A background process started in its own process group (a new session on POSIX, a new process group on
    Windows). :meth:`kill` ends the whole tree; :meth:`running` stays True while any process of the group lives."""

    def __init__(self, command: list[str], log_path: str | Path, env: dict | None = None, cwd: str | None = None):
        self.command = [str(c) for c in command]
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # its own process group, whose id is the child's pid
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd, **kwargs)

    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def running(self) -> bool:
        if self.process is None:
            return False
        if self.process.poll() is None:
            return True
        return os.name != "nt" and bool(group_members(self.process.pid))

    def kill(self, timeout: float = 10.0) -> None:
        """End the process and everything it started, at once; returns when they are gone (or ``timeout`` passed)."""
        if self.process is None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        end = time.monotonic() + timeout
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        while self.running() and time.monotonic() < end:  # the grandchildren die a moment later
            time.sleep(0.02)

    def output_tail(self, lines: int = 8) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a POSIX process group; [] when there are none."""
    proc = Path("/proc")
    if proc.is_dir():
        members = []
        for stat in proc.glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            fields = text[text.rfind(")") + 2:].split()  # after "pid (name) ": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
        return members
    try:  # macOS: no /proc; zombies count, which only delays "not running" until they are reaped
        os.killpg(pgid, 0)
        return [pgid]
    except ProcessLookupError:
        return []
    except PermissionError:
        return [pgid]


def child_environment(extra_paths: list[str]) -> dict:
    """This process's environment with ``extra_paths`` first on PYTHONPATH and unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*extra_paths, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def default_python() -> str:
    """Inside Slicer, ``sys.executable`` is the application; its Python is the ``PythonSlicer`` beside it."""
    exe = Path(sys.executable)
    if exe.stem.lower().startswith("slicer"):
        name = "PythonSlicer" + exe.suffix
        for candidate in (exe.with_name(name), exe.parent / "bin" / name):
            if candidate.exists():
                return str(candidate)
    return sys.executable


def code_paths() -> list[str]:
    """Where ``semiseg`` and ``SemiSegLib`` were imported from (the child's PYTHONPATH)."""
    import semiseg

    return [str(Path(semiseg.__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent)]


# ---- worker jobs --------------------------------------------------------------------------------------------------

def worker_steps(job: dict, folder: str | Path, python: str | None = None) -> Generator[Progress, None, dict]:
    """Run a ``SemiSegLib.worker`` job in its own process tree and follow it; returns the job's result.

    Closing the generator (Cancel) kills the worker's process tree."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    job = dict(job, progress=str(folder / "progress.jsonl"), result=str(folder / "result.json"))
    (folder / "job.json").write_text(json.dumps(job))
    process = ProcessTree([python or default_python(), "-m", "SemiSegLib.worker", folder / "job.json"],
                          folder / "worker.log", env=child_environment(code_paths()))
    process.start()
    progress, offset = Progress(None, f"{job['kind']}: starting", waiting=True), 0
    try:
        while process.running():
            progress, offset = _read_progress(Path(job["progress"]), offset, progress)
            yield progress
        code = process.returncode()
        if code != 0:
            raise RuntimeError(f"the {job['kind']} worker failed (exit code {code}); {folder / 'worker.log'}:\n"
                               f"{process.output_tail()}")
        return json.loads(Path(job["result"]).read_text())
    finally:
        if process.running():
            process.kill()


def _read_progress(path: Path, offset: int, last: Progress) -> tuple[Progress, int]:
    if not path.exists():
        return last, offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    for line in complete.splitlines():
        if line.strip():
            record = json.loads(line)
            last = Progress(record.get("fraction"), record.get("message", ""), waiting=True)
    return last, offset + len(complete)
