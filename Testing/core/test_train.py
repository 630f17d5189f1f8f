import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from semiseg.config import config_from_dict
from semiseg.io import read_image
from semiseg.runs import load_predictor
from semiseg.train import Trainer, train


def tiny_config(la_dir, **train):
    t = {"iterations": 4, "patch_size": [32, 32, 32], "batch_size": 2, "val_every": 4, "checkpoint_every": 2,
         "lr": 0.01, **train}
    return config_from_dict({"name": "tiny", "data": {"root": str(la_dir), "labelled": 2, "val": 1, "max_cases": 4},
                             "model": {"name": "vnet", "features": 4}, "train": t,
                             "infer": {"patch_size": [96, 96, 96]}})


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(run_dir / "log.jsonl")) if r["event"] == "train"]


def test_resumed_run_equals_uninterrupted_run(la_dir, tmp_path):
    cfg = tiny_config(la_dir, iterations=20, val_every=20, checkpoint_every=10, val_max_cases=0)
    train(cfg, tmp_path / "straight", quiet=True, evaluate_val=False)
    trainer = Trainer(tiny_config(la_dir, iterations=20, val_every=20, checkpoint_every=10, val_max_cases=0),
                      tmp_path / "resumed",
                      quiet=True)
    # ask the trainer to stop after step 10, as SIGINT/SIGTERM would
    trainer.method.on_step = lambda ctx, step: setattr(trainer, "stop_requested", step >= 10)
    assert trainer.fit()["stopped"]
    train(cfg, tmp_path / "resumed", quiet=True, evaluate_val=False)
    log = [json.loads(line) for line in open(tmp_path / "resumed" / "log.jsonl")]
    assert any(r["event"] == "resumed" and r["step"] == 11 for r in log)
    np.testing.assert_allclose(losses(tmp_path / "resumed")[-1], losses(tmp_path / "straight")[-1], rtol=1e-4)
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=False)["method"]
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=False)["method"]
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5)


def test_the_trainer_draws_and_checkpoints_the_streams_a_method_declares(la_dir, tmp_path):
    """Supervised declares one stream, ``labelled``; its sampler state is in the checkpoint and a resumed trainer
    continues it. A stream the method declares anew is rebuilt from its declaration (batch size, seed)."""
    from semiseg.methods.context import Stream

    cfg = tiny_config(la_dir, iterations=2, val_every=2, checkpoint_every=2, val_max_cases=0)
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    assert set(trainer.samplers) == {"labelled"}
    assert trainer.samplers["labelled"].foreground_prob == cfg.train.foreground_crop
    trainer.fit()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["streams"]
    resumed = Trainer(cfg, tmp_path / "run", quiet=True)
    fresh = resumed.samplers["labelled"].state_dict()
    assert resumed.try_resume() and resumed.samplers["labelled"].state_dict() == saved["labelled"] != fresh
    resumed.method.streams = lambda ctx: {"labelled": Stream(ctx.labelled, 1, seed=7)}
    resumed.refresh_stream("labelled")
    sampler = resumed.samplers["labelled"]
    assert sampler.batch_size == 1 and sampler.foreground_prob == 0.0
    assert sampler.state_dict() == {"rng": np.random.default_rng(cfg.train.seed * 1000 + 7).bit_generator.state}


def test_training_learns_and_predicts_on_the_input_grid(kvasir_dir, tmp_path):
    cfg = config_from_dict({"name": "kv", "data": {"root": str(kvasir_dir), "labelled": 6, "val": 2, "max_cases": 12,
                                                   "intensity": "rgb"},
                            "model": {"name": "unet2d", "in_channels": 3, "features": 8},
                            "train": {"iterations": 40, "patch_size": [128, 128], "batch_size": 4, "optimizer": "adam",
                                      "lr": 0.003, "val_every": 40, "checkpoint_every": 40}})
    result = train(cfg, tmp_path / "run", quiet=True)
    curve = losses(tmp_path / "run")
    assert np.mean(curve[-2:]) < np.mean(curve[:2])  # it learns
    assert 0 <= result["summary"]["overall"]["dice"]["mean"] <= 1
    for f in ("config.yaml", "manifest.json", "metrics.csv", "summary.json", "metrics.png", "checkpoints/best.pt"):
        assert (tmp_path / "run" / f).exists(), f
    pred = load_predictor(tmp_path / "run")
    img = read_image(json.load(open(tmp_path / "run/manifest.json"))["val"][0]["image"])
    seg = pred.segment(img)
    assert seg.spatial_shape == img.spatial_shape and set(np.unique(seg.array)) <= {0, 1}


def test_sigterm_stops_cleanly_and_the_same_command_resumes(la_dir, tmp_path, repo_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: kill\ndata: {{root: {la_dir}, labelled: 2, val: 1, max_cases: 4}}\n"
                   "model: {name: vnet, features: 4}\n"
                   "train: {iterations: 400, patch_size: [32, 32, 32], val_every: 1000, checkpoint_every: 1000}\n"
                   "infer: {patch_size: [96, 96, 96]}\n")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "semiseg.cli", "train", str(cfg), "--out", str(run), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(repo_dir / "SemiSegCore")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "log.jsonl").exists() or not losses(run):
        time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143  # 128 + SIGTERM: a script can tell a stopped run from a finished one
    events = [json.loads(line) for line in open(run / "log.jsonl")]
    stopped = [e for e in events if e["event"] == "stopped"]
    assert stopped and (run / "checkpoints/last.pt").exists()
    step = torch.load(run / "checkpoints/last.pt", weights_only=False)["step"]
    assert step == stopped[0]["step"] > 0
    # the same command with fewer iterations left resumes from there and finishes, removing what a kill during a
    # checkpoint write would have left
    (run / "checkpoints" / ".tmp-killed.pt").write_bytes(b"half a checkpoint")
    done = subprocess.run(cmd + ["--set", f"train.iterations={step + 2}"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in open(run / "log.jsonl")]
    assert events[-1]["event"] == "done" and any(e["event"] == "resumed" and e["step"] == step for e in events)
    assert not list((run / "checkpoints").glob(".tmp-*"))
