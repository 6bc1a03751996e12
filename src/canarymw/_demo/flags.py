"""The demo's guard flags, for the ``canarymw demo`` parser in :mod:`canarymw.cli`.

Light on purpose (argparse only): the command's parser is built on every run of
``canarymw``, demo or not.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from .options import GUARD_TIMEOUT

TIMEOUT_RANGE = (1.0, 3600.0)


def _timeout(text: str) -> float:
    low, high = TIMEOUT_RANGE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise argparse.ArgumentTypeError(
            f"--guard-timeout must be a number from {low:g} to {high:g}, not {text}"
        )
    return value


def add_guard_flags(demo: argparse.ArgumentParser) -> None:
    """Add ``--guard`` and ``--guard-timeout`` to the ``demo`` subcommand's parser."""
    demo.add_argument(
        "--guard",
        action="store_true",
        help=(
            "let a guard ramp green through the steps --percent, 25, 50, 100 (compressed: about a "
            "minute) or roll it back by itself when it does harm (try --error-rate 0.05); users come "
            "until the guard has finished; prints the timeline and the verdict (not with --ramp-to "
            "or --no-ramp)"
        ),
    )
    demo.add_argument(
        "--guard-timeout",
        type=_timeout,
        metavar="SECONDS",
        default=GUARD_TIMEOUT,
        help=f"with --guard, stop the users after SECONDS even if the guard has not finished "
        f"(default: {GUARD_TIMEOUT:g})",
    )


def guard_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~canarymw._demo.options.DemoOptions` fields the guard flags set."""
    return {"guard": bool(args.guard), "guard_timeout": float(args.guard_timeout)}
