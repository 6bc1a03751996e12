"""The guard's settings and its schedule as a pure state machine (sans-IO).

:func:`plan` takes a rollout's shared state, the verdict on its counters and the time,
and returns the change the guard makes, if any. Everything that acts (the controller,
a simulation, a test) goes through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from itertools import pairwise
from typing import Any, Literal

from ..store._model import WINDOW, Action, Change, RolloutState, _change, successor
from ._analysis import HARM_RATIOS, Analysis, Verdict, Window

OnDeadline = Literal["hold", "ship"]
BY = "canarymw-guard"
"""Who the guard's changes are by, in the audit log."""
SETTLE = 2.0
"""Seconds after a change of percent before a window counts as having one percent
(every process applies a change within about that time)."""


class Guard:
    """A guarded rollout's schedule, analysis and controller settings.

    Pass it as ``Rollout(..., store=..., guard=Guard(...))``. One process at a time
    (holding a lease in the store) judges the canary against the baseline from the
    whole service's counters every ``interval`` seconds and acts:

    - starts the ramp at the first step (or where the rollout already is);
    - advances to the next step once the canary has baked ``bake`` seconds and served
      ``min_requests`` requests at the current step with no harm found;
    - on harm, rolls back to 0% and pauses; on a failed health check (sample-ratio
      mismatch), pauses;
    - at ``deadline`` seconds into a step without the exposure to decide, holds (pauses)
      or, with ``on_deadline="ship"``, advances if the canary had at least the
      analysis's minimum of requests and no harm (an idle canary is never shipped);
    - reaching 100% ends the schedule (``done``).

    Operators always win: a manual pause stops the guard until resumed, a manual
    rollback ends the attempt (``resume`` starts a new one from the first step), a
    manual ``set`` or ``promote`` moves the ramp to that percent. Every action of the
    guard is in the audit log, by ``canarymw-guard``, with its verdict's sentence.

    Args:
        steps: Percents of the ramp, increasing, the last one 100. One step, ``(100,)``,
            is blue/green: a switch with nothing left to compare against.
        bake: Seconds the canary stays at a step at least.
        min_requests: Canary requests needed at a step before advancing.
        deadline: Seconds at a step after which the ``on_deadline`` policy applies.
        on_deadline: ``hold`` (pause, the default) or ``ship`` (advance).
        analysis: How the canary is judged (default :class:`Analysis` ()).
        interval: Seconds between two looks of the controller.
        lease: Seconds the controller's lease lasts unless renewed (default three
            intervals); another process takes over within two lease periods of the
            holder's death.
        on_verdict: Called by the controller (in its thread, in the one process holding
            the lease) with ``(rollout_name, verdict, change)`` whenever the verdict's
            decision changes or the guard acts (``change`` is the audit entry, or None).
            For chat or paging; an exception in it is logged and ignored.
    """

    def __init__(
        self,
        *,
        steps: Sequence[float] = (1, 5, 25, 50, 100),
        bake: float = 600.0,
        min_requests: int = 500,
        deadline: float = 24 * 3600.0,
        on_deadline: OnDeadline = "hold",
        analysis: Analysis | None = None,
        interval: float = 5.0,
        lease: float | None = None,
        on_verdict: Callable[[str, Verdict, Change | None], object] | None = None,
    ) -> None:
        try:
            steps = tuple(float(s) for s in steps)
        except (TypeError, ValueError):
            raise ValueError(f"Guard got steps={steps!r}; use increasing percents ending with 100.") from None
        if (
            not steps
            or any(not (0.0 < s <= 100.0) for s in steps)
            or any(a >= b for a, b in pairwise(steps))
            or steps[-1] != 100.0
        ):
            raise ValueError(
                f"Guard got steps={steps!r}; use increasing percents above 0 ending with 100, "
                "such as (1, 5, 25, 50, 100)."
            )
        for label, value in (("bake", bake), ("deadline", deadline), ("interval", interval)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"Guard got {label}={value!r}; use a number of seconds of at least 0.")
        if interval < 0.05:
            raise ValueError(f"Guard got interval={interval!r}; use at least 0.05 seconds.")
        if deadline <= bake:
            raise ValueError(
                f"Guard got deadline={deadline!r} with bake={bake!r}; "
                "the deadline must come after the bake time."
            )
        if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 0:
            raise ValueError(f"Guard got min_requests={min_requests!r}; use a whole number of at least 0.")
        if on_deadline not in ("hold", "ship"):
            raise ValueError(f"Guard got on_deadline={on_deadline!r}; use 'hold' or 'ship'.")
        if analysis is not None and not isinstance(analysis, Analysis):
            raise TypeError(f"Guard got analysis={analysis!r}; pass a canarymw.guard.Analysis or None.")
        lease = 3 * interval if lease is None else lease
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not lease > interval:
            raise ValueError(f"Guard got lease={lease!r}; use more seconds than interval ({interval!r}).")
        if on_verdict is not None and not callable(on_verdict):
            raise TypeError(f"Guard got on_verdict={on_verdict!r}; pass a callable or None.")
        self.steps = steps
        self.bake = float(bake)
        self.min_requests = min_requests
        self.deadline = float(deadline)
        self.on_deadline: OnDeadline = on_deadline
        self.analysis = Analysis() if analysis is None else analysis
        self.interval = float(interval)
        self.lease = float(lease)
        self.on_verdict = on_verdict

    def __repr__(self) -> str:
        return f"Guard(steps={self.steps}, bake={self.bake:g}, min_requests={self.min_requests})"

    def settings(self) -> dict[str, Any]:
        """What the store keeps of this guard (JSON), so any reader judges as the controller does."""
        a = self.analysis
        return {
            "steps": list(self.steps),
            "bake": self.bake,
            "min_requests": self.min_requests,
            "deadline": self.deadline,
            "on_deadline": self.on_deadline,
            "interval": self.interval,
            "alpha": a.alpha,
            "decision_requests": a.min_requests,
            "latency_objective": a.latency_objective,
            "latency_weight": a.latency_weight,
            "ratio_alpha": a.ratio_alpha,
            "tail_ratio": a.tail_ratio,
            "harm_ratios": [list(p) for p in a.harm_ratios],
        }

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Guard:
        """The guard a store's settings describe (for readers: the CLI, the admin page)."""
        analysis = Analysis(
            alpha=settings.get("alpha", 0.05),
            min_requests=settings.get("decision_requests", 50),
            latency_objective=settings.get("latency_objective"),
            latency_weight=settings.get("latency_weight", 0.5),
            ratio_alpha=settings.get("ratio_alpha", 0.001),
            tail_ratio=settings.get("tail_ratio", 1.25),
            harm_ratios=[tuple(p) for p in settings.get("harm_ratios", HARM_RATIOS)],
        )
        return cls(
            steps=settings.get("steps", (1, 5, 25, 50, 100)),
            bake=settings.get("bake", 600.0),
            min_requests=settings.get("min_requests", 500),
            deadline=settings.get("deadline", 24 * 3600.0),
            on_deadline=settings.get("on_deadline", "hold"),
            analysis=analysis,
            interval=settings.get("interval", 5.0),
        )

    def next_step(self, percent: float) -> float | None:
        """The step after ``percent`` (None at or above the last)."""
        for s in self.steps:
            if s > percent:
                return s
        return None


