"""``canarymw demo --guard``: the guard ramps green (or rolls it back) while simulated users come.

Every worker's rollout runs the same :class:`~canarymw.guard.Guard` (see
:class:`~canarymw._demo.settings.GuardPlan`); one of them at a time holds the lease in
the store and judges green against blue from the whole service's counters there. The
runner only watches: it reads the store until the guard has finished (green at 100%,
rolled back, or paused), waits until every worker serves that last state, lets the
users go on for :data:`TAIL` seconds more so the report can show them on it, and stops
them. The timeline is the rollout's audit log; each worker's switch to each state is
the time the worker itself noted (see :mod:`canarymw._demo.watch`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._rollout import Rollout
from ..guard._schedule import BY as GUARD_BY
from ..store import GUARD_ACTIONS, Change, RolloutState, Store
from ..store._model import HISTORY
from .load import Hit, UserRun, drive
from .options import EXIT_SETUP, DemoRun
from .progress import Ticker
from .ramp import took_at, worker_stats
from .report import (
    VARIANTS,
    Check,
    Outcome,
    Tally,
    VariantRow,
    W,
    _ms,
    completed_check,
    cookie_text,
    routed_check,
    table_lines,
)
from .server import DemoServer
from .settings import DemoSettings, GuardPlan

FINAL_STAGES = ("done", "rolled-back", "paused")
"""Stages after which the guard acts no more (until an operator does)."""
TAIL = 2.0
"""Seconds the users go on after every worker took the guard's last state."""
POLL = 0.2
"""Seconds between two reads of the store while the guard works."""
START_TIMEOUT = 15.0
"""Seconds to wait for the guard to take the rollout before the users start anyway."""
SETTLE_TIMEOUT = 10.0
"""Seconds to wait for every worker to take the guard's last state."""
NOTE = (
    "the guard judges green against blue in 10-second windows of the whole service's counters "
    "(both workers add theirs to the store), once a window closed 2.5 s ago; a step needs a "
    "whole window of its own, so each lasts about 20 s. See docs/demo.md."
)


class GuardWatch:
    """Reads the store in a thread of its own until the guard has finished or time is up,
    reports each new audit entry, then sets :attr:`stop` (which ends the load).

    Args:
        store: The store the workers share (the runner's own client).
        name: The rollout's name.
        server: The running demo server: every one of its workers must take the guard's
            last state before the users get their last :data:`TAIL` seconds.
        timeout: Seconds from :meth:`start` after which the load stops anyway.
        on_entry: Called with each audit entry as it appears (in the watching thread).
    """

    def __init__(
        self,
        store: Store,
        name: str,
        server: DemoServer,
        *,
        timeout: float,
        on_entry: Callable[[Change], None],
    ) -> None:
        self.store = store
        self.name = name
        self.server = server
        self.timeout = timeout
        self.on_entry = on_entry
        self.stop = threading.Event()
        """Set by the watch when it is done, to end the load; set by anyone else, it ends the watch."""
        self.pids = set(server.pids)
        """Worker pids seen so far: at start-up, then while waiting for the last state."""
        self.timed_out = False
        """Whether time was up before the guard finished."""
        self._reported = 0  # audit entries passed to on_entry so far
        self._version: int | None = None  # the rollout's version when they were read
        self._thread: threading.Thread | None = None

    def wait_started(self, timeout: float) -> RolloutState | None:
        """Wait until the guard has taken the rollout (its stage is set); the state last
        read (None if that read failed)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self._read()
            if state is not None and state.stage is not None:
                self._report_new_entries(state)
                return state
            if time.monotonic() > deadline:
                return state
            time.sleep(0.05)

    def start(self) -> None:
        """Watch from now on, in the background."""
        self._thread = threading.Thread(target=self._run, name="canarymw-demo-guard", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the watch to end (after :attr:`stop` was set)."""
        if self._thread is not None:
            self._thread.join(SETTLE_TIMEOUT + TAIL + 5.0)

    def _read(self) -> RolloutState | None:
        try:
            return self.store.read([self.name]).get(self.name)
        except Exception:  # a store hiccup: the guard's own reads retry too
            return None

    def _report_new_entries(self, state: RolloutState) -> None:
        if state.version == self._version:
            return  # every change adds an audit entry and a version: nothing new
        try:
            history = self.store.history(self.name, HISTORY)
        except Exception:
            return
        self._version = state.version
        for entry in history[self._reported :]:
            self.on_entry(entry)
        self._reported = len(history)

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.stop.is_set():
            state = self._read()
            if state is not None:
                self._report_new_entries(state)
                if state.stage in FINAL_STAGES:
                    self._wait_for_workers(state.version)
                    self.stop.wait(TAIL)
                    break
            if time.monotonic() > deadline:
                self.timed_out = True
                break
            self.stop.wait(POLL)
        self.stop.set()

    def _wait_for_workers(self, version: int) -> None:
        taken: set[int] = set()
        for stats in worker_stats(self.server.host, self.server.port, SETTLE_TIMEOUT, self.stop):
            pid = int(stats["pid"])
            self.pids.add(pid)
            if (stats.get("store") or {}).get("version") == version:
                taken.add(pid)
            if self.pids <= taken:
                return


