"""A real browser (headless Chromium) against both examples, each under its real server.

What only a browser can tell: that it accepts the cohort cookie as sent (attributes and
all), keeps it, sends it back on reloads and same-origin fetches, hides it from page
scripts (HttpOnly), and that the promises of the rollout hold for it: sticky at 50%,
everyone back on blue at 0% (the cookie kept), and everyone back on their own colour when
the percent is raised again.

Needs Chromium (Debian: ``apt-get install chromium``, or ``CHROMIUM=/path/to/chrome``)
and the ``playwright`` package (in the ``dev`` extra), which drives it without
downloading a browser of its own. Without Chromium these tests skip, unless
``CANARYMW_REQUIRE_BROWSER=1`` is set, as ``.ci/run`` does: then they fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from canarymw import Rollout

from ..servers import ROOT, free_port, serve
from ._chromium import chromium_or_skip

KEY = "browser-test-key-0123456789abcdef"
USERS = 16
COLOUR = {"old": "Blue", "new": "Green"}
CHROMIUM = chromium_or_skip()
sync_api = pytest.importorskip("playwright.sync_api")


@contextmanager
def example(kind: str, percent: int, port: int) -> Iterator[str]:
    """The example app ``kind`` under its real server with 2 workers, at ``percent``."""
    if kind == "flask":
        argv = [
            "gunicorn",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "--chdir",
            str(ROOT / "examples" / "flask_app"),
        ]
        argv += ["--log-level", "warning", "app:app"]
    else:
        argv = ["uvicorn", "app:app", "--app-dir", str(ROOT / "examples" / "starlette_app"), "--workers", "2"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {"CANARY_KEY": KEY, "CANARY_PERCENT": str(percent)}
    with serve(argv, port, env=env, ready_path="/healthz", timeout=30) as base:
        yield base


def colours(pages: list[Any], base: str, reloads: int) -> list[str]:
    """Each user's colour over ``reloads`` page loads and one same-origin fetch; one per user."""
    out = []
    for page in pages:
        seen = {page.goto(f"{base}/").text().strip() for _ in range(reloads)}
        seen.add(page.evaluate("fetch('/').then(r => r.text())").strip())
        assert len(seen) == 1, seen  # sticky, whichever worker answered
        (text,) = seen
        out.append(text.removeprefix("Hello, ").removesuffix(" World!"))
    return out


@pytest.mark.server
@pytest.mark.parametrize("kind", ["flask", "starlette"])
def test_a_real_browser_keeps_its_colour_through_ramp_down_and_up(kind: str) -> None:
    port = free_port()  # one origin for all three servers: the browser's cookies are per host
    rollout = Rollout("hello-v2", percent=50, secret_key=KEY)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            contexts = [browser.new_context() for _ in range(USERS)]  # one browser profile per user
            pages = [context.new_page() for context in contexts]
            with example(kind, 50, port) as base:
                first = colours(pages, base, reloads=3)
                hidden = [page.evaluate("document.cookie") for page in pages]
            jars = [context.cookies() for context in contexts]
            with example(kind, 0, port) as base:
                off = colours(pages, base, reloads=2)
            with example(kind, 50, port) as base:
                again = colours(pages, base, reloads=2)
            assert [context.cookies() for context in contexts] == jars  # never re-issued
        finally:
            browser.close()

    assert {"Blue", "Green"} <= set(first)  # 16 users at 50%: both colours (all alike: p = 3e-5)
    assert off == ["Blue"] * USERS  # 0% sends everyone back at once
    assert again == first  # and raising the percent again gives everyone their own colour back
    now = time.time()
    for jar, colour, script_view in zip(jars, first, hidden, strict=True):
        (cookie,) = jar
        assert cookie["name"] == "canarymw" and cookie["path"] == "/"
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax" and cookie["secure"] is False
        assert abs(cookie["expires"] - (now + 30 * 24 * 3600)) < 3600  # Max-Age: 30 days
        assert "canarymw" not in script_view  # page scripts cannot read it
        # The colour the frozen hash gives this cookie, computed here from the cookie alone.
        decision = rollout.decide(f"canarymw={cookie['value']}")
        assert decision.set_cookie is None and COLOUR[decision.variant] == colour