def percents_by_window(
    history: Iterable[Change], starts: Iterable[float], settle: float = SETTLE
) -> dict[int, float]:
    """For each window start, the percent in force over all of the window (and the
    ``settle`` seconds before it, while processes apply a change); windows during which
    it changed are left out. ``history``: audit entries, any order."""
    timeline: list[tuple[float, float]] = []
    for at, _, pct in sorted((c.at, c.version, c.percent_after) for c in history):
        if not timeline or timeline[-1][1] != pct:  # a pause or a note moves no request
            timeline.append((at, pct))
    out: dict[int, float] = {}
    for start in starts:
        lo, hi = start - settle, start + WINDOW
        before = None
        changed = False
        for at, pct in timeline:
            if at <= lo:
                before = pct
            elif at < hi:
                changed = True
                break
            else:
                break
        if before is not None and not changed:
            out[int(start)] = before
    return out


def closed(windows: Iterable[Window], now: float, grace: float = 2.5) -> list[Window]:
    """The windows that ended at least ``grace`` seconds ago (every process has added its counts)."""
    return [w for w in windows if w.start + WINDOW + grace <= now]


def _act(
    name: str,
    state: RolloutState,
    action: Action,
    now: float,
    reason: str,
    judged: Verdict | None,
    **new: Any,
) -> tuple[RolloutState, Change]:
    after = successor(state, version=state.version + 1, updated_at=now, updated_by=BY, reason=reason, **new)
    change = _change(name, state, after, action, BY, reason)
    if judged is not None:
        extra = {
            "decision": judged.decision,
            "errors_e_value": judged.errors.e_value,
            "canary_requests": judged.new.requests,
            "baseline_requests": judged.old.requests,
        }
        if judged.latency is not None:
            extra["latency_e_value"] = judged.latency.e_value
        change = replace(change, extra=extra)
    return after, change


