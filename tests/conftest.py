from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest

import canarymw.asgi
import canarymw.wsgi
from canarymw import Rollout

from .harness import KITS, ASGIKit, WSGIKit

KEY = "test-secret-key-0123456789abcdef"


def use_wsgi_impl(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the WSGI adapter through one implementation of its response path:
    ``compiled`` (canarymw._speedups, the default when it was built) or ``python``."""
    if name == "python":
        monkeypatch.setattr(canarymw.wsgi, "_respond", canarymw.wsgi._respond_py)
        monkeypatch.setenv("CANARYMW_NO_EXTENSIONS", "1")  # for servers started by the test
    elif canarymw.wsgi._respond is canarymw.wsgi._respond_py:
        pytest.skip("canarymw._speedups was not built (test_speedups_are_built says why)")


def use_asgi_impl(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve ASGI HTTP requests through the compiled request path (the default when it
    was built) or the Python one (``__call__`` and ``_Exchange``). Middlewares read the
    switch when they are built and on every request."""
    if name == "python":
        monkeypatch.setattr(canarymw.asgi, "_router", None)
        monkeypatch.setenv("CANARYMW_NO_EXTENSIONS", "1")  # for servers started by the test
    elif canarymw.asgi._router is None:
        pytest.skip("canarymw._speedups was not built (test_speedups_are_built says why)")


@pytest.fixture(params=sorted(KITS))
def kit(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> WSGIKit | ASGIKit:
    """The adapter under test: every behavioural test runs once per adapter and
    implementation (``wsgi``/``asgi``: compiled parts where built; ``*-python``)."""
    if request.param == "asgi" and importlib.util.find_spec("canarymw.asgi") is None:
        pytest.fail("canarymw.asgi is missing")
    impl = "python" if request.param.endswith("-python") else "compiled"
    if request.param.startswith("wsgi"):
        use_wsgi_impl(impl, monkeypatch)
    else:
        use_asgi_impl(impl, monkeypatch)
    return KITS[request.param]()


@pytest.fixture(params=["compiled", "python"])
def wsgi_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a WSGI test once per implementation of the adapter's response path."""
    use_wsgi_impl(request.param, monkeypatch)
    return str(request.param)


@pytest.fixture
def make_rollout() -> Callable[..., Rollout]:
    def make(percent: float = 50, **kw: Any) -> Rollout:
        kw.setdefault("secret_key", KEY)
        return Rollout(kw.pop("name", "hello-v2"), percent=percent, **kw)

    return make


@pytest.fixture(params=["compiled", "python"])
def asgi_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs an ASGI test once per implementation of the HTTP request path."""
    use_asgi_impl(request.param, monkeypatch)
    return str(request.param)
