"""The admin's HTML pages through ``Admin.handle``: what an operator sees and submits.

Stores are seeded as a process would seed them (``on_start``), guarded with
``canarymw.guard.start`` and given counters with ``add_counts``. Pages are parsed with
``html.parser``: the structure a browser and a screen reader rely on is checked on
every page, and so is what the admin's CSP forbids (inline styles, scripts).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from canarymw.admin import Admin, BasicAuth, Role, _pages
from canarymw.guard import Guard, start
from canarymw.store import WINDOW, Action, Counts, MemoryStore, on_start, operate

KEY = "admin-pages-secret-0123456789abcdef"
USERS: dict[str, tuple[str, Role]] = {
    "alice": ("alice-password-1234", "operate"),
    "bob": ("bob-password-12345", "read"),
}
ROOT = "/canary"
HOSTILE = "<script>alert('name')</script>&\"x\""
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# -- building a store ---------------------------------------------------------------------
def seed(store: MemoryStore, name: str, percent: float) -> None:
    seeded = on_start(name, None, percent)
    assert seeded is not None
    store.write(name, 0, *seeded)


def act(
    store: MemoryStore, name: str, action: Action, *, by: str, reason: str, percent: float | None = None
) -> None:
    current = store.read([name])[name]
    state, change = operate(name, current, action, by=by, reason=reason, percent=percent)
    store.write(name, current.version, state, change)


def guard(store: MemoryStore, name: str) -> None:
    current = store.read([name])[name]
    state, change = start(Guard(steps=(10, 50, 100), bake=60, min_requests=50), name, current, time.time())
    store.write(name, current.version, state, change)


def traffic(store: MemoryStore, name: str, windows: int = 6, new_errors: int = 3) -> None:
    """``windows`` closed windows of counters: old 100 requests (1 error), new 40."""
    now = int(time.time() // WINDOW * WINDOW)
    counts = []
    for k in range(1, windows + 1):
        at = now - k * WINDOW
        counts.append(
            Counts(name, "old", at, requests=100, errors=1, latency_sum=5.0, buckets={200: 60, 210: 40})
        )
        counts.append(
            Counts(name, "new", at, requests=40, errors=new_errors, latency_sum=3.0, buckets={220: 40})
        )
    store.add_counts(counts)


@pytest.fixture
def store() -> MemoryStore:
    store = MemoryStore()
    seed(store, "plain-v2", 25)
    traffic(store, "plain-v2")
    seed(store, "guarded-v2", 0)
    guard(store, "guarded-v2")
    traffic(store, "guarded-v2", new_errors=12)
    seed(store, "quiet-v2", 5)
    return store


@pytest.fixture
def admin(store: MemoryStore) -> Admin:
    return Admin(store, auth=BasicAuth(USERS), secret_key=KEY)


# -- requests -------------------------------------------------------------------------------
def auth(user: str) -> tuple[str, str]:
    token = base64.b64encode(f"{user}:{USERS[user][0]}".encode()).decode()
    return ("Authorization", f"Basic {token}")


@dataclass
class Page:
    status: int
    headers: dict[str, str]
    text: str
    tags: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    words: str = ""

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def forms(self) -> dict[str, dict[str, str]]:
        """Each form's fields (hidden and visible, with their values), by its action field."""
        out: dict[str, dict[str, str]] = {}
        current: dict[str, str] | None = None
        for tag, attrs in self.tags:
            if tag == "form":
                current = {"@action": attrs["action"], "@method": attrs["method"]}
            elif tag == "/form" and current is not None:
                out[current["action"]] = current
                current = None
            elif tag == "input" and current is not None:
                current[attrs["name"]] = attrs.get("value", "")
        return out


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.words: list[str] = []
        self.open: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))  # <line/> in SVG: no end tag

    def handle_endtag(self, tag: str) -> None:
        self.tags.append(("/" + tag, {}))
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()

    def handle_data(self, data: str) -> None:
        self.words.append(data)


