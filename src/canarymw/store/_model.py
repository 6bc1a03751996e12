"""What a store holds per rollout, its audit log, the errors, and the rules of change.

Sans-IO: every rule that decides a new state is a pure function here, so the three
stores (memory, SQLite, Redis) differ only in how they read, compare-and-set and wait.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

Action = Literal[
    "seed",
    "restore",
    "deploy",
    "deploy-held",
    "set",
    "promote",
    "rollback",
    "pause",
    "resume",
    "reset",
    "guard",
    "advance",
    "auto-rollback",
    "auto-pause",
]
OPERATOR_ACTIONS = ("set", "promote", "rollback", "pause", "resume", "reset")
GUARD_ACTIONS = ("guard", "advance", "auto-rollback", "auto-pause")
"""What a guarded rollout's controller writes: start, a step up, a rollback, a pause."""


T = TypeVar("T")


# json.dumps() with separators builds a new encoder per call: one, made once.
_dumps = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def _load(cls: type[T], text: str | bytes) -> T:
    # Fields a newer version added are ignored, so old readers keep working.
    data = json.loads(text)
    fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return cls(**{k: v for k, v in data.items() if k in fields})


class StoreError(Exception):
    """A store could not do what was asked; the message is one sentence saying why."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (or answered too slowly)."""


class VersionConflict(StoreError):
    """Someone else changed the rollout between our read and our write (compare-and-set lost)."""


class UnknownRollout(StoreError):
    """The store holds no state for this rollout name."""


class LeaseLost(StoreError):
    """A fenced write was refused: the writer no longer holds the rollout's controller lease."""


@dataclass(frozen=True)
class Lease:
    """Who holds a rollout's controller lease, as :meth:`Store.lease_info` reads it."""

    holder: str
    token: int
    """The fencing token: it grows every time the lease changes hands (never on a renewal)."""
    expires_in: float
    """Seconds until the lease expires unless renewed (by the store's clock)."""


@dataclass(frozen=True)
class Assignment:
    """What a store remembers of one user of a rollout, so that one user sees one variant
    on every device: the anchor bucket (of the first key the user was assigned by) and,
    for the ``drain`` and ``pin`` policies, the variant recorded in an assignment epoch."""

    bucket: int
    """The anchor bucket in ``[0, 10000)``: the user's place in the percent split."""
    variant: str | None = None
    """``"old"`` or ``"new"`` as recorded by ``drain``/``pin``, or None (nothing recorded)."""
    epoch: int = 0
    """The assignment epoch :attr:`variant` was recorded in (see :attr:`RolloutState.assignment`)."""

    def to_json(self) -> str:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Assignment:
        return _load(cls, text)


def check_assignment(assignment: object) -> Assignment:
    """``assignment`` if a store may keep it, or ValueError."""
    if (
        not isinstance(assignment, Assignment)
        or isinstance(assignment.bucket, bool)
        or not isinstance(assignment.bucket, int)
        or not 0 <= assignment.bucket < 10_000
        or assignment.variant not in (None, "old", "new")
        or isinstance(assignment.epoch, bool)
        or not isinstance(assignment.epoch, int)
        or assignment.epoch < 0
    ):
        raise ValueError(f"{assignment!r} is not an assignment a store can keep.")
    return assignment


