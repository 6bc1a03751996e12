"""The ``canarymw`` command.

``canarymw demo`` serves a Flask blue/green app under gunicorn (or, with ``--asgi``, a
Starlette one under uvicorn) on 127.0.0.1, sends a few thousand simulated users through
it, and prints per-variant numbers with a split check and a stickiness check. See
docs/demo.md. Exit codes of ``demo``: 0 every check passed; 1 a check failed; 2 bad usage;
3 the demo could not run (missing dependency, server did not start); 130 interrupted.

The store commands read and change the shared state of rollouts in a store (``--store
URL`` or the environment variable ``CANARYMW_STORE``; see docs/cli.md):

- ``status [NAME]``: percent, pause, version, who changed it last and why, and per
  variant over a recent window the requests, error rate, latency and the blended
  success estimate beside the measured one. For a guarded rollout also its stage, the
  verdict (judged live from the store's counters while it ramps, else the one behind
  the guard's last action), the evidence, which process controls it, the blended
  estimate with its uncertainty now, at the next step and at 100%, and what the guard
  does next and when.
- ``set NAME PERCENT``, ``promote NAME``, ``rollback NAME``, ``pause NAME``,
  ``resume NAME``, ``reset NAME``: an audited operator change (``--by``, ``--reason``), compare-and-set
  against ``--if-version N`` when given.
- ``history NAME``: the audit log.
- ``watch [NAME]``: ``status`` refreshed in the terminal until Ctrl-C.

``--store`` may also be the ``http(s)://`` URL of an operator page (``canarymw.admin``,
where it is mounted): the commands then use its JSON API with a bearer token (``--token``
or ``CANARYMW_TOKEN``), print the same and exit with the same codes (3 also when the
admin refuses the token). ``serve-admin`` serves that page and API for a store on its own
(see docs/admin.md).

Exit codes of the store commands: 0 ok; 1 anything unexpected; 2 bad usage; 3 no store
given or the store (or the admin, or its token) cannot be used; 4 unknown rollout; 5 version conflict (someone
else changed the rollout meanwhile); 130 interrupted (``watch`` exits 0 on Ctrl-C). A
mistake prints one sentence on stderr, never a traceback (``CANARYMW_DEBUG=1`` adds the
traceback of an unexpected error).

Heavy imports (httpx, the servers, the frameworks, redis-py) happen only when a command
runs, so importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from . import _compat
from ._version import __version__

if TYPE_CHECKING:
    from .admin._client import AdminClient
    from .guard._controller import Assessor
    from .store import Change, RolloutState, Store

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STORE = 3
EXIT_UNKNOWN = 4
EXIT_CONFLICT = 5
EXIT_INTERRUPTED = 130

STORE_ENV = "CANARYMW_STORE"
TOKEN_ENV = "CANARYMW_TOKEN"
BY_ENV = "CANARYMW_BY"
DEBUG_ENV = "CANARYMW_DEBUG"

_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen

_sleep = time.sleep  # watch's pause, replaceable in tests without touching other threads


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


def _percent(text: str) -> float:
    # "25%" reads as naturally as "25" on a command line.
    return _number(0, 100, "PERCENT")(text.strip().removesuffix("%"))


def _who(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("--by must name who makes the change, not an empty string")
    return text.strip()


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors can be one sentence on stderr.

    The store commands use it (``one_line_errors=True``); ``demo`` keeps argparse's usual
    usage-and-error output.
    """

    def __init__(self, *args: Any, one_line_errors: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.one_line_errors = one_line_errors

    def error(self, message: str) -> NoReturn:
        """Print the usage error and exit with status 2."""
        if not self.one_line_errors:
            super().error(message)
        # "argument PERCENT: PERCENT must be ..." says the name twice; keep the second.
        head, sep, rest = message.partition(": ")
        if sep and head.startswith("argument ") and rest.startswith(head.removeprefix("argument ")):
            message = rest
        self.exit(EXIT_USAGE, f"{self.prog}: {message.rstrip('.')}; see {self.prog} --help.\n")


def _store_options() -> _Parser:
    options = _Parser(add_help=False)
    options.add_argument(
        "--store",
        metavar="URL",
        help=(
            f"the store: sqlite:////abs/path/state.db, redis://host:6379/0[?prefix=...], or the "
            f"https:// URL of an operator page (default: the environment variable {STORE_ENV})"
        ),
    )
    options.add_argument(
        "--token",
        metavar="TOKEN",
        default=None,
        help=(
            f"the bearer token for an https:// admin URL (default: the environment variable "
            f"{TOKEN_ENV}, which other users cannot see in the process list)"
        ),
    )
    return options


def _json_option() -> _Parser:
    options = _Parser(add_help=False)
    options.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return options


def _window_option() -> _Parser:
    options = _Parser(add_help=False)
    options.add_argument(
        "--window",
        type=_number(1, 8 * 24 * 3600, "--window"),
        metavar="SECONDS",
        default=300.0,
        help="count outcomes of the last SECONDS (default: 300; counters are kept in 10 s windows)",
    )
    return options


def _change_options() -> _Parser:
    options = _Parser(add_help=False)
    options.add_argument("--reason", metavar="TEXT", default="", help="why: kept in the audit log")
    options.add_argument(
        "--by",
        type=_who,
        metavar="WHO",
        default=None,
        help=f"who makes the change (default: ${BY_ENV}, else user@host)",
    )
    options.add_argument(
        "--if-version",
        type=_integer(1, 2**63 - 1, "--if-version"),
        metavar="N",
        default=None,
        help="change only if the rollout is still at version N (as you saw it); else exit 5",
    )
    return options


_CHANGES = {
    "set": "send PERCENT of cohorts to new (ends a hold from an earlier rollback or pause)",
    "promote": "send every cohort to new (percent 100)",
    "rollback": "send every cohort to old (percent 0) and hold it there against deploys",
    "pause": "hold the rollout as it is: deploys no longer change its percent",
    "resume": "lift a pause",
    "reset": "start a new assignment epoch: void what the drain and pin policies recorded per visitor",
}

_STORE_EPILOG = (
    "Exit status: 0 ok; 1 unexpected error; 2 bad usage; 3 no store given or the store cannot be "
    "reached (an admin URL: it cannot be reached or refuses the token); 4 unknown rollout; 5 version "
    "conflict (someone else changed the rollout meanwhile). See docs/cli.md and docs/admin.md."
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``canarymw`` command."""
    parser = argparse.ArgumentParser(
        prog="canarymw",
        description="Canary releases and blue/green switches inside your WSGI or ASGI app.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}, {_compat.BUILD}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    demo = commands.add_parser(
        "demo",
        help="run the blue/green demo under a real server and check the split and stickiness",
        description=(
            "Serve a Flask blue/green app under gunicorn on 127.0.0.1, drive simulated users "
            "(each with its own cookie jar) through it, and print per-variant numbers, the "
            "observed vs configured split, a stickiness check across workers, and the blended "
            "success rate. Every worker follows a shared store; halfway through, the percent is "
            "changed there and the report says when each worker switched."
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
    demo.add_argument(
        "--store",
        dest="demo_store",
        metavar="URL",
        default=None,
        help=(
            "the store every worker follows: sqlite:////abs/path/state.db or "
            "redis://host:6379/0[?prefix=...] (default: a SQLite file in a temporary directory, "
            "removed after the run; memory:// cannot be shared by worker processes)"
        ),
    )
    ramp = demo.add_mutually_exclusive_group()
    ramp.add_argument(
        "--ramp-to",
        type=_number(0, 100, "--ramp-to"),
        metavar="P",
        default=None,
        help="the percent set through the store halfway through the load (default: 2.5 x --percent, "
        "at most 100)",
    )
    ramp.add_argument(
        "--no-ramp", action="store_true", help="change nothing mid-run: one percent for the whole run"
    )
    from ._demo.flags import add_guard_flags

    add_guard_flags(demo)

    store, as_json, window, changing = _store_options(), _json_option(), _window_option(), _change_options()
    status = commands.add_parser(
        "status",
        parents=[store, window, as_json],
        one_line_errors=True,
        help="show the rollouts in a store: percent, pause, version, and per-variant numbers",
        description=(
            "Show each rollout in the store (or NAME): its percent, pause, version, how long ago "
            "and by whom it was last changed and why; and per variant over the window the "
            "requests, error rate and p50/p95 latency, with the blended success estimate "
            "s = s_new * w + s_old * (1 - w) beside the measured success rate. For a guarded "
            "rollout also its stage, the verdict and its evidence, the process controlling it, "
            "the blended estimate with a 95% interval now, at the next step and at 100%, and "
            "what the guard does next and when. With shadow traffic, the share of compared "
            "copies whose response differed from the primary's (the mismatch rate)."
        ),
        epilog=_STORE_EPILOG,
    )
    status.add_argument("name", nargs="?", metavar="NAME", help="one rollout (default: all)")

    for action, what in _CHANGES.items():
        command = commands.add_parser(
            action,
            parents=[store, changing, as_json],
            one_line_errors=True,
            help=what,
            description=(
                f"{what[0].upper()}{what[1:]}; audited, and followed by every process within its "
                "refresh time."
            ),
            epilog=_STORE_EPILOG,
        )
        command.add_argument("name", metavar="NAME", help="the rollout")
        if action == "set":
            command.add_argument("percent", type=_percent, metavar="PERCENT", help="0 to 100")

    history = commands.add_parser(
        "history",
        parents=[store, as_json],
        one_line_errors=True,
        help="show a rollout's audit log",
        description=(
            "Show a rollout's audit log, oldest first: when, version, action, who, percent, pause, why."
        ),
        epilog=_STORE_EPILOG,
    )
    history.add_argument("name", metavar="NAME", help="the rollout")
    history.add_argument(
        "--limit",
        type=_integer(1, 1000, "--limit"),
        metavar="N",
        default=20,
        help="the newest N entries (default: 20)",
    )

    watch = commands.add_parser(
        "watch",
        parents=[store, window],
        one_line_errors=True,
        help="show status live, refreshed every interval, until Ctrl-C",
        description=(
            "Show the status table (with the guard's verdict and outlook for a guarded rollout) "
            "refreshed every interval (the screen is redrawn when stdout is a terminal; otherwise "
            "a new table is printed each time) until Ctrl-C."
        ),
        epilog=_STORE_EPILOG.replace("0 ok;", "0 ok or stopped with Ctrl-C;"),
    )
    watch.add_argument("name", nargs="?", metavar="NAME", help="one rollout (default: all)")
    watch.add_argument(
        "--interval",
        type=_number(0.1, 3600, "--interval"),
        metavar="SECONDS",
        default=1.0,
        help="seconds between refreshes (default: 1)",
    )
    watch.add_argument(
        "--count",
        type=_integer(1, 2**31 - 1, "--count"),
        metavar="N",
        default=None,
        help="stop after N refreshes (default: until Ctrl-C)",
    )
    _serve_admin_parser(commands)
    return parser


def _serve_admin_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve-admin",
        one_line_errors=True,
        help="serve the operator page and its JSON API for a store",
        description=(
            "Serve the operator page and its JSON API (canarymw.admin) for the rollouts of a "
            "store on its own, under uvicorn if it is installed, else the standard library's "
            "wsgiref. Bearer auth from a token file or variable (for scripts and the canarymw "
            "commands), optional basic auth for people. Binds only to loopback addresses unless "
            "--allow-remote is given; put it behind HTTPS before you do. See docs/admin.md."
        ),
        epilog=(
            "Exit status: 0 stopped with Ctrl-C; 2 bad usage (a missing or short token, a "
            "remote address without --allow-remote); 3 the store cannot be opened or the "
            "address cannot be listened on."
        ),
    )
    serve.add_argument(
        "--store",
        metavar="URL",
        help=f"the store: sqlite:////abs/path/state.db or redis://host:6379/0 (default: ${STORE_ENV})",
    )
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=_integer(0, 65535, "--port"),
        default=8377,
        metavar="PORT",
        help="the port to listen on (default: 8377; 0 picks a free one)",
    )
    token = serve.add_mutually_exclusive_group()
    token.add_argument(
        "--token-file", metavar="PATH", help="a file holding the bearer token (at least 32 characters)"
    )
    token.add_argument("--token-env", metavar="VAR", help="an environment variable holding the bearer token")
    serve.add_argument(
        "--token-name",
        type=_who,
        default="admin-token",
        metavar="NAME",
        help="who the audit log says made a change with the token (default: admin-token)",
    )
    serve.add_argument(
        "--token-role",
        choices=("operate", "read"),
        default="operate",
        help="what the token may do: operate (change rollouts; the default) or read",
    )
    serve.add_argument(
        "--basic-user",
        type=_who,
        metavar="NAME",
        help="also let NAME in with basic auth (a browser's login box; role operate)",
    )
    serve.add_argument(
        "--basic-password-env",
        metavar="VAR",
        help="the environment variable holding --basic-user's password (at least 12 characters)",
    )
    serve.add_argument(
        "--secret-key-env",
        metavar="VAR",
        help=(
            "the environment variable holding the key that signs the pages' CSRF tokens (at least "
            "32 characters; default: a random key, so open pages need a reload after a restart)"
        ),
    )
    serve.add_argument(
        "--window",
        type=_number(10, 86400, "--window"),
        metavar="SECONDS",
        default=300.0,
        help="seconds of outcome counters the page and the API summarise (default: 300)",
    )
    serve.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host that is not a loopback address (other machines can then connect)",
    )
    serve.add_argument(
        "--server",
        choices=("auto", "uvicorn", "wsgiref"),
        default="auto",
        help="the HTTP server (default: auto, uvicorn if installed, else wsgiref)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``canarymw`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help, --version and usage errors; callers get a code instead.
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "serve-admin":
        return _run_serve_admin(args)
    if args.command != "demo":
        return _run_store_command(args)

    from ._demo.flags import guard_options
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
            store=args.demo_store,
            ramp_to=args.ramp_to,
            ramp=not args.no_ramp,
            **guard_options(args),
        )
    )


# -- the store commands ------------------------------------------------------------------


class _Failure(Exception):
    """A mistake the command reports as one sentence with its exit code."""

    def __init__(self, code: int, sentence: str) -> None:
        super().__init__(sentence)
        self.code = code


def _run_store_command(args: argparse.Namespace) -> int:
    run = _COMMANDS.get(args.command, _change_command)
    try:
        code = run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (``| head``): not a failure of the command.
        _drop_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        print(file=sys.stderr)
        print(f"canarymw {args.command}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code, sentence = _explain(exc)
        if code == EXIT_ERROR and os.environ.get(DEBUG_ENV) == "1":
            import traceback

            traceback.print_exc()
        print(f"canarymw {args.command}: {sentence}", file=sys.stderr)
        return code


def _drop_stdout() -> None:
    # Point stdout at /dev/null so the interpreter's final flush does not fail again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def _explain(exc: Exception) -> tuple[int, str]:
    """The exit code and the one sentence an exception of a store command becomes."""
    from .store import StoreError, StoreUnavailable, UnknownRollout, VersionConflict

    text = " ".join(str(exc).split())  # one line, whatever the cause put in it
    if isinstance(exc, _Failure):
        return exc.code, text
    from .admin._client import AdminError

    if isinstance(exc, AdminError):
        # The admin refused, or what answered is no admin. 400: the input; a bug of either
        # side: 1; else (401, 403, a wrong URL) no usable admin: 3.
        status = exc.status
        code = EXIT_USAGE if status == 400 else EXIT_ERROR if status in (405, 413, 415, 500) else EXIT_STORE
        return code, _sentence(text)
    if isinstance(exc, StoreUnavailable):
        return EXIT_STORE, _sentence(text or "the store cannot be reached")
    if isinstance(exc, UnknownRollout):
        return EXIT_UNKNOWN, _sentence(text)
    if isinstance(exc, VersionConflict):
        return EXIT_CONFLICT, _sentence(text)
    if isinstance(exc, StoreError):
        return EXIT_ERROR, _sentence(text)
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return EXIT_ERROR, f"unexpected error ({detail.rstrip('.')}); set {DEBUG_ENV}=1 to see the traceback."


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else text + "."


def _store_url(args: argparse.Namespace) -> str:
    return str(args.store or os.environ.get(STORE_ENV, "")).strip()


def _is_admin_url(url: str) -> bool:
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in ("http", "https")


def _admin(args: argparse.Namespace) -> AdminClient | None:
    """A client of the admin when the store given is an ``http(s)://`` URL, else None."""
    url = _store_url(args)
    if not _is_admin_url(url):
        return None
    from .admin._client import AdminClient, shown

    if getattr(args, "by", None) is not None:
        raise _Failure(
            EXIT_USAGE,
            "--by cannot be used with an admin URL; the admin records the name its token belongs to.",
        )
    token = str(args.token or os.environ.get(TOKEN_ENV, "")).strip()
    if not token:
        raise _Failure(
            EXIT_STORE, f"the admin at {shown(url)} needs a bearer token; pass --token or set {TOKEN_ENV}."
        )
    try:
        return AdminClient(url, token)
    except ValueError as exc:
        raise _Failure(EXIT_USAGE, _sentence(" ".join(str(exc).split()))) from None
    except ImportError as exc:  # httpx missing
        raise _Failure(EXIT_STORE, _sentence(" ".join(str(exc).split()))) from None


class _Local:
    """A store opened here, with the admin client's methods: every store command reads and
    changes a rollout the same way whether ``--store`` is a store or an admin URL."""

    def __init__(self, store: Store, by: str | None = None) -> None:
        self.store = store
        self.by = by
        self.assessors: dict[str, tuple[dict[str, Any], Assessor]] = {}  # guards judged incrementally

    def __enter__(self) -> _Local:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    def report(self, name: str | None = None, window: float = 300.0) -> dict[str, Any]:
        return _report(self.store, name, window, time.time(), self.assessors)

    def history(self, name: str, limit: int = 50) -> list[Change]:
        if name not in self.store.read([name]):
            raise _unknown(name)
        return self.store.history(name, limit)

    def change(
        self,
        name: str,
        action: str,
        *,
        reason: str = "",
        percent: float | None = None,
        expected_version: int | None = None,
    ) -> RolloutState:
        from .store import change

        by = self.by or _default_by()
        return change(
            self.store, name, action, by=by, reason=reason, percent=percent, expected_version=expected_version
        )


def _operator(args: argparse.Namespace) -> AdminClient | _Local:
    """What the store commands work through: the admin's client for an ``http(s)://``
    URL, else the store itself."""
    client = _admin(args)
    if client is not None:
        return client
    by = getattr(args, "by", None)
    return _Local(_open(args), by)


def _open(args: argparse.Namespace) -> Store:
    url = args.store or os.environ.get(STORE_ENV, "")
    if not url.strip():
        raise _Failure(
            EXIT_STORE,
            f"no store given; pass --store URL or set {STORE_ENV} "
            "(e.g. sqlite:////var/lib/app/state.db or redis://127.0.0.1:6379/0).",
        )
    from .store import open_store

    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() == "sqlite" and rest.startswith("/") and rest != "/":
        # SQLite creates a missing file on open: a typo would read as an empty store and
        # leave a stray file behind. Processes running rollouts create it, never this command.
        path = rest[1:]
        if not os.path.exists(path):
            raise _Failure(
                EXIT_STORE,
                f"SQLite store {path} does not exist; check the path (the file appears once a "
                "process running a rollout has started with this store).",
            )
    try:
        return open_store(url)
    except ValueError as exc:
        raise _Failure(EXIT_USAGE, _sentence(" ".join(str(exc).split()))) from None
    except ImportError as exc:  # redis-py missing: the store cannot be used from here
        raise _Failure(EXIT_STORE, _sentence(" ".join(str(exc).split()))) from None


def _unknown(name: str) -> Exception:
    from .store import UnknownRollout

    return UnknownRollout(
        f"the store has no rollout {name!r}; it appears once a process running it has started."
    )


def _report(*args: Any) -> dict[str, Any]:
    from .store._report import report

    return report(*args)


def _emit_json(data: object, out: TextIO | None = None) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=False), file=out or sys.stdout)