def collect_switches(host: str, port: int, pids: set[int], timeout: float = 5.0) -> dict[int, list[Any]]:
    """Each worker's switch log (``[{"version", "percent", "at"}, ...]``), polled until
    every one of ``pids`` answered (or ``timeout``); workers never reached are left out."""
    logs: dict[int, list[Any]] = {}
    for stats in worker_stats(host, port, timeout):
        logs[int(stats["pid"])] = list(stats.get("switches", []))
        if pids <= logs.keys():
            break
    return logs


# -- the result -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One audit entry of the rollout, with how fast every worker took its state."""

    at: float
    """Unix time of the change, as the store recorded it."""
    at_s: float
    """Seconds from the server's start to the change."""
    version: int
    action: str
    percent_before: float | None
    percent_after: float
    by: str
    reason: str
    workers: dict[int, float | None]
    """Per worker pid, milliseconds from the change to the worker's switch to it (None:
    never seen); empty for changes not made by the guard."""

    @property
    def slowest_ms(self) -> float | None:
        """The slowest worker's delay (None if any worker never took it)."""
        delays = list(self.workers.values())
        if not delays or any(d is None for d in delays):
            return None
        return max(d for d in delays if d is not None)


@dataclass(slots=True)
class GuardResult(Outcome):
    """The outcome of ``canarymw demo --guard``, as printed and as ``--json``."""

    config: dict[str, Any]
    server: dict[str, Any]
    variants: dict[str, VariantRow]
    timeline: list[Step]
    stage: str | None
    """The rollout's stage at the end: ``done``, ``rolled-back``, ``paused`` or ``ramping``."""
    percent: float
    paused: bool
    verdict: str | None
    """The sentence of the verdict behind the guard's last action."""
    finished_s: float | None
    """Seconds from the server's start to the guard's last action, if it finished."""
    timed_out: bool
    users: int
    moved: dict[str, int]
    """Users whose variant changed with the guard's changes: ``old->new``, ``new->old``."""
    several_cohorts: int
    no_cookie: int
    several_workers: int
    pids: list[int]
    responses: int
    """Responses checked against the frozen hash (routed, with a valid cookie)."""
    hash_agrees: int
    """Responses with the variant the hash gives at the percent the worker reported."""
    in_flight: int
    """Of those, responses decided just before the worker's switch, at the percent before it."""
    tail: int
    """Requests started after every worker took the guard's last state."""
    tail_stamped: int
    """Of those, responses that carried that state's version and percent."""
    transport_errors: int
    unrouted: int
    elapsed_s: float
    checks: list[Check] = field(default_factory=list)
    note: str = NOTE

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``ok`` and the canarymw version included); each step
        of the timeline also has its ``slowest_ms``."""
        # Outcome's, named: zero-argument super() fails in a dataclass with slots, which
        # @dataclass rebuilds as a new class.
        out = Outcome.to_json(self)
        for step, data in zip(self.timeline, out["timeline"], strict=True):
            data["workers"] = {str(pid): delay for pid, delay in step.workers.items()}
            data["slowest_ms"] = step.slowest_ms
        return out

    def to_text(self) -> str:
        """The human-readable report."""
        return render_guarded(self)


def analyse_guarded(
    runs: Sequence[UserRun],
    settings: DemoSettings,
    *,
    config: dict[str, Any],
    server: dict[str, Any],
    elapsed: float,
    origin: float,
    history: Sequence[Change],
    state: RolloutState | None,
    switches: dict[int, list[Any]],
    timed_out: bool,
) -> GuardResult:
    """Compute the table, the timeline and the checks of a guarded run.

    ``origin`` is the Unix time the server started; ``history`` the rollout's audit log
    and ``state`` its state at the end; ``switches`` each worker's switch log (see
    :func:`collect_switches`).
    """
    tally = Tally(runs, settings)
    # The state in which the guard finished, if it did in time; once every worker took
    # it, every request must be on it.
    last = state if state is not None and state.stage in FINAL_STAGES and not timed_out else None
    tail_from = None if last is None else _last_switch(switches, last.version)
    tail = [] if tail_from is None else [h for h in tally.answered if h.at > tail_from]
    on_last = [h for h in tail if last is not None and (h.version, h.percent) == (last.version, last.percent)]
    responses, agrees, in_flight = _hash_agreement(tally, settings, switches)
    timeline = _steps(history, switches, origin)
    last_guard = next((s for s in reversed(timeline) if s.by == GUARD_BY), None)
    result = GuardResult(
        config=config,
        server={**server, "pids_seen": sorted(tally.pids)},
        variants=tally.variant_rows(),
        timeline=timeline,
        stage=None if state is None else state.stage,
        percent=0.0 if state is None else state.percent,
        paused=False if state is None else state.paused,
        verdict=None if state is None else state.verdict,
        finished_s=last_guard.at_s if last is not None and last_guard is not None else None,
        timed_out=timed_out,
        users=tally.users,
        moved=_moves(runs),
        several_cohorts=tally.several_cohorts,
        no_cookie=tally.no_cookie,
        several_workers=tally.several_workers,
        pids=sorted(tally.pids),
        responses=responses,
        hash_agrees=agrees,
        in_flight=in_flight,
        tail=len(tail),
        tail_stamped=len(on_last),
        transport_errors=tally.transport_errors,
        unrouted=tally.unrouted,
        elapsed_s=round(elapsed, 3),
    )
    result.checks = [
        completed_check(result.variants["all"].requests, result.transport_errors),
        routed_check(result.unrouted),
        _guard_check(result, finished=last is not None),
        _followed_check(result, finished=last is not None, settled=tail_from is not None),
        _sticky_check(result),
        _hash_check(result),
    ]
    return result


def _steps(history: Sequence[Change], switches: dict[int, list[Any]], origin: float) -> list[Step]:
    out = []
    for entry in history:
        workers: dict[int, float | None] = {}
        if entry.action in GUARD_ACTIONS:
            for pid, log in sorted(switches.items()):
                at = took_at(log, entry.version)
                workers[pid] = None if at is None else round((at - entry.at) * 1000.0, 1)
        out.append(
            Step(
                at=entry.at,
                at_s=round(entry.at - origin, 3),
                version=entry.version,
                action=entry.action,
                percent_before=entry.percent_before,
                percent_after=entry.percent_after,
                by=entry.by,
                reason=entry.reason,
                workers=workers,
            )
        )
    return out


def _last_switch(switches: dict[int, list[Any]], version: int) -> float | None:
    """When the last worker took ``version``; None if one of those that reported did not."""
    took = [took_at(log, version) for log in switches.values()]
    times = [t for t in took if t is not None]
    return max(times) if times and len(times) == len(took) else None


def _moves(runs: Sequence[UserRun]) -> dict[str, int]:
    """How many times a user's variant changed from one answer to the next, each way."""
    moved = {"old->new": 0, "new->old": 0}
    for run in runs:
        variants = [h.variant for h in run.hits if h.status is not None and h.variant in VARIANTS]
        for a, b in itertools.pairwise(variants):
            if a != b:
                moved[f"{a}->{b}"] += 1
    return moved


