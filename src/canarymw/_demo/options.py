"""What a run of ``canarymw demo`` is given and what it ends with, shared by both kinds of run.

:func:`~canarymw._demo.run.run_demo` picks the kind (a ramp halfway, or ``--guard`` in
:mod:`~canarymw._demo.guarded`) and hands it a :class:`DemoRun`. The options, the exit
codes and that hand-over live here, below the runner and the kinds it imports, so that
each kind (and :mod:`~canarymw._demo.flags`) can use them without importing the runner.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from .settings import DemoSettings

if TYPE_CHECKING:
    from ..store import Store
    from .report import Outcome
    from .server import Kind
    from .settings import GuardPlan

EXIT_OK = 0
EXIT_FAILED = 1
"""The run finished but a check failed (stickiness, split, routing, or requests lost)."""
EXIT_USAGE = 2
EXIT_SETUP = 3
"""The demo could not run: a missing dependency, or the server did not start."""
EXIT_INTERRUPTED = 130

GUARD_TIMEOUT = 240.0
"""Seconds of load after which ``canarymw demo --guard`` stops though the guard has not
finished (a healthy ramp takes about a minute)."""


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
    """The percent set through the store halfway through the load; None:
    :func:`~canarymw._demo.run.default_ramp`."""
    ramp: bool = True
    """False (``--no-ramp``): change nothing mid-run."""
    guard: bool = False
    """``--guard``: the rollout gets a guard that ramps green from ``percent`` (then 25, 50
    and 100) or rolls it back by itself; the users keep coming until it has finished."""
    guard_timeout: float = GUARD_TIMEOUT
    """``--guard-timeout``: seconds of load after which a guarded run stops anyway."""

    @property
    def kind(self) -> Kind:
        """The server the demo runs: uvicorn (the Starlette app) with ``--asgi``, else gunicorn (Flask)."""
        return "uvicorn" if self.asgi else "gunicorn"

    @property
    def app(self) -> str:
        """The demo app :attr:`kind` serves."""
        return "Starlette" if self.asgi else "Flask"


@dataclass(frozen=True, slots=True)
class DemoRun:
    """One run of the demo as :func:`~canarymw._demo.run.run_demo` hands it to a kind of run.

    The store is open for the whole run and closed by ``run_demo`` afterwards.
    """

    options: DemoOptions
    out: TextIO
    """Where the report goes."""
    err: TextIO
    """Where progress goes."""
    note: Callable[[str], None]
    """Writes one line of news to ``err``."""
    store: Store
    """The runner's own client of the store the workers share."""
    url: str
    """The store's URL, for the workers."""
    name: str
    """The rollout's name in the store."""
    temporary: bool
    """Whether the store is the run's own temporary SQLite file."""

    def settings(self, *, percent: float, guard: GuardPlan | None = None) -> DemoSettings:
        """The settings every worker of this run gets, starting the rollout at ``percent``
        (the seed is ``--seed``'s, or a random one)."""
        # A fresh key per run, shared by every worker through the environment: one key for
        # the whole service is what keeps a visitor's cookie valid in every worker. So is
        # the store's URL: every worker follows the same store.
        return DemoSettings(
            key=secrets.token_hex(32),
            percent=percent,
            error_rate=self.options.error_rate,
            seed=secrets.randbelow(2**31) if self.options.seed is None else self.options.seed,
            store=self.url,
            name=self.name,
            guard=guard,
        )

    @property
    def store_text(self) -> str:
        """The store as the report names it."""
        return f"{self.store!r}{' (temporary, removed after the run)' if self.temporary else ''}"

    def finish(self, result: Outcome) -> int:
        """Print the report (JSON with ``--json``), repeat any failed check on ``err``; the exit code."""
        if self.options.json:
            json.dump(result.to_json(), self.out, indent=2)
            self.out.write("\n")
        else:
            self.out.write(result.to_text() + "\n")
        self.out.flush()
        if not result.ok:
            failed = "; ".join(f"{c.name}: {c.detail}" for c in result.checks if not c.ok)
            self.note(f"FAILED: {failed}")
            return EXIT_FAILED
        return EXIT_OK

    def server_info(self, url: str) -> dict[str, Any]:
        """The server as the report describes it."""
        options = self.options
        return {"kind": options.kind, "app": options.app, "workers": options.workers, "url": url}
