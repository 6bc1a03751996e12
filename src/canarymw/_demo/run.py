"""``canarymw demo``: serve the blue/green app, drive simulated users, report and check."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..store import Store

EXIT_OK = 0
EXIT_FAILED = 1
"""The run finished but a check failed (stickiness, split, routing, or requests lost)."""
EXIT_USAGE = 2
EXIT_SETUP = 3
"""The demo could not run: a missing dependency, or the server did not start."""
EXIT_INTERRUPTED = 130


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """The demo's flags, validated by the command line parser."""

    percent: float = 10.0
    users: int = 2000
    requests_per_user: int = 5
    error_rate: float = 0.0
    workers: int = 2
    concurrency: int = 8
    seed: int | None = None
    asgi: bool = False
    json: bool = False
    store: str | None = None
    """URL of the store the workers follow; None: a SQLite file in a temporary directory."""
    ramp_to: float | None = None
    """The percent set through the store halfway through the load; None: :func:`default_ramp`."""
    ramp: bool = True
    """False (``--no-ramp``): change nothing mid-run."""


def default_ramp(percent: float) -> float:
    """The percent the demo ramps to unless told: two and a half times the start, at most 100.

    10% becomes 25%, a typical next step of a canary; 0% stays 0% (a kill switch is
    not ramped by surprise), and the change still goes through the store.
    """
    return min(100.0, round(percent * 2.5, 6))


def store_problem(url: str) -> str | None:
    """Why the demo cannot use the store at ``url``, as a sentence, or None if it may try."""
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return (
            f"--store {url} cannot work here: every worker is a separate process with its own "
            "memory, so they would not share a percent; use sqlite:////abs/path/state.db or "
            "redis://host:6379/0, or leave --store out for a temporary SQLite file."
        )
    return None


