"""Turn what the simulated users saw into the demo's table, checks and JSON.

Everything here is computed client-side over the whole service (all workers), from the
responses alone: the variant each app stamped on its answer, the worker pid, the status,
the latency, and the cohort cookie each user held.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .._cookie import CookieCodec, normalise_keys
from .._version import __version__
from .load import Hit, UserRun
from .settings import DemoSettings

SIGMAS = 4.0
"""Width of the split check: a correct split fails it about once in 16,000 runs."""

NOTE = (
    "MemorySink numbers are per worker process; this table is computed client-side over the whole "
    "service. In production, get whole-service numbers from PrometheusSink in multiprocess mode or "
    "JSONLinesSink + `python -m canarymw.sinks.jsonl DIR` (docs/outcomes.md)."
)
VARIANTS = ("old", "new")
LABELS = {"old": "old (blue)", "new": "new (green)", "all": "all"}


@dataclass(frozen=True, slots=True)
class VariantRow:
    """One row of the per-variant table."""

    users: int
    requests: int
    errors: int
    """Responses with status >= 500, plus (in the ``all`` row) requests that got no response."""
    success_rate: float | None
    p50_ms: float | None
    p95_ms: float | None


@dataclass(frozen=True, slots=True)
class SplitCheck:
    """Observed share of users on ``new`` against the configured one."""

    users: int
    users_new: int
    configured: float
    observed: float | None
    z: float | None
    """Standard score of ``users_new`` under Binomial(users, configured)."""
    low: float
    high: float
    """The share interval (configured ± 4 sigma) the observed share must fall in."""
    ok: bool


@dataclass(frozen=True, slots=True)
class StickyCheck:
    """Whether every user kept one cohort and one variant, across requests and workers."""

    users: int
    one_variant: int
    several_variants: int
    several_cohorts: int
    """Users whose cohort id changed between requests (the cookie was replaced)."""
    no_cookie: int
    """Users left without a valid cohort cookie signed with the demo key."""
    several_workers: int
    """Users served by more than one worker process (pids from ``X-Worker-Pid``)."""
    pids: list[int]
    hash_agrees: int
    """Users whose variant equals the frozen hash of their cookie id, computed here."""
    ok: bool


@dataclass(frozen=True, slots=True)
class Blend:
    """The blended success rate ``s = s_new * w + s_old * (1 - w)`` next to the measured one."""

    weight: float
    s_new: float | None
    s_old: float | None
    blended: float | None
    measured: float | None


@dataclass(frozen=True, slots=True)
class Check:
    """One pass/fail line; any failed check makes the demo exit non-zero."""

    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Result:
    """The whole outcome of one demo run, as printed and as ``--json``."""

    config: dict[str, Any]
    server: dict[str, Any]
    variants: dict[str, VariantRow]
    split: SplitCheck
    stickiness: StickyCheck
    success: Blend
    transport_errors: int
    unrouted: int
    """Responses without a valid ``X-Canary-Variant`` (``old``/``new``)."""
    elapsed_s: float
    checks: list[Check] = field(default_factory=list)
    note: str = NOTE

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``ok`` and the canarymw version included)."""
        out = asdict(self)
        out["ok"] = self.ok
        out["canarymw_version"] = __version__
        return out


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile of already sorted ``values`` (None when empty)."""
    if not values:
        return None
    rank = max(1, math.ceil(q * len(values)))
    return values[min(rank, len(values)) - 1]


def split_check(users_new: int, users: int, share: float, sigmas: float = SIGMAS) -> SplitCheck:
    """Is ``users_new`` out of ``users`` consistent with each user going new with probability ``share``?

    The count is Binomial(users, share); the check accepts ``share ± sigmas * sd / users``.
    At 0% and 100% the split is exact, and so is the check.
    """
    if users == 0:
        return SplitCheck(0, 0, share, None, None, share, share, False)
    observed = users_new / users
    sd = math.sqrt(users * share * (1.0 - share))
    if sd == 0.0:
        ok = users_new == round(users * share)
        return SplitCheck(users, users_new, share, observed, None, share, share, ok)
    z = (users_new - users * share) / sd
    half = sigmas * sd / users
    low, high = max(0.0, share - half), min(1.0, share + half)
    return SplitCheck(users, users_new, share, observed, z, low, high, abs(z) <= sigmas)


def blend(s_new: float | None, s_old: float | None, weight: float, measured: float | None) -> Blend:
    """``s = s_new * w + s_old * (1 - w)``; a term with zero weight may be unknown."""
    terms: list[float] = []
    for rate, w in ((s_new, weight), (s_old, 1.0 - weight)):
        if w == 0.0:
            continue
        if rate is None:
            return Blend(weight, s_new, s_old, None, measured)
        terms.append(rate * w)
    return Blend(weight, s_new, s_old, math.fsum(terms), measured)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _row(users: int, hits: Iterable[Hit], extra_errors: int = 0) -> VariantRow:
    hits = list(hits)
    requests = len(hits) + extra_errors
    errors = sum(1 for h in hits if h.status is not None and h.status >= 500) + extra_errors
    latencies = sorted(h.latency * 1000.0 for h in hits)
    return VariantRow(
        users=users,
        requests=requests,
        errors=errors,
        success_rate=(1.0 - errors / requests) if requests else None,
        p50_ms=_round(quantile(latencies, 0.50)),
        p95_ms=_round(quantile(latencies, 0.95)),
    )


def analyse(
    runs: Sequence[UserRun],
    settings: DemoSettings,
    *,
    config: dict[str, Any],
    server: dict[str, Any],
    elapsed: float,
) -> Result:
    """Compute the table and the checks from every user's hits."""
    rollout = settings.rollout()
    codec = CookieCodec(normalise_keys(settings.key, "canarymw demo"))
    ids: dict[str, str | None] = {}

    def cohort_of(value: str) -> str | None:
        if value not in ids:
            verified = codec.verify(value)
            ids[value] = verified[0] if verified else None
        return ids[value]

    answered = [h for r in runs for h in r.hits if h.status is not None]
    transport_errors = sum(1 for r in runs for h in r.hits if h.status is None)
    unrouted = sum(1 for h in answered if h.variant not in VARIANTS)
    user_variant: dict[int, str] = {}
    one = several = several_cohorts = no_cookie = several_workers = agrees = 0
    pids: set[int] = set()
    users_seen = 0
    for run in runs:
        variants = {h.variant for h in run.hits if h.status is not None and h.variant in VARIANTS}
        cookies = [h.cookie for h in run.hits if h.status is not None]
        if not cookies:
            continue  # the user never got an answer; counted as transport errors
        users_seen += 1
        cohorts = {cohort_of(c) if c else None for c in cookies}
        run_pids = {h.pid for h in run.hits if h.pid is not None}
        pids |= run_pids
        several_workers += len(run_pids) > 1
        if None in cohorts:
            no_cookie += 1
        if len(cohorts - {None}) > 1:
            several_cohorts += 1
        if len(variants) == 1:
            one += 1
            (variant,) = variants
            user_variant[run.index] = variant
            cohort = next(iter(cohorts)) if len(cohorts) == 1 else None
            if cohort is not None and rollout.variant_for(cohort) == variant:
                agrees += 1
        elif len(variants) > 1:
            several += 1

    by_variant = {
        v: _row(
            sum(1 for x in user_variant.values() if x == v),
            (h for h in answered if h.variant == v),
        )
        for v in VARIANTS
    }
    total = _row(users_seen, answered, transport_errors)
    weight = settings.percent / 100.0
    split = split_check(by_variant["new"].users, one, weight)
    sticky = StickyCheck(
        users=users_seen,
        one_variant=one,
        several_variants=several,
        several_cohorts=several_cohorts,
        no_cookie=no_cookie,
        several_workers=several_workers,
        pids=sorted(pids),
        hash_agrees=agrees,
        ok=users_seen > 0 and several == 0 and several_cohorts == 0 and no_cookie == 0 and one == users_seen,
    )
    result = Result(
        config=config,
        server={**server, "pids_seen": sorted(pids)},
        variants={**by_variant, "all": total},
        split=split,
        stickiness=sticky,
        success=blend(
            by_variant["new"].success_rate, by_variant["old"].success_rate, weight, total.success_rate
        ),
        transport_errors=transport_errors,
        unrouted=unrouted,
        elapsed_s=round(elapsed, 3),
    )
    result.checks = _checks(result, config)
    return result