def parse(status: int, headers: list[tuple[str, str]], body: bytes) -> Page:
    text = body.decode()
    page = Page(status, {k.lower(): v for k, v in headers}, text)
    if page.headers.get("content-type", "").startswith("text/html"):
        parser = _Parser()
        parser.feed(text)
        parser.close()
        assert not parser.errors and not parser.open, (parser.errors, parser.open)
        page.tags = parser.tags
        page.words = " ".join(" ".join(parser.words).split())
        check_structure(page)
    return page


def get(admin: Admin, path: str, user: str | None = "alice", **query: str) -> Page:
    headers = [auth(user)] if user else []
    r = admin.handle("GET", path, query=urlencode(query), headers=headers, root=ROOT)
    return parse(r.status, r.headers, r.body)


def post(admin: Admin, fields: dict[str, str], user: str = "alice") -> Page:
    body = urlencode({k: v for k, v in fields.items() if not k.startswith("@")}).encode()
    headers = [auth(user), ("Content-Type", "application/x-www-form-urlencoded")]
    r = admin.handle("POST", "/action", headers=headers, body=body, root=ROOT)
    return parse(r.status, r.headers, r.body)


def follow(admin: Admin, page: Page, user: str = "alice") -> Page:
    assert page.status == 303, page.text
    location = urlsplit(page.headers["location"])
    assert location.path == f"{ROOT}/rollout"
    query = {k: v[-1] for k, v in parse_qs(location.query).items()}
    return get(admin, "/rollout", user, **query)


# -- what every page must be ----------------------------------------------------------------
def check_structure(page: Page) -> None:
    """Valid enough for a browser and a screen reader, and within the admin's CSP."""
    assert page.text.startswith("<!doctype html>")
    assert page.find("html", lang="en")
    assert len(page.find("main")) == 1 and len(page.find("h1")) == 1
    assert page.find("meta", charset="utf-8") and page.find("title")
    levels = [int(t[1]) for t, _ in page.tags if re.fullmatch(r"h[1-6]", t)]
    assert levels[0] == 1 and all(b <= a + 1 for a, b in itertools.pairwise(levels)), levels
    ids = [a["id"] for _, a in page.tags if "id" in a]
    assert len(ids) == len(set(ids)), ids
    labels = {a.get("for") for a in page.find("label")}
    for attrs in page.find("input"):
        assert attrs["type"] == "hidden" or attrs.get("id") in labels, attrs
    # The CSP: default-src 'none'; style-src 'self': no inline style, no script, nothing foreign.
    for tag, attrs in page.tags:
        assert tag not in ("script", "style", "iframe", "object", "img"), tag
        assert "style" not in attrs and not any(k.startswith("on") for k in attrs), (tag, attrs)
        for key in ("href", "src", "action"):
            url = attrs.get(key, "")
            assert not url or url.startswith(ROOT + "/"), (tag, key, url)
    assert "<script" not in page.text.lower()
    assert page.find("link", rel="stylesheet", href=f"{ROOT}/static/admin.css")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"


# -- the list -------------------------------------------------------------------------------
def test_the_index_lists_every_rollout_with_a_link_state_and_numbers(admin: Admin) -> None:
    page = get(admin, "/")

    assert page.status == 200
    links = {a["href"] for a in page.find("a")}
    for name in ("plain-v2", "guarded-v2", "quiet-v2"):
        assert f"{ROOT}/rollout?name={name}" in links
    assert "25% not guarded" in page.words  # percent, then stage
    assert "ramping" in page.words and "no guard" in page.words
    assert "600 / 240" in page.words  # requests old / new over the window
    assert "Signed in as alice" in page.words


def test_the_index_without_rollouts_says_how_they_appear() -> None:
    page = get(Admin(MemoryStore(), auth=BasicAuth(USERS), secret_key=KEY), "/")

    assert page.status == 200 and "no rollouts yet" in page.words
    assert not page.find("table")


