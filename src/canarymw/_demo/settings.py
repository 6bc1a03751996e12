"""Settings and behaviour shared by the demo's Flask and Starlette apps.

The server runs in other processes (gunicorn or uvicorn workers), so the settings travel
through environment variables. Every worker builds the same :class:`~canarymw.Rollout`
from them: the same key verifies every cookie and the same frozen hash picks every
variant, which is what makes a visitor's variant identical in every worker.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .._bucketing import BUCKETS, bucket
from .._rollout import Rollout

if TYPE_CHECKING:
    from ..guard import Guard

ENV_KEY = "CANARYMW_DEMO_KEY"
ENV_PERCENT = "CANARYMW_DEMO_PERCENT"
ENV_ERROR_RATE = "CANARYMW_DEMO_ERROR_RATE"
ENV_SEED = "CANARYMW_DEMO_SEED"
ENV_STORE = "CANARYMW_DEMO_STORE"
ENV_ROLLOUT = "CANARYMW_DEMO_ROLLOUT"
ENV_GUARD = "CANARYMW_DEMO_GUARD"

ROLLOUT_NAME = "hello-v2"
BLUE_BODY = "Hello, Blue World!\n"
GREEN_BODY = "Hello, Green World!\n"
FAILURE_BODY = "Injected failure in green.\n"
VARIANT_HEADER = "X-Canary-Variant"
"""Set by each app itself (blue: ``old``, green: ``new``), so it proves where a request ran."""
PID_HEADER = "X-Worker-Pid"
VERSION_HEADER = "X-Canary-Store-Version"
"""The store version the answering worker followed when it answered (absent without a store)."""
PERCENT_HEADER = "X-Canary-Percent"
"""The percent in force in the answering worker when it answered."""
HEALTH_PATH = "/healthz"
STATS_PATH = "/_canarymw/stats"
TAG_PARAM = "n"
"""Query parameter the load driver numbers requests with, so injected failures are reproducible."""


GUARD_STEPS = (25.0, 50.0, 100.0)
"""The steps of the demo's guarded ramp after the first one (``--percent``, 10 by default)."""
GUARD_BAKE = 12.0
"""Seconds the demo's guard keeps green at a step at least. The guard judges 10-second
windows once they closed 2.5 s ago, and a step needs a whole window of its own, so a
step lasts about 20 s anyway; a short bake keeps it at that."""
GUARD_MIN_REQUESTS = 100
"""Canary requests the demo's guard needs at a step before it advances: one window's
worth at 10% of 100 requests a second, which the load driver exceeds even on two busy
cores (it makes about 200 a second there)."""
GUARD_DEADLINE = 600.0
"""Seconds at a step after which the demo's guard would pause: far beyond the demo's
timeout, so it never applies."""
GUARD_INTERVAL = 1.0
"""Seconds between two looks of the demo's guard."""


RATIO_ALPHA = 0.001
"""The level of the guard's sample-ratio check for visitors who make one request each
(:class:`~canarymw.guard.Analysis`'s default); see :meth:`GuardPlan.for_demo`."""


