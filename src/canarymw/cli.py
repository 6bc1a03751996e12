"""The ``canarymw`` command.

``canarymw demo`` serves a Flask blue/green app under gunicorn (or, with ``--asgi``, a
Starlette one under uvicorn) on 127.0.0.1, sends a few thousand simulated users through
it, and prints per-variant numbers with a split check and a stickiness check. See
docs/demo.md. Exit codes: 0 every check passed; 1 a check failed; 2 bad usage; 3 the demo
could not run (missing dependency, server did not start); 130 interrupted.

Heavy imports (httpx, the servers, the frameworks) happen only when a command runs, so
importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

from . import _compat
from ._version import __version__


def _number(low: float, high: float, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{what} must be a number from {low:g} to {high:g}, not {text}")
        return value

    return parse


def _integer(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, not {text}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be from {low} to {high}, not {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``canarymw`` command."""
    parser = argparse.ArgumentParser(
        prog="canarymw",
        description="Canary releases and blue/green switches inside your WSGI or ASGI app.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}, {_compat.BUILD}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the blue/green demo under a real server and check the split and stickiness",
        description=(
            "Serve a Flask blue/green app under gunicorn on 127.0.0.1, drive simulated users "
            "(each with its own cookie jar) through it, and print per-variant numbers, the "
            "observed vs configured split, a stickiness check across workers, and the blended "
            "success rate."
        ),
        epilog=(
            "Exit status: 0 the run completed and every check passed; 1 a check failed; "
            "2 bad usage; 3 the demo could not run (missing dependency, server did not start); "
            "130 interrupted. See docs/demo.md."
        ),
    )
    demo.add_argument(
        "--percent",
        type=_number(0, 100, "--percent"),
        metavar="P",
        default=10.0,
        help="share of users sent to green (new), 0 to 100 (default: 10)",
    )
    demo.add_argument(
        "--users",
        type=_integer(1, 100_000, "--users"),
        metavar="N",
        default=2000,
        help="simulated users (default: 2000)",
    )
    demo.add_argument(
        "--requests-per-user",
        type=_integer(1, 1000, "--requests-per-user"),
        metavar="N",
        default=5,
        help="requests each user makes in a row (default: 5)",
    )
    demo.add_argument(
        "--error-rate",
        type=_number(0, 1, "--error-rate"),
        metavar="RATE",
        default=0.0,
        help="probability that green answers a request with a 500, 0 to 1 (default: 0)",
    )
    demo.add_argument(
        "--workers",
        type=_integer(1, 32, "--workers"),
        metavar="N",
        default=2,
        help="server worker processes (default: 2)",
    )
    demo.add_argument(
        "--concurrency",
        type=_integer(1, 256, "--concurrency"),
        metavar="N",
        default=8,
        help="users active at the same time (default: 8)",
    )
    demo.add_argument(
        "--seed",
        type=_integer(0, 2**63 - 1, "--seed"),
        metavar="N",
        default=None,
        help="selects which green requests fail under --error-rate (default: random, printed)",
    )
    demo.add_argument(
        "--asgi", action="store_true", help="run the Starlette demo under uvicorn instead of Flask/gunicorn"
    )
    demo.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``canarymw`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help, --version and usage errors; callers get a code instead.
        return exc.code if isinstance(exc.code, int) else 2
    if args.command != "demo":
        parser.print_help()
        return 2

    from ._demo.run import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
            percent=args.percent,
            users=args.users,
            requests_per_user=args.requests_per_user,
            error_rate=args.error_rate,
            workers=args.workers,
            concurrency=args.concurrency,
            seed=args.seed,
            asgi=args.asgi,
            json=args.json,
        )
    )