def start(guard: Guard, name: str, state: RolloutState, now: float) -> tuple[RolloutState, Change]:
    """The change that puts ``state`` under ``guard`` (or updates its settings)."""
    settings = guard.settings()
    if state.stage is not None:
        return _act(name, state, "guard", now, "the guard's settings changed", None, guard=settings)
    common: dict[str, Any] = {"guard": settings, "guard_since": now, "stage_since": now, "verdict": None}
    if state.paused:
        return _act(
            name, state, "guard", now, "guarded; paused by an operator", None, stage="paused", **common
        )
    if state.held and state.percent == 0:
        return _act(
            name,
            state,
            "guard",
            now,
            "guarded; rolled back by an operator",
            None,
            stage="rolled-back",
            **common,
        )
    percent = max(state.percent, guard.steps[0])
    stage = "done" if percent >= 100 else "ramping"
    reason = f"guarded ramp started at {percent:g}%" if stage == "ramping" else "guarded; already at 100%"
    return _act(name, state, "guard", now, reason, None, percent=percent, stage=stage, **common)


def plan(
    guard: Guard, name: str, state: RolloutState, verdict: Verdict | None, step_requests: int, now: float
) -> tuple[RolloutState, Change] | None:
    """The guard's next change to ``state``, or None: the schedule as a state machine.

    ``verdict`` judges the windows since ``state.guard_since``; ``step_requests`` counts
    the canary's requests since ``state.stage_since``. Pure: same inputs, same answer.
    """
    if state.stage is None or state.guard != guard.settings():
        return start(guard, name, state, now)
    if state.paused or state.stage in ("done", "rolled-back") or verdict is None:
        return None
    if verdict.decision == "rollback":
        return _act(
            name,
            state,
            "auto-rollback",
            now,
            verdict.sentence,
            verdict,
            percent=0.0,
            paused=True,
            held=True,
            stage="rolled-back",
            stage_since=now,
            verdict=verdict.sentence,
        )
    if verdict.decision == "pause":
        return _act(
            name,
            state,
            "auto-pause",
            now,
            verdict.sentence,
            verdict,
            paused=True,
            held=True,
            stage="paused",
            verdict=verdict.sentence,
        )
    since = state.stage_since if state.stage_since is not None else state.updated_at
    elapsed = now - since
    ready = verdict.decision == "pass" and elapsed >= guard.bake and step_requests >= guard.min_requests
    if not ready and elapsed >= guard.deadline:
        if guard.on_deadline == "ship" and verdict.decision == "pass":
            ready = True
        else:
            why = (
                f"paused: the step at {state.percent:g}% reached its deadline of {guard.deadline:g} s "
                f"without the exposure to decide ({step_requests:,} of {guard.min_requests:,} canary "
                f"requests; {verdict.sentence})"
            )
            return _act(
                name,
                state,
                "auto-pause",
                now,
                why,
                verdict,
                paused=True,
                held=True,
                stage="paused",
                verdict=why,
            )
    if not ready:
        return None
    target = guard.next_step(state.percent)
    if target is None:  # at or above the last step: nothing left to do
        return _act(
            name, state, "advance", now, verdict.sentence, verdict, stage="done", verdict=verdict.sentence
        )
    why = f"advance to {target:g}%: {verdict.sentence}"
    return _act(
        name,
        state,
        "advance",
        now,
        why,
        verdict,
        percent=target,
        stage="done" if target >= 100 else "ramping",
        stage_since=now,
        held=False,
        verdict=why,
    )


def outlook(
    guard: Guard, state: RolloutState, verdict: Verdict | None, step_requests: int, now: float
) -> str:
    """What the guard will do next and when, in one sentence (for ``canarymw status``)."""
    if state.stage is None:
        return "not guarded yet: the guard starts when a process running it looks"
    if state.paused:
        return "nothing until an operator resumes (canarymw resume)"
    if state.stage == "done":
        return "nothing: the ramp is done"
    if state.stage == "rolled-back":
        return "nothing: rolled back; canarymw resume starts a new attempt from the first step"
    if verdict is None:
        return f"judge at its next look (every {guard.interval:g} s)"
    if verdict.decision == "rollback":
        return "roll back to 0% and pause at its next look"
    if verdict.decision == "pause":
        return "pause at its next look (sample-ratio mismatch)"
    since = state.stage_since if state.stage_since is not None else state.updated_at
    target = guard.next_step(state.percent)
    goal = "finish" if target is None else f"advance to {target:g}%"
    needs = []
    bake_left = since + guard.bake - now
    if bake_left > 0:
        needs.append(f"in {_duration(bake_left)} (bake time)")
    if step_requests < guard.min_requests:
        needs.append(f"after {guard.min_requests - step_requests:,} more canary requests")
    if verdict.decision == "wait":
        needs.append("once the analysis can decide")
    deadline = f"; deadline in {_duration(since + guard.deadline - now)} ({guard.on_deadline})"
    if not needs:
        return f"{goal} at its next look"
    return f"{goal} " + ", ".join(needs) + ", unless harm is found" + deadline


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s / 3600:.1f} h"