def _hash_agreement(
    tally: Tally, settings: DemoSettings, switches: dict[int, list[Any]]
) -> tuple[int, int, int]:
    """Of the routed responses to requests with a valid cookie: how many there were, how
    many had the variant the frozen hash gives at the percent the worker reported, and
    how many of those were decided at the percent before it (see :func:`_percent_before`)."""
    rollouts: dict[float, Rollout] = {}

    def variant_at(cohort: str, percent: float) -> str:
        if percent not in rollouts:
            rollouts[percent] = settings.local_rollout(percent)
        return rollouts[percent].variant_for(cohort)

    responses = agrees = in_flight = 0
    for hit in tally.answered:
        cohort = tally.cohort_of(hit)
        if hit.variant not in VARIANTS or cohort is None or hit.percent is None:
            continue
        responses += 1
        if hit.variant == variant_at(cohort, hit.percent):
            agrees += 1
        elif (before := _percent_before(hit, switches.get(hit.pid or 0, []))) is not None and (
            hit.variant == variant_at(cohort, before)
        ):
            agrees += 1
            in_flight += 1
    return responses, agrees, in_flight


def _percent_before(hit: Hit, log: Sequence[Mapping[str, Any]]) -> float | None:
    """The percent the answering worker had before it took the state ``hit`` carries, if
    the request started before the worker noted that switch: the decision may have come
    just before the switch, the response's header just after."""
    for i, entry in enumerate(log):
        if entry["version"] == hit.version and entry["percent"] == hit.percent:
            if i > 0 and hit.at <= float(entry["at"]):
                return float(log[i - 1]["percent"])
            return None
    return None


