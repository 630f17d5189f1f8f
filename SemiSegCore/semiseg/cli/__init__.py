"""The `semiseg` command: train, predict, evaluate, plan, pseudolabel (and method-specific tools).

Each subcommand lives in its own module with an ``add_parser(subparsers)``; :data:`SUBCOMMANDS` lists them. They are
imported here, plainly: a subcommand whose module cannot be imported fails the command with that error rather than
silently going missing from it.
"""
from __future__ import annotations

import argparse
import errno
import sys

from ..knowledge.cli import add_knowledge_parser
from ..sam.cli import add_pseudolabel_parser
from . import evaluate, plan, predict, train

SUBCOMMANDS = (train.add_parser, predict.add_parser, evaluate.add_parser, plan.add_parser, add_pseudolabel_parser,
               add_knowledge_parser)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semiseg", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return p


_OS_ERRORS = {errno.ENOSPC: "the disk is full (no space left on device)", errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def error_line(exc: BaseException) -> str:
    """One line for an error; an OSError says which path and what happened to it (disk full, read-only ...)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{_OS_ERRORS.get(exc.errno, exc.strerror)}"
    return " ".join(str(exc).split())


def main(argv=None) -> int:
    from ..errors import SemiSegError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (SemiSegError, OSError) as exc:
        print(f"semiseg {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2