# -- one rollout ------------------------------------------------------------------------------
def test_an_unguarded_rollout_shows_its_state_numbers_and_audit_log(admin: Admin, store: MemoryStore) -> None:
    act(store, "plain-v2", "set", by="carol", reason="ramp to 30", percent=30)
    page = get(admin, "/rollout", name="plain-v2")

    assert page.status == 200
    assert "Percent on new 30%" in page.words
    assert "Stage not guarded" in page.words and "Paused no" in page.words and "Version 2" in page.words
    assert "no guard judges this rollout" in page.words
    # Per variant: requests, errors, error rate, p50, p95, p99.
    assert re.search(r"old 600 6 1\.00% [\d.]+ ms [\d.]+ ms [\d.]+ ms", page.words), page.words
    assert re.search(r"new 240 18 7\.50% [\d.]+ ms [\d.]+ ms [\d.]+ ms", page.words)
    # Blended at 30% (0.3 * 92.5% + 0.7 * 99%) beside the measured rate (816 / 840).
    assert "Blended success estimate at 30% on new: 97.05%" in page.words
    assert "measured success rate: 97.14%" in page.words
    # The audit log, newest first, with who, what, from and to, and why.
    assert "carol set 25% → 30% no 2 ramp to 30" in page.words
    assert page.words.index("ramp to 30") < page.words.index("seeded from the percent in code")


def test_a_guarded_rollout_shows_its_stage_verdict_and_intervals(admin: Admin) -> None:
    report = admin.handle("GET", "/api/rollout", query="name=guarded-v2", headers=[auth("alice")])
    guard_report = json.loads(report.body)["rollouts"]["guarded-v2"]["guard"]
    page = get(admin, "/rollout", name="guarded-v2")

    assert "Stage ramping" in page.words and "Percent on new 10%" in page.words
    assert guard_report["sentence"] and guard_report["sentence"] in page.words
    assert f"{guard_report['decision']} {guard_report['sentence']}" in page.words
    assert guard_report["outlook"] in page.words
    caption = "Blended success estimate with its 95% interval."
    assert caption in page.words
    # now, the next step and 100%, each with low, estimate and high
    assert re.search(r"now 10% [\d.]+% [\d.]+% [\d.]+% at the next step 50%", page.words)
    assert re.search(r"at 100% 100% [\d.]+% [\d.]+% [\d.]+%", page.words)


def test_hostile_names_reasons_and_operators_are_escaped(store: MemoryStore, admin: Admin) -> None:
    seed(store, HOSTILE, 40)
    act(store, HOSTILE, "pause", by="<b>mallory</b>", reason="<img src=x onerror=alert(1)>")

    for page in (get(admin, "/"), get(admin, "/rollout", name=HOSTILE)):
        assert page.status == 200
        assert "<script>" not in page.text and "<img" not in page.text and "<b>mallory" not in page.text
        assert "&lt;script&gt;alert(&#x27;name&#x27;)&lt;/script&gt;&amp;&quot;x&quot;" in page.text
        assert HOSTILE in page.words  # and the reader sees it as it was written
    detail = get(admin, "/rollout", name=HOSTILE)
    assert "<img src=x onerror=alert(1)>" in detail.words and "<b>mallory</b>" in detail.words
    assert detail.forms()["pause"]["name"] == HOSTILE  # the hidden field round-trips the name
    index = get(admin, "/")
    assert {"href": f"{ROOT}/rollout?" + urlencode({"name": HOSTILE})} in index.find("a")
    # A forged "done" in the URL is never echoed.
    forged = get(admin, "/rollout", name="plain-v2", done="<script>x</script>")
    assert not forged.find("p", role="status") and "<script>" not in forged.text


