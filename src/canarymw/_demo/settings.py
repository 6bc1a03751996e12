"""Settings and behaviour shared by the demo's Flask and Starlette apps.

The server runs in other processes (gunicorn or uvicorn workers), so the settings travel
through environment variables. Every worker builds the same :class:`~canarymw.Rollout`
from them: the same key verifies every cookie and the same frozen hash picks every
variant, which is what makes a visitor's variant identical in every worker.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass

from .._bucketing import BUCKETS, bucket
from .._rollout import Rollout

ENV_KEY = "CANARYMW_DEMO_KEY"
ENV_PERCENT = "CANARYMW_DEMO_PERCENT"
ENV_ERROR_RATE = "CANARYMW_DEMO_ERROR_RATE"
ENV_SEED = "CANARYMW_DEMO_SEED"
ENV_STORE = "CANARYMW_DEMO_STORE"
ENV_ROLLOUT = "CANARYMW_DEMO_ROLLOUT"

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

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("The demo needs a non-empty secret key.")
        if not self.name:
            raise ValueError("The demo rollout needs a non-empty name.")
        if not 0.0 <= self.percent <= 100.0:
            raise ValueError(f"The demo percent must be from 0 to 100, not {self.percent!r}.")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"The demo error rate must be from 0 to 1, not {self.error_rate!r}.")

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
        return env

    def rollout(self) -> Rollout:
        """The rollout a worker serves with: it follows :attr:`store` when one is set.

        Health and stats paths are excluded: never routed, never counted.
        """
        return Rollout(
            self.name,
            percent=self.percent,
            secret_key=self.key,
            exclude=[HEALTH_PATH, STATS_PATH],
            store=self.store,
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
