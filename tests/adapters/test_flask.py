from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from wsgiref.validate import validator

import pytest
from flask import Flask, Response, render_template_string, request
from werkzeug.test import Client, TestResponse

from canarymw import Decision, MemorySink, Rollout
from canarymw.flask import Canary, CanaryLogFilter, current_variant

from ..harness import RecordingSink

# Every test here runs against both implementations of the adapter's response path.

KEY = "test-secret-key-0123456789abcdef"


def make_app(
    percent: float = 50, *, rollout: Rollout | None = None, **config: Any
) -> tuple[Flask, Canary, RecordingSink]:
    app = Flask(__name__)
    app.config.update(CANARYMW_NAME="hello-v2", CANARYMW_PERCENT=percent, CANARYMW_SECRET_KEY=KEY, **config)
    sink = RecordingSink()
    canary = Canary(sink=sink, rollout=rollout)
    canary.init_app(app)

    def green(name: str = "World") -> str:
        return f"Hello, Green {name}! ({current_variant()})"

    @app.route("/")
    @app.route("/hi/<name>")
    @canary.split(new=green)
    def blue(name: str = "World") -> str:
        return f"Hello, Blue {name}! ({current_variant()})"

    @app.route("/boom")
    @canary.split(new=lambda: 1 / 0)
    def boom() -> str:
        return "fine"

    @app.route("/plain")
    def plain() -> str:
        return render_template_string("variant={{ canary_variant }}")

    @app.route("/template-if")
    def template_if() -> str:
        return render_template_string("{% if canary_variant == 'new' %}green{% else %}blue{% endif %}")

    @app.route("/template-without")
    def template_without() -> str:
        return render_template_string("no variant here")

    @app.route("/about")
    def about() -> str:
        return "about"

    @app.route("/reads")
    def reads() -> str:
        return f"reads {current_variant()}"

    @app.route("/own-headers")
    def own_headers() -> Response:
        return Response("cached", headers={"Cache-Control": "public, max-age=60", "Vary": "Accept-Encoding"})

    return app, canary, sink


def marks(response: TestResponse) -> tuple[bool, bool, bool]:
    """(a cohort cookie was set, Vary has Cookie, Cache-Control has private)."""
    vary = {v.strip().lower() for v in response.headers.get("Vary", "").split(",")}
    cache = {d.strip().lower() for d in response.headers.get("Cache-Control", "").split(",")}
    cookie = any(c.startswith("canarymw=") for c in response.headers.getlist("Set-Cookie"))
    return cookie, "cookie" in vary, "private" in cache


ALL = (True, True, True)
NONE = (False, False, False)
SPLIT_AND_READERS = [
    pytest.param("/", ALL, id="split view"),
    pytest.param("/hi/Ann", ALL, id="split view with arguments"),
    pytest.param("/reads", ALL, id="plain view that called current_variant"),
    pytest.param("/plain", ALL, id="template that shows the variable"),
    pytest.param("/template-if", ALL, id="template that compares the variable"),
]
UNMARKED = [
    pytest.param("/about", NONE, id="plain view"),
    pytest.param("/template-without", NONE, id="template without the variable"),
    pytest.param("/missing", NONE, id="404"),
]


@pytest.mark.parametrize(("path", "expected"), SPLIT_AND_READERS + UNMARKED)
@pytest.mark.parametrize("percent", [0, 50, 100])
def test_only_responses_that_depend_on_the_cohort_are_marked(
    path: str, expected: tuple[bool, bool, bool], percent: float
) -> None:
    app, _, _ = make_app(percent)
    assert marks(app.test_client().get(path, buffered=True)) == expected


def test_a_plain_view_keeps_its_own_caching_headers() -> None:
    app, _, _ = make_app(50)
    response = app.test_client().get("/own-headers", buffered=True)
    assert response.headers["Cache-Control"] == "public, max-age=60"
    assert response.headers["Vary"] == "Accept-Encoding"
    assert "Set-Cookie" not in response.headers


def test_a_visitor_is_assigned_on_the_first_split_view_not_the_first_page() -> None:
    exposed: list[Decision] = []
    rollout = Rollout("assign", percent=50, secret_key=KEY, on_exposure=exposed.append)
    app, _, sink = make_app(rollout=rollout)
    client = app.test_client()
    for path in ("/about", "/template-without", "/missing", "/own-headers"):
        assert "Set-Cookie" not in client.get(path, buffered=True).headers
    assert rollout.counters["assigned"] == 0 and exposed == [] and sink.outcomes == []
    first = client.get("/", buffered=True)
    assert marks(first) == ALL
    assert rollout.counters["assigned"] == 1 and len(exposed) == 1
    variant = exposed[0].variant
    # Back on plain pages with the cookie: still nothing added, unless the view reads it.
    assert marks(client.get("/about", buffered=True)) == NONE
    reads = client.get("/reads", buffered=True)
    assert reads.get_data(as_text=True) == f"reads {variant}"
    assert marks(reads) == (False, True, True)  # the cookie is valid: no new one
    assert rollout.counters["assigned"] == 1 and len(exposed) == 1
    assert len(sink.outcomes) == 1  # only the split view is recorded


