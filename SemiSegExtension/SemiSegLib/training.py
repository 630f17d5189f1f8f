"""Training in a separate process: launch the ``semiseg`` CLI, follow its ``log.jsonl``, stop it, resume it.

The GUI never waits on training: it starts the process and polls :meth:`TrainingProcess.poll` from a timer. The
process runs in its own process group (:class:`~SemiSegLib.tasks.ProcessTree`): inside Slicer the command is the
``PythonSlicer`` launcher, which runs the real Python as its child. Stopping creates ``<run>/STOP``, which the
trainer polls every step: it saves ``checkpoints/last.pt``, logs ``{"event": "stopped"}`` and exits, whatever
launcher sits in between and on every platform. :meth:`TrainingProcess.kill` ends the whole tree at once.
Resuming is launching the same command again with the same run directory: the CLI continues from ``last.pt``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .tasks import ProcessTree, child_environment, default_python

STOP_FILE = "STOP"  # the name semiseg.train.trainer polls (STOP_FILE there; not imported: it would load torch)


@dataclass
class Progress:
    state: str = "idle"
    """idle | running | done | stopped (asked to, or killed) | failed"""
    step: int = 0
    iterations: int = 0
    loss: float | None = None
    dice: float | None = None
    losses: list = field(default_factory=list)
    """(step, loss) for every train event so far: the live loss curve."""
    dices: list = field(default_factory=list)
    """(step, dice) for every validation."""
    returncode: int | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.iterations) if self.iterations else 0.0


def core_path() -> str:
    """The folder holding the ``semiseg`` package this process imported (handed to the child's PYTHONPATH)."""
    import semiseg

    return str(Path(semiseg.__file__).resolve().parent.parent)


def training_overrides(dataset_root: str | None, method: str | None = None, iterations: int | None = None,
                       device: str | None = None, labelled: int | None = None, val: int | None = None,
                       labelled_ids: list[str] | None = None) -> list[str]:
    """``--set`` overrides for a run on a dataset folder. ``labelled``/``val`` are case counts: pass the number of
    labelled cases (minus ``val``) so that every labelled case trains; ``labelled_ids`` (accepted or corrected
    pseudo-labels) are always labelled, never validation. ``dataset_root`` None keeps the config's ``data.root``."""
    out = [f"data.root={dataset_root}"] if dataset_root else []
    if method:
        out.append(f"method={method}")
    if iterations:
        out.append(f"train.iterations={int(iterations)}")
    if device:
        out.append(f"train.device={device}")
    if labelled is not None:
        out.append(f"data.labelled={max(int(labelled), 1)}")
    if val is not None:
        out.append(f"data.val={int(val)}")
    if labelled_ids:
        out.append("data.labelled_ids=[" + ",".join(json.dumps(str(i)) for i in labelled_ids) + "]")
    return out


class TrainingProcess:
    """One training run directory and the process tree working on it."""

    def __init__(self, config: str | Path, run_dir: str | Path, overrides: list[str] | None = None,
                 python: str | None = None):
        self.config = Path(config)
        self.run_dir = Path(run_dir)
        self.overrides = list(overrides or [])
        self.python = python or default_python()
        self.tree: ProcessTree | None = None
        self._offset = 0
        self._partial = b""
        self._ended: str | None = None  # "done" or "stopped" once the log says so
        self._killed = False
        self.progress = Progress()

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    @property
    def stop_path(self) -> Path:
        return self.run_dir / STOP_FILE

    @property
    def pid(self) -> int | None:
        return self.tree.pid if self.tree is not None else None

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "semiseg.cli", "train", str(self.config), "--out", str(self.run_dir)]
        for item in self.overrides:
            cmd += ["--set", item]
        return cmd

    def is_running(self) -> bool:
        """True while the process or anything it started is alive."""
        return self.tree is not None and self.tree.running()

    def stop_requested(self) -> bool:
        return self.is_running() and self.stop_path.exists()

    def start(self) -> None:
        """Start (or resume, when the run directory has a checkpoint) training in the background."""
        if self.is_running():
            raise RuntimeError(f"{self.run_dir}: training is already running (pid {self.pid})")
        if not self.config.exists():
            raise FileNotFoundError(f"{self.config}: training config not found")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop_path.unlink(missing_ok=True)  # a stop asked of an earlier run must not end this one
        self._read_log()  # an earlier session's log: its "stopped" must not end this one
        self._ended, self._killed = None, False
        self.tree = ProcessTree(self.command(), self.run_dir / "process.log", env=child_environment([core_path()]))
        self.tree.start()
        self.progress.state, self.progress.returncode, self.progress.message = "running", None, ""

    def stop(self) -> None:
        """Ask the trainer to save ``last.pt`` and exit at its next step; :meth:`poll` reports when it has."""
        if self.is_running():
            self.stop_path.touch()

    def kill(self) -> None:
        """End the training process tree now (what the last checkpoint saved is kept)."""
        if self.tree is not None and self.tree.running():
            self.tree.kill()
            self._killed = True
        self.stop_path.unlink(missing_ok=True)

    def wait(self, timeout: float | None = None) -> Progress:
        import time

        end = None if timeout is None else time.monotonic() + timeout
        while self.is_running():
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"{self.run_dir}: training still running after {timeout} s")
            time.sleep(0.2)
        return self.poll()

    def poll(self) -> Progress:
        """Read new log lines (never blocks) and update :attr:`progress`. The state leaves "running" only when the
        whole process tree has exited, so that a new :meth:`start` never finds the previous trainer still saving."""
        self._read_log()
        p = self.progress
        if self.tree is None:
            p.state = self._ended or p.state
            return p
        if p.state == "running" and not self.tree.running():
            code = self.tree.returncode()
            self._read_log()  # lines written just before exit
            p.returncode = code
            if self._killed:
                p.state = "stopped"
                p.message = "ended at once; resuming continues from the last checkpoint"
            elif code == 0 or self._ended == "stopped":  # a stopped run exits 130 (SIGINT) or 143 (SIGTERM)
                p.state = self._ended or "done"
            else:
                p.state = "failed"
                p.message = f"training exited with code {code}; see {self.run_dir / 'process.log'}: " \
                            f"{self.last_output()}"
        return p

    def _read_log(self) -> None:
        for event in self._new_events():
            self._apply(event)

    def last_output(self, lines: int = 5) -> str:
        log = self.run_dir / "process.log"
        if not log.exists():
            return ""
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])

    def _new_events(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next poll
        events = []
        for line in lines:
            if line.strip():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # not ours to judge; the trainer owns the log format
        return events

    def _apply(self, event: dict) -> None:
        p = self.progress
        kind = event.get("event")
        if "step" in event:
            p.step = int(event["step"])
        if kind == "train":
            p.iterations = int(event.get("iterations", p.iterations))
            p.loss = float(event["loss"])
            p.losses.append((p.step, p.loss))
        elif kind == "val" and "dice" in event:
            p.dice = float(event["dice"])
            p.dices.append((p.step, p.dice))
        elif kind in ("done", "stopped"):
            self._ended = kind
