"""A real browser (headless Chromium) drives the admin page of a rollout under gunicorn.

The app (``tests/apps/admin_app.py``) routes a guarded rollout held at 50% and mounts
the admin at ``/canary`` behind basic auth, on a SQLite store, with 2 workers. The
browser logs in, reads the state, clicks "Roll back", and sees the percent, the stage,
the verdict, the audit log and the charts change; fresh clients of the app then all get
``old``. axe-core, run in the page, finds no serious or critical violation on the list
or the rollout's page, before or after the click; the pages keep their CSP and log no
console error. A screenshot of the page after the rollback is kept as an artefact
(``CANARYMW_ARTIFACTS=DIR`` copies it there).

Needs Chromium and the ``playwright`` and ``axe-playwright-python`` packages (the
``dev`` extra); like ``test_browser.py``, it skips without Chromium unless
``CANARYMW_REQUIRE_BROWSER=1`` is set.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx
import pytest

from canarymw.store import open_store

from ..servers import free_port, gunicorn, serve
from ._chromium import chromium_or_skip

NAME = "admin-v2"
PASSWORD = "alice-browser-password-0123"
CHROMIUM = chromium_or_skip()
sync_api = pytest.importorskip("playwright.sync_api")
axe_playwright = pytest.importorskip("axe_playwright_python.sync_playwright")

pytestmark = pytest.mark.server


def fresh_visits(base: str, count: int) -> dict[str, int]:
    """``count`` requests from new visitors (no cookie, a new connection each): variants seen."""
    seen: dict[str, int] = {}
    # A jar that keeps nothing: every request is a visitor the rollout has never seen.
    with httpx.Client(timeout=10, cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[]))) as client:
        for _ in range(count):
            r = client.get(base + "/", headers={"Connection": "close"})
            assert r.status_code == 200, r.text
            variant = r.headers["x-variant"]
            seen[variant] = seen.get(variant, 0) + 1
    return seen


def wait_until(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def serious(page: Any) -> list[str]:
    """axe-core's serious and critical violations on ``page``, one line each."""
    # axe is evaluated through the DevTools protocol, which the page's CSP (no script at
    # all) does not govern: no bypass_csp needed, so the CSP stays in force for the test.
    results = axe_playwright.Axe().run(page)
    found = [f"{v['id']} ({v['impact']})" for v in results.response["violations"]]
    print(f"axe on {page.url}: {len(found)} violation(s) {found}")
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']]}"
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def test_an_operator_rolls_back_from_the_admin_page_and_traffic_follows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    port = free_port()
    env = {"CANARYMW_TEST_STORE": url, "CANARYMW_TEST_NAME": NAME, "CANARYMW_TEST_ADMIN_PASSWORD": PASSWORD}
    store = open_store(url)
    errors: list[str] = []
    shots: list[str] = []
    with serve(
        gunicorn("tests.apps.admin_app:app", port), port, env=env, ready_path="/canary/", timeout=30
    ) as base:
        # The guard puts the rollout at its first step, 50%; then traffic for the charts.
        wait_until("the guard's first step", lambda: _stage(store) == "ramping", 20)
        before = fresh_visits(base, 200)
        assert before.get("old", 0) > 40 and before.get("new", 0) > 40, before
        wait_until(
            "the counters in the store",
            lambda: sum(c.requests for c in store.read_counts([NAME], time.time() - 600)) >= 200,
            10,
        )

        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                context = browser.new_context(
                    http_credentials={"username": "alice", "password": PASSWORD},
                    viewport={"width": 1280, "height": 900},
                )
                page = context.new_page()
                page.on("console", lambda m: _console(m, errors))
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))

                # The list: behind auth, with its CSP, the rollout at 50%.
                response = page.goto(f"{base}/canary/")
                assert response is not None and response.status == 200
                csp = response.headers["content-security-policy"]
                assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
                assert "unsafe-inline" not in csp and "script-src" not in csp
                row = page.get_by_role("row").filter(has=page.get_by_role("link", name=NAME))
                assert "50%" in row.inner_text() and "ramping" in row.inner_text()
                assert serious(page) == []

                # The rollout: state, verdict, charts with the traffic just sent.
                page.get_by_role("link", name=NAME).click()
                page.wait_for_url(re.compile(r"/canary/rollout\?name="))
                assert page.locator("#percent").inner_text() == "50%"
                assert page.locator("#stage").inner_text() == "ramping"
                verdict_before = page.locator("#verdict").inner_text()
                assert "judged now" in verdict_before
                chart = page.locator("#chart-requests")
                assert chart.get_attribute("role") == "img" and chart.get_attribute("aria-label")
                for variant in ("old", "new"):  # a line, or a dot while the traffic fits one window
                    assert chart.locator(f'g.series[data-variant="{variant}"] > *').count() >= 1
                marked_before = chart.locator("g.change").all_text_contents()  # the seed and the guard
                assert marked_before and not any("rollback" in m for m in marked_before)
                assert page.locator("#chart-p95").is_visible()
                shots.append(_screenshot(page, tmp_path / "admin-before-rollback.png"))
                assert serious(page) == []

                # Roll back, with a reason, as an operator would.
                page.locator("#rollback-reason").fill("browser test: roll back")
                page.get_by_role("button", name="Roll back to 0%").click()
                page.wait_for_url(re.compile(r"done=rollback"))
                # The app follows: within a second or so of the write, every new visitor gets old.
                wait_until("every worker on old", lambda: fresh_visits(base, 20) == {"old": 20}, 5)
                followed = time.time() - store.read([NAME])[NAME].updated_at
                shots.append(_screenshot(page, tmp_path / "admin-after-rollback.png"))

                assert "Rolled back" in page.get_by_role("status").inner_text()
                assert page.locator("#percent").inner_text() == "0%"
                assert page.locator("#stage").inner_text() == "rolled-back"
                verdict_after = page.locator("#verdict").inner_text()
                assert verdict_after != verdict_before and "judged now" not in verdict_after
                assert "rolled back" in page.locator(".verdict").inner_text()  # what the guard does next
                marked = page.locator("#chart-requests g.change").all_text_contents()
                assert "rollback by alice" in marked[-1]  # the chart marks the click
                audit = page.get_by_role("region", name="Audit log").get_by_role("row").nth(1).inner_text()
                assert "alice" in audit and "rollback" in audit and "browser test: roll back" in audit
                assert serious(page) == []
            finally:
                browser.close()

        after = fresh_visits(base, 100)

    state = store.read([NAME])[NAME]
    store.close()
    assert after == {"old": 100}, after
    assert followed < 2, followed  # the workers read the store every 0.2 s
    assert (state.percent, state.stage, state.updated_by) == (0, "rolled-back", "alice")
    assert errors == [], errors
    print("\n".join(shots))
    print(f"every new visitor got old within {followed:.2f} s of the rollback's write")


def _stage(store: Any) -> str | None:
    state = store.read([NAME]).get(NAME)
    return None if state is None else state.stage


def _console(message: Any, errors: list[str]) -> None:
    # A browser asks for /favicon.ico by itself: that is the app's, not the admin's page.
    if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
        errors.append(f"console: {message.text} ({message.location.get('url')})")


def _screenshot(page: Any, path: Path) -> str:
    """A full-page screenshot at ``path``, copied to ``$CANARYMW_ARTIFACTS`` if set; says where."""
    page.screenshot(path=str(path), full_page=True)
    artefacts = os.environ.get("CANARYMW_ARTIFACTS")
    if not artefacts:
        return f"screenshot: {path}"
    Path(artefacts).mkdir(parents=True, exist_ok=True)
    return f"screenshot: {path} (copied to {shutil.copy(path, Path(artefacts) / path.name)})"
