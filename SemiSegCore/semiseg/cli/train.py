"""``semiseg train``: train (or resume) a run from a YAML config."""
from __future__ import annotations

import time
from pathlib import Path


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("train", help="train (or resume) a run from a YAML config")
    t.add_argument("config", help="YAML config (see Resources/configs)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.iterations=100 (repeatable)")
    t.add_argument("--out", help="run directory (default runs/<name>-<time>); an existing one resumes if its "
                                 "config is the same")
    t.add_argument("--force-new", action="store_true",
                   help="start over in an existing run directory (the old run is moved to <out>/replaced-<time>/)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=run)


def _default_run_dir(cfg) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(args) -> int:
    from ..config import load_config
    from ..train import train

    cfg = load_config(args.config, args.set)
    run_dir = Path(args.out) if args.out else _default_run_dir(cfg)
    print(f"run directory: {run_dir}")
    result = train(cfg, run_dir, quiet=args.quiet, force_new=args.force_new)
    if result["stopped"]:
        print(f"stopped at step {result['step']}; run the same command again to resume")
        return 128 + result["signal"] if result.get("signal") else 1  # 130 after SIGINT, 143 after SIGTERM
    return 0