def test_the_read_role_sees_everything_but_no_form(admin: Admin) -> None:
    page = get(admin, "/rollout", "bob", name="plain-v2")

    assert page.status == 200 and "Percent on new 25%" in page.words
    assert not page.find("form") and not page.find("input") and not page.find("button")
    assert "You may look but not change this rollout" in page.words
    assert (
        post(admin, {"name": "plain-v2", "action": "rollback", "expected_version": "1"}, "bob").status == 403
    )


def test_the_operate_role_gets_a_form_per_control_against_the_shown_version(admin: Admin) -> None:
    page = get(admin, "/rollout", name="plain-v2")
    forms = page.forms()

    assert set(forms) == {"set", "promote", "rollback", "pause", "resume", "reset"}
    tokens = {f["csrf"] for f in forms.values()}
    assert len(tokens) == 1 and len(tokens.pop()) >= 32
    for action, fields in forms.items():
        assert fields["@method"] == "post" and fields["@action"] == f"{ROOT}/action"
        assert fields["name"] == "plain-v2" and fields["action"] == action
        assert fields["expected_version"] == "1" and "reason" in fields
    percent = page.find("input", name="percent")[0]
    assert percent["type"] == "number" and (percent["min"], percent["max"], percent["step"]) == (
        "0",
        "100",
        "any",
    )
    assert page.find("label", **{"for": "set-percent"}) and page.find("label", **{"for": "rollback-reason"})
    assert len(page.find("button")) == 6

    # A submitted form: 303 to the rollout, which says what was done and shows it.
    form = forms["set"] | {"percent": "42.5", "reason": "halfway"}
    after = follow(admin, post(admin, form))
    assert after.find("p", role="status") and "Percent set. The rollout is now at 42.5% on new" in after.words
    assert "Percent on new 42.5%" in after.words and "Version 2" in after.words
    assert "alice set 25% → 42.5% no 2 halfway" in after.words
    assert {f["expected_version"] for f in after.forms().values()} == {"2"}


def test_a_stale_form_gets_409_and_changes_nothing(admin: Admin, store: MemoryStore) -> None:
    forms = get(admin, "/rollout", name="plain-v2").forms()

    first = post(admin, forms["rollback"])
    assert first.status == 303
    second = post(admin, forms["set"] | {"percent": "80"})  # made against version 1 too

    assert second.status == 409
    assert second.find("h1") and "409 Conflict: the page was stale" in second.words
    assert "is at version 2, not 1" in second.words  # the store's sentence
    assert "It is now at version 2" in second.words
    assert {"href": f"{ROOT}/rollout?name=plain-v2"} in second.find("a")
    assert "Reload plain-v2" in second.words
    assert store.read(["plain-v2"])["plain-v2"].percent == 0  # the rollback stands
    after = follow(admin, first)
    assert "Rolled back. The rollout is now at 0% on new (version 2)" in after.words
    assert after.words.count("alice rollback") == 1 and "alice set" not in after.words


def test_the_charts_are_labelled_svg_with_a_table_of_their_numbers(admin: Admin, store: MemoryStore) -> None:
    act(store, "plain-v2", "rollback", by="alice", reason="errors")
    page = get(admin, "/rollout", name="plain-v2")

    charts = [a for a in page.find("svg") if a.get("class") == "chart"]
    assert [c["id"] for c in charts] == ["chart-requests", "chart-errors", "chart-p95"]
    for chart in charts:
        assert chart["role"] == "img" and chart["aria-label"] and chart["viewbox"].startswith("0 0 ")
        assert chart["aria-describedby"] == chart["id"] + "-d" and page.find("desc", id=chart["id"] + "-d")
    assert len(page.find("title")) >= 1 + 3  # the page's and each chart's
    assert len(page.find("polyline")) == 6  # old and new on each chart
    assert page.words.count("time (UTC)") == 3
    assert (
        "Requests per 10-second window: old: 600 in all, latest 100, highest 100; new: 240 in all"
        in page.words
    )
    assert "changes marked" in page.words and page.find("g", **{"class": "change"})  # the rollback, drawn
    # The numbers behind the charts: one row per window, newest first.
    assert page.find("details") and "The charts' numbers as a table" in page.words
    rows = re.findall(r"\d\d:\d\d:\d\d 100 40 1 3 [\d.]+ ms [\d.]+ ms", page.words)
    assert len(rows) == 6