# status ---------------------------------------------------------------------------------


def _status_text(data: dict[str, Any]) -> list[str]:
    """The human-readable status: one table of rollouts, then one table per rollout."""
    rollouts: dict[str, Any] = data["rollouts"]
    if not rollouts:
        return ["the store holds no rollouts yet; one appears once a process running it has started."]
    header = ["rollout", "percent", "paused", "version", "age", "by", "reason"]
    rows = [
        [
            name,
            _pct(r["state"]["percent"]),
            "yes" if r["state"]["paused"] else "no",
            str(r["state"]["version"]),
            _age(r["age"]),
            r["state"]["updated_by"] or "-",
            r["state"]["reason"] or "-",
        ]
        for name, r in rollouts.items()
    ]
    if any(r.get("guard") is not None for r in rollouts.values()):
        # A stage column only when a rollout is guarded: without guards, the table is as it was.
        header.insert(3, "stage")
        for row, r in zip(rows, rollouts.values(), strict=True):
            guard = r.get("guard")
            row.insert(3, "-" if guard is None else guard["stage"] or "-")
    lines = _table(header, rows, right={1, 4} if len(header) == 8 else {1, 3})
    for name, r in rollouts.items():
        lines += ["", f"{name}: the last {_seconds(data['window'])}"]
        lines += _variant_table(r)
        if r.get("shadow") is not None:
            lines.append(_shadow_line(r["shadow"]))
        if r.get("guard") is not None:
            lines += _guard_text(r, data["at"])
    if data.get("processes") and data["processes"]["reported"]:
        lines += ["", *_processes_text(data["processes"], data["at"], data["window"])]
    return lines


