"""Shadow configuration: bad values fail at construction, in a sentence."""

from __future__ import annotations

from typing import Any

import pytest

from canarymw import Rollout, Shadow, WSGICanaryMiddleware
from canarymw.shadow import DEFAULT_HEADERS

from ..conftest import KEY
from .apps import make_app


def test_the_defaults() -> None:
    shadow = Shadow(make_app("wsgi"))
    assert shadow.methods == {"GET", "HEAD"} and shadow.when is None and shadow.primary == "old"
    assert (shadow.queue_size, shadow.concurrency, shadow.timeout) == (100, 4, 10.0)
    assert (shadow.max_body, shadow.max_request_body, shadow.samples) == (1 << 20, 64 * 1024, 20)
    assert shadow.headers == set(DEFAULT_HEADERS) == {"content-type", "location", "cache-control"}
    assert shadow.send_cohort_cookie is False and shadow.normalize is None
    assert Shadow(make_app("wsgi"), methods=["get", "Post"], headers=[" ETag "]).methods == {"GET", "POST"}
    assert Shadow(make_app("wsgi"), headers=["ETag"]).headers == {"etag"}
    assert repr(Shadow(make_app("wsgi"))).startswith("Shadow(<function")


@pytest.mark.parametrize(
    ("kw", "error", "words"),
    [
        pytest.param({"target": None}, TypeError, "needs a WSGI or ASGI app", id="no target"),
        pytest.param({"target": "http://x"}, TypeError, "needs a WSGI or ASGI app", id="url string"),
        pytest.param({"methods": "GET"}, TypeError, "pass a list", id="methods string"),
        pytest.param({"methods": []}, ValueError, "no methods", id="no methods"),
        pytest.param({"methods": ["GET /"]}, ValueError, "use names such as 'GET'", id="bad method"),
        pytest.param({"when": "yes"}, TypeError, "when=", id="when not callable"),
        pytest.param({"primary": "blue"}, ValueError, "'old', 'new' or 'both'", id="primary"),
        pytest.param({"queue_size": -1}, ValueError, "queue_size=-1", id="negative queue"),
        pytest.param({"queue_size": 1.5}, ValueError, "whole number", id="fractional queue"),
        pytest.param({"concurrency": 0}, ValueError, "at least 1", id="no concurrency"),
        pytest.param({"concurrency": True}, ValueError, "concurrency=True", id="bool concurrency"),
        pytest.param({"timeout": 0}, ValueError, "above 0", id="zero timeout"),
        pytest.param({"timeout": float("inf")}, ValueError, "finite", id="endless timeout"),
        pytest.param({"max_body": -1}, ValueError, "max_body", id="negative max_body"),
        pytest.param({"max_request_body": "1k"}, ValueError, "max_request_body", id="max_request_body"),
        pytest.param({"headers": "Content-Type"}, TypeError, "list of names", id="headers string"),
        pytest.param({"headers": ["Bad\nName"]}, ValueError, "ASCII names", id="bad header"),
        pytest.param({"normalize": 1}, TypeError, "normalize=", id="normalize"),
        pytest.param({"send_cohort_cookie": "no"}, TypeError, "True or False", id="cookie flag"),
        pytest.param({"samples": -2}, ValueError, "samples=-2", id="samples"),
    ],
)
def test_bad_settings_fail_at_construction(kw: dict[str, Any], error: type[Exception], words: str) -> None:
    target = kw.pop("target", make_app("wsgi"))
    with pytest.raises(error, match=words) as info:
        Shadow(target, **kw)
    assert str(info.value).startswith("Shadow") and str(info.value).endswith(".")


def test_a_shadow_of_a_shadow_is_refused() -> None:
    with pytest.raises(TypeError, match="another Shadow"):
        Shadow(Shadow(make_app("wsgi")))


def test_an_asgi_app_cannot_shadow_a_wsgi_middleware() -> None:
    with pytest.raises(TypeError, match="an ASGI app; shadow a WSGI app"):
        WSGICanaryMiddleware(
            make_app("wsgi"),
            new=None,
            rollout=Rollout("r", percent=0, secret_key=KEY),
            shadow=make_app("asgi"),
        )