def user_digest(user: str) -> str:
    """How stores key a user: a SHA-256 prefix, so user ids never appear in the store."""
    return hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class RolloutState:
    """The shared state of one rollout, as a store holds it. Immutable.

    ``version`` grows by one with every change (compare-and-set is on it), so a reader
    can always tell the newer of two states.
    """

    percent: float
    """Share of cohorts sent to ``new``, 0 to 100."""
    paused: bool = False
    """Held by an operator: deploys (and, later, automatic ramps) do not change it."""
    version: int = 0
    updated_at: float = 0.0
    """Unix time of the change that made this state."""
    updated_by: str = ""
    """Who made it: ``code`` (seeded), ``deploy``, or the operator's ``--by``."""
    reason: str = ""
    code_percent: float | None = None
    """The percent last seen from code: a deploy that brings another one applies it."""
    held: bool = False
    """An operator paused or rolled back since the code percent was last applied."""
    stage: str | None = None
    """A guarded rollout's stage: ``ramping``, ``paused`` (by the guard), ``rolled-back`` or
    ``done``; None for a rollout without a guard."""
    verdict: str | None = None
    """The sentence of the verdict behind the guard's last action."""
    stage_since: float | None = None
    """Unix time the current step of a guarded rollout began (its bake time counts from it)."""
    guard_since: float | None = None
    """Unix time the guard began judging this attempt (its evidence counts from it)."""
    guard: dict[str, Any] | None = None
    """The guard's settings (steps, bake time, levels), so that any reader can judge the
    counters as the controller does."""
    epoch: str = ""
    """Who created this line of versions: new at every seed and restore. A store that lost
    a rollout starts counting again; followers take any state of another epoch."""
    assignment: int = 0
    """The assignment epoch: what the ``drain`` and ``pin`` policies recorded for a visitor
    holds only within it. One up at every reset and whenever the percent drops to 0 (a
    rollback), so a new attempt assigns everyone afresh."""

    def to_json(self) -> str:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> RolloutState:
        return _load(cls, text)


@dataclass(frozen=True)
class Change:
    """One entry of a rollout's audit log: who changed what, from what, to what, why, when."""

    rollout: str
    version: int
    """The state's version after this change."""
    at: float
    by: str
    action: Action
    reason: str
    percent_before: float | None
    percent_after: float
    paused_before: bool | None
    paused_after: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Change:
        return _load(cls, text)


WINDOW = 10
"""Seconds per window of the outcome counters (windows start at multiples of it)."""
HISTORY = 1000
"""Audit entries a store keeps per rollout; older ones are dropped."""
RETENTION = 8 * 24 * 3600
"""Seconds a store keeps counter windows (at least; older ones may be dropped)."""


def check_name(name: object) -> str:
    """A rollout name every store can key on, or ValueError."""
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or not name.isprintable():
        raise ValueError(
            f"rollout name {name!r} cannot be stored; use printable text of 1 to 200 characters."
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"rollout name {name!r} cannot be stored; it is not valid text.") from None
    return name


def check_write(name: str, expected_version: int, state: RolloutState, change: Change) -> None:
    """What every store checks before a write: a caller's mistake, never a race."""
    check_name(name)
    # A creation (expected 0) may start above 1: a rollout restored after the store lost it
    # keeps counting up from the version its followers hold.
    step = state.version >= 1 if expected_version == 0 else state.version == expected_version + 1
    if not step or change.version != state.version or change.rollout != name:
        raise ValueError(
            f"a write to rollout {name!r} must take it from version {expected_version} to "
            f"{expected_version + 1}, with a change of that rollout and version."
        )


def check_holder(holder: object) -> str:
    """A lease holder every store can keep: non-empty text, or ValueError."""
    if not isinstance(holder, str) or not holder:
        raise ValueError(f"lease holder {holder!r} cannot be used; name the holder with non-empty text.")
    return holder


def check_ttl(ttl: object) -> float:
    """A time to live (a lease's, a user's assignment's): a finite number of seconds above 0
    (as a float), or ValueError."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"ttl {ttl!r} cannot be used; give a finite number of seconds above 0.")
    return float(ttl)


def check_fence(fence: object) -> int | None:
    """A write's ``fence``: None, or a lease token (an int), else ValueError."""
    if fence is not None and (isinstance(fence, bool) or not isinstance(fence, int)):
        raise ValueError(
            f"fence {fence!r} is not a lease token; pass the int that lease() returned, or None."
        )
    return fence


def lease_lost(name: str, current: int | None, fence: int) -> LeaseLost:
    """The error of a fenced write refused: ``current`` is the token of the unexpired lease
    (None: no one holds it, so ours expired or was released)."""
    if current is None:
        return LeaseLost(
            f"the controller lease of rollout {name!r} expired or was released (ours had token {fence}); "
            "this write was refused."
        )
    return LeaseLost(
        f"rollout {name!r} is controlled by another process now (lease token {current}, ours {fence}); "
        "this write was refused."
    )


