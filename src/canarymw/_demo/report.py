"""Turn what the simulated users saw into the demo's table, checks and JSON.

Everything here is computed client-side over the whole service (all workers), from the
responses alone: the variant each app stamped on its answer, the worker pid, the status,
the latency, the store version and percent the worker followed, and the cohort cookie
each user held; plus, for a ramp, the change and the switch time each worker reported.

A ramp splits the run in phases, by the client's clock: ``before`` (requests that ended
before the runner asked the store for the change: certainly served at the starting
percent), ``after`` (requests that started after the last worker switched: certainly
served at the new percent), and the requests in between, which either percent may have
served; they count everywhere except in the split and success estimates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import Field, asdict, dataclass, field
from typing import Any, ClassVar

from .._cookie import CookieCodec, normalise_keys
from .._version import __version__
from .load import Hit, UserRun
from .ramp import RampRecord
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
    """Whether every user kept one cohort, and one variant except for the ramp's one move.

    Raising the percent only moves users from old to new (lowering it, from new to old):
    a user may change variant once, in that direction, and never back.
    """

    users: int
    one_variant: int
    """Users who saw one variant on all their requests."""
    moved: int
    """Users who changed variant once, in the ramp's direction (old -> new when raised)."""
    moved_back: int
    """Users who changed variant against the ramp's direction, or more than once."""
    mixed_in_phase: int
    """Users who saw both variants within one phase, where the percent did not change."""
    several_cohorts: int
    """Users whose cohort id changed between requests (the cookie was replaced)."""
    no_cookie: int
    """Users left without a valid cohort cookie signed with the demo key."""
    several_workers: int
    """Users served by more than one worker process (pids from ``X-Worker-Pid``)."""
    pids: list[int]
    hash_agrees: int
    """Users whose every response has the variant the frozen hash of their cookie id gives
    at the percent of the response's phase, computed here."""
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
class Phase:
    """Part of the run served at one percent: ``run`` (no ramp), ``before`` or ``after`` it."""

    name: str
    percent: float
    version: int | None
    """The store version every response of the phase must carry (None: not checked)."""
    users: int
    """Users with at least one request in the phase."""
    requests: int
    stamped: int
    """Requests whose response carried the phase's store version and percent."""
    split: SplitCheck
    """Users on new among the phase's users who saw one variant in it."""
    success: Blend
    """Per-variant success rates of the phase's requests, blended with its weight."""


@dataclass(frozen=True, slots=True)
class Check:
    """One pass/fail line; any failed check makes the demo exit non-zero."""

    name: str
    ok: bool
    detail: str


class Outcome:
    """What the results of both kinds of run share: the table, the checks, the note, and
    the ways to print them.

    A base of dataclasses that hold these fields (:class:`Result`,
    :class:`~canarymw._demo.guarded.GuardResult`); it has none of its own, so that each
    keeps its own field order in the JSON.
    """

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # set by the subclass's @dataclass
    variants: dict[str, VariantRow]
    elapsed_s: float
    checks: list[Check]
    note: str

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

    def to_text(self) -> str:
        """The human-readable report."""
        raise NotImplementedError

    def closing_lines(self, pids: Sequence[int], *, of_load: bool = False) -> list[str]:
        """The report's last lines: a line a check, the workers that answered, the note,
        and whether the run passed."""
        rate = self.variants["all"].requests / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return [
            *(f"{c.name:<{W}} {'ok  ' if c.ok else 'FAIL'}  {c.detail}" for c in self.checks),
            f"{'workers':<{W}} pids that answered: {', '.join(str(p) for p in pids) or 'none reported'}",
            f"{'note':<{W}} {self.note}",
            f"{'PASSED' if self.ok else 'FAILED'} in {self.elapsed_s:.1f} s{' of load' if of_load else ''} "
            f"({rate:.0f} requests/s)",
        ]