def _checks(result: Result, config: dict[str, Any]) -> list[Check]:
    expected = int(config["users"]) * int(config["requests_per_user"])
    made = result.variants["all"].requests
    st, sp = result.stickiness, result.split
    completed = made == expected and result.transport_errors == 0
    return [
        Check(
            "completed",
            completed,
            f"{made - result.transport_errors}/{expected} requests answered"
            + (
                f", {result.transport_errors} failed to connect or timed out"
                if result.transport_errors
                else ""
            ),
        ),
        Check(
            "routed",
            result.unrouted == 0,
            f"{result.unrouted} responses without an X-Canary-Variant of old/new"
            if result.unrouted
            else "every response came from the blue or the green app",
        ),
        Check(
            "sticky",
            st.ok,
            f"{st.one_variant}/{st.users} users saw one variant on all their requests"
            + (f", {st.several_variants} saw both" if st.several_variants else "")
            + (f", {st.several_cohorts} changed cohort" if st.several_cohorts else "")
            + (f", {st.no_cookie} without a valid cookie" if st.no_cookie else "")
            + f"; {st.several_workers} of them were served by more than one worker",
        ),
        Check(
            "hash",
            st.hash_agrees == st.one_variant,
            f"{st.hash_agrees}/{st.one_variant} users got the variant the frozen hash of their "
            "cookie id gives here",
        ),
        Check("split", sp.ok, _split_text(sp)),
    ]


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _split_text(sp: SplitCheck) -> str:
    head = (
        f"{_pct(sp.observed)} of users on new ({sp.users_new}/{sp.users}), {_pct(sp.configured)} configured"
    )
    if sp.z is None:
        return head + (": exact, as it must be at 0% and 100%" if sp.ok else "")
    return (
        f"{head}: z = {sp.z:+.2f}, {'within' if sp.ok else 'OUTSIDE'} ±{SIGMAS:g} sigma "
        f"[{_pct(sp.low)}, {_pct(sp.high)}]"
    )


