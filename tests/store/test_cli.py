"""The store commands of ``canarymw``: status, set/promote/rollback/pause/resume, history, watch.

Most cases call ``canarymw.cli.main`` in this process; a few run the installed console
script, as an operator would. Every case runs against a real SQLite file and a real Redis.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from canarymw import cli
from canarymw.store import Counts, RolloutState, Store, StoreUnavailable, on_start
from canarymw.store._stats import VariantSummary, blended, blended_interval, measured, summarize

from .cli_where import Where, where_for

SCRIPT = Path(sys.executable).parent / "canarymw"
UNREACHABLE = "redis://127.0.0.1:1/0"


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def where(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Where]:
    with where_for(request.param, tmp_path, monkeypatch) as where:
        yield where


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (cli.STORE_ENV, cli.BY_ENV, cli.DEBUG_ENV):
        monkeypatch.delenv(name, raising=False)


def seed(store: Store, name: str, percent: float) -> RolloutState:
    """What a process running the rollout writes when it starts on an empty store."""
    made = on_start(name, None, percent)
    assert made is not None
    store.write(name, 0, *made)
    return made[0]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def script(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script, as an operator runs it."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CANARYMW_")}
    full.update(env or {})
    return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, env=full, timeout=60)


def one_sentence(err: str) -> str:
    """stderr must be one line, without a traceback; returns it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def upper(i: int) -> float:
    # Bucket i of MemorySink's log histogram holds latencies in (1e-5 * 1.04**(i-1), 1e-5 * 1.04**i].
    return 1e-5 * 1.04**i


def lower(i: int) -> float:
    return 1e-5 * 1.04 ** (i - 1)


def window_of(at: float) -> int:
    return int(at) // 10 * 10


# Traffic for rollout "checkout" at 20%: old 900 requests (1 error), new 100 (5 errors).
OLD_BUCKETS = {176: 400, 180: 440, 200: 60}
NEW_BUCKETS = {178: 50, 182: 40, 210: 10}
# By hand, the way _quantile interpolates (geometrically inside a 4% bucket):
OLD_P50 = lower(180) * 1.04 ** ((450 - 400) / 440)  # rank 450 falls in bucket 180
OLD_P95 = lower(200) * 1.04 ** ((855 - 840) / 60)  # rank 855 falls in bucket 200
NEW_P50 = upper(178)  # rank 50 ends bucket 178
NEW_P95 = lower(210) * 1.04 ** ((95 - 90) / 10)
S_OLD, S_NEW = 899 / 900, 95 / 100
BLENDED = S_NEW * 0.2 + S_OLD * 0.8  # 98.91%: weighed by the configured split
MEASURED = 994 / 1000  # 99.40%: weighed by the traffic that came


def feed_checkout(store: Store, now: float) -> None:
    """Old and new traffic for "checkout", split over two windows and two 'processes',
    plus an older window that a 300 s status leaves out."""
    w = window_of(now)
    store.add_counts(
        [
            Counts(
                "checkout",
                "old",
                w - 10,
                requests=500,
                errors=1,
                latency_sum=6.0,
                buckets={176: 400, 180: 100},
            ),
            Counts(
                "checkout",
                "new",
                w - 10,
                requests=60,
                errors=3,
                exceptions=1,
                latency_sum=0.9,
                buckets={178: 50, 182: 10},
            ),
        ]
    )
    store.add_counts(
        [
            Counts("checkout", "old", w, requests=400, latency_sum=5.1, buckets={180: 340, 200: 60}),
            Counts(
                "checkout",
                "new",
                w,
                requests=40,
                errors=2,
                disconnects=2,
                latency_sum=0.8,
                buckets={182: 30, 210: 10},
            ),
            Counts("checkout", "new", window_of(now - 1000), requests=1000, errors=1000, buckets={300: 1000}),
        ]
    )


# -- the numbers -------------------------------------------------------------------------


