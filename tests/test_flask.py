from __future__ import annotations

import logging
from typing import Any

import pytest
from flask import Flask, render_template_string

from canarymw import MemorySink, Rollout
from canarymw.flask import Canary, CanaryLogFilter, current_variant

from .harness import RecordingSink

# Every test here runs against both implementations of the adapter's response path.
pytestmark = pytest.mark.usefixtures("wsgi_impl")

KEY = "test-secret-key-0123456789abcdef"


def make_app(percent: float = 50, **config: Any) -> tuple[Flask, Canary, RecordingSink]:
    app = Flask(__name__)
    app.config.update(CANARYMW_NAME="hello-v2", CANARYMW_PERCENT=percent, CANARYMW_SECRET_KEY=KEY, **config)
    sink = RecordingSink()
    canary = Canary(sink=sink)
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

    return app, canary, sink


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
    app, _, _ = make_app(100)
    logger = logging.getLogger("test.canary")
    logger.addFilter(CanaryLogFilter())

    @app.route("/log")
    def log_view() -> str:
        logger.warning("inside")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="test.canary"):
        app.test_client().get("/log", buffered=True)
        logger.warning("outside")
    variants = [getattr(r, "canary_variant", None) for r in caplog.records]
    assert variants == ["new", "-"]


def test_split_requires_callable() -> None:
    with pytest.raises(TypeError, match="view function"):
        Canary().split(new="nope")  # type: ignore[arg-type]


@pytest.mark.server
def test_split_view_under_gunicorn_is_sticky_across_workers() -> None:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from .servers import free_port, gunicorn, serve

    port = free_port()
    with serve(gunicorn("tests.apps.flask_split:app", port), port, ready_path="/stats") as base:

        def user(i: int) -> tuple[set[str], set[str]]:
            with httpx.Client(base_url=base, timeout=10) as c:
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
