"""Training in a separate process: launch the ``semiseg`` CLI, follow its ``log.jsonl``, stop it, resume it.

The GUI never waits on training: it starts the process and polls :meth:`TrainingProcess.poll` from a timer.
Stopping sends SIGINT; the CLI then saves ``checkpoints/last.pt`` and logs ``{"event": "stopped"}``. Resuming is
launching the same command again with the same run directory: the CLI continues from ``last.pt``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Progress:
    state: str = "idle"
    """idle | running | done | stopped | failed"""
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


def default_python() -> str:
    """Inside Slicer, ``sys.executable`` is the application; its Python is the ``PythonSlicer`` beside it."""
    exe = Path(sys.executable)
    if exe.stem.lower().startswith("slicer"):
        candidate = exe.with_name("PythonSlicer" + exe.suffix)
        if not candidate.exists():
            candidate = exe.parent / "bin" / ("PythonSlicer" + exe.suffix)
        if candidate.exists():
            return str(candidate)
    return sys.executable


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
    """One training run directory and the process working on it."""

    def __init__(self, config: str | Path, run_dir: str | Path, overrides: list[str] | None = None,
                 python: str | None = None):
        self.config = Path(config)
        self.run_dir = Path(run_dir)
        self.overrides = list(overrides or [])
        self.python = python or default_python()
        self.process: subprocess.Popen | None = None
        self._offset = 0
        self._partial = b""
        self._ended: str | None = None  # "done" or "stopped" once the log says so
        self.progress = Progress()

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "semiseg.cli", "train", str(self.config), "--out", str(self.run_dir)]
        for item in self.overrides:
            cmd += ["--set", item]
        return cmd

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (or resume, when the run directory has a checkpoint) training in the background."""
        if self.is_running():
            raise RuntimeError(f"{self.run_dir}: training is already running (pid {self.process.pid})")
        if not self.config.exists():
            raise FileNotFoundError(f"{self.config}: training config not found")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._read_log()  # an earlier session's log: its "stopped" must not end this one
        self._ended = None
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (core_path(), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        kwargs = {}
        if os.name == "nt":  # lets stop() deliver a console break that Python raises as KeyboardInterrupt
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        with open(self.run_dir / "process.log", "ab") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, **kwargs)
        self.progress.state, self.progress.returncode, self.progress.message = "running", None, ""

    def stop(self) -> None:
        """Ask the trainer to save and exit (it logs ``stopped``); :meth:`poll` reports when it has."""
        if not self.is_running():
            return
        self.process.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGINT)

    def wait(self, timeout: float | None = None) -> Progress:
        if self.process is not None:
            self.process.wait(timeout)
        return self.poll()

    def poll(self) -> Progress:
        """Read new log lines (never blocks) and update :attr:`progress`. The state leaves "running" only when the
        process has exited, so that a new :meth:`start` never finds the previous process still saving."""
        self._read_log()
        p = self.progress
        if self.process is None:
            p.state = self._ended or p.state
            return p
        code = self.process.poll()
        if code is not None and p.state == "running":
            self._read_log()  # lines written just before exit
            p.returncode = code
            if code == 0:
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
