"""One JSON-ready report of a store's rollouts: the CLI's ``status`` and the operator
page (and its JSON API) show the same thing from here."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ._model import RolloutState, Store, UnknownRollout, lost
from ._stats import SHADOW, VariantSummary, blended, blended_interval, measured, shadow_summary, summarize

if TYPE_CHECKING:
    from ..guard._controller import Assessor


def report(
    store: Store,
    name: str | None = None,
    window: float = 300.0,
    now: float | None = None,
    assessors: dict[str, tuple[dict[str, Any], Assessor]] | None = None,
) -> dict[str, Any]:
    """Everything a store says about its rollouts, as one JSON-ready object: what
    ``canarymw status`` prints and the operator page and its JSON API serve.

    Per rollout: its ``state`` (:class:`RolloutState` as a dict), the ``age`` of that
    state, per-variant numbers over the last ``window`` seconds (``variants``, each a
    :class:`VariantSummary` as a dict), the blended and measured success rates
    (``success``), and for a guarded rollout its ``guard``: stage, the verdict (judged
    live while it ramps, else the sentence behind the guard's last action), evidence,
    the controller holding the lease, the blended estimate with its 95% interval now,
    at the next step and at 100%, and the outlook; and its ``shadow`` comparisons
    (:class:`ShadowSummary` as a dict, None without any), which are never a variant.
    ``processes``: the ledger of the processes that added counters in the window
    (running, stopped gracefully, and those that stopped without their final flush,
    with the outcomes they likely lost). ``name`` limits it to one rollout
    (:class:`UnknownRollout` if the store has none of that name).

    ``assessors`` keeps the judgement of each guarded rollout between calls (a screen
    that refreshes), so that a refresh reads only the windows closed since the last one.
    """
    if now is None:
        now = time.time()

    names = [name] if name is not None else store.names()
    states = store.read(names) if names else {}
    if name is not None and name not in states:
        raise UnknownRollout(
            f"the store has no rollout {name!r}; it appears once a process running it has started."
        )
    ordered = sorted(states)
    counts = store.read_counts(ordered, since=now - window) if ordered else []
    summaries = summarize(counts, ordered)
    rollouts: dict[str, Any] = {}
    for rollout in ordered:
        state = states[rollout]
        variants = summaries[rollout]
        # Comparisons, not requests: kept apart from the variants and every rate over them.
        shadow = variants.pop(SHADOW, None)
        rollouts[rollout] = {
            "state": asdict(state),
            "age": max(0.0, now - state.updated_at),
            "variants": {v: asdict(s) for v, s in variants.items()},
            "success": {
                "blended": blended(variants["old"], variants["new"], state.percent),
                "measured": measured(variants.values()),
            },
            "guard": None if state.guard is None else _guard(store, rollout, state, variants, now, assessors),
            "shadow": _shadow(shadow),
        }
    return {
        "at": now,
        "window": window,
        "rollouts": rollouts,
        "processes": _processes(store, name, window, now),
    }


def _shadow(summary: VariantSummary | None) -> dict[str, Any] | None:
    """The shadow comparisons of the window (:class:`ShadowSummary` as a dict), or None."""
    got = None if summary is None else shadow_summary(summary)
    return None if got is None else asdict(got)


def _processes(store: Store, name: str | None, window: float, now: float) -> dict[str, Any]:
    """The ledger of the processes that added counters in the window: how many ran, how
    many stopped gracefully, and which stopped without their final flush (killed), with
    the outcomes each likely took with it."""
    reports = store.processes(since=now - window)
    if name is not None:
        reports = [r for r in reports if name in r.rollouts]
    gone = lost(reports, now)
    closed = sum(1 for r in reports if r.closed)
    return {
        "since": now - window,
        "reported": len(reports),
        "running": len(reports) - closed - len(gone),
        "closed": closed,
        "lost": [
            {
                "process": r.process,
                "host": r.host,
                "pid": r.pid,
                "last_flush_at": r.last_flush_at,
                "flushed": r.flushed,
                "last_batch": r.last_batch,
                "interval": r.interval,
                "rollouts": list(r.rollouts),
            }
            for r in gone
        ],
        "lost_outcomes_estimate": sum(r.last_batch for r in gone),
    }


def _guard(
    store: Store,
    name: str,
    state: RolloutState,
    variants: dict[str, VariantSummary],
    now: float,
    assessors: dict[str, tuple[dict[str, Any], Assessor]] | None,
) -> dict[str, Any]:
    """The guard's part of ``status`` for a guarded rollout (``state.guard`` set).

    The verdict is judged here, from the store's counters, as the controller judges
    them, while the rollout ramps (stage ``ramping``, not paused); otherwise the guard
    judges nothing and the sentence is the one behind its last action (``live`` false).
    The blended intervals use the per-variant numbers of the status window.
    """
    from ..guard import Guard, outlook
    from ..guard._controller import Assessor

    settings = state.guard or {}
    data: dict[str, Any] = {
        "stage": state.stage,
        "stage_since": state.stage_since,
        "guard_since": state.guard_since,
        "steps": None,
        "live": False,
        "decision": None,
        "sentence": state.verdict,
        "notes": [],
        "e_values": None,
        "harm_at": None,
        "step_requests": None,
        "controller": None,
        "blended": None,
        "outlook": None,
        "error": None,
    }
    lease = store.lease_info(name)
    if lease is not None:
        data["controller"] = {"holder": lease.holder, "token": lease.token, "expires_in": lease.expires_in}
    try:
        guard = Guard.from_settings(settings)
    except (ValueError, TypeError) as exc:
        # Settings this version cannot read (another version of canarymw wrote them):
        # show what the state says rather than fail the whole status.
        data["error"] = f"the guard's settings cannot be read: {' '.join(str(exc).split())}".rstrip(".") + "."
        return data
    data["steps"] = list(guard.steps)
    verdict = None
    step_requests = 0
    if state.stage == "ramping" and not state.paused:
        held = None if assessors is None else assessors.get(name)
        if held is None or held[0] != settings:
            held = (settings, Assessor(guard))
            if assessors is not None:
                assessors[name] = held
        got = held[1].update(store, name, state, now)
        verdict, step_requests = got.verdict, got.step_requests
        data.update(
            live=True,
            decision=verdict.decision,
            sentence=verdict.sentence,
            notes=list(verdict.notes),
            e_values={
                "errors": _finite(verdict.errors.e_value),
                "latency": None if verdict.latency is None else _finite(verdict.latency.e_value),
            },
            harm_at={
                "errors": 1.0 / verdict.errors.alpha,
                "latency": None if verdict.latency is None else 1.0 / verdict.latency.alpha,
            },
            step_requests=step_requests,
        )

    def interval(percent: float | None) -> dict[str, Any] | None:
        if percent is None:
            return None
        got = blended_interval(variants["old"], variants["new"], percent)
        low, estimate, high = (None, None, None) if got is None else got
        return {"percent": percent, "low": low, "estimate": estimate, "high": high}

    data["blended"] = {
        "confidence": 0.95,
        "now": interval(state.percent),
        "next": interval(guard.next_step(state.percent)),
        "full": interval(100.0),
    }
    data["outlook"] = outlook(guard, state, verdict, step_requests, now)
    return data


def _finite(value: float) -> float:
    # JSON has no infinity: overwhelming evidence is the largest float instead.
    return min(value, sys.float_info.max)
