from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest

from canarymw import Rollout

from .harness import KITS, ASGIKit, WSGIKit

KEY = "test-secret-key-0123456789abcdef"


@pytest.fixture(params=sorted(KITS))
def kit(request: pytest.FixtureRequest) -> WSGIKit | ASGIKit:
    """The adapter under test: every behavioural test runs once per adapter. The whole
    suite runs once per build (compiled, then ``CANARYMW_NO_EXTENSIONS=1``); servers
    started by a test inherit the environment, so they run the same build."""
    if request.param == "asgi" and importlib.util.find_spec("canarymw.asgi") is None:
        pytest.fail("canarymw.asgi is missing")
    return KITS[request.param]()


@pytest.fixture
def make_rollout() -> Callable[..., Rollout]:
    def make(percent: float = 50, **kw: Any) -> Rollout:
        kw.setdefault("secret_key", KEY)
        return Rollout(kw.pop("name", "hello-v2"), percent=percent, **kw)

    return make