def _processes_text(p: dict[str, Any], now: float, window: float) -> list[str]:
    """The ledger of the processes that added counters: did any stop without its final flush?"""
    lost: list[dict[str, Any]] = p["lost"]
    if not lost:
        return [
            f"processes: {p['reported']} reported in the last {_seconds(window)} ({p['running']} running, "
            f"{p['closed']} stopped gracefully); none stopped without its final flush"
        ]

    def one(r: dict[str, Any]) -> str:
        where = f"{r['host']}:{r['pid']}" if r["pid"] is not None else r["process"]
        took = (
            f"up to ~{r['last_batch']:,} outcomes not counted"
            if r["last_batch"]
            else "idle at its last report: likely nothing lost"
        )
        return f"{where} at {_when(r['last_flush_at'])} ({_age(now - r['last_flush_at'])} ago), {took}"

    if len(lost) == 1:
        return [f"1 process stopped without its final flush: {one(lost[0])}"]
    lines = [
        f"{len(lost)} processes stopped without their final flush, "
        f"up to ~{p['lost_outcomes_estimate']:,} outcomes not counted:"
    ]
    return lines + [
        f"  {one(r)} (interval {r['interval']:g} s; {', '.join(r['rollouts']) or '-'})" for r in lost
    ]


def _guard_text(r: dict[str, Any], now: float) -> list[str]:
    """The guard's lines of a guarded rollout in ``status``: label, then what it says."""
    g: dict[str, Any] = r["guard"]
    paused = r["state"]["paused"]
    stage = "stage " + (g["stage"] or "-")
    if paused and g["stage"] in ("ramping", "done"):
        stage += ", paused by an operator"
    if g["stage_since"] is not None:
        stage += f"; this step began {_age(max(0.0, now - g['stage_since']))} ago"
    if g["steps"]:
        stage += "; steps " + " -> ".join(_pct(s) for s in g["steps"])
    rows = [["guard", stage]]
    if g["error"]:
        rows.append(["error", g["error"]])
    if g["live"]:
        rows.append(["verdict", g["sentence"]])
        evidence = [f"errors e-value {_e(g['e_values']['errors'])} (harm at {_e(g['harm_at']['errors'])})"]
        if g["e_values"]["latency"] is not None:
            evidence.append(
                f"latency e-value {_e(g['e_values']['latency'])} (harm at {_e(g['harm_at']['latency'])})"
            )
        evidence.append(f"{g['step_requests']:,} canary requests at this step")
        rows.append(["evidence", "; ".join(evidence)])
        rows += [["note", note] for note in g["notes"]]
    else:
        # The guard judges only a ramp that runs: say why it does not now.
        why = "paused by an operator" if g["stage"] == "ramping" else f"stage {g['stage'] or '-'}"
        rows.append(["last action", f"{g['sentence'] or '-'} (not judged now: {why})"])
    c = g["controller"]
    if c is None:
        rows.append(["controller", "none: no process holds the lease; the guard acts only while one does"])
    else:
        rows.append(
            [
                "controller",
                f"{c['holder']} (lease token {c['token']}, expires in {_seconds(round(c['expires_in'], 1))})",
            ]
        )
    blend = g["blended"]
    if blend is not None:
        label = f"blended {blend['confidence'] * 100:g}%"
        for key, what in (("now", "now"), ("next", "next step"), ("full", "all on new")):
            at = blend[key]
            if at is None or (key == "full" and at["percent"] in (blend["now"]["percent"], _next(blend))):
                continue
            rows.append([label, f"at {_pct(at['percent'])} ({what}): {_interval(at)}"])
            label = ""
    if g["outlook"] is not None:
        rows.append(["next", g["outlook"]])
    width = max(len(label) for label, _ in rows)
    return [f"  {label.ljust(width)}  {text}".rstrip() for label, text in rows]


