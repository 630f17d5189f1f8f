"""Shared by the bench_* scripts: run settings into runs/<bench>/<setting>/[seed<k>/] (skipping finished ones,
resuming interrupted ones), over several seeds and in parallel processes, collect their test-split summaries and
times, compare a method with its baseline case by case, and print one table with the machine's name.

Protocol: every setting of a benchmark uses the same data split (``data.seed``): validation cases choose
``best.pt``, test cases are scored only once, at the end. A seed changes the network initialisation and the patch
sampling (``train.seed``). The paired difference of a method and its baseline is taken per test case (averaged over
seeds) with a 95% t-interval over cases.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SemiSegCore"))

from semiseg.config import apply_overrides, config_from_dict, describe_changes  # noqa: E402
from semiseg.utils import device_name, pick_device, usable_cores  # noqa: E402

import yaml  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=["cpu", "full"], default="cpu",
                   help="cpu: sized for a 2-core machine; full: the standard protocol, for GPU machines")
    p.add_argument("--only", nargs="*", help="run only these settings")
    p.add_argument("--rerun", action="store_true", help="train again even where a finished run exists")
    p.add_argument("--runs", default=str(REPO / "runs"), help="parent of runs/<bench>/<setting>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, one process each, the CPU cores shared among them")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every setting, after the preset's (repeatable; e.g. a smoke run with "
                        "--set train.iterations=20 --runs /tmp/smoke)")
    return p


def load_yaml(path: str | Path) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists() and (run_dir / "bench.json").exists()


WHERE_NOT_WHAT = ("name", "train.threads", "train.device", "train.init_from", "knowledge_mining.embedding_cache",
                  "llm_segnet.embedding_cache", "sam_mix.embedding_cache", "sam_mix.embedding_dir")
"""Config keys that say where or how fast a run trained, not what it learned: a finished run whose config differs
from its setting's only in these is still that setting's run."""


def stale_reason(run_dir: Path, expected: dict, start: Path | None = None) -> str | None:
    """Why the finished run in ``run_dir`` no longer stands for its setting (None if it does): its config.yaml
    differs from ``expected`` (the setting's raw config with every override applied) in what it learns, or its
    warm start ``start`` was trained again after it finished. Both sides carry their method's defaults (config.yaml
    keeps those a run trained with; a run saved before it did reads today's for the keys it lacks), so a changed
    default counts too (``train.rundir.changes_since_saved``, as a resume compares them). The check imports torch."""
    from semiseg.train.rundir import changes_since_saved

    changes = changes_since_saved(run_dir, config_from_dict(expected))
    learned = {k: v for k, v in changes.items() if k not in WHERE_NOT_WHAT}
    if learned:
        return f"trained with another config ({describe_changes(learned)})"
    start_ckpt = start / "checkpoints" / "best.pt" if start else None
    if start_ckpt and start_ckpt.exists() and start_ckpt.stat().st_mtime > (run_dir / "bench.json").stat().st_mtime:
        return f"its warm start {start} was trained again after it finished"
    return None


def run_setting(bench: str, setting: str, raw_config: dict, overrides: list[str], runs: str | Path,
                rerun: bool = False, seed: int | None = None) -> dict:
    """Train one setting (or reuse a finished run) and return its summaries, minutes and run directory. With a
    ``seed`` the run goes to ``<setting>/seed<k>/`` and trains with ``train.seed=k``."""
    from semiseg.train import train

    run_dir = Path(runs) / bench / setting
    if seed is not None:
        run_dir = run_dir / f"seed{seed}"
    if finished(run_dir) and not rerun:
        return read_run(run_dir)
    if rerun and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cfg = config_from_dict(resolved_config(setting, raw_config, overrides, seed))
    t0, load0 = time.time(), os.getloadavg()[0]
    result = train(cfg, run_dir, quiet=True)
    if result.get("stopped"):
        raise SystemExit(1)  # the harness says why, from the run's log (ended_early)
    minutes = (time.time() - t0) / 60
    earlier = earlier_legs_minutes(run_dir)
    info = {"setting": setting, "seed": seed, "minutes": round(earlier + minutes, 2), "run_dir": str(run_dir),
            "labelled": _count_labelled(run_dir), "device": device_name(pick_device(cfg.train.device)),
            "threads": cfg.train.threads or usable_cores(), "iterations": cfg.train.iterations,
            "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    if earlier:  # resumed: the load average is the last leg's
        info["minutes_last_leg"] = round(minutes, 2)
    (run_dir / "bench.json").write_text(json.dumps(info, indent=1))
    return read_run(run_dir)


def resolved_config(setting: str, raw_config: dict, overrides: list[str], seed: int | None) -> dict:
    """The raw config a run of ``setting`` trains with: ``overrides`` applied, then the seed and the name."""
    extra = [f"train.seed={seed}"] if seed is not None else []
    return apply_overrides(json.loads(json.dumps(raw_config)), overrides + extra + [f"name={setting}"])


def read_run(run_dir: Path) -> dict:
    """A finished run's bench.json plus its validation summary and, when it has a test split, the test summary and
    per-case test rows."""
    info = json.loads((run_dir / "bench.json").read_text())
    info["run_dir"] = str(run_dir)  # where the run is now (bench.json keeps where it was trained)
    info["summary"] = json.loads((run_dir / "summary.json").read_text())
    test = run_dir / "test"
    if (test / "summary.json").exists():
        info["test_summary"] = json.loads((test / "summary.json").read_text())
        with open(test / "metrics.csv") as f:
            info["test_rows"] = list(csv.DictReader(f))
    return info


@dataclass
class Setting:
    """One setting of a benchmark: a config and its overrides; ``init_from`` names the setting whose run (same
    seed) gives the starting weights (a warm start), which must finish first. ``bench`` puts the setting's runs
    under another benchmark's folder (a baseline shared by two benchmarks is trained once)."""
    name: str
    raw: dict
    overrides: list[str] = field(default_factory=list)
    init_from: str | None = None
    bench: str | None = None


def run_settings(bench: str, settings: list[Setting], args) -> dict[str, list[dict]]:
    """Run every (setting, seed), ``args.jobs`` at a time in child processes (threads shared out), honouring warm
    starts; return setting -> one info per seed."""
    wanted = [s for s in settings if not args.only or s.name in args.only]
    todo = [(s, seed) for s in wanted for seed in args.seeds]
    jobs = max(1, args.jobs)
    by_name = {s.name: s for s in settings}
    for s in settings:
        if s.init_from and s.init_from not in by_name:
            raise SystemExit(f"{s.name}: init_from names an unknown setting '{s.init_from}'")

    def run_dir(name, seed):
        return Path(args.runs) / (by_name[name].bench or bench) / name / f"seed{seed}"

    def overrides(s, seed, threads):
        extra = list(getattr(args, "set", [])) + [f"train.threads={threads}"]
        if s.init_from:
            extra.append(f"train.init_from={run_dir(s.init_from, seed)}")
        return s.overrides + extra

    def ready(s, seed):
        return s.init_from is None or finished(run_dir(s.init_from, seed))

    check_not_stale(wanted, by_name, args.seeds, run_dir, lambda s, seed: overrides(s, seed, 1), args.rerun)

    running: list[tuple[subprocess.Popen, str]] = []
    pending = [(s, seed) for s, seed in todo if args.rerun or not finished(run_dir(s.name, seed))]
    while pending or running:
        for item in list(pending):
            s, seed = item
            if len(running) >= jobs or not ready(s, seed):
                continue
            at_once = min(jobs, len(running) + sum(ready(*p) for p in pending))  # cores shared by these
            threads = max(1, usable_cores() // at_once)
            spec = {"bench": s.bench or bench, "setting": s.name, "raw": s.raw,
                    "overrides": overrides(s, seed, threads),
                    "runs": args.runs, "rerun": args.rerun, "seed": seed}
            print(f"[{time.strftime('%H:%M:%S')}] start {s.name} seed {seed} ({threads} thread(s), "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
            proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)])
            running.append((proc, f"{s.name} seed {seed}", run_dir(s.name, seed)))
            pending.remove(item)
        if not running:
            missing = ", ".join(f"{s.init_from} seed {seed}" for s, seed in pending)
            raise SystemExit(f"cannot start: warm-start runs missing ({missing}); run those settings too")
        for _ in range(15):  # poll every 2 s, report progress every 30 s
            time.sleep(2)
            if any(proc.poll() is not None for proc, _, _ in running):
                break
        else:
            print(f"[{time.strftime('%H:%M:%S')}] " + "; ".join(f"{label}: {progress(d)}" for _, label, d in running),
                  flush=True)
        for entry in list(running):
            proc, label, where = entry
            if proc.poll() is not None:
                running.remove(entry)
                if proc.returncode != 0:
                    raise SystemExit(ended_early(label, where, proc.returncode))
                print(f"[{time.strftime('%H:%M:%S')}] done {label}", flush=True)
    return {s.name: [read_run(run_dir(s.name, seed)) for seed in args.seeds] for s in wanted}