def conflict(name: str, have: int, expected: int) -> VersionConflict:
    """The error of a lost compare-and-set."""
    return VersionConflict(
        f"rollout {name!r} is at version {have}, not {expected}: "
        "someone else changed it meanwhile; read it again and retry."
    )


@dataclass
class Counts:
    """Outcome counters of one rollout variant in one window, as stores add them up.

    Latencies are counted in the log buckets of :class:`~canarymw.MemorySink` (4%
    wide), so quantiles can be read from the sum of many processes.
    """

    rollout: str
    variant: str
    window: int
    """Unix time at the start of the window (a multiple of :data:`WINDOW`)."""
    requests: int = 0
    errors: int = 0
    exceptions: int = 0
    disconnects: int = 0
    latency_sum: float = 0.0
    buckets: dict[int, int] = field(default_factory=dict)
    """Latency histogram: bucket index -> outcomes."""

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.exceptions += other.exceptions
        self.disconnects += other.disconnects
        self.latency_sum += other.latency_sum
        for i, n in other.buckets.items():
            self.buckets[i] = self.buckets.get(i, 0) + n


IDENTITY_TTL = 90 * 24 * 3600
"""Seconds a store remembers a user's :class:`Assignment` after it was last claimed."""
IDENTITY_KEEP = 1_000_000
"""Users a :class:`MemoryStore` holds before it drops expired ones."""
PROCESS_KEEP = 24 * 3600
"""Seconds a store keeps a process's :class:`ProcessReport` after its last one (at least)."""
PROCESS_ROLLOUTS = 50
"""Rollout names a :class:`ProcessReport` lists at most."""
IDLE_REPORT = 10.0
"""Seconds between two reports of a :class:`~canarymw.sinks.store.StoreSink` that has
nothing to add (a heartbeat: an idle process is not mistaken for a killed one)."""


@dataclass(frozen=True)
class ProcessReport:
    """One process's entry in a store's ledger of outcome counters: what it has added.

    Every :class:`~canarymw.sinks.store.StoreSink` reports after each flush that added
    outcomes, after its first flush with nothing to add and then every
    :data:`IDLE_REPORT` seconds while it stays idle, and once more at a graceful stop,
    with ``closed`` True. A process killed outright never
    sends that last report: :func:`lost` finds it, and its ``last_batch`` estimates the
    outcomes it took with it. A store keeps a report at least :data:`PROCESS_KEEP`
    seconds after its last update. Times are the reporting host's Unix time.
    """

    process: str
    """The process's id, ``HOST:PID:RANDOM`` (a forked child gets one of its own)."""
    started_at: float
    """When the process started counting (its sink was made, or it was forked)."""
    last_flush_at: float
    """When the process sent this report (just after the flush it reports)."""
    flushed: int = 0
    """Outcomes this process has added to the store so far."""
    last_batch: int = 0
    """Outcomes its last flush added (0: it had nothing to add, a heartbeat)."""
    interval: float = 1.0
    """Its sink's flush interval, in seconds."""
    closed: bool = False
    """True once a graceful stop added everything it had counted: it lost nothing."""
    rollouts: tuple[str, ...] = ()
    """The rollouts it counted outcomes of, sorted (at most :data:`PROCESS_ROLLOUTS`)."""
    next_within: float = 0.0
    """Seconds after this report within which the process reports again unless it stops:
    its interval after a flush that added outcomes, :data:`IDLE_REPORT` plus the interval
    after a heartbeat (0, in a report that lacks it: the interval)."""

    @property
    def host(self) -> str:
        """The host part of :attr:`process`."""
        return self.process.rsplit(":", 2)[0]

    @property
    def pid(self) -> int | None:
        """The pid part of :attr:`process` (None if the id has no such part)."""
        parts = self.process.rsplit(":", 2)
        return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None

    @property
    def silent_after(self) -> float:
        """Seconds after :attr:`last_flush_at` without a newer report after which the
        process counts as stopped: its next report was due, plus twice its interval (at
        least 2 s) for a slow flush: ``max(3 x interval, interval + 2)`` while it adds."""
        interval = max(self.interval, 0.0)
        return max(self.next_within, interval) + max(2.0 * interval, 2.0)

    def to_json(self) -> str:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> ProcessReport:
        report = _load(cls, text)
        return replace(report, rollouts=tuple(report.rollouts))