def test_a_plain_view_that_reads_the_variant_assigns_the_visitor() -> None:
    exposed: list[Decision] = []
    rollout = Rollout("assign", percent=50, secret_key=KEY, on_exposure=exposed.append)
    app, _, sink = make_app(rollout=rollout)
    client = app.test_client()
    text = client.get("/reads", buffered=True).get_data(as_text=True)
    assert rollout.counters["assigned"] == 1 and len(exposed) == 1
    assert text == f"reads {exposed[0].variant}"
    # The same cohort on the split view, with no second cookie.
    split = client.get("/", buffered=True)
    assert split.get_data(as_text=True).endswith(f"({exposed[0].variant})")
    assert marks(split) == (False, True, True)
    assert rollout.counters["assigned"] == 1 and [o.route for o in sink.outcomes] == ["/"]


def test_force_token_works_and_is_removed_on_plain_views() -> None:
    token = "qa-token-0123456789abcdef"
    rollout = Rollout("forced", percent=0, secret_key=KEY, force_token=token, force_query=True)
    app, _, _ = make_app(rollout=rollout)
    seen: list[tuple[str | None, str]] = []

    @app.route("/peek")
    def peek() -> str:
        seen.append((request.headers.get("X-Canarymw-Force"), request.query_string.decode()))
        return f"peek {current_variant()}" if "read" in request.args else "peek"

    client = app.test_client()
    by_header = client.get("/peek?read=1", headers={"X-Canarymw-Force": f"new:{token}"}, buffered=True)
    by_query = client.get(f"/peek?read=2&canarymw_force=new:{token}", buffered=True)
    assert by_header.get_data(as_text=True) == by_query.get_data(as_text=True) == "peek new"
    unread = client.get(f"/peek?canarymw_force=new:{token}", buffered=True)
    assert unread.get_data(as_text=True) == "peek" and marks(unread) == NONE
    # The token never reaches the view, whether or not it reads the variant.
    assert seen == [(None, "read=1"), (None, "read=2"), (None, "")]


def test_record_all_marks_every_response() -> None:
    # Recording every request by cohort needs a cohort on every request.
    app, _, sink = make_app(50, CANARYMW_RECORD="all")
    client = app.test_client()
    assert marks(client.get("/about", buffered=True)) == ALL
    assert marks(client.get("/about", buffered=True)) == (False, True, True)
    assert len(sink.outcomes) == 2


def test_a_split_view_hidden_by_a_decorator_still_marks_its_response() -> None:
    app, canary, sink = make_app(100)

    def opaque(view: Callable[[], str]) -> Callable[[], str]:
        def inner() -> str:  # no functools.wraps: the split cannot be seen before routing
            return view()

        return inner

    @app.route("/hidden")
    @opaque
    @canary.split(new=lambda: "new")
    def hidden() -> str:
        return "old"

    response = app.test_client().get("/hidden", buffered=True)
    assert response.get_data(as_text=True) == "new" and marks(response) == ALL
    assert sink.outcomes == []  # served and marked, but not recorded


def test_automatic_options_of_a_split_view_is_not_marked() -> None:
    app, _, _ = make_app(50)
    response = app.test_client().options("/", buffered=True)
    assert response.status_code == 200 and marks(response) == NONE
    assert app.extensions["canarymw"].rollout.counters["assigned"] == 0


def test_the_split_is_known_per_method_and_url() -> None:
    app, canary, sink = make_app(100)

    @app.post("/form")
    @canary.split(new=lambda: "new post")
    def post_form() -> str:
        return "old post"

    @app.get("/form")
    def get_form() -> str:
        return "form"

    client = app.test_client()
    for _ in range(2):  # the second time from what the first one remembered
        assert marks(client.get("/form", buffered=True)) == NONE
        assert marks(client.put("/form", buffered=True)) == NONE  # 405
        posted = client.post("/form", buffered=True)
        assert posted.get_data(as_text=True) == "new post" and marks(posted)[1:] == (True, True)
    assert [o.method for o in sink.outcomes] == ["POST", "POST"]


@pytest.mark.parametrize("path", ["/", "/reads", "/about"])
def test_both_paths_are_valid_wsgi(path: str) -> None:
    app, _, _ = make_app(50)
    outer = validator(app)
    app.wsgi_app = validator(app.wsgi_app)  # type: ignore[method-assign]
    response = Client(outer).get(path)
    assert response.status_code == 200
    response.close()


def test_split_view_is_sticky_per_user() -> None:
    app, _, sink = make_app(50)
    client = app.test_client()
    first = client.get("/", buffered=True).get_data(as_text=True)
    assert first in ("Hello, Blue World! (old)", "Hello, Green World! (new)")
    for _ in range(4):
        assert client.get("/", buffered=True).get_data(as_text=True) == first
    assert client.get("/hi/Ann", buffered=True).get_data(as_text=True).startswith(first.split(" W")[0])
    assert len(sink.outcomes) == 6
    assert {o.route for o in sink.outcomes} == {"/", "/hi/<name>"}