def _guard_check(result: GuardResult, *, finished: bool) -> Check:
    injected = float(result.config["error_rate"]) > 0
    if not finished:
        return Check(
            "guard",
            False,
            f"the guard did not finish within {result.config['guard_timeout']:g} s: stage "
            f"{result.stage or 'not started'} at {result.percent:g}%"
            + (f"; its last verdict: {result.verdict}" if result.verdict else ""),
        )
    after = "" if result.finished_s is None else f" at +{result.finished_s:.1f} s"
    advances = sum(1 for s in result.timeline if s.action == "advance")
    if result.stage == "done":
        if advances:
            detail = f"the guard ramped green to 100% in {advances} step{'s' if advances != 1 else ''}{after}"
        else:
            detail = f"the guard switched green to 100% at once{after}: one step, nothing to judge"
        if injected:
            detail += "; green's injected errors were too few to be told from chance in the traffic it judged"
        return Check("guard", True, detail)
    if result.stage == "rolled-back":
        auto = any(s.action == "auto-rollback" for s in result.timeline)
        if not auto:
            return Check("guard", False, "green was rolled back, but not by the guard")
        if not injected:
            return Check(
                "guard", False, f"the guard rolled back a green without injected errors{after}: a false alarm"
            )
        return Check("guard", True, f"the guard rolled green back to 0% by itself{after}")
    return Check("guard", False, f"the guard paused the rollout{after}: {result.verdict}")