def check_not_stale(wanted: list[Setting], by_name: dict[str, Setting], seeds: list[int], run_dir, overrides,
                    rerun: bool) -> None:
    """Stop before training if a finished run that this benchmark would reuse (a wanted setting's, unless ``rerun``
    trains those again, or a warm start they depend on) was trained with another config or from an older start: a
    changed preset must not leave old numbers standing in a new table."""
    needed, stack = {}, list(wanted)
    while stack:
        s = stack.pop()
        needed[s.name] = s
        if s.init_from and s.init_from not in needed:
            stack.append(by_name[s.init_from])
    rerun_names = {s.name for s in wanted} if rerun else set()
    reused = [s for s in needed.values() if s.name not in rerun_names]
    stale = []
    for s in reused:
        for seed in seeds:
            d = run_dir(s.name, seed)
            if finished(d):
                start = run_dir(s.init_from, seed) if s.init_from else None
                why = stale_reason(d, resolved_config(s.name, s.raw, overrides(s, seed), seed), start)
                if why:
                    stale.append((s.name, f"{d}: {why}"))
    if stale:
        names = " ".join(sorted({name for name, _ in stale}))
        raise SystemExit("finished runs no longer match their settings:\n  " + "\n  ".join(why for _, why in stale)
                         + f"\ntrain them again (--only {names} --rerun), or keep them and use another --runs folder")