def test_summarize_sums_windows_and_reads_quantiles_from_the_summed_histogram() -> None:
    w = window_of(time.time())
    counts = [
        Counts("r", "old", w, requests=500, errors=1, latency_sum=6.0, buckets={176: 400, 180: 100}),
        Counts("r", "old", w + 10, requests=400, latency_sum=5.1, buckets={180: 340, 200: 60}),
        Counts("r", "canary-b", w, requests=1, latency_sum=0.5, buckets={250: 1}),
    ]
    got = summarize(counts, ["r", "quiet"])
    assert list(got) == ["quiet", "r"]
    assert list(got["r"]) == ["old", "new", "canary-b"]  # old and new always, first
    old = got["r"]["old"]
    assert (old.requests, old.errors, old.exceptions, old.disconnects) == (900, 1, 0, 0)
    assert old.error_rate == pytest.approx(1 / 900) and old.success_rate == pytest.approx(S_OLD)
    assert old.latency_mean == pytest.approx(11.1 / 900)
    assert old.p50 == pytest.approx(OLD_P50) and old.p95 == pytest.approx(OLD_P95)
    # p99: rank 891 in bucket 200 (840 below it): frac 51/60.
    assert old.p99 == pytest.approx(lower(200) * 1.04 ** (51 / 60))
    empty = VariantSummary(0, 0, 0, 0, None, None, None, None, None, None)
    assert got["r"]["new"] == empty and got["quiet"] == {"old": empty, "new": empty}


def test_blended_weighs_by_the_configured_split() -> None:
    old = VariantSummary(900, 1, 0, 0, 1 / 900, S_OLD, 0.01, None, None, None)
    new = VariantSummary(100, 5, 0, 0, 0.05, S_NEW, 0.01, None, None, None)
    none = VariantSummary(0, 0, 0, 0, None, None, None, None, None, None)
    assert blended(old, new, 20) == pytest.approx(BLENDED)
    assert blended(old, new, 0) == pytest.approx(S_OLD) and blended(old, new, 100) == pytest.approx(S_NEW)
    assert blended(old, none, 0) == pytest.approx(S_OLD)  # new has no weight: its silence does not matter
    assert blended(none, new, 100) == pytest.approx(S_NEW)
    assert blended(old, none, 20) is None and blended(none, new, 20) is None
    assert measured([old, new]) == pytest.approx(MEASURED) and measured([none]) is None


def _variant(requests: int, errors: int) -> VariantSummary:
    rate = errors / requests if requests else None
    return VariantSummary(
        requests, errors, 0, 0, rate, None if rate is None else 1 - rate, None, None, None, None
    )


def test_blended_interval_adds_agresti_coull_variances_by_the_split() -> None:
    old, new = _variant(900, 1), _variant(100, 5)
    # By hand: z = 1.96; new: n~ = 103.84, p~ = (95 + 1.92) / 103.84, v = p~ (1 - p~) / n~.
    low, estimate, high = blended_interval(old, new, 100) or (0, 0, 0)
    assert (low, estimate, high) == pytest.approx((0.9020292850053736, 0.95, 0.9979707149946263), abs=1e-12)
    low, estimate, high = blended_interval(old, new, 20) or (0, 0, 0)
    assert estimate == pytest.approx(BLENDED) == blended(old, new, 20)  # centred on the blended estimate
    assert (low, high) == pytest.approx((0.9790707398000701, 0.9991514824221525), abs=1e-12)
    z = 1.959963984540054
    v = [(p := (n - e + z * z / 2) / (n + z * z)) * (1 - p) / (n + z * z) for n, e in ((100, 5), (900, 1))]
    spread = z * (0.2**2 * v[0] + 0.8**2 * v[1]) ** 0.5
    assert (low, high) == pytest.approx((BLENDED - spread, BLENDED + spread), abs=1e-12)
    # A higher confidence, a wider interval; 0.99 reaches past 100%, clamped.
    wide = blended_interval(old, new, 20, confidence=0.99) or (0, 0, 0)
    assert wide[0] < low and wide[2] == 1.0 and wide[1] == estimate