def test_percent_from_config_and_live_change() -> None:
    app, canary, _ = make_app(0)
    client = app.test_client()
    assert "Blue" in client.get("/", buffered=True).get_data(as_text=True)
    with app.app_context():
        canary.rollout.percent = 100
    assert "Green" in client.get("/", buffered=True).get_data(as_text=True)


def test_only_split_views_are_recorded_by_default() -> None:
    app, _, sink = make_app(50)
    client = app.test_client()
    assert client.get("/plain", buffered=True).get_data(as_text=True) in ("variant=old", "variant=new")
    assert sink.outcomes == []
    app2, _, sink2 = make_app(50, CANARYMW_RECORD="all")
    app2.test_client().get("/plain", buffered=True)
    assert len(sink2.outcomes) == 1 and sink2.outcomes[0].route == "/plain"


def test_exception_in_new_view_is_recorded() -> None:
    app, _, sink = make_app(100)
    response = app.test_client().get("/boom", buffered=True)
    assert response.status_code == 500
    [outcome] = sink.outcomes
    assert outcome.error == "ZeroDivisionError" and outcome.status == 500 and outcome.variant == "new"


def test_no_app_stored_and_state_in_extensions() -> None:
    app, canary, _ = make_app()
    assert not any(isinstance(v, Flask) for v in vars(canary).values())
    assert app.extensions["canarymw"].rollout.name == "hello-v2"
    with pytest.raises(RuntimeError, match="once per app"):
        canary.init_app(app)


def test_secret_key_falls_back_to_app_secret_and_is_required() -> None:
    app = Flask(__name__)
    with pytest.raises(ValueError, match="secret key"):
        Canary(app)
    app.secret_key = KEY
    Canary(app)
    assert app.extensions["canarymw"].rollout.percent == 0


def test_bad_record_setting() -> None:
    app = Flask(__name__)
    app.config.update(CANARYMW_SECRET_KEY=KEY, CANARYMW_RECORD="some")
    with pytest.raises(ValueError, match="CANARYMW_RECORD"):
        Canary(app)


def test_shared_rollout_and_static_excluded() -> None:
    rollout = Rollout("shared", percent=100, secret_key=KEY, exclude=["/static"])
    memory = MemorySink()
    app = Flask(__name__)
    canary = Canary(app, rollout=rollout, sink=memory)
    assert canary.rollout is rollout

    @app.route("/")
    @canary.split(new=lambda: "new")
    def index() -> str:
        return "old"

    client = app.test_client()
    assert client.get("/", buffered=True).get_data(as_text=True) == "new"
    assert "Set-Cookie" not in client.get("/static/missing.css", buffered=True).headers
    assert memory.snapshot()["new"].requests == 1


def test_log_filter_adds_variant(caplog: pytest.LogCaptureFixture) -> None:
    app, canary, _ = make_app(100)
    logger = logging.getLogger("test.canary")
    logger.addFilter(CanaryLogFilter())

    @app.route("/log")
    def log_view() -> str:
        logger.warning("before")
        current_variant()
        logger.warning("after")
        return "ok"

    @app.route("/log-split")
    @canary.split(new=lambda: logger.warning("split") or "new")
    def log_split() -> str:
        return "old"

    with caplog.at_level(logging.WARNING, logger="test.canary"):
        app.test_client().get("/log", buffered=True)
        app.test_client().get("/log-split", buffered=True)
        logger.warning("outside")
    variants = [getattr(r, "canary_variant", None) for r in caplog.records]
    # Logging never decides a request (that would mark the page as cohort-dependent).
    assert variants == ["-", "new", "new", "-"]


def test_split_requires_callable() -> None:
    with pytest.raises(TypeError, match="view function"):
        Canary().split(new="nope")  # type: ignore[arg-type]


@pytest.mark.server
def test_split_view_under_gunicorn_is_sticky_across_workers() -> None:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from ..servers import free_port, gunicorn, serve

    port = free_port()
    with serve(gunicorn("tests.apps.flask_split:app", port), port, ready_path="/stats") as base:

        def user(i: int) -> tuple[set[str], set[str]]:
            with httpx.Client(base_url=base, timeout=10) as c:
                about = c.get("/about")  # not split: no cohort, whichever worker answers
                assert "set-cookie" not in about.headers and "vary" not in about.headers
                seen, pids = set(), set()
                for _ in range(4):
                    version, name, variant, pid = c.get(f"/greet/u{i}").text.split()
                    assert name == f"u{i}"
                    assert (version, variant) in (("v1", "old"), ("v2", "new"))
                    seen.add(version)
                    pids.add(pid)
                return seen, pids

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(user, range(80)))
    assert all(len(seen) == 1 for seen, _ in results)
    assert len({p for _, pids in results for p in pids}) == 2
    assert 0 < sum("v2" in seen for seen, _ in results) < 80