def _followed_check(result: GuardResult, *, finished: bool, settled: bool) -> Check:
    """Whether every worker took every change of the guard. ``finished``: the guard
    finished in time; ``settled``: then every worker that reported its switches took its
    last state, so the requests after that can be checked."""
    steps = [s for s in result.timeline if s.action in GUARD_ACTIONS]
    lagging = [s for s in steps if s.slowest_ms is None]
    # Every worker that reported its switches, and every one that answered a user, must
    # have taken every change of the guard.
    reported = set(steps[-1].workers) if steps else set()
    answered = set(result.pids)
    workers = len(reported | answered)
    if lagging or not answered <= reported or workers < int(result.server["workers"]):
        missing = sorted(answered - reported)
        return Check(
            "followed",
            False,
            f"{len(reported)} of {result.server['workers']} workers reported their switches"
            + (f" (none from pid {', '.join(map(str, missing))}, which answered users)" if missing else "")
            + "".join(
                f"; version {s.version} ({s.action}) was not taken by every one of them" for s in lagging
            ),
        )
    if not steps:
        return Check("followed", False, "the guard made no change")
    changes = "the guard's change" if len(steps) == 1 else f"each of the guard's {len(steps)} changes"
    slowest = max((s.slowest_ms for s in steps if s.slowest_ms is not None), default=None)
    detail = f"all {workers} workers took {changes}"
    if slowest is not None:
        detail += f", the slowest {_ms(slowest)} ms after it"
    if settled:
        detail += (
            f"; {result.tail_stamped}/{result.tail} responses after every worker took the last one "
            f"carried its version and {result.percent:g}%"
        )
    elif finished:
        detail += "; not every worker was seen on the guard's last state in time"
    ok = not finished or (settled and result.tail > 0 and result.tail_stamped == result.tail)
    return Check("followed", ok, detail)


def _sticky_check(result: GuardResult) -> Check:
    moves = ", ".join(f"{n} moved {k.replace('->', ' -> ')}" for k, n in result.moved.items() if n)
    return Check(
        "sticky",
        result.users > 0 and result.several_cohorts == 0 and result.no_cookie == 0,
        f"{result.users} users kept one signed cohort id each"
        + cookie_text(result.several_cohorts, result.no_cookie)
        + (f"; {moves} as the guard's changes reached the workers" if moves else "")
        + f"; {result.several_workers} users were served by more than one worker",
    )


def _hash_check(result: GuardResult) -> Check:
    return Check(
        "hash",
        result.responses > 0 and result.hash_agrees == result.responses,
        f"{result.hash_agrees}/{result.responses} responses had the variant the frozen hash of the "
        "user's cookie id gives at the percent the answering worker reported"
        + (
            f" ({result.in_flight} decided just before the worker took a new percent, at the one before)"
            if result.in_flight
            else ""
        ),
    )


# -- the report ---------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:g}%"


def _stage_text(result: GuardResult) -> str:
    state = f"green at {result.percent:g}%" + (", paused" if result.paused else "")
    if result.stage == "done":
        return f"done: {state}; the ramp is over"
    if result.stage == "rolled-back":
        return f"rolled-back: {state}; 'canarymw resume' would start a new attempt from the first step"
    if result.stage == "paused":
        return f"paused: {state}; 'canarymw resume' would let the guard go on"
    return f"{result.stage or 'not guarded'}: {state} when the demo stopped waiting"


def _timeline_line(step: Step) -> str:
    at = f"{step.at_s:+.1f}"
    change = f"{_percent(step.percent_before):>4} -> {_percent(step.percent_after):<4}"
    delays = ", ".join("-" if d is None else f"+{d:.0f}" for d in step.workers.values())
    workers = f"workers {delays} ms" if step.workers else ""
    return f"  {at:>7} s  {step.action:<13} {change}  by {step.by:<15} {workers:<21} {step.reason}"


