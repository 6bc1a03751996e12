"""``canarymw demo``: serve the blue/green app, drive simulated users, report and check."""

from __future__ import annotations

import importlib
import importlib.util
import json
import secrets
import sys
import time
from dataclasses import dataclass
from typing import TextIO

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

    # Imported here: they need the optional dependencies checked above.
    from .load import drive
    from .progress import Progress
    from .report import analyse, render
    from .server import DemoServer, Kind, ServerError
    from .settings import ROLLOUT_NAME, DemoSettings

    seed = secrets.randbelow(2**31) if options.seed is None else options.seed
    # A fresh key per run, shared by every worker through the environment: one key for
    # the whole service is what keeps a visitor's cookie valid in every worker.
    settings = DemoSettings(
        key=secrets.token_hex(32), percent=options.percent, error_rate=options.error_rate, seed=seed
    )
    kind: Kind = "uvicorn" if options.asgi else "gunicorn"
    app = "Starlette" if options.asgi else "Flask"
    total = options.users * options.requests_per_user
    config = {
        "rollout": ROLLOUT_NAME,
        "percent": options.percent,
        "users": options.users,
        "requests_per_user": options.requests_per_user,
        "error_rate": options.error_rate,
        "concurrency": options.concurrency,
        "seed": seed,
    }

    def note(message: str) -> None:
        print(f"canarymw demo: {message}", file=err, flush=True)

    note(f"starting {app} blue/green under {kind} with {options.workers} workers on 127.0.0.1")
    try:
        with DemoServer(kind, workers=options.workers, env=settings.to_env()) as server:
            pids = ", ".join(str(p) for p in sorted(server.pids))
            note(
                f"serving at {server.url} (worker pids {pids}); "
                f"{options.users} users x {options.requests_per_user} requests"
            )
            progress = Progress(total, err)
            started = time.perf_counter()
            runs = drive(
                server.host,
                server.port,
                users=options.users,
                requests=options.requests_per_user,
                concurrency=options.concurrency,
                cookie_name=settings.rollout().cookie_name,
                on_progress=progress.update,
            )
            elapsed = time.perf_counter() - started
            progress.close(sum(len(r.hits) for r in runs))
            server_info = {"kind": kind, "app": app, "workers": options.workers, "url": server.url}
    except ServerError as exc:
        note(f"could not start {kind}: {exc}")
        return EXIT_SETUP
    except KeyboardInterrupt:
        print(file=err)
        note(f"interrupted; {kind} stopped")
        return EXIT_INTERRUPTED

    result = analyse(runs, settings, config=config, server=server_info, elapsed=elapsed)
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