def lost(reports: Iterable[ProcessReport], now: float | None = None) -> list[ProcessReport]:
    """The processes that stopped without their final flush, as of ``now`` (default: now).

    A process is lost when it did not close gracefully (``closed`` False) and has not
    reported for longer than :attr:`ProcessReport.silent_after` (for a sink flushing
    every second, 3 s). Its outcomes since its last flush were never added: at most one
    interval's worth, which its ``last_batch`` estimates (the outcomes of one interval at
    its last rate; 0 if it was idle). A live process cut off from the store, or whose
    flushes take longer than that, looks the same until its next report gets through.
    """
    at = time.time() if now is None else now
    return [r for r in reports if not r.closed and at - r.last_flush_at > r.silent_after]


def check_report(report: object) -> ProcessReport:
    """A report every store can keep, or TypeError/ValueError."""
    if not isinstance(report, ProcessReport):
        raise TypeError(f"report_process needs a ProcessReport, not {type(report).__name__}.")
    if not report.process or not isinstance(report.process, str) or len(report.process) > 300:
        raise ValueError(f"process id {report.process!r} cannot be stored; use text of 1 to 300 characters.")
    if not math.isfinite(report.last_flush_at):
        raise ValueError(f"report of {report.process!r} has no finite last_flush_at.")
    return report


@runtime_checkable
class Store(Protocol):
    """Where rollouts' shared state, audit log and outcome counters (with the ledger of
    the processes that add them) live.

    Every method may raise :class:`StoreUnavailable`; none is called on the request
    path (a background thread per process reads and waits; operators write).
    """

    def read(self, names: list[str]) -> dict[str, RolloutState]:
        """The current state of each named rollout the store holds (absent ones are left out)."""
        ...

    def write(
        self, name: str, expected_version: int, state: RolloutState, change: Change, fence: int | None = None
    ) -> None:
        """Store ``state`` and append ``change`` to the audit log, atomically, if the
        rollout's version is still ``expected_version`` (0: it must not exist yet);
        else raise :class:`VersionConflict`. Keeps the newest :data:`HISTORY` entries.
        Checks :func:`check_write` first.

        With ``fence`` (a token :meth:`lease` returned), the write also needs the
        rollout's controller lease to be unexpired and still carry that token, checked
        in the same atomic step; else it raises :class:`LeaseLost` and writes nothing.
        So a controller that lost its lease (paused by GC, cut off by a partition)
        cannot write after another has taken over."""
        ...

    def lease(self, name: str, holder: str, ttl: float) -> int | None:
        """Take or renew the controller lease of rollout ``name`` for ``ttl`` seconds.

        Returns the fencing token if ``holder`` holds the lease after the call: the
        same token when it renews its own unexpired lease, a larger one than ever
        given before for this rollout when it takes a free or expired lease. Returns
        None (and changes nothing) while someone else holds an unexpired lease. Atomic
        across processes and hosts; the lease exists without any rollout state."""
        ...

    def release(self, name: str, holder: str) -> None:
        """Give up ``holder``'s lease of ``name`` at once (nothing if it holds none), so
        another process can take over without waiting for the expiry."""
        ...

    def lease_info(self, name: str) -> Lease | None:
        """Who holds the unexpired lease of ``name``, or None."""
        ...

    def history(self, name: str, limit: int = 50) -> list[Change]:
        """The newest ``limit`` audit entries of a rollout, oldest first."""
        ...

    def names(self) -> list[str]:
        """Every rollout the store holds state for, sorted."""
        ...

    def wait(self, timeout: float) -> bool:
        """Block until a change by anyone since the previous call to ``wait`` returned, at
        most ``timeout`` seconds; True if one may have happened. (One process-wide thread
        calls it per store object, then reads; a change between the two is not lost.)
        The first call may return True at once: there is no earlier point to compare with."""
        ...

    def add_counts(self, counts: list[Counts], report: ProcessReport | None = None) -> bool:
        """Add these counters to the store's (atomically per call; several processes add).
        Windows older than :data:`RETENTION` may be dropped.

        With ``report``, also keep it as its process's ledger entry (as
        :meth:`report_process` does) in the same round trip. True if the report was kept
        too (or none was given); False if only the counters were added, so the caller
        sends the report again. Raises :class:`StoreUnavailable` if the counters were not
        added. (A store whose ``add_counts`` takes no ``report`` still works: the
        :class:`~canarymw.sinks.store.StoreSink` then reports apart.)"""
        ...

    def read_counts(self, names: list[str], since: float) -> list[Counts]:
        """The summed counters of the named rollouts' windows that end after ``since``."""
        ...

    def report_process(self, report: ProcessReport) -> None:
        """Keep ``report`` as its process's entry in the ledger (replacing the one before).
        Entries last reported more than :data:`PROCESS_KEEP` seconds ago may be dropped."""
        ...

    def processes(self, since: float = 0.0) -> list[ProcessReport]:
        """The ledger's entries last reported at or after ``since``, sorted by process id."""
        ...

    def claim(self, name: str, user: str, assignment: Assignment, ttl: float) -> Assignment:
        """Keep ``assignment`` for ``user`` of rollout ``name`` unless the store already
        has an unexpired one (first assignment wins); return the one kept. Either way
        the entry then lives ``ttl`` seconds more. Atomic across processes and hosts;
        users are keyed by :func:`user_digest`."""
        ...

    def remember(self, name: str, user: str, assignment: Assignment, ttl: float) -> None:
        """Replace ``user``'s assignment (a variant recorded anew by a ramp policy) for
        ``ttl`` seconds."""
        ...

    def close(self) -> None:
        """Release connections and files (the store may be used again afterwards)."""
        ...


