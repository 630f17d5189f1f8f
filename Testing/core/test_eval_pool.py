"""scripts/eval_pool: a supervised run scored on its unlabelled pool (cases it never read), refused for other methods."""
import csv
import json
import subprocess
import sys

import yaml

from semiseg.config import config_from_dict
from semiseg.train import train


def case_dice(report_dir):
    with open(report_dir / "metrics.csv", newline="") as f:
        return {row["case"]: row["dice"] for row in csv.DictReader(f)}


def run_script(repo_dir, *args):
    return subprocess.run([sys.executable, str(repo_dir / "scripts" / "eval_pool"), "--threads", "1", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_the_pool_of_a_supervised_run_is_scored_and_other_methods_are_refused(kvasir_dir, tmp_path, repo_dir):
    cfg = config_from_dict({"name": "kv", "data": {"root": str(kvasir_dir), "labelled": 4, "val": 2, "max_cases": 10,
                                                   "intensity": "rgb"},
                            "model": {"name": "unet2d", "in_channels": 3, "features": 4},
                            "train": {"iterations": 2, "patch_size": [64, 64], "batch_size": 2, "val_every": 2,
                                      "checkpoint_every": 2}})
    run = tmp_path / "run"
    train(cfg, run, quiet=True)
    manifest = json.loads((run / "manifest.json").read_text())
    pool_ids = {c["id"] for c in manifest["unlabelled"]}
    assert len(pool_ids) == 4

    done = run_script(repo_dir, run)
    assert done.returncode == 0, done.stderr
    with open(run / "pool" / "metrics.csv", newline="") as f:
        scored = {row["case"] for row in csv.DictReader(f)}
    assert scored == pool_ids  # every pool case, and no validation or labelled case
    assert json.loads((run / "pool" / "summary.json").read_text())["n_cases"] == 4
    assert f"{run} | 4 |" in done.stdout

    # scored again with the clean-up the run already has (none): the same numbers as its own pool and validation reports
    again = run_script(repo_dir, "--largest-component", "off", run)
    assert again.returncode == 0, again.stderr
    for own, rescored in ((run / "pool", run / "pool-off"), (run, run / "validation-off")):
        assert case_dice(rescored) == case_dice(own) and case_dice(own)
    assert set(case_dice(run / "validation-off")) == {c["id"] for c in manifest["val"]}

    config = yaml.safe_load((run / "config.yaml").read_text())
    config["method"] = "knowledge_mining"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    refused = run_script(repo_dir, run)
    assert refused.returncode != 0 and "trains on the unlabelled pool" in refused.stderr