@dataclass(slots=True)
class Result(Outcome):
    """The whole outcome of one demo run, as printed and as ``--json``."""

    config: dict[str, Any]
    server: dict[str, Any]
    variants: dict[str, VariantRow]
    phases: list[Phase]
    ramp: RampRecord | None
    """The mid-run change and each worker's switch; None with ``--no-ramp``."""
    between: int
    """Requests made while the change was spreading: left out of the phases."""
    stickiness: StickyCheck
    transport_errors: int
    unrouted: int
    """Responses without a valid ``X-Canary-Variant`` (``old``/``new``)."""
    elapsed_s: float
    checks: list[Check] = field(default_factory=list)
    note: str = NOTE

    def to_text(self) -> str:
        """The human-readable report."""
        return render(self)


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


def _phase_of(hit: Hit, ramp: RampRecord | None) -> str | None:
    """``run``, ``before``, ``after``, or None for a request made while the change spread."""
    if ramp is None:
        return "run"
    if ramp.requested_at is None or hit.at + hit.latency < ramp.requested_at:
        return "before"
    if ramp.switched_at is not None and hit.at > ramp.switched_at:
        return "after"
    return None


class Tally:
    """What both kinds of run count the same way over every user's requests.

    Only users who got at least one answer count as users; a request that got none is a
    transport error.
    """

    def __init__(self, runs: Sequence[UserRun], settings: DemoSettings) -> None:
        self._codec = CookieCodec(normalise_keys(settings.key, "canarymw demo"))
        self._cohorts: dict[str, str | None] = {}
        self.answered = [h for r in runs for h in r.hits if h.status is not None]
        """Every request that got a response, user by user."""
        self.transport_errors = sum(1 for r in runs for h in r.hits if h.status is None)
        self.unrouted = sum(1 for h in self.answered if h.variant not in VARIANTS)
        """Responses without a valid ``X-Canary-Variant`` (``old``/``new``)."""
        self.users = 0
        self.users_by_variant = dict.fromkeys(VARIANTS, 0)
        """Users who saw each variant at least once."""
        self.pids: set[int] = set()
        """The worker pids that answered."""
        self.several_workers = 0
        """Users served by more than one worker process."""
        self.several_cohorts = 0
        """Users whose cohort id changed between requests (the cookie was replaced)."""
        self.no_cookie = 0
        """Users left, after some response, without a valid cohort cookie signed with the demo key."""
        for run in runs:
            hits = [h for h in run.hits if h.status is not None]
            if hits:
                self._add_user(hits)

    def _add_user(self, hits: list[Hit]) -> None:
        self.users += 1
        for variant in {h.variant for h in hits if h.variant in VARIANTS}:
            self.users_by_variant[str(variant)] += 1
        pids = {h.pid for h in hits if h.pid is not None}
        self.pids |= pids
        self.several_workers += len(pids) > 1
        cohorts = {self.cohort_of(h) for h in hits}
        self.no_cookie += None in cohorts
        self.several_cohorts += len(cohorts - {None}) > 1

    def cohort_of(self, hit: Hit) -> str | None:
        """The cohort id in the cookie the user held after this response, or None without a valid one."""
        if not hit.cookie:
            return None
        if hit.cookie not in self._cohorts:
            verified = self._codec.verify(hit.cookie)
            self._cohorts[hit.cookie] = verified[0] if verified else None
        return self._cohorts[hit.cookie]

    def variant_rows(self) -> dict[str, VariantRow]:
        """The rows of the per-variant table: ``old``, ``new`` and ``all``."""
        rows = {
            v: _row(self.users_by_variant[v], (h for h in self.answered if h.variant == v)) for v in VARIANTS
        }
        return {**rows, "all": _row(self.users, self.answered, self.transport_errors)}