def check_percent(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"percent {value!r} is not a number; use a number from 0 to 100.")
    if not 0.0 <= float(value) <= 100.0:
        raise ValueError(f"percent {value!r} is out of range; use a number from 0 to 100.")
    return float(value)


def _change(
    name: str, before: RolloutState | None, after: RolloutState, action: Action, by: str, reason: str
) -> Change:
    return Change(
        rollout=name,
        version=after.version,
        at=after.updated_at,
        by=by,
        action=action,
        reason=reason,
        percent_before=None if before is None else before.percent,
        percent_after=after.percent,
        paused_before=None if before is None else before.paused,
        paused_after=after.paused,
    )


def on_start(
    name: str, existing: RolloutState | None, code_percent: float, now: float | None = None
) -> tuple[RolloutState, Change] | None:
    """What a process starting with ``code_percent`` in its code writes, if anything.

    - The store has no state for the rollout: the code's percent seeds it.
    - The code's percent is the one the store last saw from code: nothing; the store
      is the truth (a redeploy never undoes an operator's change).
    - Another percent in code (a deploy that changed it): applied as a change by
      ``deploy``, unless an operator paused or rolled back since; then only noted
      (``deploy-held``), and the operator's state stays.
    """
    at = time.time() if now is None else now
    code_percent = float(code_percent)
    if existing is None:
        seeded = RolloutState(
            percent=code_percent,
            epoch=secrets.token_hex(8),
            version=1,
            updated_at=at,
            updated_by="code",
            reason="seeded from the percent in code",
            code_percent=code_percent,
        )
        return seeded, _change(name, None, seeded, "seed", "code", seeded.reason)
    if existing.code_percent == code_percent:
        return None
    if existing.paused or existing.held:
        why = "paused" if existing.paused else "rolled back"
        reason = f"code percent {code_percent:g} not applied: {why} by an operator since the last deploy"
        noted = replace(existing, version=existing.version + 1, updated_at=at, code_percent=code_percent)
        return noted, _change(name, existing, noted, "deploy-held", "deploy", reason)
    reason = f"code percent changed from {_fmt(existing.code_percent)} to {code_percent:g}"
    applied = successor(
        existing,
        percent=code_percent,
        version=existing.version + 1,
        updated_at=at,
        updated_by="deploy",
        reason=reason,
        code_percent=code_percent,
    )
    return applied, _change(name, existing, applied, "deploy", "deploy", reason)