def render(result: Result) -> str:
    """The human-readable report."""
    cfg, srv = result.config, result.server
    lines = [
        f"canarymw demo: {srv['app']} blue/green under {srv['kind']} "
        f"({srv['workers']} workers) at {srv['url']}",
        f"rollout {cfg['rollout']!r} at {cfg['percent']:g}% new; {cfg['users']} users x "
        f"{cfg['requests_per_user']} requests, {cfg['concurrency']} at a time; "
        f"injected error rate in green {cfg['error_rate']:g}; seed {cfg['seed']}",
        "",
        f"{'variant':<12} {'users':>7} {'requests':>9} {'errors':>7} {'success':>9} "
        f"{'p50 ms':>7} {'p95 ms':>7}",
    ]
    for key, row in result.variants.items():
        lines.append(
            f"{LABELS[key]:<12} {row.users:>7} {row.requests:>9} {row.errors:>7} "
            f"{_pct(row.success_rate):>9} {_ms(row.p50_ms):>7} {_ms(row.p95_ms):>7}"
        )
    b = result.success
    formula = "s = s_new * w + s_old * (1 - w)"
    if b.blended is None:
        blended = f"{formula}: not enough data"
    else:
        s_new = "-" if b.s_new is None else f"{b.s_new:.4f}"
        s_old = "-" if b.s_old is None else f"{b.s_old:.4f}"
        blended = f"{formula} = {s_new} * {b.weight:g} + {s_old} * {1 - b.weight:g} = {_pct(b.blended)}"
    lines += [
        "",
        f"{'success':<10} {blended}; measured overall {_pct(b.measured)}",
    ]
    for check in result.checks:
        lines.append(f"{check.name:<10} {'ok  ' if check.ok else 'FAIL'}  {check.detail}")
    pids = ", ".join(str(p) for p in result.stickiness.pids) or "none reported"
    rate = result.variants["all"].requests / result.elapsed_s if result.elapsed_s > 0 else 0.0
    lines += [
        f"{'workers':<10} pids that answered: {pids}",
        f"{'note':<10} {result.note}",
        f"{'PASSED' if result.ok else 'FAILED'} in {result.elapsed_s:.1f} s ({rate:.0f} requests/s)",
    ]
    return "\n".join(lines)
