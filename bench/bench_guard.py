"""Guarded rollouts: how often the analysis rolls back a healthy canary, how fast it
catches a bad one, and what the schedule does with an idle or a leaky canary.

    python bench/bench_guard.py               # every scenario, 2,000 runs each (about 2 min)
    python bench/bench_guard.py --runs 500    # quicker, wider intervals
    python bench/bench_guard.py errors        # one scenario: errors|latency|idle|srm|drift

Deterministic: every scenario draws from ``random.Random(seed)`` (``--seed``, default 1).
Pure Python; the canarymw code judged is the library's own (``Evidence`` for the
peeks, ``Analysis`` and ``plan`` for the schedule scenarios).

Scenarios (the issue's (a)-(e), and a drifting day):

- errors: 20,000 requests per run, 10% to the canary, a peek after every 100 requests
  (one window per peek). Baseline error rate 1%; canary 1% (healthy: any rollback is a
  false one), 2% (2x) and 5% (5x). For each: the share of runs rolled back, within
  2,000 canary requests, and the median canary requests until rollback. Beside it,
  on the same draws: a Flagger-style check (the canary's success rate over a
  1-minute window of 1,000 requests, i.e. about 100 canary requests, below a threshold counts
  as a failed check; 5 failed checks roll back), a fixed-horizon one-sided z-test at
  2,000 canary requests, the same z-test peeked every 100 requests, and the guard's
  test (alpha 0.05). Two oracles bound what any anytime-valid test at this alpha can
  do: the guard's test told the true ratio in advance (a single-ratio SPRT), and an
  SPRT that also knows the baseline's true error rate.
- latency: the same traffic, log-normal latencies (median 100 ms, sigma 0.5); the
  canary healthy or 30% slower; objective 250 ms (the analysis's latency test alone,
  alpha 0.05).
- idle: the schedule (``plan``) over 48 simulated hours with traffic to the baseline
  only: never promoted, never rolled back (it pauses at the deadline).
- srm: the schedule over simulated days, 100 requests/s, steps (5, 25, 50, 100), bake
  10 min, 1,000 canary requests per step; the canary healthy or silently losing 5% of
  its requests; requests independent, or visitors making 5 requests each (all to their
  variant, so counts vary more than a binomial's). How each ramp ended.
- drift: load that varies 5x over the day and a baseline error rate that drifts from
  0.5% to 2%, while the canary (equally good) ramps 5 -> 25 -> 50%: the guard's test,
  which compares windows, against the same test on totals (which mixes the
  baseline's good hours with the canary's bad ones).
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from canarymw.guard import Analysis, Evidence, Guard, plan, start
from canarymw.guard._controller import Assessor
from canarymw.store import Change, Counts, RolloutState, on_start
from canarymw.store._model import WINDOW

ALPHA = 0.05
N = 20_000
PEEK = 100
SHARE = 0.10


def hits(rng: random.Random, n: int, p: float) -> int:
    """Binomial(n, p) by geometric gaps: cost proportional to the hits, not to n."""
    if p <= 0.0 or n <= 0:
        return 0
    if p >= 1.0:
        return n
    log_q = math.log1p(-p)
    count = 0
    i = -1
    while True:
        i += 1 + int(math.log(1.0 - rng.random()) / log_q)
        if i >= n:
            return count
        count += 1


@dataclass
class Run:
    cells: list[
        tuple[int, int, int, int]
    ]  # per window: canary requests, canary errors, baseline requests, errors


def runs(seed: int, count: int, p_canary: float, p_base: float = 0.01) -> Iterator[Run]:
    rng = random.Random(seed)
    for _ in range(count):
        cells = []
        for _ in range(N // PEEK):
            nc = hits(rng, PEEK, SHARE)
            nb = PEEK - nc
            cells.append((nc, hits(rng, nc, p_canary), nb, hits(rng, nb, p_base)))
        yield Run(cells)


def guard_stop(run: Run, ratios: list[tuple[float, float]] | None = None) -> int | None:
    """Canary requests when the guard's error test first reaches 1/alpha, or None."""
    ev = Evidence() if ratios is None else Evidence(ratios)
    seen = 0
    for nc, xc, nb, xb in run.cells:
        seen += nc
        if nc and nb:
            ev.add(nc / (nc + nb), xc, xb)
        if ev.e_value >= 1 / ALPHA:
            return seen
    return None