def test_blended_interval_at_the_ends_and_without_requests() -> None:
    old, new, none = _variant(900, 1), _variant(100, 5), _variant(0, 0)
    assert blended_interval(old, none, 20) is None  # new has weight and no requests
    assert blended_interval(none, new, 20) is None
    assert blended_interval(none, none, 50) is None
    at0 = blended_interval(old, none, 0)  # new has no weight: its silence does not matter
    assert at0 is not None and at0[1] == pytest.approx(S_OLD) and at0[2] == 1.0  # clamped
    assert at0 == blended_interval(old, new, 0)
    at100 = blended_interval(none, new, 100)
    assert at100 is not None and at100 == blended_interval(old, new, 100)
    # Clamped to [0, 1]; no error at all still leaves room for doubt (never zero width).
    perfect = blended_interval(_variant(10, 0), _variant(10, 0), 50) or (0, 0, 0)
    assert perfect[1:] == (1.0, 1.0) and 0.8 < perfect[0] < 1.0
    broken = blended_interval(_variant(10, 10), _variant(10, 10), 50) or (1, 1, 1)
    assert broken[:2] == (0.0, 0.0) and 0.0 < broken[2] < 0.2
    for bad in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="confidence"):
            blended_interval(old, new, 20, confidence=bad)
    for percent in (-1, 101, float("nan")):
        with pytest.raises(ValueError, match="percent"):
            blended_interval(old, new, percent)


def test_blended_interval_covers_the_true_rate_about_as_often_as_it_says() -> None:
    import random

    rng = random.Random(20240611)
    p_old, p_new, n_old, n_new, percent = 0.995, 0.97, 2000, 60, 5
    truth = p_new * 0.05 + p_old * 0.95
    trials = 800
    covered = 0
    for _ in range(trials):
        e_old = sum(rng.random() > p_old for _ in range(n_old))
        e_new = sum(rng.random() > p_new for _ in range(n_new))
        got = blended_interval(_variant(n_old, e_old), _variant(n_new, e_new), percent)
        assert got is not None
        covered += got[0] <= truth <= got[2]
    # 95% nominal; the binomial spread of 800 trials is about 0.8 points.
    assert 0.92 <= covered / trials <= 0.99


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0 s"), (12, "12 s"), (180, "3 min"), (7200, "2 h"), (3 * 86400, "3 d")]
)
def test_ages_read_as_one_unit(seconds: float, text: str) -> None:
    assert cli._age(seconds) == text


# -- status --------------------------------------------------------------------------------