def events(run_dir: Path, name: str | None = None) -> list[dict]:
    """The records of a run's log.jsonl (those of one event kind when ``name`` is given); a torn last line (a run
    still writing) is skipped."""
    log = Path(run_dir) / "log.jsonl"
    out = []
    for line in (log.read_text().splitlines() if log.exists() else []):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if name is None or rec.get("event") == name:
            out.append(rec)
    return out


def earlier_legs_minutes(run_dir: Path) -> float:
    """Minutes a resumed run trained before its last leg: each earlier leg runs from its 'start' or 'resumed' record
    to the last record before the next 'resumed' (a stop, or the last step logged before a kill)."""
    total, begin, last = 0.0, None, None
    for rec in events(run_dir):
        if rec.get("event") in ("start", "resumed"):
            if begin is not None and rec["event"] == "resumed":
                total += last - begin
            begin = rec["time"]
        last = rec.get("time", last)
    return total / 60


def ended_early(label: str, run_dir: Path, returncode: int) -> str:
    """Why a run's process ended before the run finished: a stop asked for (STOP file or a signal; its log ends with
    'stopped', and the same command resumes it) or a failure."""
    records = events(run_dir)
    if records and records[-1].get("event") == "stopped":
        return f"{label} stopped at step {records[-1].get('step')}; run the same command again to resume it"
    return f"{label} failed (exit {returncode})"


