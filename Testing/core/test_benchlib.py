"""The benchmark harness (scripts/benchlib.py) reuses a finished run only while it still stands for its setting."""
import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import benchlib  # noqa: E402

from semiseg.config import config_from_dict, save_config  # noqa: E402
from semiseg.methods import with_method_defaults  # noqa: E402
from semiseg.methods.knowledge_mining import KnowledgeMining, KnowledgeMiningParams  # noqa: E402

RAW = {"method": "supervised", "data": {"root": "data", "num_classes": 2},
       "model": {"name": "unet2d", "features": 8}, "train": {"iterations": 100, "patch_size": [32, 32]}}


def finished_run(run_dir: Path, setting: str, overrides: list[str], seed: int, raw: dict = RAW,
                 saved_defaults: bool = True) -> Path:
    """A run directory as run_setting leaves it, trained with ``overrides`` (only the files the check reads);
    ``saved_defaults=False``: config.yaml as runs saved it before it kept the method's defaults."""
    run_dir.mkdir(parents=True)
    cfg = config_from_dict(benchlib.resolved_config(setting, raw, overrides, seed))
    save_config(with_method_defaults(cfg) if saved_defaults else cfg, run_dir / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"")
    for name in ("summary.json", "bench.json"):
        (run_dir / name).write_text(json.dumps({}))
    return run_dir


def test_a_finished_run_is_reused_whatever_its_threads_and_paths(tmp_path):
    run = finished_run(tmp_path / "a" / "seed0", "a", ["train.threads=1", "train.init_from=/old/place"], 0)
    expected = benchlib.resolved_config("a", RAW, ["train.threads=2", "train.init_from=/new/place"], 0)
    assert benchlib.stale_reason(run, expected) is None


def test_a_finished_run_with_another_config_is_stale(tmp_path):
    run = finished_run(tmp_path / "a" / "seed0", "a", [], 0)
    reason = benchlib.stale_reason(run, benchlib.resolved_config("a", RAW, ["train.iterations=200"], 0))
    assert reason == "trained with another config (train.iterations: 100 -> 200)"
    other_seed = benchlib.stale_reason(run, benchlib.resolved_config("a", RAW, [], 1))
    assert "train.seed: 0 -> 1" in other_seed


def test_a_changed_method_default_makes_a_finished_run_stale(tmp_path, monkeypatch):
    raw = dict(RAW, method="knowledge_mining", knowledge_mining={"schedule": "one_time"})
    run = finished_run(tmp_path / "km" / "seed0", "km", [], 0, raw)
    old_style = finished_run(tmp_path / "old" / "seed0", "km", [], 0, raw, saved_defaults=False)
    expected = benchlib.resolved_config("km", raw, [], 0)
    assert benchlib.stale_reason(run, expected) is None and benchlib.stale_reason(old_style, expected) is None

    @dataclasses.dataclass
    class LighterPseudoLabels(KnowledgeMiningParams):
        weight: float = 0.5

    monkeypatch.setattr(KnowledgeMining, "Params", LighterPseudoLabels)
    assert benchlib.stale_reason(run, expected) == "trained with another config (knowledge_mining.weight: 1.0 -> 0.5)"
    assert benchlib.stale_reason(old_style, expected) is None  # its missing keys read as today's defaults


def test_a_run_whose_warm_start_was_trained_again_is_stale(tmp_path):
    start = finished_run(tmp_path / "sup" / "seed0", "sup", [], 0)
    run = finished_run(tmp_path / "cont" / "seed0", "cont", [], 0)
    assert benchlib.stale_reason(run, benchlib.resolved_config("cont", RAW, [], 0), start) is None
    later = (run / "bench.json").stat().st_mtime + 60
    os.utime(start / "checkpoints" / "best.pt", (later, later))
    assert "trained again" in benchlib.stale_reason(run, benchlib.resolved_config("cont", RAW, [], 0), start)


def write_log(run_dir: Path, records: list[dict]) -> None:
    """A run's log.jsonl holding these records."""
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("rerun", [False, True])
def test_the_harness_stops_before_training_when_a_start_it_needs_is_stale(tmp_path, rerun):
    """A stale warm start stops the benchmark even when only the runs built on it are asked for (and --rerun, which
    retrains only those, does not excuse it)."""
    finished_run(tmp_path / "bench" / "sup" / "seed0", "sup", [], 0)
    settings = [benchlib.Setting("sup", dict(RAW, train=dict(RAW["train"], iterations=300))),
                benchlib.Setting("cont", RAW, init_from="sup")]
    args = SimpleNamespace(only=["cont"], seeds=[0], jobs=1, runs=str(tmp_path), set=[], rerun=rerun)
    with pytest.raises(SystemExit, match=r"sup/seed0: trained with another config \(train.iterations: 100 -> 300\)"):
        benchlib.run_settings("bench", settings, args)
    assert not (tmp_path / "bench" / "cont").exists()


def test_a_resumed_run_counts_the_minutes_of_its_earlier_legs(tmp_path):
    """Stopped at 2 minutes, resumed and killed after 1 more minute, resumed again: the earlier legs are 3 minutes
    (the time between a stop and the next resume is not counted); a run that never resumed has none."""
    def timed(records):
        return [{"event": event, "time": 1.8e9 + t} for event, t in records]

    write_log(tmp_path, timed([("start", 0), ("train", 60), ("stopped", 120), ("resumed", 1000), ("train", 1060),
                               ("resumed", 2000), ("train", 2300), ("done", 2600)]))
    assert benchlib.earlier_legs_minutes(tmp_path) == pytest.approx(3.0)
    write_log(tmp_path, timed([("start", 0), ("train", 60), ("done", 90)]))
    assert benchlib.earlier_legs_minutes(tmp_path) == 0.0


def test_a_stopped_run_is_reported_as_stopped_not_failed(tmp_path):
    """A run whose log ends with the trainer's 'stopped' record was stopped on request (a STOP file or a signal) and
    resumes; any other early exit, including a crash after an earlier stop and resume, is a failure."""
    write_log(tmp_path, [{"event": "start"}, {"event": "train", "step": 50}, {"event": "stopped", "step": 52}])
    assert benchlib.ended_early("la_4 seed 0", tmp_path, 1) == (
        "la_4 seed 0 stopped at step 52; run the same command again to resume it")
    write_log(tmp_path, [{"event": "start"}, {"event": "stopped", "step": 52}, {"event": "resumed"},
                         {"event": "train", "step": 60}])
    assert benchlib.ended_early("la_4 seed 0", tmp_path, 1) == "la_4 seed 0 failed (exit 1)"
    assert benchlib.ended_early("la_4 seed 0", tmp_path / "never-started", -9) == "la_4 seed 0 failed (exit -9)"