def missing_requirements(asgi: bool) -> str | None:
    """Why the demo cannot run here, as a message for the user, or None if it can."""
    if asgi:
        needed = {"starlette": "starlette", "uvicorn": "uvicorn"}
    else:
        if sys.platform == "win32":
            return (
                "canarymw demo runs the Flask app under gunicorn, which does not run on Windows; "
                "try 'canarymw demo --asgi' (uvicorn) instead."
            )
        needed = {"flask": "flask", "gunicorn": "gunicorn"}
    missing = [name for name, module in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        return (
            f"canarymw demo{' --asgi' if asgi else ''} needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed here. "
            "Install the demo extra: pip install 'canarymw[demo]'"
        )
    if asgi:
        try:
            module = importlib.import_module("canarymw.asgi")
        except ImportError:
            module = None
        if module is None or not hasattr(module, "ASGICanaryMiddleware"):
            return (
                "canarymw demo --asgi needs canarymw.asgi.ASGICanaryMiddleware, which this "
                "version of canarymw does not provide; run 'canarymw demo' (Flask under gunicorn)."
            )
    return None


def run_demo(options: DemoOptions, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the demo end to end and return the process exit code."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    problem = missing_requirements(options.asgi)
    if problem is not None:
        print(f"canarymw demo: {problem}", file=err)
        return EXIT_SETUP

    def note(message: str) -> None:
        print(f"canarymw demo: {message}", file=err, flush=True)

    if options.store is not None and (problem := store_problem(options.store)) is not None:
        note(problem)
        return EXIT_USAGE

    from ..store import StoreError, open_store
    from .settings import ROLLOUT_NAME

    tmpdir: str | None = None
    if options.store is None:
        # The embedded store: one SQLite file that every worker on this host opens, in a
        # directory of our own, removed after the run, so the one-command demo needs no
        # server and a rerun never inherits the state an earlier run left.
        tmpdir = tempfile.mkdtemp(prefix="canarymw-demo-")
        url, name = "sqlite:///" + os.path.join(tmpdir, "state.db"), ROLLOUT_NAME
    else:
        # A store of the user's outlives the run, and after seeding the store is the
        # truth: a fixed name would make the next run start at this run's ramped percent.
        url, name = options.store, f"{ROLLOUT_NAME}-{secrets.token_hex(4)}"
    store: Store | None = None
    try:
        try:
            store = open_store(url)
            store.read([name])  # reachable? (a run against a dead Redis ends here, at once)
        except ValueError as exc:
            note(f"--store: {exc}")
            return EXIT_USAGE
        except (StoreError, ImportError) as exc:
            # The store's own sentence names the place without any password in the URL.
            note(f"cannot use the store: {exc}")
            return EXIT_SETUP
        return _run(options, out, err, note, store, url, name, tmpdir is not None)
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _run(
    options: DemoOptions,
    out: TextIO,
    err: TextIO,
    note: Callable[[str], None],
    store: Store,
    url: str,
    name: str,
    temporary: bool,
) -> int:
    """Serve, drive the users, make the change, report; the store is open and closed by the caller."""
    # Imported here: they need the optional dependencies checked by run_demo.
    from .load import UserRun, drive
    from .progress import Progress
    from .ramp import Ramp, RampRecord
    from .report import analyse, render
    from .server import DemoServer, Kind, ServerError
    from .settings import DemoSettings

    seed = secrets.randbelow(2**31) if options.seed is None else options.seed
    # A fresh key per run, shared by every worker through the environment: one key for
    # the whole service is what keeps a visitor's cookie valid in every worker. So is
    # the store's URL: every worker follows the same store.
    settings = DemoSettings(
        key=secrets.token_hex(32),
        percent=options.percent,
        error_rate=options.error_rate,
        seed=seed,
        store=url,
        name=name,
    )
    ramp_to = None
    if options.ramp:
        ramp_to = default_ramp(options.percent) if options.ramp_to is None else options.ramp_to
    kind: Kind = "uvicorn" if options.asgi else "gunicorn"
    app = "Starlette" if options.asgi else "Flask"
    total = options.users * options.requests_per_user
    config = {
        "rollout": name,
        "percent": options.percent,
        "ramp_to": ramp_to,
        "store": f"{store!r}{' (temporary, removed after the run)' if temporary else ''}",
        "users": options.users,
        "requests_per_user": options.requests_per_user,
        "error_rate": options.error_rate,
        "concurrency": options.concurrency,
        "seed": seed,
    }

    note(f"starting {app} blue/green under {kind} with {options.workers} workers on 127.0.0.1")
    record: RampRecord | None = None
    runs: list[UserRun]
    try:
        with DemoServer(kind, workers=options.workers, env=settings.to_env()) as server:
            pids = ", ".join(str(p) for p in sorted(server.pids))
            note(
                f"serving at {server.url} (worker pids {pids}); "
                f"{options.users} users x {options.requests_per_user} requests"
                + ("" if ramp_to is None else f"; {options.percent:g}% -> {ramp_to:g}% halfway")
            )
            progress = Progress(total, err)
            ramp = None
            if ramp_to is not None:
                ramp = Ramp(
                    store,
                    name,
                    from_percent=options.percent,
                    to_percent=ramp_to,
                    host=server.host,
                    port=server.port,
                    pids=server.pids,
                    workers=options.workers,
                    started=time.time(),
                )

            def on_progress(done: int) -> None:
                progress.update(done)

            def at_half(gate: threading.Event) -> None:
                # New requests wait while the change spreads (a fraction of a second), so
                # that every run, however small, has requests after every worker switched.
                if ramp is not None:
                    ramp.trigger(then=gate.set)
                else:
                    gate.set()

            started = time.perf_counter()
            runs = drive(
                server.host,
                server.port,
                users=options.users,
                requests=options.requests_per_user,
                concurrency=options.concurrency,
                cookie_name=settings.local_rollout().cookie_name,
                on_progress=on_progress,
                at_half=at_half,
            )
            elapsed = time.perf_counter() - started
            progress.close(sum(len(r.hits) for r in runs))
            if ramp is not None:
                # The server stays up until every worker has been polled for its switch.
                record = ramp.finish()
            server_info = {"kind": kind, "app": app, "workers": options.workers, "url": server.url}
    except ServerError as exc:
        note(f"could not start {kind}: {exc}")
        return EXIT_SETUP
    except KeyboardInterrupt:
        print(file=err)
        note(f"interrupted; {kind} stopped")
        return EXIT_INTERRUPTED

    result = analyse(runs, settings, config=config, server=server_info, elapsed=elapsed, ramp=record)
    if options.json:
        json.dump(result.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(render(result) + "\n")
    out.flush()
    if not result.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in result.checks if not c.ok)
        note(f"FAILED: {failed}")
        return EXIT_FAILED
    return EXIT_OK
