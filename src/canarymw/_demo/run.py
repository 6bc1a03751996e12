"""``canarymw demo``: serve the blue/green app, drive simulated users, report and check."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, TextIO

from .options import EXIT_INTERRUPTED, EXIT_SETUP, EXIT_USAGE, DemoRun
from .options import DemoOptions as DemoOptions  # re-exported: canarymw.cli builds it from here

if TYPE_CHECKING:
    from ..store import Store


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


def guard_problem(options: DemoOptions) -> str | None:
    """Why the demo's flags cannot go together with ``--guard``, as a sentence, or None."""
    if not options.guard:
        return None
    why = (
        "with --guard the guard ramps green through its own steps (--percent, then 25, 50 and 100), "
        "so the demo sets no percent of its own halfway"
    )
    if options.ramp_to is not None:
        return f"--ramp-to cannot be combined with --guard: {why}."
    if not options.ramp:
        return f"--no-ramp cannot be combined with --guard: {why}; leave --no-ramp out."
    if options.percent <= 0:
        return (
            "--percent 0 cannot start a guarded ramp: with --guard, --percent is the first step of "
            "the ramp and must be above 0 (the default is 10)."
        )
    if not options.guard_timeout > 0:
        return f"--guard-timeout must be a number of seconds above 0, not {options.guard_timeout:g}."
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
    if (problem := guard_problem(options)) is not None:
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
        run = DemoRun(options, out, err, note, store, url, name, temporary=tmpdir is not None)
        return _serve(run)
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _serve(run: DemoRun) -> int:
    """Run the kind of demo the options ask for; a server that does not start, or a
    Ctrl-C, ends it here (the server stopped)."""
    from .server import ServerError

    options = run.options
    run.note(
        f"starting {options.app} blue/green under {options.kind} with {options.workers} workers on 127.0.0.1"
    )
    try:
        if options.guard:
            from .guarded import run_guarded

            return run_guarded(run)
        return _run_ramped(run)
    except ServerError as exc:
        run.note(f"could not start {options.kind}: {exc}")
        return EXIT_SETUP
    except KeyboardInterrupt:
        print(file=run.err)
        run.note(f"interrupted; {options.kind} stopped")
        return EXIT_INTERRUPTED


def _run_ramped(run: DemoRun) -> int:
    """Serve, drive the users, make the change halfway (unless ``--no-ramp``), report."""
    # Imported here: they need the optional dependencies checked by run_demo.
    from .load import drive
    from .progress import Progress
    from .ramp import Ramp, RampRecord
    from .report import analyse
    from .server import DemoServer

    options, note = run.options, run.note
    settings = run.settings(percent=options.percent)
    ramp_to = None
    if options.ramp:
        ramp_to = default_ramp(options.percent) if options.ramp_to is None else options.ramp_to
    config = {
        "rollout": run.name,
        "percent": options.percent,
        "ramp_to": ramp_to,
        "store": run.store_text,
        "users": options.users,
        "requests_per_user": options.requests_per_user,
        "error_rate": options.error_rate,
        "concurrency": options.concurrency,
        "seed": settings.seed,
    }
    record: RampRecord | None = None
    with DemoServer(options.kind, workers=options.workers, env=settings.to_env()) as server:
        pids = ", ".join(str(p) for p in sorted(server.pids))
        note(
            f"serving at {server.url} (worker pids {pids}); "
            f"{options.users} users x {options.requests_per_user} requests"
            + ("" if ramp_to is None else f"; {options.percent:g}% -> {ramp_to:g}% halfway")
        )
        progress = Progress(options.users * options.requests_per_user, run.err)
        ramp = None
        if ramp_to is not None:
            ramp = Ramp(
                run.store,
                run.name,
                from_percent=options.percent,
                to_percent=ramp_to,
                host=server.host,
                port=server.port,
                pids=server.pids,
                workers=options.workers,
                started=time.time(),
            )

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
            on_progress=progress.update,
            at_half=at_half,
        )
        elapsed = time.perf_counter() - started
        progress.close(sum(len(r.hits) for r in runs))
        if ramp is not None:
            # The server stays up until every worker has been polled for its switch.
            record = ramp.finish()
        server_info = run.server_info(server.url)
    result = analyse(runs, settings, config=config, server=server_info, elapsed=elapsed, ramp=record)
    return run.finish(result)