@dataclass(frozen=True, slots=True)
class GuardPlan:
    """The demo's :class:`~canarymw.guard.Guard`, as plain numbers every worker agrees on."""

    steps: tuple[float, ...] = (10.0, *GUARD_STEPS)
    bake: float = GUARD_BAKE
    min_requests: int = GUARD_MIN_REQUESTS
    deadline: float = GUARD_DEADLINE
    interval: float = GUARD_INTERVAL
    ratio_alpha: float = RATIO_ALPHA
    """The level of the sample-ratio check (a mismatch pauses the rollout)."""

    @classmethod
    def for_demo(cls, first: float, requests_per_user: int = 1) -> GuardPlan:
        """The demo's guard: steps from ``first`` percent, then those of 25, 50 and 100
        above it (10 gives 10, 25, 50, 100; 30 gives 30, 50, 100; 100 gives 100 alone).

        The library's defaults otherwise, the sample-ratio check included: its users'
        several requests each (all to one variant) make the canary's request count vary
        more than a binomial's, which the check learns from the windows before it judges
        finely (docs/guard.md). ``requests_per_user`` is checked, not used.
        """
        if not 0.0 < first <= 100.0:
            raise ValueError(
                f"The first step of a guarded ramp must be above 0 and at most 100, not {first!r}."
            )
        if requests_per_user < 1:
            raise ValueError(f"The demo's users make at least one request, not {requests_per_user!r}.")
        return cls(steps=(float(first), *(s for s in GUARD_STEPS if s > first)))

    def build(self) -> Guard:
        """The guard a worker's rollout runs."""
        from ..guard import Analysis, Guard

        return Guard(
            steps=self.steps,
            bake=self.bake,
            min_requests=self.min_requests,
            deadline=self.deadline,
            interval=self.interval,
            analysis=Analysis(ratio_alpha=self.ratio_alpha),
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data, field by field (for the environment and the report)."""
        return {**asdict(self), "steps": list(self.steps)}

    def to_text(self) -> str:
        """JSON, for the environment."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_text(cls, text: str) -> GuardPlan:
        """The plan :meth:`to_text` wrote; RuntimeError for anything else."""
        try:
            data = json.loads(text)
            return cls(
                steps=tuple(float(s) for s in data["steps"]),
                bake=float(data["bake"]),
                min_requests=int(data["min_requests"]),
                deadline=float(data["deadline"]),
                interval=float(data["interval"]),
                ratio_alpha=float(data["ratio_alpha"]),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise RuntimeError(f"Bad {ENV_GUARD} in the environment ({exc!r}): {text!r}.") from None


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """What every demo worker must agree on."""

    key: str
    percent: float = 10.0
    error_rate: float = 0.0
    """Probability that green answers a request with a 500."""
    seed: int = 0
    """Selects which green requests fail, given their cohort and request number."""
    store: str | None = None
    """URL of the store every worker follows (see :func:`canarymw.store.open_store`), or None."""
    name: str = ROLLOUT_NAME
    """The rollout's name: also its key in the store, so a shared store gets a fresh one per run."""
    guard: GuardPlan | None = None
    """The guard every worker's rollout runs (``canarymw demo --guard``), or None."""

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("The demo needs a non-empty secret key.")
        if not self.name:
            raise ValueError("The demo rollout needs a non-empty name.")
        if not 0.0 <= self.percent <= 100.0:
            raise ValueError(f"The demo percent must be from 0 to 100, not {self.percent!r}.")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"The demo error rate must be from 0 to 1, not {self.error_rate!r}.")
        if self.guard is not None and self.store is None:
            raise ValueError("The demo's guard needs a store that every worker shares.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DemoSettings:
        """Read the settings the demo runner exported; a missing key is a clear error."""
        env = os.environ if environ is None else environ
        key = env.get(ENV_KEY, "")
        if not key:
            # A per-process random key would give each worker its own cookies and break
            # stickiness across workers: exactly the mistake this demo exists to avoid.
            raise RuntimeError(
                f"Set {ENV_KEY} to the same secret in every worker, for example "
                f"{ENV_KEY}=$(python -c 'import secrets; print(secrets.token_hex(32))')."
            )
        try:
            percent = float(env.get(ENV_PERCENT, "10"))
            error_rate = float(env.get(ENV_ERROR_RATE, "0"))
            seed = int(env.get(ENV_SEED, "0"))
        except ValueError as exc:
            raise RuntimeError(f"Bad demo setting in the environment: {exc}.") from None
        if math.isnan(percent) or math.isnan(error_rate):
            raise RuntimeError("Demo percent and error rate must be numbers, not NaN.")
        return cls(
            key=key,
            percent=percent,
            error_rate=error_rate,
            seed=seed,
            store=env.get(ENV_STORE) or None,
            name=env.get(ENV_ROLLOUT) or ROLLOUT_NAME,
            guard=GuardPlan.from_text(env[ENV_GUARD]) if env.get(ENV_GUARD) else None,
        )

    def to_env(self) -> dict[str, str]:
        """The environment variables that make a worker build these settings."""
        env = {
            ENV_KEY: self.key,
            ENV_PERCENT: repr(self.percent),
            ENV_ERROR_RATE: repr(self.error_rate),
            ENV_SEED: str(self.seed),
            ENV_ROLLOUT: self.name,
        }
        if self.store is not None:
            env[ENV_STORE] = self.store
        if self.guard is not None:
            env[ENV_GUARD] = self.guard.to_text()
        return env

    def rollout(self) -> Rollout:
        """The rollout a worker serves with: it follows :attr:`store` when one is set, and
        runs :attr:`guard` when one is set (the demo then seeds it at 0%: the guard starts
        the ramp at its first step).

        Health and stats paths are excluded: never routed, never counted.
        """
        return Rollout(
            self.name,
            percent=self.percent,
            secret_key=self.key,
            exclude=[HEALTH_PATH, STATS_PATH],
            store=self.store,
            guard=None if self.guard is None else self.guard.build(),
        )

    def local_rollout(self, percent: float | None = None) -> Rollout:
        """The same rollout at ``percent`` (default: :attr:`percent`), following no store.

        What the demo runner recomputes variants with: it must not seed nor follow the
        store the workers share.
        """
        return Rollout(
            self.name,
            percent=self.percent if percent is None else percent,
            secret_key=self.key,
            exclude=[HEALTH_PATH, STATS_PATH],
        )

    def should_fail(self, cohort: str, tag: str | None) -> bool:
        """Whether green fails this request.

        With a request tag the answer is a pure function of (seed, cohort, tag), so the
        same visitor's same request fails in every worker and on every rerun; without
        one (a request typed by hand) it is a fresh coin flip.
        """
        if self.error_rate <= 0.0:
            return False
        if tag is None:
            return random.random() < self.error_rate
        return bucket(f"canarymw-demo-errors:{self.seed}", f"{cohort}:{tag}") < self.error_rate * BUCKETS