def _next(blend: dict[str, Any]) -> float | None:
    return None if blend["next"] is None else blend["next"]["percent"]


def _interval(at: dict[str, Any]) -> str:
    if at["estimate"] is None:
        return "- (a variant with weight had no requests in the window)"
    return f"{_rate(at['estimate'])} ({_rate(at['low'])} to {_rate(at['high'])})"


def _e(value: float) -> str:
    if value >= 1e6:
        return f"{value:.1e}"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _variant_table(r: dict[str, Any]) -> list[str]:
    rows = []
    requests = errors = 0
    for variant, v in r["variants"].items():
        requests += v["requests"]
        errors += v["errors"]
        rows.append(
            [
                variant,
                str(v["requests"]),
                str(v["errors"]),
                _rate(v["error_rate"]),
                _ms(v["p50"]),
                _ms(v["p95"]),
                _rate(v["success_rate"]),
            ]
        )
    error_rate = errors / requests if requests else None
    success = r["success"]
    rows.append(["all", str(requests), str(errors), _rate(error_rate), "", "", _rate(success["measured"])])
    lines = _table(
        ["variant", "requests", "errors", "error rate", "p50 ms", "p95 ms", "success"],
        rows,
        right={1, 2, 3, 4, 5, 6},
    )
    lines.append(_success_line(r))
    return [f"  {line}" for line in lines]


