"""The behaviour both adapters share, run once per adapter (the ``kit`` fixture)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from canarymw import MemorySink, Outcome, Rollout

from ..harness import ASGIKit, Boom, RecordingSink, WSGIKit

Kit = WSGIKit | ASGIKit
MakeRollout = Callable[..., Rollout]
TOKEN = "force-token-0123456789"


class BrokenSink:
    calls = 0

    def record(self, outcome: Outcome) -> None:
        self.calls += 1
        raise RuntimeError("sink down")


def pair(kit: Kit, rollout: Rollout, **kw: Any) -> Any:
    return kit.wrap(kit.echo("old"), kit.echo("new"), rollout, **kw)


def visit(client: httpx.Client, path: str = "/", **kw: Any) -> httpx.Response:
    response = client.get(path, **kw)
    assert response.status_code == 200, response.text
    assert response.headers["x-decision"] == response.text  # the app sees the decision
    return response


def test_visitor_is_sticky_and_cookie_is_set_once(kit: Kit, make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    rollout = make_rollout(50)
    with kit.client(pair(kit, rollout, sink=sink)) as client:
        first = visit(client)
        assert "canarymw=" in first.headers["set-cookie"]
        for _ in range(5):
            again = visit(client)
            assert again.text == first.text
            assert "set-cookie" not in again.headers
    assert [o.variant for o in sink.outcomes] == [first.text] * 6
    assert rollout.counters["assigned"] == 1


def test_split_and_ramp_keep_earlier_new_users(kit: Kit, make_rollout: MakeRollout) -> None:
    rollout = make_rollout(10)
    app = pair(kit, rollout)
    clients = [kit.client(app) for _ in range(120)]
    opened = [c.__enter__() for c in clients]
    try:
        at_10 = {i for i, c in enumerate(opened) if visit(c).text == "new"}
        rollout.percent = 25
        at_25 = {i for i, c in enumerate(opened) if visit(c).text == "new"}
        assert at_10 <= at_25
        assert 0 < len(at_25) < 120
        rollout.percent = 0  # kill switch: everyone back at once, cookies unchanged
        assert all(visit(c).text == "old" for c in opened)
        rollout.percent = 100  # blue/green switch
        assert all(visit(c).text == "new" for c in opened)
        rollout.percent = 25
        assert {i for i, c in enumerate(opened) if visit(c).text == "new"} == at_25
    finally:
        for c in clients:
            c.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("app_headers", "expected_vary", "expected_cc"),
    [
        pytest.param([], "Cookie", "private", id="none set"),
        pytest.param([("Vary", "Accept-Encoding")], "Accept-Encoding, Cookie", "private", id="vary merged"),
        pytest.param([("Vary", "cookie")], "cookie", "private", id="vary already"),
        pytest.param([("Vary", "*")], "*", "private", id="vary star"),
        pytest.param([("Cache-Control", "no-store")], "Cookie", "no-store", id="no-store kept"),
        pytest.param([("Cache-Control", "max-age=60")], "Cookie", "private, max-age=60", id="private merged"),
        pytest.param(
            [("Cache-Control", "public, max-age=5")], "Cookie", "public, max-age=5", id="public kept"
        ),
    ],
)
def test_caching_headers(
    kit: Kit,
    make_rollout: MakeRollout,
    app_headers: list[tuple[str, str]],
    expected_vary: str,
    expected_cc: str,
) -> None:
    old = kit.echo("old", headers=app_headers)
    new = kit.echo("new", headers=app_headers)
    with kit.client(kit.wrap(old, new, make_rollout(50))) as client:
        response = visit(client)
    assert response.headers.get_list("vary") == [expected_vary]
    assert response.headers.get_list("cache-control") == [expected_cc]


def test_cache_control_can_be_disabled(kit: Kit, make_rollout: MakeRollout) -> None:
    with kit.client(pair(kit, make_rollout(50), cache_control=None)) as client:
        response = visit(client)
    assert "cache-control" not in response.headers
    assert response.headers["vary"] == "Cookie"


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param("canarymw=garbage", id="malformed"),
        pytest.param("canarymw=1.AAAAAAAAAAAAAAAAAAAAAA.1.abc", id="forged"),
        pytest.param("canarymw=" + "A" * 8192, id="oversized 8 KB"),
        pytest.param('a"b=c; canarymw=; d=\\e', id="malformed neighbours and empty"),
        pytest.param("canarymw=é€漢字", id="non-ascii"),
        pytest.param("canarymw=x; canarymw=y", id="duplicated bad"),
    ],
)
def test_bad_cookie_reassigns_silently(kit: Kit, make_rollout: MakeRollout, cookie: str) -> None:
    rollout = make_rollout(50)
    with kit.client(pair(kit, rollout)) as client:
        response = client.get("/", headers={"cookie": cookie.encode("utf-8")})
        assert response.status_code == 200
        assert "canarymw=" in response.headers["set-cookie"]
    assert rollout.counters["assigned"] == 1


def test_cookie_from_another_key_or_truncated_reassigns(kit: Kit, make_rollout: MakeRollout) -> None:
    foreign = make_rollout(50, secret_key="some-other-key-0123456789")
    value = (foreign.decide(None).set_cookie or "").split(";")[0]
    rollout = make_rollout(50)
    with kit.client(pair(kit, rollout)) as client:
        for cookie in (value, value[:-3]):
            response = client.get("/", headers={"cookie": cookie})
            assert response.status_code == 200 and "set-cookie" in response.headers
    assert rollout.counters["cookie_rejected"] == 2


def test_valid_cookie_among_others_and_joined_headers(kit: Kit, make_rollout: MakeRollout) -> None:
    rollout = make_rollout(50)
    first = rollout.decide(None)
    ours = (first.set_cookie or "").split(";")[0]
    with kit.client(pair(kit, rollout)) as client:
        for header in (f"a=1; {ours}; b=2", f"session=x, {ours}", f'bad"=1; {ours}'):
            response = client.get("/", headers={"cookie": header})
            assert response.text == first.variant
            assert "set-cookie" not in response.headers


def test_exception_before_start_is_recorded_and_reraised(kit: Kit, make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    app = kit.wrap(kit.boom(after_start=False), kit.boom(after_start=False), make_rollout(50), sink=sink)
    with kit.client(app) as client, pytest.raises(Boom, match="before start"):
        client.get("/")
    [outcome] = sink.outcomes
    assert outcome.error == "Boom" and outcome.status is None and not outcome.ok


def test_exception_after_start_is_recorded_and_reraised(kit: Kit, make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    app = kit.wrap(kit.boom(after_start=True), kit.boom(after_start=True), make_rollout(50), sink=sink)
    with kit.client(app) as client, pytest.raises(Boom, match="after start"):
        client.get("/")
    [outcome] = sink.outcomes
    assert outcome.error == "Boom" and outcome.status == 200 and not outcome.ok


def test_one_outcome_per_request_with_fields(kit: Kit, make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    memory = MemorySink()
    with kit.client(pair(kit, make_rollout(50, name="fields"), sink=[sink, memory])) as client:
        seen = [visit(client).text for _ in range(3)]
        head = client.head("/")
        assert head.status_code == 200 and head.headers["x-app"] == seen[0]
    assert len(sink.outcomes) == 4
    for o in sink.outcomes:
        assert o.rollout == "fields" and o.variant == seen[0] and o.status == 200
        assert 0 < o.duration < 5 and o.error is None and not o.disconnected and o.ok
    assert [o.method for o in sink.outcomes] == ["GET", "GET", "GET", "HEAD"]
    stats = memory.snapshot()[seen[0]]
    assert stats.requests == 4 and stats.errors == 0 and stats.statuses == {2: 4}


def test_a_memory_sink_subclass_gets_its_record_called_with_whole_outcomes(
    kit: Kit, make_rollout: MakeRollout
) -> None:
    # Only a plain MemorySink has its queue filled directly; a subclass may override record().
    class Tallying(MemorySink):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[Outcome] = []

        def record(self, outcome: Outcome) -> None:
            self.seen.append(outcome)
            super().record(outcome)

    sink = Tallying()
    app = kit.wrap(kit.echo("old"), kit.echo("new"), make_rollout(50), sink=sink)
    with kit.client(app) as client:
        for _ in range(3):
            assert client.get("/").status_code == 200
    assert [type(o) for o in sink.seen] == [Outcome] * 3
    assert all(o.rollout == "hello-v2" and o.status == 200 and o.method == "GET" for o in sink.seen)
    assert sum(s.requests for s in sink.snapshot().values()) == 3


def test_a_plain_memory_sink_that_fails_to_fold_is_counted_not_raised(
    kit: Kit, make_rollout: MakeRollout, monkeypatch: pytest.MonkeyPatch
) -> None:
    from canarymw.sinks.memory import _BATCH

    sink = MemorySink()

    def broken_fold(*, blocking: bool) -> None:
        raise RuntimeError("fold failed")

    monkeypatch.setattr(sink, "_fold", broken_fold)
    mw = kit.raw_wrap(kit.echo("old"), kit.echo("new"), make_rollout(50), sink=sink)
    with kit.client(mw) as client:
        for _ in range(_BATCH):
            assert client.get("/").status_code == 200
    assert mw.sink_errors == 1  # the request that filled the batch; none failed


def test_status_500_counts_as_error(kit: Kit, make_rollout: MakeRollout) -> None:
    memory = MemorySink()
    app = kit.wrap(kit.echo("old", status=500), kit.echo("new", status=500), make_rollout(50), sink=memory)
    with kit.client(app) as client:
        assert client.get("/").status_code == 500
    [stats] = [s for s in memory.snapshot().values() if s.requests]
    assert stats.errors == 1 and stats.error_rate == 1.0 and stats.statuses == {5: 1}
    assert sum(s.requests for s in memory.snapshot().values()) == 1


def test_failing_sink_never_affects_the_response(
    kit: Kit, make_rollout: MakeRollout, caplog: pytest.LogCaptureFixture
) -> None:
    broken = BrokenSink()
    good = RecordingSink()
    mw = kit.raw_wrap(kit.echo("old"), kit.echo("new"), make_rollout(50), sink=[broken, good])
    with kit.client(mw) as client:
        for _ in range(5):
            visit(client)
    assert broken.calls == 5 and len(good.outcomes) == 5
    assert mw.sink_errors == 5  # counted through the fan-out too
    assert sum("sink" in r.getMessage() for r in caplog.records) == 1  # logged once, not per request


def test_sink_errors_are_counted_on_the_middleware(kit: Kit, make_rollout: MakeRollout) -> None:
    mw = kit.raw_wrap(kit.echo("old"), kit.echo("new"), make_rollout(50), sink=BrokenSink())
    with kit.client(mw) as client:
        for _ in range(3):
            visit(client)
    assert mw.sink_errors == 3


def test_streaming_passes_chunk_by_chunk(kit: Kit, make_rollout: MakeRollout) -> None:
    log: list[str] = []
    chunks = [b"one ", b"two ", b"three"]
    sink = RecordingSink()
    app = kit.wrap(kit.stream(chunks, log), kit.stream(chunks, log), make_rollout(50), sink=sink)
    with kit.client(app) as client, client.stream("GET", "/") as response:
        assert b"".join(response.iter_bytes()) == b"one two three"
    assert log == ["chunk 0", "chunk 1", "chunk 2", "closed"]
    [outcome] = sink.outcomes
    assert outcome.status == 200 and not outcome.disconnected


def test_excluded_paths_are_never_routed_or_counted(kit: Kit, make_rollout: MakeRollout) -> None:
    sink = RecordingSink()
    rollout = make_rollout(100, exclude=["/healthz"])
    with kit.client(pair(kit, rollout, sink=sink)) as client:
        response = client.get("/healthz")
        assert response.text == "old" and response.headers["x-decision"] == "-"
        assert "set-cookie" not in response.headers and "vary" not in response.headers
    assert sink.outcomes == []


def test_forcing_with_the_secret_token(kit: Kit, make_rollout: MakeRollout) -> None:
    rollout = make_rollout(0, force_token=TOKEN, force_query=True)
    with kit.client(pair(kit, rollout)) as client:
        assert visit(client, headers={"x-canarymw-force": f"new:{TOKEN}"}).text == "new"
        assert visit(client, params={"canarymw_force": f"new:{TOKEN}"}).text == "new"
        assert visit(client, headers={"x-canarymw-force": "new:guess-guess-guess"}).text == "old"
        assert visit(client, params={"canarymw": "new"}).text == "old"
        assert visit(client).text == "old"  # forcing is per request, not sticky


def test_logged_in_user_key(kit: Kit, make_rollout: MakeRollout) -> None:
    def user_of(request: Any) -> str | None:
        # Works for both a WSGI environ and an ASGI scope.
        if "HTTP_X_USER" in request:
            return str(request["HTTP_X_USER"])
        for name, value in request.get("headers", ()):
            if name == b"x-user":
                return str(value.decode())
        return None

    rollout = make_rollout(50, key=user_of)
    expected = {u: rollout.variant_for(u) for u in ("alice", "bob", "carol", "dave", "erin", "frank")}
    with kit.client(pair(kit, rollout)) as client:
        for user, variant in expected.items():
            response = visit(client, headers={"x-user": user})
            assert response.text == variant and "set-cookie" not in response.headers