def analyse(
    runs: Sequence[UserRun],
    settings: DemoSettings,
    *,
    config: dict[str, Any],
    server: dict[str, Any],
    elapsed: float,
    ramp: RampRecord | None = None,
) -> Result:
    """Compute the table, the phases and the checks from every user's hits."""
    tally = Tally(runs, settings)
    percents = {"run": settings.percent}
    versions: dict[str, int | None] = {"run": None}
    if ramp is not None:
        percents = {"before": settings.percent, "after": ramp.to_percent}
        versions = {"before": ramp.version_before, "after": ramp.version}
    rollouts = {name: settings.local_rollout(pct) for name, pct in percents.items()}
    up = ramp is not None and ramp.to_percent > settings.percent
    down = ramp is not None and ramp.to_percent < settings.percent

    def expected(cohort: str, phase: str | None) -> set[str]:
        if phase is not None:
            return {rollouts[phase].variant_for(cohort)}
        return {rollouts["before"].variant_for(cohort), rollouts["after"].variant_for(cohort)}

    phase_hits: dict[str, list[Hit]] = {name: [] for name in percents}
    phase_users: dict[str, dict[int, set[str]]] = {name: {} for name in percents}
    between = 0
    one = moved = moved_back = mixed = agrees = 0
    for run in runs:
        phases = [_phase_of(h, ramp) for h in run.hits]
        for hit, phase in zip(run.hits, phases, strict=True):
            if phase is None:
                between += 1
            else:
                phase_hits[phase].append(hit)
        hits = [(h, p) for h, p in zip(run.hits, phases, strict=True) if h.status is not None]
        if not hits:
            continue  # the user never got an answer; counted as transport errors
        routed = [(h.variant, p) for h, p in hits if h.variant in VARIANTS]
        for variant, phase in routed:
            if phase is not None:
                phase_users[phase].setdefault(run.index, set()).add(variant)
        mixed += any(len(v) > 1 for p in phase_users.values() if (v := p.get(run.index)))
        flips = [(a, b) for (a, _), (b, _) in itertools.pairwise(routed) if a != b]
        if not flips:
            one += 1
        elif (flips == [("old", "new")] and up) or (flips == [("new", "old")] and down):
            moved += 1
        else:
            moved_back += 1
        cohorts = {tally.cohort_of(h) for h, _ in hits}
        cohort = next(iter(cohorts)) if len(cohorts) == 1 else None
        if cohort is not None and routed and all(v in expected(cohort, p) for v, p in routed):
            agrees += 1

    phase_list = []
    for name, pct in percents.items():
        in_phase = phase_hits[name]
        one_variant = [v for v in phase_users[name].values() if len(v) == 1]
        weight = pct / 100.0
        ok_hits = [h for h in in_phase if h.status is not None]
        rates = {v: _row(0, (h for h in ok_hits if h.variant == v)).success_rate for v in VARIANTS}
        version = versions[name]
        phase_list.append(
            Phase(
                name=name,
                percent=pct,
                version=version,
                users=len(phase_users[name]),
                requests=len(in_phase),
                stamped=sum(
                    1 for h in ok_hits if (version is None or h.version == version) and h.percent == pct
                ),
                split=split_check(sum(1 for v in one_variant if v == {"new"}), len(one_variant), weight),
                success=blend(
                    rates["new"],
                    rates["old"],
                    weight,
                    _row(0, ok_hits, len(in_phase) - len(ok_hits)).success_rate,
                ),
            )
        )

    sticky = StickyCheck(
        users=tally.users,
        one_variant=one,
        moved=moved,
        moved_back=moved_back,
        mixed_in_phase=mixed,
        several_cohorts=tally.several_cohorts,
        no_cookie=tally.no_cookie,
        several_workers=tally.several_workers,
        pids=sorted(tally.pids),
        hash_agrees=agrees,
        ok=tally.users > 0
        and moved_back == 0
        and mixed == 0
        and tally.several_cohorts == 0
        and tally.no_cookie == 0
        and one + moved == tally.users,
    )
    result = Result(
        config=config,
        server={**server, "pids_seen": sorted(tally.pids)},
        variants=tally.variant_rows(),
        phases=phase_list,
        ramp=ramp,
        between=between,
        stickiness=sticky,
        transport_errors=tally.transport_errors,
        unrouted=tally.unrouted,
        elapsed_s=round(elapsed, 3),
    )
    result.checks = _checks(result, config)
    return result