def _success_line(r: dict[str, Any]) -> str:
    w = r["state"]["percent"] / 100.0
    s_new = r["variants"]["new"]["success_rate"]
    s_old = r["variants"]["old"]["success_rate"]
    estimate = r["success"]["blended"]
    measured = _rate(r["success"]["measured"])
    if estimate is None:
        missing = "new" if w > 0 and s_new is None else "old"
        return (
            f"success  blended estimate -: no requests on {missing} in the window "
            f"(w = {w:g}); measured {measured}"
        )

    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    return (
        f"success  blended estimate s = s_new * w + s_old * (1 - w) = {s(s_new)} * {w:g} + "
        f"{s(s_old)} * {1 - w:g} = {_rate(estimate)}; measured {measured}"
    )


def _shadow_line(sh: dict[str, Any]) -> str:
    """The shadow comparisons of a rollout in ``status``: never requests, so never in the table."""
    return (
        f"  shadow   mismatch rate {_rate(sh['mismatch_rate'])} ({sh['mismatches']:,} of "
        f"{sh['compared']:,} compared copies differ); {sh['failures']:,} failed or timed out, "
        f"{sh['dropped']:,} dropped; shadow p50 {_ms(sh['p50'])} ms, p95 {_ms(sh['p95'])} ms"
    )