def known_baseline_stop(run: Run, ratio: float, p_base: float = 0.01) -> int | None:
    """An SPRT of exactly ``ratio`` that knows the baseline's rate (no real test can)."""
    log_e = 0.0
    seen = 0
    for nc, xc, _, _ in run.cells:
        seen += nc
        log_e += xc * math.log(ratio) - nc * p_base * (ratio - 1)
        if log_e >= math.log(1 / ALPHA):
            return seen
    return None


def flagger_stop(run: Run, threshold: float, window: int = 10, fails: int = 5) -> int | None:
    """A fixed-threshold check per 1-minute window (``window`` peeks), ``fails`` failed checks."""
    failed = 0
    seen = 0
    for i in range(0, len(run.cells), window):
        chunk = run.cells[i : i + window]
        n = sum(c[0] for c in chunk)
        x = sum(c[1] for c in chunk)
        seen += n
        if n and 1 - x / n < threshold:
            failed += 1
            if failed >= fails:
                return seen
    return None


def z(xc: int, nc: int, xb: int, nb: int) -> float:
    if not nc or not nb:
        return 0.0
    p = (xc + xb) / (nc + nb)
    se = math.sqrt(p * (1 - p) * (1 / nc + 1 / nb)) if 0 < p < 1 else 0.0
    return (xc / nc - xb / nb) / se if se else 0.0


Z95 = 1.6448536269514722


def peeked_z_stop(run: Run) -> int | None:
    xc = nc = xb = nb = 0
    for cnc, cxc, cnb, cxb in run.cells:
        nc, xc, nb, xb = nc + cnc, xc + cxc, nb + cnb, xb + cxb
        if z(xc, nc, xb, nb) > Z95:
            return nc
    return None


def fixed_z(run: Run, canary_requests: int = 2000) -> bool:
    xc = nc = xb = nb = 0
    for cnc, cxc, cnb, cxb in run.cells:
        nc, xc, nb, xb = nc + cnc, xc + cxc, nb + cnb, xb + cxb
        if nc >= canary_requests:
            break
    return z(xc, nc, xb, nb) > Z95


def interval(k: int, n: int) -> str:
    """A share with its 95% Wilson interval."""
    if n == 0:
        return "-"
    p = k / n
    zz = 1.96
    den = 1 + zz * zz / n
    mid = (p + zz * zz / (2 * n)) / den
    half = zz * math.sqrt(p * (1 - p) / n + zz * zz / (4 * n * n)) / den
    return f"{p * 100:5.1f}% [{max(0, mid - half) * 100:.1f}, {min(1, mid + half) * 100:.1f}]"


def summary(name: str, stops: list[int | None]) -> str:
    got = [s for s in stops if s is not None]
    within = sum(1 for s in got if s <= 2000)
    med = statistics.median([s if s is not None else math.inf for s in stops])
    med_s = "never" if math.isinf(med) else f"{med:,.0f}"
    return (
        f"  {name:<34} rolled back {interval(len(got), len(stops))}   within 2,000 canary requests "
        f"{interval(within, len(stops))}   median {med_s}"
    )


def errors(seed: int, count: int) -> None:
    print(f"errors: {count} runs of {N:,} requests, {SHARE:.0%} canary, a peek every {PEEK} requests")
    for label, pc in (("healthy (1% vs 1%)", 0.01), ("2x (2% vs 1%)", 0.02), ("5x (5% vs 1%)", 0.05)):
        rs = list(runs(seed, count, pc))
        print(f" {label}")
        print(summary("guard (mixture e-process)", [guard_stop(r) for r in rs]))
        if pc > 0.01:
            # Bounds no anytime-valid test at this alpha beats: told the true ratio in advance.
            r_true = pc / 0.01
            print(
                summary(f"oracle: same test, only {r_true:g}x", [guard_stop(r, [(r_true, 1.0)]) for r in rs])
            )
            print(
                summary(
                    f"oracle: {r_true:g}x and baseline known", [known_baseline_stop(r, r_true) for r in rs]
                )
            )
        for t in (0.99, 0.98):
            print(summary(f"Flagger-style, success < {t:.0%}", [flagger_stop(r, t) for r in rs]))
        print(summary("z-test peeked every 100 requests", [peeked_z_stop(r) for r in rs]))
        power = sum(fixed_z(r) for r in rs)
        print(
            f"  {'fixed-horizon z-test at 2,000':<34} rejects {interval(power, len(rs))}"
            " (after all 2,000 canary requests)"
        )


def lognormal_slow(rng: random.Random, n: int, factor: float, objective: float) -> int:
    # P(latency > objective) for log-normal(median 100 ms * factor, sigma 0.5).
    p = 0.5 * math.erfc((math.log(objective / (0.1 * factor))) / (0.5 * math.sqrt(2)))
    return hits(rng, n, p)


