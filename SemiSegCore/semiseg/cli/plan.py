"""``semiseg plan``: spacing, patch, network and iterations that fit a time budget on this machine (measured)."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    pl = subparsers.add_parser("plan", help="spacing, patch, network and iterations that fit a time budget here "
                                            "(measured)")
    pl.add_argument("config", help="YAML config to plan for")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    pl.add_argument("--budget-minutes", type=float, default=20.0, help="training time to fill (default 20)")
    pl.add_argument("--device", help="plan for this device (default: the config's train.device)")
    pl.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..plan import make_plan

    print(make_plan(load_config(args.config, args.set), args.budget_minutes, args.device).text())
    return 0
