"""Real 2-process torchrun runs (gloo on the CPU) against a single process."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from semiseg.config import load_config
from semiseg.methods import build_method
from semiseg.train import train
from semiseg.utils import seed_everything


def write_config(tmp_path, la_dir, iterations):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"name: ddp\ndata: {{root: {la_dir}, labelled: 3, val: 1, max_cases: 5}}\n"
                    "model: {name: vnet, features: 4, norm: instance}\n"
                    f"train: {{iterations: {iterations}, patch_size: [32, 32, 32], batch_size: 2, lr: 0.05, "
                    "val_every: 1000, checkpoint_every: 2, val_max_cases: 0}\n")
    return path


def torchrun(cfg_path, run_dir, repo_dir, *extra, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "semiseg.cli",
           "train", str(cfg_path), "--out", str(run_dir), "--quiet", "--set", "train.batch_size=1", *extra]
    env = {**os.environ, "PYTHONPATH": str(repo_dir / "SemiSegCore"), "OMP_NUM_THREADS": "1"}
    return cmd, env


def descendants(pid: int) -> list[int]:
    """Every process started (directly or not) by ``pid``; torchrun puts its workers in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                ppid = int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def flat(state):
    return torch.cat([v.float().flatten() for k, v in state.items() if "running" not in k and "num_batches" not in k])


def test_two_processes_match_one(tmp_path, la_dir, repo_dir):
    cfg_path = write_config(tmp_path, la_dir, iterations=6)
    train(load_config(cfg_path), tmp_path / "single", quiet=True, evaluate_val=False)
    cmd, env = torchrun(cfg_path, tmp_path / "ddp", repo_dir)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")]
    assert log[0]["event"] == "start" and log[0]["world_size"] == 2
    assert [r["step"] for r in log if r["event"] == "train"] == [6]  # rank 0 alone logs
    seed_everything(0)
    init = flat(build_method(load_config(cfg_path), torch.device("cpu")).state_dict())
    single = flat(torch.load(tmp_path / "single/checkpoints/last.pt", weights_only=False)["method"])
    ddp = flat(torch.load(tmp_path / "ddp/checkpoints/last.pt", weights_only=False)["method"])
    moved = (single - init).norm()
    assert moved > 0
    # same data (each rank takes its share of the global batch) and averaged gradients: the two runs stay close;
    # they are not identical because the soft Dice is pooled over each rank's batch, not the global one
    assert (ddp - single).norm() < 0.5 * moved, ((ddp - single).norm(), moved)


def test_killed_two_process_run_resumes(tmp_path, la_dir, repo_dir):
    cfg_path = write_config(tmp_path, la_dir, iterations=400)
    run = tmp_path / "run"
    cmd, env = torchrun(cfg_path, run, repo_dir)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint written in time"
        time.sleep(0.5)
    time.sleep(1.0)
    for pid in [proc.pid] + descendants(proc.pid):  # a hard kill of every process: nothing can be saved now
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    time.sleep(1.0)
    step = torch.load(run / "checkpoints/last.pt", weights_only=False)["step"]
    assert step >= 2
    cmd_resume = cmd + ["--set", f"train.iterations={step + 2}"]
    done = subprocess.run(cmd_resume, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert any(r["event"] == "resumed" and r["step"] == step for r in log) and log[-1]["event"] == "done", log
    assert torch.load(run / "checkpoints/last.pt", weights_only=False)["step"] == step + 2


def test_two_process_pseudolabelling_writes_each_case_once(tmp_path, kvasir_dir, repo_dir):
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((kvasir_dir / "images").iterdir())[:4]:
        (images / p.name).symlink_to(p)
    out = tmp_path / "pl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "semiseg.cli",
           "pseudolabel", "--input", str(images), "--prompt-from-masks", str(kvasir_dir / "masks"), "--out", str(out),
           "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(repo_dir / "SemiSegCore"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    masks = sorted(out.glob("*.png"))
    assert [m.stem for m in masks] == sorted(p.stem for p in images.iterdir())
    ranks = [json.load(open(m.with_suffix(".json")))["rank"] for m in masks]
    assert sorted(ranks) == [0, 0, 1, 1]  # each case by exactly one rank, the work shared evenly
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    stamps = {m.name: m.stat().st_mtime_ns for m in masks}
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("0 written, 2 skipped") == 2, again.stdout
    assert {m.name: m.stat().st_mtime_ns for m in sorted(out.glob("*.png"))} == stamps
