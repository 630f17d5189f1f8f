"""``python -m SemiSegLib.worker JOB.json``: run one :mod:`SemiSegLib.batch` job in this process.

The job file holds ``kind`` (a key of ``batch.JOBS``), ``args`` (its keyword arguments), ``progress`` (a JSON-lines
file that gets one ``{"fraction", "message"}`` line per step) and ``result`` (the JSON result, written last and
atomically). :func:`SemiSegLib.tasks.worker_steps` starts it and follows the progress file."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m SemiSegLib.worker JOB.json", file=sys.stderr)
        return 2
    from .batch import JOBS

    job = json.loads(Path(argv[0]).read_text())
    steps = JOBS[job["kind"]](**job["args"])
    with open(job["progress"], "a") as log:
        while True:
            try:
                progress = next(steps)
            except StopIteration as stop:
                result = stop.value
                break
            log.write(json.dumps({"fraction": progress.fraction, "message": progress.message}) + "\n")
            log.flush()
    tmp = Path(job["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, job["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