def completed_check(made: int, transport_errors: int, expected: int | None = None) -> Check:
    """Whether every request got an answer: ``expected`` of them, or (None) as many as
    were made, at least one."""
    ok = transport_errors == 0 and (made > 0 if expected is None else made == expected)
    return Check(
        "completed",
        ok,
        f"{made - transport_errors}/{made if expected is None else expected} requests answered"
        + (f", {transport_errors} failed to connect or timed out" if transport_errors else ""),
    )


def routed_check(unrouted: int) -> Check:
    """Whether every response came from one of the two apps."""
    return Check(
        "routed",
        unrouted == 0,
        f"{unrouted} responses without an X-Canary-Variant of old/new"
        if unrouted
        else "every response came from the blue or the green app",
    )


def cookie_text(several_cohorts: int, no_cookie: int) -> str:
    """The part of a stickiness check's sentence about users whose cookie did not hold."""
    return (f", {several_cohorts} changed cohort" if several_cohorts else "") + (
        f", {no_cookie} without a valid cookie" if no_cookie else ""
    )


def _checks(result: Result, config: dict[str, Any]) -> list[Check]:
    expected = int(config["users"]) * int(config["requests_per_user"])
    made = result.variants["all"].requests
    st = result.stickiness
    checks = [completed_check(made, result.transport_errors, expected), routed_check(result.unrouted)]
    if result.ramp is not None:
        checks.append(_switch_check(result, result.ramp))
    if result.ramp is None:
        sticky = f"{st.one_variant}/{st.users} users saw one variant on all their requests"
    else:
        direction = (
            "old -> new"
            if result.ramp.to_percent > result.ramp.from_percent
            else "new -> old"
            if result.ramp.to_percent < result.ramp.from_percent
            else "nowhere (same percent)"
        )
        sticky = (
            f"{st.one_variant}/{st.users} users kept one variant, {st.moved} moved {direction} "
            f"with the ramp, {st.moved_back} moved back"
        )
    checks += [
        Check(
            "sticky",
            st.ok,
            sticky
            + (f", {st.mixed_in_phase} saw both at one percent" if st.mixed_in_phase else "")
            + cookie_text(st.several_cohorts, st.no_cookie)
            + f"; {st.several_workers} users were served by more than one worker",
        ),
        Check(
            "hash",
            st.hash_agrees == st.users,
            f"{st.hash_agrees}/{st.users} users got, on every request, the variant the frozen hash "
            "of their cookie id gives here at the percent in force",
        ),
    ]
    for phase in result.phases:
        name = "split" if phase.name == "run" else f"split-{phase.name}"
        if phase.split.users == 0:
            detail = (
                f"no user had a request {_PHASE_TEXT[phase.name]} (too few requests to check the split "
                "there: use more --users)"
            )
            checks.append(Check(name, False, detail))
        else:
            checks.append(Check(name, phase.split.ok, _split_text(phase.split)))
    return checks


_PHASE_TEXT = {
    "run": "in the run",
    "before": "before the change",
    "after": "after every worker switched",
}


def _switch_check(result: Result, ramp: RampRecord) -> Check:
    if ramp.error is not None:
        return Check("switch", False, f"the change could not be written to the store: {ramp.error}")
    answered = set(result.stickiness.pids)
    reported = {w.pid for w in ramp.workers if w.switched_at is not None}
    missing = sorted((answered | {w.pid for w in ramp.workers}) - reported)
    if missing or not ramp.all_switched:
        which = ", ".join(str(p) for p in missing) or "some"
        return Check(
            "switch",
            False,
            f"worker(s) {which} did not report version {ramp.version} ({ramp.to_percent:g}%) "
            "within the time allowed",
        )
    wrong = [p for p in result.phases if p.stamped != p.requests]
    stamps = "; ".join(
        f"{p.stamped}/{p.requests} responses {_PHASE_TEXT[p.name]} carried version {p.version} "
        f"and {p.percent:g}%"
        for p in result.phases
    )
    return Check(
        "switch",
        not wrong,
        f"all {len(reported)} workers switched to version {ramp.version} ({ramp.to_percent:g}%), the "
        f"last {_ms(ramp.max_delay_ms)} ms after the change; {stamps}",
    )


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