def test_a_rollout_without_traffic_says_so_instead_of_empty_charts(admin: Admin) -> None:
    page = get(admin, "/rollout", name="quiet-v2")

    assert page.status == 200 and "No traffic recorded in the last 60 minutes" in page.words
    assert not [a for a in page.find("svg") if a.get("class") == "chart"]
    assert "old 0 0 n/a n/a n/a n/a" in page.words


def test_the_stylesheet_is_served_as_css(admin: Admin) -> None:
    r = admin.handle("GET", "/static/admin.css", headers=[auth("bob")], root=ROOT)

    assert r.status == 200 and r.body == _pages.CSS
    assert dict(r.headers)["Content-Type"] == "text/css; charset=utf-8"
    css = r.body.decode()
    assert ":focus-visible" in css and "outline" in css  # a visible keyboard focus
    assert "@import" not in css and "url(" not in css  # nothing from elsewhere


@pytest.mark.parametrize(
    ("path", "query", "user", "status", "says"),
    [
        ("/", {}, None, 401, "authentication required"),
        ("/rollout", {"name": "nope"}, "alice", 404, "no rollout 'nope'"),
        ("/nowhere", {}, "alice", 404, "'/nowhere'"),
        ("/rollout", {}, "alice", 400, "name"),
    ],
)
def test_problems_get_a_page_of_their_own(
    admin: Admin, path: str, query: dict[str, str], user: str | None, status: int, says: str
) -> None:
    page = get(admin, path, user, **query)

    assert page.status == status and says in page.words
    assert page.find("p", role="alert") and page.find("h1")
    assert ("All rollouts" in page.words) == (status != 401)  # a 401 page has nothing to go back to


def test_every_page_links_an_icon_the_admin_serves() -> None:
    from canarymw.admin import Admin, BasicAuth
    from canarymw.store import MemoryStore

    admin = Admin(
        MemoryStore(), auth=BasicAuth({"alice": ("correct horse battery", "read")}), secret_key="k" * 32
    )
    auth = [("Authorization", "Basic " + base64.b64encode(b"alice:correct horse battery").decode())]
    page = admin.handle("GET", "/", headers=auth, root="/canary").body.decode()
    assert '<link rel="icon" type="image/svg+xml" href="/canary/static/icon.svg">' in page
    icon = admin.handle("GET", "/static/icon.svg", headers=auth, root="/canary")
    assert icon.status == 200 and ("Content-Type", "image/svg+xml") in icon.headers
    assert icon.body.startswith(b"<svg") and b"<script" not in icon.body


def test_a_rollout_with_shadow_traffic_shows_its_mismatch_rate_apart_from_the_variants(
    admin: Admin, store: MemoryStore
) -> None:
    assert not get(admin, "/rollout", name="plain-v2").find("h3", id="shadow")  # none yet
    at = time.time() - WINDOW
    # Comparisons as a StoreSink counts them: copies, mismatches, failures, drops.
    store.add_counts(
        [
            Counts(
                "plain-v2",
                "shadow",
                at,
                requests=50,
                errors=9,
                exceptions=2,
                disconnects=4,
                buckets={230: 44},
            )
        ]
    )
    page = get(admin, "/rollout", name="plain-v2")
    assert page.status == 200 and page.find("h3", id="shadow")
    assert "Mismatch rate: 20.45% (9 of 44 compared copies differ" in page.words
    assert "2 copies failed or timed out and 4 were dropped" in page.words
    # The copies are not traffic: the variant table still lists old and new only.
    table = page.words[page.words.index("Per variant, over the last") : page.words.index("Success rate")]
    assert " old " in table and " new " in table and "shadow" not in table.lower()