def restore(name: str, known: RolloutState, now: float | None = None) -> tuple[RolloutState, Change]:
    """What a process writes when the store has lost a rollout it follows (a Redis that
    restarted without persistence): its last known state, one version up, so that every
    follower takes it and an operator's last change is not undone by the code's percent."""
    at = time.time() if now is None else now
    reason = "the store had lost this rollout; restored from a process's last known state"
    restored = replace(
        known,
        version=known.version + 1,
        updated_at=at,
        updated_by="canarymw",
        reason=reason,
        epoch=secrets.token_hex(8),
    )
    return restored, _change(name, None, restored, "restore", "canarymw", reason)


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def operate(
    name: str,
    existing: RolloutState | None,
    action: Action,
    *,
    by: str,
    reason: str = "",
    percent: float | None = None,
    now: float | None = None,
) -> tuple[RolloutState, Change]:
    """The state an operator's ``action`` makes of ``existing`` (pure; raises on mistakes).

    ``set`` needs ``percent``; ``promote`` is ``set`` 100, ``rollback`` is ``set`` 0 and
    holds the rollout against deploys; ``pause`` holds it as it is; ``resume`` lifts
    the pause. A ``set``/``promote``/``resume`` ends an earlier hold. ``reset`` starts a
    new assignment epoch and changes nothing else: every visitor's recorded variant
    (``drain``, ``pin``) is void, and each is assigned afresh by the percent.
    """
    if action not in OPERATOR_ACTIONS:
        raise ValueError(f"unknown action {action!r}; use one of {', '.join(OPERATOR_ACTIONS)}.")
    if existing is None:
        raise UnknownRollout(
            f"the store has no rollout {name!r}; it appears once a process running it has started."
        )
    if not by or not isinstance(by, str):
        raise ValueError("say who makes the change (by=..., or --by on the command line).")
    at = time.time() if now is None else now
    new = {"updated_at": at, "updated_by": by, "reason": reason, "version": existing.version + 1}
    if action == "set":
        if percent is None:
            raise ValueError("set needs a percent from 0 to 100.")
        new.update(percent=check_percent(percent), held=False)
    elif action == "promote":
        new.update(percent=100.0, held=False)
    elif action == "rollback":
        new.update(percent=0.0, held=True)
    elif action == "pause":
        new.update(paused=True, held=True)
    elif action == "resume":
        new.update(paused=False, held=False)
    if existing.stage is not None and action != "reset":
        new.update(_guarded(existing, action, new, at))
    after = successor(existing, reset=action == "reset", **new)
    return after, _change(name, existing, after, action, by, reason)


def successor(existing: RolloutState, *, reset: bool = False, **fields: Any) -> RolloutState:
    """``existing`` with ``fields`` changed, in a new assignment epoch if this is a reset
    or the percent drops to 0: the one rule every writer of a state follows."""
    after = replace(existing, **fields)
    if reset or (after.percent <= 0.0 < existing.percent):
        after = replace(after, assignment=existing.assignment + 1)
    return after


def _guarded(existing: RolloutState, action: Action, new: dict[str, Any], at: float) -> dict[str, Any]:
    # An operator's action on a guarded rollout also moves its stage, so the guard
    # carries on from what the operator did (an operator always wins).
    if action == "pause":
        return {}
    if action == "resume":
        if existing.stage == "rolled-back" or existing.percent == 0:
            # A new attempt from the first step: the evidence against the last one is void.
            steps = (existing.guard or {}).get("steps") or [existing.percent]
            return {"stage": "ramping", "stage_since": at, "guard_since": at, "percent": float(steps[0])}
        if existing.stage == "paused":
            return {"stage": "ramping", "stage_since": at}
        return {}
    percent = new["percent"]
    stage = "done" if percent >= 100 else "rolled-back" if percent <= 0 else "ramping"
    return {"stage": stage, "stage_since": at}
