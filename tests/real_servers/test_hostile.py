"""Hostile input through real servers: where the behaviour depends on the server (what
gunicorn puts in ``RAW_URI``, how uvicorn splits headers), the attacks of
``adapters/test_hostile.py`` are also sent through one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from ..attacks import TOKEN, forged_values
from ..servers import free_port, gunicorn, serve


# -- the same attacks through real servers ----------------------------------------------
@pytest.fixture
def hostile_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """gunicorn (WSGI) or uvicorn (ASGI), one worker, hostile.py's apps."""
    kind = request.param
    port = free_port()
    if kind == "gunicorn":
        argv = gunicorn("tests.apps.hostile:wsgi", port, workers=1)
    else:
        argv = ["uvicorn", "tests.apps.hostile:asgi", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--log-level", "warning", "--no-access-log"]
    with serve(argv, port, ready_path="/_state") as base:
        yield base


SERVERS = ["gunicorn", "uvicorn"]


@pytest.mark.server
@pytest.mark.parametrize("hostile_server", SERVERS, indirect=True)
def test_served_force_token_never_reaches_the_app(hostile_server: str) -> None:
    with httpx.Client(base_url=hostile_server, timeout=10) as client:
        seen = client.get(
            f"/f/page?a=1&canarymw_force=new:{TOKEN}&b=2", headers={"X-Canarymw-Force": f"old:{TOKEN}"}
        ).json()
    assert seen["reason"] == "forced" and seen["variant"] == "old"  # the header is read first
    assert seen["force_header"] is None and seen["query"] == "a=1&b=2"
    assert TOKEN not in json.dumps(seen)


@pytest.mark.server
@pytest.mark.parametrize("hostile_server", SERVERS, indirect=True)
def test_served_cookie_floods_stay_bounded(hostile_server: str) -> None:
    with httpx.Client(base_url=hostile_server, timeout=10) as client:
        first = client.get("/page")
        valid = first.headers["set-cookie"].split(";", 1)[0]
        client.cookies.clear()
        before = client.get("/_state").json()
        for i in range(300):  # a fresh 7 KB junk neighbour each time
            r = client.get("/page", headers={"Cookie": f"junk{i}={'x' * 7_000}; {valid}"})
            assert r.status_code == 200 and "set-cookie" not in r.headers
        stuffed = client.get("/page", headers={"Cookie": f"{forged_values(120)}; {valid}"})
        after = client.get("/_state").json()
    assert stuffed.status_code == 200 and "set-cookie" in stuffed.headers  # reassigned, not an error
    assert after["header_chars"] - before["header_chars"] < 300 * 100  # long headers are not cached
    assert after["counters"]["cookie_rejected"] - before["counters"]["cookie_rejected"] == 1
    assert after["counters"]["assigned"] - before["counters"]["assigned"] == 1