def render_guarded(result: GuardResult) -> str:
    """The human-readable report of a guarded run."""
    cfg, srv = result.config, result.server
    steps = " -> ".join(f"{s:g}%" for s in cfg["steps"])
    lines = [
        f"canarymw demo --guard: {srv['app']} blue/green under {srv['kind']} "
        f"({srv['workers']} workers) at {srv['url']}",
        f"rollout {cfg['rollout']!r} guarded: steps {steps}, bake {cfg['bake']:g} s, "
        f"{cfg['min_requests']} canary requests a step, judged every {cfg['interval']:g} s, "
        f"sample-ratio check at {cfg['ratio_alpha']:g}; "
        f"users of {cfg['requests_per_user']} requests, {cfg['concurrency']} at a time; "
        f"injected error rate in green {cfg['error_rate']:g}; seed {cfg['seed']}",
        f"store: {cfg['store']}",
        "",
        *table_lines(result.variants),
        "",
        "timeline (seconds since the server started; the rollout's audit log, oldest first)",
        *(_timeline_line(step) for step in result.timeline),
        "",
        f"{'stage':<{W}} {_stage_text(result)}",
        f"{'verdict':<{W}} {result.verdict or '-'}",
        *result.closing_lines(result.pids, of_load=True),
    ]
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------


def run_guarded(run: DemoRun) -> int:
    """Serve with a guarded rollout, drive users until the guard has finished, report.

    Called by :func:`~canarymw._demo.run.run_demo`, which ends the run on a server that
    does not start and on a Ctrl-C.
    """
    options, note = run.options, run.note
    plan = GuardPlan.for_demo(options.percent, options.requests_per_user)
    # Seeded at 0% in code: the guard takes the rollout to its first step, as a guarded
    # deploy of new code would start.
    settings = run.settings(percent=0.0, guard=plan)
    config = {
        "rollout": run.name,
        "guard": True,
        **plan.to_dict(),
        "guard_timeout": options.guard_timeout,
        "store": run.store_text,
        "requests_per_user": options.requests_per_user,
        "error_rate": options.error_rate,
        "concurrency": options.concurrency,
        "seed": settings.seed,
    }
    ticker = Ticker(run.err)
    origin = time.time()

    def on_entry(entry: Change) -> None:
        ticker.clear()  # the news gets a line of its own, not the end of the ticker's
        note(
            f"+{entry.at - origin:.1f} s {entry.action} {_percent(entry.percent_before)} -> "
            f"{_percent(entry.percent_after)} by {entry.by}: {entry.reason}"
        )

    def on_progress(done: int) -> None:
        ticker.update(f"{done:,} requests, {time.time() - origin:.0f} s")

    with DemoServer(options.kind, workers=options.workers, env=settings.to_env()) as server:
        watch = GuardWatch(run.store, run.name, server, timeout=options.guard_timeout, on_entry=on_entry)
        note(
            f"serving at {server.url} (worker pids {', '.join(str(p) for p in sorted(server.pids))}); "
            f"guarded ramp {', '.join(f'{s:g}%' for s in plan.steps)} (bake {plan.bake:g} s, "
            f"{plan.min_requests} canary requests a step); users come until the guard has finished "
            f"(at most {options.guard_timeout:g} s)"
        )
        first = watch.wait_started(timeout=START_TIMEOUT)
        if first is None or first.stage is None:
            note(f"the guard has not started within {START_TIMEOUT:g} s; driving users anyway")
        watch.start()
        started = time.perf_counter()
        try:
            runs = drive(
                server.host,
                server.port,
                users=None,
                requests=options.requests_per_user,
                concurrency=options.concurrency,
                cookie_name=settings.local_rollout().cookie_name,
                on_progress=on_progress,
                stop=watch.stop,
            )
        finally:
            watch.stop.set()
            watch.join()
            ticker.clear()
        elapsed = time.perf_counter() - started
        known = watch.pids | {h.pid for r in runs for h in r.hits if h.pid is not None}
        switches = collect_switches(server.host, server.port, known)
        server_info = run.server_info(server.url)

    try:
        history = run.store.history(run.name, HISTORY)
        state = run.store.read([run.name]).get(run.name)
    except Exception as exc:
        note(f"cannot read the rollout back from the store: {exc}")
        return EXIT_SETUP
    result = analyse_guarded(
        runs,
        settings,
        config=config,
        server=server_info,
        elapsed=elapsed,
        origin=origin,
        history=history,
        state=state,
        switches=switches,
        timed_out=watch.timed_out,
    )
    return run.finish(result)