def test_status_shows_each_rollout_and_its_numbers(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    seed(where.store, "checkout", 20)
    seed(where.store, "search", 50)
    feed_checkout(where.store, time.time())
    code, out, err = run(capsys, "status", "--store", where.url)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["rollout", "percent", "paused", "version", "age", "by", "reason"]
    assert lines[1].split()[:7] == ["checkout", "20%", "no", "1", "0", "s", "code"]
    assert lines[1].endswith("seeded from the percent in code")
    assert lines[2].split()[:3] == ["search", "50%", "no"]
    block = out[out.index("checkout: the last 300 s") :]
    rows = {line.split()[0]: line.split() for line in block.splitlines()[1:6]}
    assert rows["old"] == [
        "old",
        "900",
        "1",
        "0.11%",
        f"{OLD_P50 * 1000:.1f}",
        f"{OLD_P95 * 1000:.1f}",
        "99.89%",
    ]
    assert rows["new"] == [
        "new",
        "100",
        "5",
        "5.00%",
        f"{NEW_P50 * 1000:.1f}",
        f"{NEW_P95 * 1000:.1f}",
        "95.00%",
    ]
    assert rows["all"] == ["all", "1000", "6", "0.60%", "99.40%"]
    assert "blended estimate s = s_new * w + s_old * (1 - w) = 0.9500 * 0.2 + 0.9989 * 0.8 = 98.91%" in block
    assert "measured 99.40%" in block
    search = out[out.index("search: the last 300 s") :]
    assert "new             0       0           -       -       -        -" in search
    assert "blended estimate -: no requests on new in the window" in search


def test_status_json_is_one_object_with_the_numbers(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    seed(where.store, "checkout", 20)
    seed(where.store, "search", 50)
    feed_checkout(where.store, time.time())
    code, out, _ = run(capsys, "status", "checkout", "--json", "--store", where.url)
    assert code == 0
    data = json.loads(out)
    assert data["window"] == 300 and list(data["rollouts"]) == ["checkout"]
    r = data["rollouts"]["checkout"]
    assert r["state"]["percent"] == 20 and r["state"]["version"] == 1 and r["state"]["paused"] is False
    assert r["state"]["updated_by"] == "code" and 0 <= r["age"] < 60
    old, new = r["variants"]["old"], r["variants"]["new"]
    assert (old["requests"], old["errors"], new["requests"], new["errors"]) == (900, 1, 100, 5)
    assert (new["exceptions"], new["disconnects"]) == (1, 2)
    assert old["latency_mean"] == pytest.approx(11.1 / 900) and new["latency_mean"] == pytest.approx(0.017)
    assert old["p50"] == pytest.approx(OLD_P50) and old["p95"] == pytest.approx(OLD_P95)
    assert new["p50"] == pytest.approx(NEW_P50) and new["p95"] == pytest.approx(NEW_P95)
    assert r["success"]["blended"] == pytest.approx(BLENDED)
    assert r["success"]["measured"] == pytest.approx(MEASURED)


def test_the_window_chooses_which_counters_count(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    seed(where.store, "checkout", 20)
    feed_checkout(where.store, time.time())
    _, out, _ = run(capsys, "status", "checkout", "--json", "--window", "2000", "--store", where.url)
    new = json.loads(out)["rollouts"]["checkout"]["variants"]["new"]
    assert (new["requests"], new["errors"]) == (1100, 1005)  # the window of 1000 s ago too


def test_status_of_a_guarded_rollout_names_its_controller(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    from canarymw.guard import Guard, start

    seeded = seed(where.store, "checkout", 0)
    where.store.write("checkout", 1, *start(Guard(steps=(20, 100)), "checkout", seeded, time.time()))
    feed_checkout(where.store, time.time())
    token = where.store.lease("checkout", "web-2:77:beef01", 15)
    code, out, _ = run(capsys, "status", "--store", where.url)
    assert code == 0
    assert out.splitlines()[1].split()[:4] == ["checkout", "20%", "no", "ramping"]
    block = out[out.index("checkout: the last 300 s") :]
    assert f"controller   web-2:77:beef01 (lease token {token}, expires in " in block
    assert "verdict      wait: no traffic yet" in block  # the counters fed are not in closed windows since
    assert "at 20% (now): 98.91% (" in block and "at 100% (next step): 95.00% (" in block
    code, out, _ = run(capsys, "status", "--json", "--store", where.url)
    g = json.loads(out)["rollouts"]["checkout"]["guard"]
    assert g["controller"]["holder"] == "web-2:77:beef01" and g["controller"]["token"] == token
    assert (
        g["blended"]["now"]["estimate"] == pytest.approx(BLENDED) and g["blended"]["full"]["percent"] == 100
    )


def test_status_of_an_empty_store_and_of_an_unknown_rollout(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "status", "--store", where.url)
    assert code == 0 and "the store holds no rollouts yet" in out
    code, out, _ = run(capsys, "status", "--json", "--store", where.url)
    assert code == 0 and json.loads(out)["rollouts"] == {}
    code, out, err = run(capsys, "status", "nope", "--store", where.url)
    assert code == 4 and out == ""
    assert one_sentence(err) == (
        "canarymw status: the store has no rollout 'nope'; it appears once a process running it has started."
    )


def test_the_store_comes_from_the_environment(
    where: Where, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(where.store, "checkout", 20)
    monkeypatch.setenv(cli.STORE_ENV, where.url)
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0 and list(json.loads(out)["rollouts"]) == ["checkout"]


# -- changes -------------------------------------------------------------------------------


def test_reset_starts_a_new_assignment_epoch_and_a_rollback_does_too(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(where.store, "checkout", 10)
    code, out, err = run(
        capsys, "reset", "checkout", "--by", "alice", "--reason", "new build", "--store", where.url
    )
    assert (code, err) == (0, "")
    assert out == "checkout: 10% to new, running, version 2, assignment epoch 1 (reset by alice: new build)\n"
    state = where.store.read(["checkout"])["checkout"]
    assert (state.percent, state.assignment) == (10, 1)
    run(capsys, "rollback", "checkout", "--by", "alice", "--store", where.url)
    run(capsys, "set", "checkout", "20", "--by", "alice", "--store", where.url)
    assert where.store.read(["checkout"])["checkout"].assignment == 2
    assert [c.action for c in where.store.history("checkout")] == ["seed", "reset", "rollback", "set"]


def test_operator_commands_change_the_store_and_are_audited(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(where.store, "checkout", 10)
    steps = [
        (
            ["set", "checkout", "25"],
            25,
            False,
            "checkout: 25% to new, running, version 2 (set by alice: ramp)",
        ),
        (["pause", "checkout"], 25, True, "checkout: 25% to new, paused, version 3 (pause by alice: ramp)"),
        (
            ["resume", "checkout"],
            25,
            False,
            "checkout: 25% to new, running, version 4 (resume by alice: ramp)",
        ),
        (
            ["promote", "checkout"],
            100,
            False,
            "checkout: 100% to new, running, version 5 (promote by alice: ramp)",
        ),
        (
            ["rollback", "checkout"],
            0,
            False,
            "checkout: 0% to new, running, version 6 (rollback by alice: ramp)",
        ),
    ]
    for argv, percent, paused, line in steps:
        code, out, err = run(capsys, *argv, "--by", "alice", "--reason", "ramp", "--store", where.url)
        assert (code, out, err) == (0, line + "\n", "")
        state = where.store.read(["checkout"])["checkout"]
        assert (state.percent, state.paused, state.updated_by, state.reason) == (
            percent,
            paused,
            "alice",
            "ramp",
        )
    assert where.store.read(["checkout"])["checkout"].held  # a rollback holds against deploys
    log = where.store.history("checkout")
    assert [c.action for c in log] == ["seed", "set", "pause", "resume", "promote", "rollback"]
    assert {(c.by, c.reason) for c in log[1:]} == {("alice", "ramp")}
    assert [(c.percent_before, c.percent_after) for c in log[1:]] == [
        (10, 25),
        (25, 25),
        (25, 25),
        (25, 100),
        (100, 0),
    ]
    assert [c.paused_after for c in log[1:]] == [False, True, False, False, False]


def test_a_change_prints_json_and_takes_a_percent_sign(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(where.store, "checkout", 10)
    code, out, _ = run(capsys, "set", "checkout", "12.5%", "--json", "--by", "bob", "--store", where.url)
    assert code == 0
    data = json.loads(out)
    assert data["rollout"] == "checkout" and data["action"] == "set"
    assert (
        data["state"]["percent"] == 12.5
        and data["state"]["version"] == 2
        and data["state"]["updated_by"] == "bob"
    )
    assert where.store.read(["checkout"])["checkout"].percent == 12.5


def test_who_defaults_to_the_environment_then_user_at_host(
    where: Where, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import getpass

    seed(where.store, "checkout", 10)
    assert run(capsys, "pause", "checkout", "--store", where.url)[0] == 0
    assert where.store.history("checkout")[-1].by == f"{getpass.getuser()}@{socket.gethostname()}"
    monkeypatch.setenv(cli.BY_ENV, "deploy-bot")
    assert run(capsys, "resume", "checkout", "--store", where.url)[0] == 0
    assert where.store.history("checkout")[-1].by == "deploy-bot"
    code, _, err = run(capsys, "pause", "checkout", "--by", " ", "--store", where.url)
    assert code == 2 and "--by must name who makes the change" in one_sentence(err)


def test_if_version_is_a_compare_and_set(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    seed(where.store, "checkout", 10)
    code, _, _ = run(capsys, "set", "checkout", "20", "--if-version", "1", "--by", "a", "--store", where.url)
    assert code == 0
    # b looked at version 1 too; a changed it since.
    code, out, err = run(
        capsys, "rollback", "checkout", "--if-version", "1", "--by", "b", "--store", where.url
    )
    assert code == 5 and out == ""
    sentence = one_sentence(err)
    assert sentence.startswith("canarymw rollback: rollout 'checkout' is at version 2, not 1")
    assert "someone else changed it meanwhile" in sentence
    state = where.store.read(["checkout"])["checkout"]
    assert (state.percent, state.version, state.updated_by) == (20, 2, "a")


@pytest.mark.parametrize(
    "command",
    [
        ["set", "nope", "5"],
        ["promote", "nope"],
        ["rollback", "nope"],
        ["pause", "nope"],
        ["resume", "nope"],
        ["history", "nope"],
    ],
)
def test_an_unknown_rollout_exits_4(
    where: Where, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv(cli.BY_ENV, "a")
    seed(where.store, "checkout", 10)
    code, out, err = run(capsys, *command, "--store", where.url)
    assert code == 4 and out == ""
    assert "the store has no rollout 'nope'" in one_sentence(err)
    assert where.store.names() == ["checkout"]


@pytest.mark.parametrize("percent", ["150", "abc", "-1", "nan", "inf", "100.5"])
def test_a_percent_out_of_range_exits_2(
    where: Where, capsys: pytest.CaptureFixture[str], percent: str
) -> None:
    seed(where.store, "checkout", 10)
    code, out, err = run(capsys, "set", "checkout", percent, "--store", where.url)
    assert code == 2 and out == ""
    assert one_sentence(err) == (
        f"canarymw set: PERCENT must be a number from 0 to 100, not {percent}; see canarymw set --help."
    )
    assert where.store.read(["checkout"])["checkout"].version == 1


# -- history -------------------------------------------------------------------------------


def test_history_is_oldest_first_and_limited(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    seed(where.store, "checkout", 10)
    for percent in (20, 30, 40):
        run(
            capsys,
            "set",
            "checkout",
            str(percent),
            "--by",
            "carol",
            "--reason",
            f"to {percent}",
            "--store",
            where.url,
        )
    run(capsys, "pause", "checkout", "--by", "dave", "--reason", "incident 42", "--store", where.url)
    code, out, _ = run(capsys, "history", "checkout", "--limit", "3", "--store", where.url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["when", "(UTC)", "version", "action", "by", "percent", "paused", "reason"]
    assert [line.split()[1:4] for line in lines[1:]] == [
        ["3", "set", "carol"],
        ["4", "set", "carol"],
        ["5", "pause", "dave"],
    ]
    assert lines[1].split()[4:] == ["20%", "->", "30%", "no", "to", "30"]
    assert lines[3].split()[4:] == ["40%", "->", "40%", "no", "->", "yes", "incident", "42"]
    when = lines[1].split()[0]
    assert time.strptime(when, "%Y-%m-%dT%H:%M:%SZ")  # ISO 8601, UTC

    code, out, _ = run(capsys, "history", "checkout", "--json", "--store", where.url)
    entries = json.loads(out)["history"]
    assert [e["version"] for e in entries] == [1, 2, 3, 4, 5]  # default limit 20 holds them all
    assert entries[0]["action"] == "seed" and entries[0]["percent_before"] is None
    assert entries[-1] | {"at": 0, "when": ""} == {
        "rollout": "checkout",
        "version": 5,
        "at": 0,
        "when": "",
        "by": "dave",
        "action": "pause",
        "reason": "incident 42",
        "percent_before": 40,
        "percent_after": 40,
        "paused_before": False,
        "paused_after": True,
        "extra": {},
    }
    code, out, _ = run(capsys, "history", "checkout", "--store", where.url)
    assert out.splitlines()[1].split()[2:8] == ["seed", "code", "-", "->", "10%", "no"]


# -- watch ---------------------------------------------------------------------------------


def test_watch_count_2_prints_two_tables(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    seed(where.store, "checkout", 20)
    feed_checkout(where.store, time.time())
    code, out, err = run(capsys, "watch", "--count", "2", "--interval", "0.1", "--store", where.url)
    assert code == 0 and err == ""
    assert "\x1b" not in out  # not a terminal: no escape codes, one table after the other
    assert out.count("canarymw watch ") == 2 and out.count("checkout: the last 300 s") == 2
    assert out.count("98.91%") == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_redraws_a_terminal_and_stops_on_ctrl_c(where: Where, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(where.store, "checkout", 20)
    screen = _Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_sleep", sleep)  # not time.sleep: other threads sleep too
    assert cli.main(["watch", "checkout", "--interval", "2", "--store", where.url]) == 0
    assert screen.getvalue().count("\x1b[H\x1b[2J") == 3 and sleeps == [2, 2, 2]


def test_watch_shows_a_store_failure_after_the_first_table_and_keeps_going(
    where: Where, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(where.store, "checkout", 20)
    real = cli._report
    calls: list[int] = []

    def flaky(*args: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 2:
            raise StoreUnavailable("cannot read rollouts on Redis at 10.0.0.1:6379: Timeout.")
        return real(*args)

    monkeypatch.setattr(cli, "_report", flaky)
    code, out, _ = run(capsys, "watch", "--count", "3", "--interval", "0.1", "--store", where.url)
    assert code == 0 and out.count("checkout: the last 300 s") == 2
    assert "cannot read rollouts on Redis at 10.0.0.1:6379: Timeout; trying again in 0.1 s." in out


def test_watch_of_an_unknown_rollout_exits_4(where: Where, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "watch", "nope", "--count", "1", "--store", where.url)
    assert code == 4 and out == "" and "no rollout 'nope'" in one_sentence(err)


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_goes_away_is_not_an_error(
    where: Where, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(where.store, "checkout", 20)
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())  # canarymw status | head -1
    assert cli.main(["status", "--store", where.url]) == 0
    assert capsys.readouterr().err == ""


# -- mistakes ------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_env")
@pytest.mark.parametrize(
    "command", [["status"], ["set", "checkout", "5"], ["history", "checkout"], ["watch", "--count", "1"]]
)
def test_an_unreachable_store_exits_3_quickly(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    started = time.monotonic()
    code, out, err = run(capsys, *command, "--store", UNREACHABLE)
    assert time.monotonic() - started < 3.0
    assert code == 3 and out == ""
    sentence = one_sentence(err)
    assert sentence.startswith(f"canarymw {command[0]}: cannot ") and "127.0.0.1:1" in sentence


@pytest.mark.usefixtures("no_env")
def test_no_store_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "status")
    assert code == 3 and out == ""
    assert one_sentence(err).startswith(
        "canarymw status: no store given; pass --store URL or set CANARYMW_STORE"
    )


@pytest.mark.usefixtures("no_env")
def test_a_missing_sqlite_file_is_not_created(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    for command in (["status"], ["pause", "checkout", "--by", "a"], ["history", "checkout"]):
        code, out, err = run(capsys, *command, "--store", f"sqlite:///{path}")
        assert code == 3 and out == ""
        assert one_sentence(err) == (
            f"canarymw {command[0]}: SQLite store {path} does not exist; check the path (the file "
            "appears once a process running a rollout has started with this store)."
        )
    assert not path.exists()


@pytest.mark.usefixtures("no_env")
@pytest.mark.parametrize(
    ("url", "says"),
    [("state.db", "is not a URL"), ("ftp://x", "unknown scheme"), ("sqlite://", "names no file")],
)
def test_a_malformed_store_url_exits_2(capsys: pytest.CaptureFixture[str], url: str, says: str) -> None:
    code, _, err = run(capsys, "status", "--store", url)
    assert code == 2 and says in one_sentence(err)


def test_an_unexpected_error_is_one_sentence_unless_debugging(
    where: Where, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import canarymw.store

    seed(where.store, "checkout", 10)

    def broken(url: str) -> Store:
        raise RuntimeError("boom")

    monkeypatch.setattr(canarymw.store, "open_store", broken)
    code, _, err = run(capsys, "pause", "checkout", "--store", where.url)
    assert code == 1
    assert one_sentence(err) == (
        "canarymw pause: unexpected error (RuntimeError: boom); set CANARYMW_DEBUG=1 to see the traceback."
    )
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    code, _, err = run(capsys, "pause", "checkout", "--store", where.url)
    assert (
        code == 1
        and "Traceback" in err
        and err.rstrip().endswith("set CANARYMW_DEBUG=1 to see the traceback.")
    )


@pytest.mark.usefixtures("no_env")
def test_demo_keeps_its_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "demo", "--percent", "150")
    assert code == 2 and err.startswith("usage: canarymw demo") and "--percent must be a number" in err


# -- the console script, end to end --------------------------------------------------------


def test_the_console_script_end_to_end(where: Where) -> None:
    seed(where.store, "checkout", 20)
    feed_checkout(where.store, time.time())
    env = {cli.STORE_ENV: where.url, cli.BY_ENV: "erin"}
    done = script("set", "checkout", "30", "--reason", "canary healthy", env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "checkout: 30% to new, running, version 2 (set by erin: canary healthy)\n"
    done = script("status", "--json", env=env)
    assert done.returncode == 0
    r = json.loads(done.stdout)["rollouts"]["checkout"]
    assert r["state"]["percent"] == 30 and r["state"]["updated_by"] == "erin"
    assert r["success"]["blended"] == pytest.approx(S_NEW * 0.3 + S_OLD * 0.7)
    done = script("history", "checkout", "--limit", "1", env=env)
    assert done.returncode == 0 and "canary healthy" in done.stdout.splitlines()[1]
    done = script("set", "checkout", "150", env=env)
    assert done.returncode == 2 and "PERCENT must be a number from 0 to 100" in one_sentence(done.stderr)
    done = script("promote", "checkout", "--if-version", "1", env=env)
    assert done.returncode == 5 and "someone else changed it meanwhile" in one_sentence(done.stderr)
    done = script("watch", "--count", "2", "--interval", "0.1", env=env)
    assert done.returncode == 0 and done.stdout.count("canarymw watch ") == 2


def test_the_console_script_with_an_unreachable_store() -> None:
    started = time.monotonic()
    done = script("status", env={cli.STORE_ENV: UNREACHABLE})
    took = time.monotonic() - started
    assert done.returncode == 3 and done.stdout == ""
    assert "127.0.0.1:1" in one_sentence(done.stderr)
    assert took < 10.0  # interpreter start and importing redis-py included; the connect itself fails at once


def test_importing_the_cli_stays_cheap() -> None:
    code = "import sys, canarymw.cli; print(sorted({'redis', 'httpx', 'sqlite3'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]"


def test_status_names_a_process_that_stopped_without_its_final_flush(
    where: Where, capsys: pytest.CaptureFixture[str]
) -> None:
    from canarymw.store import ProcessReport

    seed(where.store, "checkout", 20)
    now = time.time()

    def report(pid: int, at: float, **kw: Any) -> None:
        where.store.report_process(
            ProcessReport(f"web-1:{pid}:abc123", now - 100, at, interval=1.0, rollouts=("checkout",), **kw)
        )

    report(4242, now - 60, flushed=900, last_batch=25)  # killed a minute ago: silent, never closed
    report(4243, now - 1, flushed=950, last_batch=30, next_within=1.0)  # running
    report(4244, now - 30, flushed=400, last_batch=0, closed=True)  # stopped gracefully
    code, out, _ = run(capsys, "status", "--store", where.url)
    assert code == 0
    line = out.strip().splitlines()[-1]
    assert line.startswith("1 process stopped without its final flush: web-1:4242 at ")
    assert line.endswith(" s ago), up to ~25 outcomes not counted")
    assert "(60 s ago)" in line or "(61 s ago)" in line
    code, out, _ = run(capsys, "status", "--store", where.url, "--json")
    p = json.loads(out)["processes"]
    assert (p["reported"], p["running"], p["closed"], p["lost_outcomes_estimate"]) == (3, 1, 1, 25)
    assert [(r["host"], r["pid"]) for r in p["lost"]] == [("web-1", 4242)]
    report(4245, now - 50, flushed=10, last_batch=0)  # idle at its last report, then killed
    code, out, _ = run(capsys, "status", "--store", where.url)
    tail = out.strip().splitlines()[-3:]
    assert tail[0] == "2 processes stopped without their final flush, up to ~25 outcomes not counted:"
    assert "web-1:4245" in tail[2] and "idle at its last report: likely nothing lost" in tail[2]


def test_watch_ignores_a_second_ctrl_c_while_it_ends(
    where: Where, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C ends watch with 0; a second SIGINT while it closes the store and the
    interpreter exits (a double press, or `timeout` signalling the process and then its
    group) must not turn that into 130: from the first one on, SIGINT is ignored."""
    import signal

    seed(where.store, "checkout", 20)
    seen: list[object] = []

    def ctrl_c(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_sleep", ctrl_c)
    previous = signal.getsignal(signal.SIGINT)
    try:
        from canarymw.store import open_store

        real_close = type(open_store(where.url)).close

        def close(self: Any) -> None:
            seen.append(signal.getsignal(signal.SIGINT))  # what a second Ctrl-C would meet now
            real_close(self)

        monkeypatch.setattr(type(open_store(where.url)), "close", close)
        code, out, _ = run(capsys, "watch", "checkout", "--store", where.url)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 0 and out.startswith("canarymw watch ")
    assert seen and seen[0] is signal.SIG_IGN