def progress(run_dir: Path) -> str:
    """'step/iterations (Dice of the last validation)' from a run's log, for a running job."""
    step, total, dice, event = 0, "?", None, "starting"
    for rec in events(run_dir):
        event = rec.get("event", event)
        if event == "train":
            step, total = rec["step"], rec["iterations"]
        elif event == "val":
            dice = rec.get("dice")
    text = f"step {step}/{total}" + (", mining pseudo-labels with SAM" if event == "mining_start" else "")
    return text + (f", val Dice {dice:.3f}" if dice is not None else "")


def finetune_overrides(iterations: int, lr: float) -> list[str]:
    """A warm-started phase (``Setting.init_from``): its own iterations and learning rate, five validations."""
    every = max(iterations // 5, 1)
    return [f"train.iterations={iterations}", f"train.lr={lr}", f"train.val_every={every}",
            f"train.checkpoint_every={every}"]


def _worker(spec: dict) -> None:
    run_setting(spec["bench"], spec["setting"], spec["raw"], spec["overrides"], spec["runs"], spec["rerun"],
                spec["seed"])


# -- statistics --------------------------------------------------------------------------------------------------
def case_values(info: dict, metric_name: str = "dice", label: str = "1") -> dict[str, float]:
    """Test case -> value of one metric for one label."""
    return {r["case"]: float(r[metric_name]) for r in info["test_rows"] if str(r["label"]) == str(label)}


def over_seeds(infos: list[dict], metric_name: str = "dice", label: str | None = None) -> tuple[float, float]:
    """Mean and standard deviation over seeds of the test-split mean."""
    return mean_std([metric(i["test_summary"], metric_name, label) for i in infos])


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(sum(values) / len(values)), float(_std(values))


def paired_difference(method: list[dict], baseline: list[dict], metric_name: str = "dice",
                      label: str = "1") -> dict:
    """Per test case, the method's value minus the baseline's (each averaged over seeds); mean, 95% t-interval and
    the number of cases (those defined in every run)."""
    from scipy import stats

    def averaged(infos):
        per_seed = [case_values(i, metric_name, label) for i in infos]
        cases = set.intersection(*(set(k for k, v in d.items() if not math.isnan(v)) for d in per_seed))
        return {c: sum(d[c] for d in per_seed) / len(per_seed) for c in cases}

    m, b = averaged(method), averaged(baseline)
    cases = sorted(set(m) & set(b))
    diffs = [m[c] - b[c] for c in cases]
    n = len(diffs)
    mean = sum(diffs) / n if n else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * _std(diffs) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def minutes_per_run(infos: list[dict]) -> str:
    return f"{sum(i['minutes'] for i in infos) / len(infos):.1f}"


def compared(infos: list[dict], baseline: list[dict] | None, metric_name: str = "dice", label: str = "1") -> list:
    """The cells every method-vs-baseline table shares: test cases, mean ± std over seeds, the paired per-case
    difference from the baseline's runs (points, 95% interval; empty without a baseline), iterations and minutes
    per run."""
    diff = interval(paired_difference(infos, baseline, metric_name, label)) if baseline else ""
    return [infos[0]["test_summary"]["n_cases"], pm(over_seeds(infos, metric_name)), diff, infos[0]["iterations"],
            minutes_per_run(infos)]


COMPARED = ["test cases", "Dice", "vs baseline (points, 95% CI)", "iterations", "minutes/run"]
"""Column names of ``compared``'s cells."""


def _std(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1))


def pm(mean_std: tuple[float, float], digits: int = 3) -> str:
    return f"{mean_std[0]:.{digits}f} ± {mean_std[1]:.{digits}f}"


def interval(d: dict, scale: float = 100.0) -> str:
    """A paired difference in points (Dice x 100) with its interval."""
    return f"{scale * d['mean']:+.2f} [{scale * d['low']:+.2f}, {scale * d['high']:+.2f}]"


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


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(json.loads(sys.argv[2]))