def _status(args: argparse.Namespace) -> int:
    with _operator(args) as operator:
        data = operator.report(args.name, args.window)
    if args.json:
        _emit_json(data)
    else:
        print("\n".join(_status_text(data)))
    return EXIT_OK


# changes --------------------------------------------------------------------------------


def _default_by() -> str:
    by = os.environ.get(BY_ENV, "").strip()
    if by:
        return by
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no login name in a bare container: still say where it came from
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _change_command(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    with _operator(args) as operator:
        state = operator.change(
            args.name,
            args.command,
            reason=args.reason,
            percent=getattr(args, "percent", None),
            expected_version=args.if_version,
        )
    if args.json:
        _emit_json({"rollout": args.name, "action": args.command, "state": asdict(state)})
    else:
        print(_state_line(args.name, args.command, state))
    return EXIT_OK


def _state_line(name: str, action: str, state: RolloutState) -> str:
    held = "paused" if state.paused else "running"
    why = f": {state.reason}" if state.reason else ""
    epoch = f", assignment epoch {state.assignment}" if action == "reset" else ""
    return (
        f"{name}: {_pct(state.percent)} to new, {held}, version {state.version}{epoch} "
        f"({action} by {state.updated_by}{why})"
    )


# history --------------------------------------------------------------------------------


def _history(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    with _operator(args) as operator:
        log = operator.history(args.name, args.limit)
    if args.json:
        entries = [{"when": _when(c.at), **asdict(c)} for c in log]
        _emit_json({"rollout": args.name, "history": entries})
    else:
        print("\n".join(_history_text(log)))
    return EXIT_OK


def _history_text(log: list[Change]) -> list[str]:
    if not log:
        return ["no audit entries."]
    rows = []
    for c in log:
        before = "-" if c.percent_before is None else _pct(c.percent_before)
        paused = _yes(c.paused_after)
        if c.paused_before is not None and c.paused_before != c.paused_after:
            paused = f"{_yes(c.paused_before)} -> {paused}"
        rows.append(
            [
                _when(c.at),
                str(c.version),
                c.action,
                c.by or "-",
                f"{before} -> {_pct(c.percent_after)}",
                paused,
                c.reason or "-",
            ]
        )
    return _table(["when (UTC)", "version", "action", "by", "percent", "paused", "reason"], rows, right={1})


# watch ----------------------------------------------------------------------------------


def _watch(args: argparse.Namespace) -> int:
    out = sys.stdout
    tty = out.isatty()
    operator = _operator(args)  # keeps what it judged of guards between refreshes
    refreshes = 0

    try:
        while True:
            now = time.time()
            try:
                body = _status_text(operator.report(args.name, args.window))
            except Exception as exc:
                if refreshes == 0:
                    raise  # a wrong store or name: say so and stop, as status does
                # Later failures are often a blip of the store: show it, keep watching.
                code, sentence = _explain(exc)
                if code == EXIT_ERROR:
                    raise
                body = [f"{sentence.rstrip('.')}; trying again in {_seconds(args.interval)}."]
            head = (
                f"canarymw watch  {_when(now)} UTC  every {_seconds(args.interval)}, "
                f"numbers over the last {_seconds(args.window)}  (Ctrl-C stops)"
            )
            text = "\n".join([head, "", *body])
            if tty:
                out.write(_CLEAR + text + "\n")
            else:
                # Not a terminal (a pipe, a log): one table after the other, no escape codes.
                out.write(("\n" if refreshes else "") + text + "\n")
            out.flush()
            refreshes += 1
            if args.count is not None and refreshes >= args.count:
                return EXIT_OK
            _sleep(args.interval)
    except KeyboardInterrupt:
        # Ctrl-C is how watch ends: a second one (a quick double press, or `timeout`
        # signalling the process and then its group) must not turn the clean exit into 130.
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if tty:
            out.write("\n")
        return EXIT_OK
    finally:
        operator.close()


# serve-admin ----------------------------------------------------------------------------


def _run_serve_admin(args: argparse.Namespace) -> int:
    try:
        return _serve_admin(args)
    except KeyboardInterrupt:
        print("canarymw serve-admin: stopped.", file=sys.stderr)
        return EXIT_OK
    except Exception as exc:
        code, sentence = _explain(exc)
        if code == EXIT_ERROR and os.environ.get(DEBUG_ENV) == "1":
            import traceback

            traceback.print_exc()
        print(f"canarymw serve-admin: {sentence}", file=sys.stderr)
        return code


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def _secret_from_env(var: str, what: str) -> str:
    value = os.environ.get(var, "")
    if not value.strip():
        raise _Failure(EXIT_USAGE, f"the environment variable {var} ({what}) is not set or is empty.")
    return value.strip()


def _admin_auth(args: argparse.Namespace) -> list[Any]:
    from .admin import BasicAuth, BearerAuth

    auths: list[Any] = []
    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
            mode = os.stat(args.token_file).st_mode
        except (OSError, UnicodeDecodeError) as exc:
            detail = getattr(exc, "strerror", None) or type(exc).__name__
            raise _Failure(
                EXIT_USAGE, f"the token file {args.token_file} cannot be read ({detail})."
            ) from None
        where = f"the token file {args.token_file}"
        if mode & 0o077:
            print(
                f"canarymw serve-admin: warning: {where} can be read by other users; chmod 600 it.",
                file=sys.stderr,
            )
    elif args.token_env:
        token = _secret_from_env(args.token_env, "the bearer token")
        where = f"the environment variable {args.token_env}"
    if token is not None:
        if len(token) < 32 or any(c.isspace() for c in token) or not token.isprintable():
            raise _Failure(
                EXIT_USAGE,
                f"the token in {where} must be at least 32 printable characters without spaces; make one "
                "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'.",
            )
        auths.append(BearerAuth({token: (args.token_name, args.token_role)}))
    if (args.basic_user is None) != (args.basic_password_env is None):
        raise _Failure(EXIT_USAGE, "--basic-user and --basic-password-env go together; give both or neither.")
    if args.basic_user is not None:
        password = _secret_from_env(args.basic_password_env, f"the password of {args.basic_user}")
        try:
            auths.append(BasicAuth({args.basic_user: (password, "operate")}))
        except ValueError as exc:
            raise _Failure(EXIT_USAGE, _sentence(" ".join(str(exc).split()))) from None
    if not auths:
        raise _Failure(
            EXIT_USAGE,
            "serve-admin needs credentials: --token-file PATH or --token-env VAR (and optionally "
            "--basic-user NAME --basic-password-env VAR); the admin serves nothing without them.",
        )
    return auths


def _serve_admin(args: argparse.Namespace) -> int:
    import secrets

    from .admin import Admin
    from .store import _redact

    host = args.host.strip()
    if not host:
        raise _Failure(EXIT_USAGE, "--host must name an address, not an empty string.")
    if not _is_loopback(host) and not args.allow_remote:
        raise _Failure(
            EXIT_USAGE,
            f"--host {host} is not a loopback address, so other machines could reach the admin; "
            "pass --allow-remote if you mean it (and put it behind HTTPS).",
        )
    url = _store_url(args)
    if _is_admin_url(url):
        raise _Failure(
            EXIT_USAGE, "serve-admin needs a store URL (sqlite:///..., redis://...), not an admin URL."
        )
    auth = _admin_auth(args)
    if args.secret_key_env:
        secret_key = _secret_from_env(args.secret_key_env, "the CSRF secret key")
        if len(secret_key) < 32:
            raise _Failure(
                EXIT_USAGE, f"the secret key in {args.secret_key_env} must be at least 32 characters."
            )
    else:
        secret_key = secrets.token_urlsafe(32)
    store = _open(args)
    try:
        admin = Admin(store, auth=auth, secret_key=secret_key, window=args.window)
        server = _admin_server(args.server, admin, host, args.port)
        shown_host = f"[{host}]" if ":" in host else host
        print(
            f"canarymw serve-admin: the rollouts of {_redact(url)} on "
            f"http://{shown_host}:{server.port}/ ({server.kind}); Ctrl-C stops.",
            file=sys.stderr,
            flush=True,
        )
        import signal

        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt  # SIGTERM (systemd, docker stop) ends it as Ctrl-C does: exit 0

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        store.close()
    print("canarymw serve-admin: stopped.", file=sys.stderr)
    return EXIT_OK


class _AdminServer:
    """A bound listening socket and the server that will answer on it."""

    def __init__(self, kind: str, port: int, run: Callable[[], None]) -> None:
        self.kind = kind
        self.port = port
        self.run = run


def _admin_server(choice: str, admin: Any, host: str, port: int) -> _AdminServer:
    import importlib.util
    import socket

    kind = choice
    if kind == "auto":
        kind = "uvicorn" if importlib.util.find_spec("uvicorn") is not None else "wsgiref"
    elif kind == "uvicorn" and importlib.util.find_spec("uvicorn") is None:
        raise _Failure(
            EXIT_STORE, "--server uvicorn needs uvicorn, which is not installed; pip install uvicorn."
        )
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        detail = exc.strerror or type(exc).__name__
        raise _Failure(EXIT_STORE, f"cannot listen on {host} port {port} ({detail}).") from None
    bound = int(sock.getsockname()[1])
    if kind == "uvicorn":
        import uvicorn

        config = uvicorn.Config(
            admin.asgi,
            interface="asgi3",
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
        )

        def run_uvicorn() -> None:
            try:
                uvicorn.Server(config).run(sockets=[sock])
            finally:
                sock.close()

        return _AdminServer("uvicorn", bound, run_uvicorn)
    return _AdminServer("wsgiref", bound, lambda: _run_wsgiref(admin, sock, host))


def _run_wsgiref(admin: Any, sock: Any, host: str) -> None:
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = sock.family

    server = Server(sock.getsockname()[:2], Quiet, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_name = host
    server.server_port = int(sock.getsockname()[1])
    server.setup_environ()
    server.set_app(admin.wsgi)

    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": _status,
    "history": _history,
    "watch": _watch,
}


# formatting -----------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Aligned columns, two spaces apart; columns in ``right`` are right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _pct(percent: float) -> str:
    return f"{percent:g}%"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}%"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _age(seconds: float) -> str:
    """How long ago, to one unit: "12 s", "3 min", "2 h", "5 d"."""
    if seconds < 120:
        return f"{int(seconds)} s"
    if seconds < 120 * 60:
        return f"{int(seconds // 60)} min"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} d"


def _seconds(seconds: float) -> str:
    return f"{seconds:g} s"


def _when(at: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


if __name__ == "__main__":  # python -m canarymw.cli: as the console script
    sys.exit(main())