def _blend_text(b: Blend) -> str:
    formula = "s = s_new * w + s_old * (1 - w)"
    if b.blended is None:
        return f"{formula}: not enough data; measured {_pct(b.measured)}"
    s_new = "-" if b.s_new is None else f"{b.s_new:.4f}"
    s_old = "-" if b.s_old is None else f"{b.s_old:.4f}"
    return (
        f"{formula} = {s_new} * {b.weight:g} + {s_old} * {1 - b.weight:g} = {_pct(b.blended)}; "
        f"measured {_pct(b.measured)}"
    )


W = 14
"""Width of the label column of the report."""


def table_lines(variants: Mapping[str, VariantRow]) -> list[str]:
    """The per-variant table: its header, then a row a variant (``all`` last)."""
    return [
        f"{'variant':<{W}} {'users':>7} {'requests':>9} {'errors':>7} {'success':>9} "
        f"{'p50 ms':>7} {'p95 ms':>7}",
        *(
            f"{LABELS[key]:<{W}} {row.users:>7} {row.requests:>9} {row.errors:>7} "
            f"{_pct(row.success_rate):>9} {_ms(row.p50_ms):>7} {_ms(row.p95_ms):>7}"
            for key, row in variants.items()
        ),
    ]


def render(result: Result) -> str:
    """The human-readable report."""
    cfg, srv, ramp = result.config, result.server, result.ramp
    change = "" if ramp is None else f", set to {ramp.to_percent:g}% through the store halfway"
    lines = [
        f"canarymw demo: {srv['app']} blue/green under {srv['kind']} "
        f"({srv['workers']} workers) at {srv['url']}",
        f"rollout {cfg['rollout']!r} at {cfg['percent']:g}% new{change}; {cfg['users']} users x "
        f"{cfg['requests_per_user']} requests, {cfg['concurrency']} at a time; "
        f"injected error rate in green {cfg['error_rate']:g}; seed {cfg['seed']}",
        f"store: {cfg['store']}",
        "",
        *table_lines(result.variants),
        "",
    ]
    if ramp is not None:
        if ramp.version is not None:
            lines.append(
                f"{'change':<{W}} {ramp.from_percent:g}% -> {ramp.to_percent:g}% at {ramp.at_s:.2f} s "
                f"into the load: store version {ramp.version_before} -> {ramp.version}, written in "
                f"{_ms(ramp.write_ms)} ms by {ramp.by!r}"
            )
        switched = ", ".join(
            f"pid {w.pid} +{_ms(w.delay_ms)} ms" if w.delay_ms is not None else f"pid {w.pid} not seen"
            for w in ramp.workers
        )
        lines.append(
            f"{'switched':<{W}} {switched or 'no worker reported'}; slowest {_ms(ramp.max_delay_ms)} ms "
            "after the change (as each worker noted it)"
        )
        by_name = {p.name: p for p in result.phases}
        before, after = by_name["before"], by_name["after"]
        lines.append(
            f"{'phases':<{W}} before the change {before.requests} requests at {before.percent:g}%; "
            f"while it spread {result.between} (left out of split and success); "
            f"after every worker switched {after.requests} at {after.percent:g}%"
        )
    for phase in result.phases:
        label = "success" if phase.name == "run" else f"success-{phase.name}"
        lines.append(f"{label:<{W}} {_blend_text(phase.success)}")
    lines += result.closing_lines(result.stickiness.pids)
    return "\n".join(lines)