def latency(seed: int, count: int) -> None:
    objective = 0.25
    analysis = Analysis(latency_objective=objective)
    obj = analysis.latency_objective or objective
    print(
        f"latency: {count} runs of {N:,} requests, objective {obj * 1000:.0f} ms,"
        f" latency test alone at alpha {ALPHA}"
    )
    for label, factor in (("healthy", 1.0), ("+30% latency", 1.3)):
        rng = random.Random(seed)
        stops: list[int | None] = []
        for _ in range(count):
            ev = Evidence()
            seen = 0
            stop = None
            for _ in range(N // PEEK):
                nc = hits(rng, PEEK, SHARE)
                nb = PEEK - nc
                sc = lognormal_slow(rng, nc, factor, obj)
                sb = lognormal_slow(rng, nb, 1.0, obj)
                seen += nc
                if nc and nb:
                    ev.add(nc / PEEK, sc, sb)
                if ev.e_value >= 1 / ALPHA:
                    stop = seen
                    break
            stops.append(stop)
        print(f" {label}")
        print(summary("guard latency test", stops))


# -- schedule scenarios -------------------------------------------------------------


class Counters:
    """The two reads the guard's assessor makes of a store, over simulated windows (a
    MemoryStore re-sorts every window at every read, too slow for days of them)."""

    def __init__(self) -> None:
        self.counts: list[Counts] = []
        self.starts: list[int] = []
        self.history: list[Change] = []

    def read_counts(self, names: list[str], since: float) -> list[Counts]:
        i = bisect.bisect_right(self.starts, since - WINDOW)
        return self.counts[i:]

    def history_of(self, name: str, limit: int = 50) -> list[Change]:
        return self.history[-limit:]


class Service:
    """A simulated service under the guard: 10-second windows, looked at after each one
    closes by the library's own assessor and schedule (``Assessor``, ``plan``)."""

    def __init__(self, guard: Guard, rng: random.Random, name: str = "sim") -> None:
        self.guard = guard
        self.rng = rng
        self.name = name
        self.now = 1_000_000.0
        self.store = Counters()
        history = self.store.history
        self.assessor = Assessor(guard)
        made = on_start(name, None, 0, now=self.now)
        assert made is not None
        self.state = made[0]
        history.append(made[1])
        self.apply(start(guard, name, self.state, self.now))

    def apply(self, made: tuple[RolloutState, Change] | None) -> None:
        if made is not None:
            self.state, change = made
            self.store.history.append(change)

    def window(self, nb: int, xb: int, nc: int, xc: int) -> None:
        w = int(self.now)
        self.store.counts.append(Counts(self.name, "old", w, requests=nb, errors=xb))
        self.store.counts.append(Counts(self.name, "new", w, requests=nc, errors=xc))
        self.store.starts += [w, w]
        self.now += WINDOW
        self.look()

    def step(
        self, requests: int, p_old: float, p_new: float, lose: float = 0.0, per_visitor: float = 1.0
    ) -> None:
        if per_visitor > 1.0:
            # Visitors making a geometric number of requests each, all to their variant.
            assigned, total, log_q = 0, 0, math.log1p(-1.0 / per_visitor)
            while total < requests:
                n = 1 + int(math.log(1.0 - self.rng.random()) / log_q)
                total += n
                if self.rng.random() < self.state.percent / 100:
                    assigned += n
            requests = total
        else:
            assigned = hits(self.rng, requests, self.state.percent / 100)
        nc = assigned - hits(self.rng, assigned, lose)  # requests the canary loses are never counted
        nb = requests - assigned
        self.window(nb, hits(self.rng, nb, p_old), nc, hits(self.rng, nc, p_new))

    def look(self) -> None:
        verdict, step = None, 0
        if self.state.stage == "ramping" and not self.state.paused:
            got = self.assessor.update(_AsStore(self.store), self.name, self.state, self.now + 2.5)
            verdict, step = got.verdict, got.step_requests
        self.apply(plan(self.guard, self.name, self.state, verdict, step, self.now))


class _AsStore:
    def __init__(self, counters: Counters) -> None:
        self.read_counts = counters.read_counts
        self.history = counters.history_of


def idle(seed: int, count: int) -> None:
    count = max(1, count // 20)
    guard = Guard(steps=(5, 25, 50, 100), bake=600, min_requests=1000, deadline=6 * 3600)
    outcomes: dict[str, int] = {}
    rng = random.Random(seed)
    for _ in range(count):
        svc = Service(guard, rng)
        for _ in range(48 * 360):
            svc.window(500, hits(rng, 500, 0.01), 0, 0)  # the canary's route is never hit
        actions = [c.action for c in svc.store.history]
        key = f"stage {svc.state.stage}, percent {svc.state.percent:g}, actions {'/'.join(actions[1:])}"
        outcomes[key] = outcomes.get(key, 0) + 1
    print(f"idle: {count} runs of 48 simulated hours, no canary traffic")
    for key, n in sorted(outcomes.items()):
        print(f"  {n:>4} x {key}")
    bad = sum(n for k, n in outcomes.items() if "percent 100" in k or "rolled-back" in k)
    print(f"  promoted or rolled back: {bad} of {count}")


def srm(seed: int, count: int) -> None:
    count = max(1, count // 10)
    guard = Guard(steps=(5, 25, 50, 100), bake=600, min_requests=1000, deadline=6 * 3600)
    print(
        f"srm: {count} runs per case, 100 requests/s, steps 5/25/50/100%, bake 10 min,"
        " 1,000 canary requests a step"
    )
    cases = (
        ("healthy canary", 0.0, 1.0),
        ("healthy canary, visitors making 5 requests a window each", 0.0, 5.0),
        ("canary loses 5% of its requests", 0.05, 1.0),
        ("canary loses 5% of its requests, 5 requests a visitor", 0.05, 5.0),
    )
    for label, lose, per_visitor in cases:
        rng = random.Random(seed)
        ends: dict[str, int] = {}
        hours: list[float] = []
        for _ in range(count):
            svc = Service(guard, rng)
            t0 = svc.now
            for _ in range(24 * 360):
                svc.step(1000, 0.01, 0.01, lose=lose, per_visitor=per_visitor)
                if svc.state.stage != "ramping":
                    break
            key = f"{svc.state.stage} at {svc.state.percent:g}%"
            ends[key] = ends.get(key, 0) + 1
            hours.append((svc.now - t0) / 3600)
        print(f" {label}: median {statistics.median(hours):.2f} simulated hours until the ramp stopped")
        for key, n in sorted(ends.items()):
            print(f"  {interval(n, count)}  {key}")


def drift(seed: int, count: int) -> None:
    count = max(1, count // 10)
    rng = random.Random(seed)
    ours = totals = 0
    steps = (5, 25, 50)
    for _ in range(count):
        ev = Evidence()
        fired = fired_totals = False
        xc = nc = xb = nb = 0
        for hour in range(72):
            pct = steps[min(hour // 24, 2)]
            load = int(2000 * (1 + 0.8 * math.sin(2 * math.pi * hour / 24)))  # per 6 min
            rate = 0.005 + 0.015 * hour / 72  # the baseline's errors drift up; the canary is equally good
            for _ in range(10):
                c = hits(rng, load, pct / 100)
                b = load - c
                ec, eb = hits(rng, c, rate), hits(rng, b, rate)
                if c and b:
                    ev.add(c / (c + b), ec, eb)
                nc, xc, nb, xb = nc + c, xc + ec, nb + b, xb + eb
                if ev.e_value >= 1 / ALPHA:
                    fired = True
                # the same test, fed the totals as one window at every look
                tot = Evidence()
                tot.add(nc / (nc + nb), xc, xb)
                if tot.e_value >= 1 / ALPHA:
                    fired_totals = True
        ours += fired
        totals += fired_totals
    print(
        f"drift: {count} runs of 72 simulated hours, load varying 5x a day,"
        " baseline errors drifting 0.5% -> 2%,"
    )
    print("       an equally good canary ramping 5 -> 25 -> 50% (any rollback is false)")
    print(f"  windows compared (the guard):   false rollback {interval(ours, count)}")
    print(f"  totals compared (naive):        false rollback {interval(totals, count)}")


SCENARIOS: dict[str, Callable[[int, int], None]] = {
    "errors": errors,
    "latency": latency,
    "idle": idle,
    "srm": srm,
    "drift": drift,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("scenario", nargs="?", default="all", choices=[*SCENARIOS, "all"])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    print(f"canarymw guard simulation: seed {args.seed}, Python {sys.version.split()[0]}")
    for name in names:
        t0 = time.perf_counter()
        SCENARIOS[name](args.seed, args.runs)
        print(f"  ({time.perf_counter() - t0:.1f} s)\n")


if __name__ == "__main__":
    main()
