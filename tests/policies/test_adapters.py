"""The invariants of each ramp policy, as properties, through both adapters and both
request paths (the cached path of returning visitors, and the full decision)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canarymw import Rollout

from ..conftest import KEY
from ..harness import ASGIKit, WSGIKit, _lifespan_ok, by_bucket

FORCE = "force-token-0123456789"
Step = tuple[str, float]


def decision_app(kit: WSGIKit | ASGIKit) -> Any:
    """Answers with the decision's variant and bucket."""
    if kit.kind == "wsgi":

        def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            d = environ["canarymw.decision"]
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [f"{d.variant} {d.bucket}".encode()]

        return wsgi

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan_ok(receive, send)
            return
        d = scope["canarymw.decision"]
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": f"{d.variant} {d.bucket}".encode()})

    return asgi


steps = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from([0, 0.5, 5, 10, 25, 50, 75, 99.5, 100])),
        st.tuples(st.just("set"), st.floats(0, 100).map(lambda x: round(x, 2))),
        st.tuples(st.just("reset"), st.just(0.0)),
    ),
    min_size=1,
    max_size=8,
)


def user_of(request: Any) -> str | None:
    """The X-User header of a WSGI environ or an ASGI scope."""
    if "headers" in request:
        return next((v.decode() for k, v in request["headers"] if k == b"x-user"), None)
    value = request.get("HTTP_X_USER")
    return str(value) if value is not None else None


class Person:
    __slots__ = ("cookie", "epoch", "first", "seen_new", "user")

    def __init__(self) -> None:
        self.user: str | None = None  # logged in (path "key"): sent as X-User
        self.cookie: str | None = None
        self.first: str | None = None  # pin: the variant first given in this epoch (0 < pct)
        self.seen_new = False  # drain: given new in this epoch
        self.epoch = 0


@pytest.mark.parametrize("policy", ["monotone", "drain", "pin"])
@pytest.mark.parametrize("path", ["cached", "decide", "key"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.sampled_from([0, 10, 50, 100]), plan=steps)
def test_policy_invariants(
    kit: WSGIKit | ASGIKit, policy: str, path: str, start: float, plan: list[Step]
) -> None:
    extra: dict[str, Any] = {}
    if path == "decide":
        extra["force_token"] = FORCE
    elif path == "key":
        extra["key"] = user_of
    rollout = Rollout("prop", percent=start, secret_key=KEY, policy=policy, **extra)  # type: ignore[arg-type]
    app = kit.wrap(decision_app(kit), decision_app(kit), rollout)
    people = [Person() for _ in range(24)]
    epoch = 0
    with kit.client(app) as client:

        def visit(p: Person) -> tuple[str, int]:
            headers = {} if p.cookie is None else {"cookie": f"canarymw={p.cookie}"}
            if p.user is not None:
                headers["x-user"] = p.user
            r = client.get("/", headers=headers)
            client.cookies.clear()  # each person's cookie is theirs alone
            got = r.headers.get("set-cookie")
            if got:
                p.cookie = got.split(";", 1)[0].split("=", 1)[1]
            variant, bucket = r.text.split()
            return variant, int(bucket)

        def check_all() -> None:
            pct = rollout.percent
            for p in people:
                if p.epoch != epoch:
                    p.first, p.seen_new, p.epoch = None, False, epoch
                variant, bucket = visit(p)
                frozen = by_bucket(bucket, pct)
                if pct <= 0:
                    assert variant == "old"
                elif pct >= 100:
                    assert variant == "new"
                elif policy == "monotone":
                    assert variant == frozen
                elif policy == "drain":
                    # Never back from new within an epoch; old goes by the bucket.
                    assert variant == ("new" if p.seen_new else frozen)
                else:
                    assert variant == (p.first or frozen), (pct, p.first, frozen, p.cookie, plan, start)
                if pct > 0:
                    p.seen_new = p.seen_new or variant == "new"
                    if p.first is None:
                        p.first = variant
                # A returning visit, the same answer (the cached path when it applies).
                assert visit(p)[0] == variant

        check_all()
        if path == "key":
            # Half of them log in: nobody's variant may change for it.
            for i, p in enumerate(people[::2]):
                p.user = f"user-{i}"
            check_all()
        for action, pct in plan:
            if action == "reset":
                rollout.reset()
                epoch += 1
            else:
                dropped = pct <= 0 < rollout.percent
                rollout.percent = pct
                epoch += dropped
            assert rollout.epoch == epoch
            people.append(Person())  # someone new arrives at every step
            check_all()
