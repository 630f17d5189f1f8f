"""Shared by the bench_* scripts: run one setting into runs/<bench>/<setting>/ (skipping finished ones, resuming
interrupted ones), collect its validation summary and time, and print one table with the machine's name."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SemiSegCore"))

from semiseg.config import apply_overrides, config_from_dict  # noqa: E402
from semiseg.utils import device_name, pick_device  # noqa: E402

import yaml  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=["cpu", "full"], default="cpu",
                   help="cpu: sized for a 2-core machine; full: the standard protocol, for GPU machines")
    p.add_argument("--only", nargs="*", help="run only these settings")
    p.add_argument("--rerun", action="store_true", help="train again even where a finished run exists")
    p.add_argument("--runs", default=str(REPO / "runs"), help="parent of runs/<bench>/<setting>")
    return p


def load_yaml(path: str | Path) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists() and (run_dir / "bench.json").exists()


def run_setting(bench: str, setting: str, raw_config: dict, overrides: list[str], runs: str | Path,
                rerun: bool = False) -> dict:
    """Train one setting (or reuse a finished run) and return its summary, minutes and run directory."""
    from semiseg.train import train

    run_dir = Path(runs) / bench / setting
    if finished(run_dir) and not rerun:
        info = json.loads((run_dir / "bench.json").read_text())
        info["summary"] = json.loads((run_dir / "summary.json").read_text())
        info["reused"] = True
        return info
    if rerun and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    raw = apply_overrides(json.loads(json.dumps(raw_config)), overrides + [f"name={setting}"])
    cfg = config_from_dict(raw)
    t0 = time.time()
    result = train(cfg, run_dir, quiet=True)
    if result.get("stopped"):
        raise SystemExit(f"{setting}: stopped at step {result['step']}; run the benchmark again to resume")
    minutes = (time.time() - t0) / 60
    info = {"setting": setting, "minutes": round(minutes, 2), "run_dir": str(run_dir),
            "labelled": _count_labelled(run_dir), "device": device_name(pick_device(cfg.train.device))}
    (run_dir / "bench.json").write_text(json.dumps(info, indent=1))
    info["summary"] = json.loads((run_dir / "summary.json").read_text())
    return info


def _count_labelled(run_dir: Path) -> int:
    return len(json.loads((run_dir / "manifest.json").read_text())["labelled"])


def metric(summary: dict, name: str, label: str | None = None) -> float:
    stats = summary["overall"] if label is None else summary["per_label"][label]
    return stats[name]["mean"]


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_table(title: str, columns: list[str], rows: list[list], device: str) -> str:
    """Print (and return) a plain-text table headed by the machine it ran on."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = [f"{title}  [{device}]", "  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text)
    return text
