"""The admin's JSON API through ``Admin.handle()`` (sans-IO), on a MemoryStore and a SQLite file.

Every JSON response under ``/api/`` is checked against the OpenAPI document the admin
serves (its status documented for the operation, its body valid for the schema), and
every response of any kind for the security headers. Changes are checked in the store:
the state, the version and the audit entry with the operator's name and reason; refused
changes write nothing.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from canarymw.admin import Admin, BasicAuth, BearerAuth, CallableAuth, Principal, Request
from canarymw.admin._core import MAX_BODY, ROUTES
from canarymw.guard import Analysis, Guard, start
from canarymw.store import (
    OPERATOR_ACTIONS,
    Counts,
    MemoryStore,
    ProcessReport,
    RolloutState,
    Store,
    StoreUnavailable,
    on_start,
)
from canarymw.store._report import report
from canarymw.store.sqlite import SQLiteStore

NAME = "checkout-v2"
TOKEN = "operate-token-0123456789abcdef-0123456789"
READ_TOKEN = "read-token-0123456789abcdef-0123456789abc"
ALICE = ("alice", "alice-password-1234")
BOB = ("bob", "bob-password-123456")  # role read
KEY = "admin-test-secret-key-0123456789abcdef"

BEARER = f"Bearer {TOKEN}"
READER = f"Bearer {READ_TOKEN}"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


ALICE_BASIC = basic(*ALICE)
BOB_BASIC = basic(*BOB)
_MISSING: Any = object()


def default_auth() -> list[Any]:
    return [
        BearerAuth({TOKEN: ("deploy-bot", "operate"), READ_TOKEN: ("dashboard", "read")}),
        BasicAuth({ALICE[0]: (ALICE[1], "operate"), BOB[0]: (BOB[1], "read")}),
    ]


# -- the document's schemas, as a validator per operation and status ----------------------


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "components": doc["components"],
    }
    return jsonschema_rs.validator_for(root)


def _response_object(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any] | None:
    operation = doc["paths"].get(path, {}).get(method.lower())
    if operation is None:
        return None
    found = operation["responses"].get(str(status))
    assert found is not None, f"{method} {path} answered {status}, which its document does not list"
    if "$ref" in found:
        found = doc["components"]["responses"][found["$ref"].rsplit("/", 1)[1]]
    result: dict[str, Any] = found
    return result


SECURITY = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        got = self.all(name)
        return got[-1] if got else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        assert self.header("content-type") == "application/json", self.headers
        return json.loads(self.body)

    @property
    def error(self) -> str:
        data = self.json()
        assert data["status"] == self.status
        assert isinstance(data["error"], str) and data["error"].endswith("."), data
        result: str = data["error"]
        return result


def check_security_headers(reply: Reply) -> None:
    for name, value in SECURITY.items():
        assert reply.header(name) == value, (name, reply.headers)
    csp = reply.header("content-security-policy")
    assert csp is not None
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp


class Api:
    """An Admin on ``store`` and a way to call it that checks every answer."""

    def __init__(self, store: Store, auth: Any = None, **kw: Any) -> None:
        self.store = store
        self.admin = Admin(store, auth=default_auth() if auth is None else auth, secret_key=KEY, **kw)
        self.doc = self.admin.openapi("")
        self._validators: dict[tuple[str, str, int], Any] = {}

    def call(
        self,
        method: str,
        path: str,
        query: str = "",
        *,
        auth: str | None = BEARER,
        body: bytes = b"",
        json_body: Any = _MISSING,
        content_type: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Reply:
        sent: list[tuple[str, str]] = []
        if auth is not None:
            sent.append(("Authorization", auth))
        if json_body is not _MISSING:
            body = json.dumps(json_body).encode()
            content_type = content_type or "application/json"
        if content_type is not None:
            sent.append(("Content-Type", content_type))
        sent += headers
        reply = Reply(*self.admin.handle(method, path, query=query, headers=sent, body=body))
        check_security_headers(reply)
        if path.startswith("/api/"):
            self.conform(method, path, reply)
        return reply

    def conform(self, method: str, path: str, reply: Reply) -> None:
        """The answer is what the document says for the operation (or the error schema)."""
        assert reply.header("content-type") == "application/json"
        response = _response_object(self.doc, path, "GET" if method == "HEAD" else method, reply.status)
        if response is None:  # a path or method the document has not: still the error object
            assert reply.status in (401, 404, 405), (method, path, reply.status)
            schema: dict[str, Any] = {"$ref": "#/components/schemas/Error"}
        else:
            schema = response["content"]["application/json"]["schema"]
            for name, header in response.get("headers", {}).items():
                if header.get("required"):
                    assert reply.header(name), f"{name} missing from {reply.status} of {method} {path}"
        key = (path, method, reply.status)
        if key not in self._validators:
            self._validators[key] = _validator(self.doc, schema)
        if method != "HEAD":
            self._validators[key].validate(json.loads(reply.body))

    def state(self, name: str = NAME) -> RolloutState:
        return self.store.read([name])[name]

    def act(
        self,
        action: str,
        *,
        name: str = NAME,
        version: Any = _MISSING,
        auth: str | None = BEARER,
        headers: Sequence[tuple[str, str]] = (),
        **fields: Any,
    ) -> Reply:
        body = {"name": name, "action": action, **fields}
        body["expected_version"] = self.state(name).version if version is _MISSING else version
        return self.call("POST", "/api/action", auth=auth, json_body=body, headers=headers)


def seed(store: Store, name: str = NAME, percent: float = 10.0, now: float | None = None) -> RolloutState:
    made = on_start(name, None, percent, now=now)
    assert made is not None
    store.write(name, 0, *made)
    return made[0]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "state.db")
    seed(made)
    yield made
    made.close()


@pytest.fixture
def api(store: Store) -> Api:
    return Api(store)


def traffic(store: Store, name: str = NAME, windows: int = 6) -> None:
    """Closed counter windows of the last minute: old 1000 requests/2 errors, new 100/3."""
    now = int(time.time()) // 10 * 10
    counts = []
    for w in range(now - 10 * windows, now, 10):
        counts.append(Counts(name, "old", w, requests=1000, errors=2, latency_sum=12.0, buckets={60: 1000}))
        counts.append(Counts(name, "new", w, requests=100, errors=3, latency_sum=1.5, buckets={62: 100}))
    store.add_counts(counts)


# -- the document ----------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1_and_describes_every_api_route() -> None:
    import schemathesis
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    doc = Api(MemoryStore()).doc
    assert doc["openapi"] == "3.1.0"
    OPENAPI_31_VALIDATOR.validate(doc)
    schemathesis.openapi.from_dict(doc).validate()
    assert doc["servers"] == [{"url": "/", "description": "Where the admin is mounted."}]
    api_routes = {path: method for path, method in ROUTES.items() if path.startswith("/api/")}
    assert {p: next(iter(ops)).upper() for p, ops in doc["paths"].items()} == api_routes
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "basic"}
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    assert doc["security"] == [{"bearer": []}, {"basic": []}]
    action = doc["paths"]["/api/action"]["post"]
    assert set(action["responses"]) == {"200", "400", "401", "403", "404", "405", "409", "413", "415", "503"}
    schemas = doc["components"]["schemas"]
    set_action, other = schemas["SetAction"]["properties"], schemas["OtherAction"]["properties"]
    assert set_action["percent"]["minimum"] == 0 and set_action["percent"]["maximum"] == 100
    assert set_action["expected_version"]["minimum"] == 1
    assert set_action["name"]["minLength"] == 1 and set_action["name"]["maxLength"] == 200
    assert set_action["reason"]["maxLength"] == 500
    assert {set_action["action"]["const"], *other["action"]["enum"]} == set(OPERATOR_ACTIONS)
    params = doc["components"]["parameters"]
    assert (params["limit"]["schema"]["minimum"], params["limit"]["schema"]["maximum"]) == (1, 1000)
    assert (params["minutes"]["schema"]["minimum"], params["minutes"]["schema"]["maximum"]) == (1, 1440)
    assert params["name"]["required"] is True
    assert schemas["RolloutReport"]["properties"]["guard"] == {
        "anyOf": [{"$ref": "#/components/schemas/Guard"}, {"type": "null"}]
    }


def test_the_document_is_served_with_the_mount_root_as_its_server(api: Api) -> None:
    for root, url in (("", "/"), ("/canary", "/canary"), ("/ops/canary/", "/ops/canary")):
        r = api.admin.handle("GET", "/api/openapi.json", headers=[("Authorization", BEARER)], root=root)
        assert r.status == 200
        assert json.loads(r.body)["servers"][0]["url"] == url
    reply = api.call("GET", "/api/openapi.json", auth=READER)
    assert reply.json()["paths"].keys() == api.doc["paths"].keys()


# -- reads -------------------------------------------------------------------------------


def test_rollouts_is_the_report_canarymw_status_prints(api: Api) -> None:
    seed(api.store, "search-v3", 50.0)
    traffic(api.store)
    now = time.time()
    killed = ProcessReport(
        "web-1:4242:abc", now - 100, now - 60, flushed=500, last_batch=20, rollouts=(NAME,)
    )
    api.store.report_process(killed)
    data = api.call("GET", "/api/rollouts").json()
    expected = report(api.store, None, 300.0, data["at"])
    assert data == json.loads(json.dumps(expected))
    assert set(data["rollouts"]) == {NAME, "search-v3"}
    one = data["rollouts"][NAME]
    assert one["variants"]["old"]["requests"] == 6000
    assert one["variants"]["new"]["errors"] == 18
    assert one["success"]["blended"] == pytest.approx(0.97 * 0.1 + 0.998 * 0.9)
    if "processes" in data:  # the ledger of the processes adding counters
        assert [(p["pid"], p["last_batch"]) for p in data["processes"]["lost"]] == [(4242, 20)]


def test_window_picks_the_seconds_summarised(api: Api) -> None:
    traffic(api.store)
    assert api.call("GET", "/api/rollouts").json()["window"] == 300.0
    data = api.call("GET", "/api/rollouts", "window=15").json()
    assert data["window"] == 15.0
    assert data["rollouts"][NAME]["variants"]["old"]["requests"] in (1000, 2000)
    assert api.call("GET", "/api/rollout", f"name={NAME}&window=86400.5").json()["window"] == 86400.5
    for bad in ("0", "0.5", "691201", "-5", "1e3", "nan", "inf", "", " 10", "ten"):
        reply = api.call("GET", "/api/rollouts", f"window={bad}")
        assert reply.status == 400, bad
        assert "window" in reply.error


def test_rollout_is_one_rollout_and_unknown_query_parameters_are_ignored(api: Api) -> None:
    seed(api.store, "search-v3", 50.0)
    data = api.call("GET", "/api/rollout", f"name={NAME}&utm_source=x&verbose=1").json()
    assert list(data["rollouts"]) == [NAME]
    assert data["rollouts"][NAME]["state"]["percent"] == 10.0
    # A repeated parameter counts with its last value.
    assert list(api.call("GET", "/api/rollout", f"name=x&name={NAME}").json()["rollouts"]) == [NAME]


def test_a_name_the_store_does_not_have_is_404_on_every_read(api: Api) -> None:
    for path in ("/api/rollout", "/api/history", "/api/series"):
        reply = api.call("GET", path, "name=nope")
        assert reply.status == 404, path
        assert reply.json()["rollout"] == "nope"
        assert (
            reply.error
            == "the store has no rollout 'nope'; it appears once a process running it has started."
        )


@pytest.mark.parametrize("path", ["/api/rollout", "/api/history", "/api/series"])
@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("", "name is missing"),
        ("other=1", "name is missing"),
        ("name=", 'rollout name "" is not valid'),
        ("name=%20%20", 'rollout name "  " is not valid'),
        ("name=a%00b", "is not valid"),
        ("name=a%0Ab", "is not valid"),
        ("name=" + "x" * 201, "is not valid"),
    ],
)
def test_a_missing_or_invalid_name_is_400(api: Api, path: str, query: str, says: str) -> None:
    reply = api.call("GET", path, query)
    assert reply.status == 400
    assert says in reply.error


def test_a_name_of_200_characters_is_valid_and_merely_unknown(api: Api) -> None:
    assert api.call("GET", "/api/rollout", "name=" + "x" * 200).status == 404


def test_history_is_the_audit_log_oldest_first_with_a_bounded_limit(api: Api) -> None:
    for percent in (20, 30, 40):
        assert api.act("set", percent=percent, reason=f"to {percent}").status == 200
    data = api.call("GET", "/api/history", f"name={NAME}").json()
    assert data["rollout"] == NAME
    assert [c["action"] for c in data["changes"]] == ["seed", "set", "set", "set"]
    assert [c["version"] for c in data["changes"]] == [1, 2, 3, 4]
    last = data["changes"][-1]
    assert (last["by"], last["reason"], last["percent_before"], last["percent_after"]) == (
        "deploy-bot",
        "to 40",
        30.0,
        40.0,
    )
    limited = api.call("GET", "/api/history", f"name={NAME}&limit=2").json()["changes"]
    assert [c["version"] for c in limited] == [3, 4]
    assert len(api.call("GET", "/api/history", f"name={NAME}&limit=1000").json()["changes"]) == 4
    for bad in ("0", "1001", "-1", "x", "1.5", "", "%C2%B2", "+5", "99999999999999999999"):
        reply = api.call("GET", "/api/history", f"name={NAME}&limit={bad}")
        assert reply.status == 400, bad
        assert "limit" in reply.error and "from 1 to 1000" in reply.error


def test_series_is_per_window_numbers_with_bounded_minutes(api: Api) -> None:
    traffic(api.store, windows=6)
    data = api.call("GET", "/api/series", f"name={NAME}&minutes=5").json()
    assert data["rollout"] == NAME and data["window_seconds"] == 10
    assert 5 <= len(data["points"]) <= 6
    point = data["points"][-1]
    assert point["variants"]["old"]["requests"] == 1000 and point["variants"]["new"]["errors"] == 3
    assert api.call("GET", "/api/series", f"name={NAME}").status == 200  # default 60 minutes
    assert api.call("GET", "/api/series", f"name={NAME}&minutes=1440").status == 200
    for bad in ("0", "1441", "x", "", "%D9%A3"):  # ... and an Arabic-Indic digit
        reply = api.call("GET", "/api/series", f"name={NAME}&minutes={bad}")
        assert reply.status == 400, bad
        assert "minutes" in reply.error


def test_a_guarded_rollout_reports_its_guard(api: Api) -> None:
    now = time.time()
    guard = Guard(steps=(5, 25, 100), bake=600, min_requests=100, analysis=Analysis(min_requests=50))
    seeded = seed(api.store, "guarded", 0.0, now=now - 2000)
    api.store.write("guarded", 1, *start(guard, "guarded", seeded, now - 120))
    traffic(api.store, "guarded", windows=10)
    assert api.store.lease("guarded", "web-1:4242:abc", 30.0) is not None
    data = api.call("GET", "/api/rollout", "name=guarded").json()  # checked against Guard's schema
    g = data["rollouts"]["guarded"]["guard"]
    assert g["stage"] == "ramping" and g["live"] is True
    assert g["controller"]["holder"] == "web-1:4242:abc"
    assert g["steps"] == [5.0, 25.0, 100.0]
    assert g["blended"]["now"]["percent"] == 5.0
    # An operator's action moves the guard's stage, as canarymw rollback does.
    assert api.act("rollback", name="guarded", reason="p95 doubled").status == 200
    assert api.state("guarded").stage == "rolled-back"
    assert (
        api.call("GET", "/api/rollout", "name=guarded").json()["rollouts"]["guarded"]["guard"]["live"]
        is False
    )


# -- changes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "fields", "percent", "paused"),
    [
        ("set", {"percent": 37.5}, 37.5, False),
        ("promote", {}, 100.0, False),
        ("rollback", {}, 0.0, False),
        ("pause", {}, 10.0, True),
    ],
)
def test_every_action_changes_the_store_and_audits_who_and_why(
    api: Api, action: str, fields: dict[str, Any], percent: float, paused: bool
) -> None:
    reply = api.act(action, reason=f"{action} because", **fields)
    assert reply.status == 200
    data = reply.json()
    assert (data["rollout"], data["action"]) == (NAME, action)
    assert (data["state"]["percent"], data["state"]["paused"], data["state"]["version"]) == (
        percent,
        paused,
        2,
    )
    state = api.state()
    assert (state.percent, state.paused, state.version, state.updated_by) == (
        percent,
        paused,
        2,
        "deploy-bot",
    )
    entry = api.store.history(NAME, 1)[0]
    assert (entry.action, entry.by, entry.reason, entry.version) == (
        action,
        "deploy-bot",
        f"{action} because",
        2,
    )
    assert (entry.percent_before, entry.percent_after) == (10.0, percent)


def test_resume_lifts_a_pause_and_a_no_op_writes_nothing(api: Api) -> None:
    assert api.act("pause", reason="incident 4711").status == 200
    assert api.state().version == 2
    # Pausing a paused rollout changes nothing: 200 with the state as it is, no entry.
    again = api.act("pause", reason="again")
    assert again.status == 200 and again.json()["state"]["version"] == 2
    assert len(api.store.history(NAME)) == 2
    reply = api.act("resume", reason="incident over", auth=ALICE_BASIC, headers=[csrf_header(api, "alice")])
    assert reply.status == 200
    state = api.state()
    assert (state.paused, state.version, state.updated_by, state.reason) == (
        False,
        3,
        "alice",
        "incident over",
    )
    assert [c.action for c in api.store.history(NAME)] == ["seed", "pause", "resume"]


def test_a_change_without_a_reason_records_an_empty_one_as_the_cli_does(api: Api) -> None:
    assert api.act("set", percent=20).status == 200
    assert api.store.history(NAME, 1)[0].reason == ""
    assert api.act("set", percent=25, reason=None).status == 200
    assert api.act("set", percent=30, reason="  trimmed  ").status == 200
    assert api.store.history(NAME, 1)[0].reason == "trimmed"


def test_a_stale_version_is_409_with_the_current_version_and_writes_nothing(api: Api) -> None:
    assert api.act("set", percent=20, version=1).status == 200  # someone else, first
    reply = api.act("set", percent=90, version=1)
    assert reply.status == 409
    data = reply.json()
    assert data["current_version"] == 2 and data["rollout"] == NAME
    assert "is at version 2, not 1" in reply.error
    assert (api.state().percent, api.state().version) == (20.0, 2)
    assert api.act("rollback", version=7).json()["current_version"] == 2
    assert len(api.store.history(NAME)) == 2


def test_an_action_on_a_rollout_the_store_does_not_have_is_404(api: Api) -> None:
    reply = api.act("promote", name="nope", version=1)
    assert reply.status == 404
    assert reply.json()["rollout"] == "nope"


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    # percent, for set
    ({"action": "set", "percent": float("nan")}, "percent NaN is not a finite number"),
    ({"action": "set", "percent": float("inf")}, "percent Infinity is not a finite number"),
    ({"action": "set", "percent": float("-inf")}, "percent -Infinity is not a finite number"),
    ({"action": "set", "percent": -1}, "percent -1 is out of range"),
    ({"action": "set", "percent": 100.0001}, "percent 100.0001 is out of range"),
    ({"action": "set", "percent": 101}, "percent 101 is out of range"),
    ({"action": "set", "percent": 10**400}, "is out of range"),
    ({"action": "set", "percent": True}, "percent true is not a number"),
    ({"action": "set", "percent": "50"}, 'percent "50" is not a number'),
    ({"action": "set", "percent": None}, "set needs a percent"),
    ({"action": "set"}, "set needs a percent"),
    ({"action": "set", "percent": [50]}, "percent [50] is not a number"),
    ({"action": "promote", "percent": 50}, "promote takes no percent"),
    ({"action": "rollback", "percent": 0}, "rollback takes no percent"),
    # expected_version
    ({"action": "pause", "expected_version": 0}, "expected_version 0 is not a version"),
    ({"action": "pause", "expected_version": -1}, "expected_version -1 is not a version"),
    ({"action": "pause", "expected_version": "x"}, 'expected_version "x" is not a version'),
    ({"action": "pause", "expected_version": "1"}, 'expected_version "1" is not a version'),
    ({"action": "pause", "expected_version": 1.5}, "expected_version 1.5 is not a version"),
    ({"action": "pause", "expected_version": True}, "expected_version true is not a version"),
    ({"action": "pause", "expected_version": None}, "expected_version is missing"),
    ({"action": "pause", "expected_version": 2**63}, "is not a version"),
    ({"action": "pause", "expected_version": float("nan")}, "expected_version NaN is not a version"),
    # action
    (
        {"action": "delete"},
        'action "delete" is unknown; use one of set, promote, rollback, pause, resume, reset.',
    ),
    ({"action": "seed"}, 'action "seed" is unknown'),
    ({"action": "advance"}, 'action "advance" is unknown'),
    ({"action": "SET", "percent": 5}, 'action "SET" is unknown'),
    ({"action": None}, "action is missing"),
    ({"action": 1}, "action 1 is unknown"),
    # name
    ({"action": "pause", "name": None}, "name is missing"),
    ({"action": "pause", "name": ""}, "is not valid"),
    ({"action": "pause", "name": "   "}, "is not valid"),
    ({"action": "pause", "name": 5}, "rollout name 5 is not valid"),
    ({"action": "pause", "name": "a\u0000b"}, "is not valid"),
    ({"action": "pause", "name": "\ud800"}, "is not valid"),
    ({"action": "pause", "name": "x" * 201}, "is not valid"),
    # reason
    ({"action": "pause", "reason": "x" * 501}, "reason must be printable text of at most 500 characters."),
    ({"action": "pause", "reason": "a\u0007b"}, "reason must be printable"),
    ({"action": "pause", "reason": 5}, "reason must be printable"),
]


@pytest.mark.parametrize(("fields", "says"), BAD_FIELDS)
def test_a_field_that_is_not_valid_is_400_and_writes_nothing(
    api: Api, fields: dict[str, Any], says: str
) -> None:
    body: dict[str, Any] = {"name": NAME, "expected_version": 1, **fields}
    for key in [k for k, v in fields.items() if v is _MISSING]:
        del body[key]
    if "action" in fields and fields["action"] is None:
        del body["action"]
    if "name" in fields and fields["name"] is None:
        del body["name"]
    raw = json.dumps(body).encode()  # NaN and Infinity as Python writes them: not JSON
    reply = api.call("POST", "/api/action", body=raw, content_type="application/json")
    assert reply.status == 400, reply.body
    assert says in reply.error
    assert api.state().version == 1
    assert len(api.store.history(NAME)) == 1


def test_a_reason_may_have_newlines_and_unknown_fields_are_ignored(api: Api) -> None:
    reply = api.act("set", percent=0.5, reason="line one\nline two", ticket="OPS-1", expected_by="x")
    assert reply.status == 200
    assert api.store.history(NAME, 1)[0].reason == "line one\nline two"
    assert api.act("promote", version=2.0).status == 200  # 2.0 is the integer 2 in JSON
    assert api.state().version == 3


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "the body is not valid JSON."),
        (b"{", "the body is not valid JSON."),
        (b"name=checkout-v2&action=pause", "the body is not valid JSON."),
        (b'{"name": "\xff"}', "the body is not valid JSON."),
        (b"[" * 8000 + b"]" * 8000, "the body is not valid JSON."),
        (b"1" * 5000, "the body is not valid JSON."),
        (b'["pause"]', "the body must be a JSON object"),
        (b'"pause"', "the body must be a JSON object"),
        (b"null", "the body must be a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(api: Api, body: bytes, says: str) -> None:
    reply = api.call("POST", "/api/action", body=body, content_type="application/json")
    assert reply.status == 400
    assert reply.error.startswith(says)
    assert api.state().version == 1


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "json"]
)
def test_a_body_of_another_media_type_is_415(api: Api, content_type: str | None) -> None:
    body = json.dumps({"name": NAME, "action": "pause", "expected_version": 1}).encode()
    reply = api.call("POST", "/api/action", body=body, content_type=content_type)
    assert reply.status == 415
    assert "application/json" in reply.error
    assert api.state().version == 1
    ok = api.call("POST", "/api/action", body=body, content_type="Application/JSON; charset=utf-8")
    assert ok.status == 200


def test_a_body_over_the_limit_is_413_before_it_is_read(api: Api) -> None:
    body = json.dumps({"name": NAME, "action": "pause", "expected_version": 1, "pad": "x" * MAX_BODY})
    reply = api.call("POST", "/api/action", body=body.encode(), content_type="application/json")
    assert reply.status == 413
    assert str(MAX_BODY) in reply.error
    assert api.state().version == 1
    # Unauthenticated, it is 401 first: nothing about the admin is told to strangers.
    assert api.call("POST", "/api/action", auth=None, body=body.encode()).status == 401


# -- CSRF and roles ----------------------------------------------------------------------


def csrf_header(api: Api, user: str, now: float | None = None) -> tuple[str, str]:
    return ("X-CSRF-Token", api.admin._core.csrf.token(Principal(user, "operate"), now))


def test_basic_auth_changes_need_the_csrf_token(api: Api) -> None:
    body = {"name": NAME, "action": "set", "percent": 20, "expected_version": 1}
    missing = api.call("POST", "/api/action", auth=ALICE_BASIC, json_body=body)
    assert missing.status == 403 and "CSRF token is missing or stale" in missing.error
    stale = csrf_header(api, "alice", now=time.time() - 3 * 3600)
    assert api.call("POST", "/api/action", auth=ALICE_BASIC, json_body=body, headers=[stale]).status == 403
    other = csrf_header(api, "mallory")
    assert api.call("POST", "/api/action", auth=ALICE_BASIC, json_body=body, headers=[other]).status == 403
    for junk in ("", "x" * 64, "é" * 64, "0" * 10_000):
        reply = api.call(
            "POST", "/api/action", auth=ALICE_BASIC, json_body=body, headers=[("X-CSRF-Token", junk)]
        )
        assert reply.status == 403
        reply = api.call("POST", "/api/action", auth=ALICE_BASIC, json_body={**body, "csrf": junk})
        assert reply.status == 403
    for junk in (5, None, ["x"], {"token": "x"}, True):  # not text at all: a bad field, whoever sends it
        for auth in (ALICE_BASIC, BEARER):
            reply = api.call("POST", "/api/action", auth=auth, json_body={**body, "csrf": junk})
            assert reply.status == 400 and "is not a token" in reply.error
    assert api.state().version == 1
    # Last hour's token still counts (a page left open across the hour).
    previous = csrf_header(api, "alice", now=time.time() - 3600)
    ok = api.call("POST", "/api/action", auth=ALICE_BASIC, json_body=body, headers=[previous])
    assert ok.status == 200
    assert api.state().updated_by == "alice"
    # The token may also come as the body's csrf field.
    token = csrf_header(api, "alice")[1]
    body = {"name": NAME, "action": "pause", "expected_version": 2, "csrf": token}
    assert api.call("POST", "/api/action", auth=ALICE_BASIC, json_body=body).status == 200


def test_a_get_gives_an_ambient_operator_the_csrf_token_for_the_next_post(api: Api) -> None:
    got = api.call("GET", "/api/rollout", f"name={NAME}", auth=ALICE_BASIC)
    token = got.header("X-CSRF-Token")
    assert token
    assert api.call("GET", "/api/rollouts", auth=BEARER).header("X-CSRF-Token") is None  # no need
    assert api.call("GET", "/api/rollouts", auth=BOB_BASIC).header("X-CSRF-Token") is None  # may not act
    reply = api.act("rollback", auth=ALICE_BASIC, headers=[("X-CSRF-Token", token)])
    assert reply.status == 200


def test_a_bearer_token_needs_no_csrf_token(api: Api) -> None:
    assert api.act("set", percent=42).status == 200
    assert api.act("pause", headers=[("X-CSRF-Token", "garbage")]).status == 200  # and ignores one


def test_the_apps_own_login_is_ambient_and_needs_the_csrf_token(store: Store) -> None:
    def login(request: Request) -> Principal | None:
        return Principal("carol", "operate") if request.headers.get("cookie") == "session=ok" else None

    api = Api(store, auth=CallableAuth(login))
    body = {"name": NAME, "action": "pause", "expected_version": 1}
    cookie = ("Cookie", "session=ok")
    assert api.call("POST", "/api/action", auth=None, json_body=body, headers=[cookie]).status == 403
    token = csrf_header(api, "carol")
    reply = api.call("POST", "/api/action", auth=None, json_body=body, headers=[cookie, token])
    assert reply.status == 200
    assert api.state().updated_by == "carol"
    assert api.call("GET", "/api/rollouts", auth=None).status == 401


def test_the_read_role_reads_everything_and_changes_nothing(api: Api) -> None:
    for auth in (READER, BOB_BASIC):
        assert api.call("GET", "/api/rollouts", auth=auth).status == 200
        assert api.call("GET", "/api/history", f"name={NAME}", auth=auth).status == 200
        assert api.call("GET", "/api/series", f"name={NAME}", auth=auth).status == 200
        assert api.call("GET", "/api/openapi.json", auth=auth).status == 200
        token = csrf_header(api, "bob")
        reply = api.act("promote", auth=auth, headers=[token])
        assert reply.status == 403
        assert "may look but not change rollouts (role 'read')" in reply.error
        # The role is checked before the body: a reader learns nothing from a bad one.
        bad = api.call("POST", "/api/action", auth=auth, body=b"{", content_type="text/plain")
        assert bad.status == 403
    assert api.state().version == 1


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Token {TOKEN}",
        f"Basic {TOKEN}",
        basic("alice", "wrong-password-123"),
        basic("nobody", ALICE[1]),
        "Basic !!!!",
        "Basic " + base64.b64encode(b"alice").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        "Basic " + base64.b64encode(b"alice:" + ALICE[1].encode())[:-2].decode(),
        "Bearerx " + TOKEN,
        "Digest username=alice",
    ],
)
def test_no_or_wrong_credentials_are_401_with_a_challenge(api: Api, authorization: str | None) -> None:
    for path in ("/api/rollouts", "/api/action", "/api/nope"):
        reply = api.call("GET", path, f"name={NAME}", auth=authorization)
        assert reply.status == 401
        assert reply.error == "authentication required."
        assert sorted(reply.all("WWW-Authenticate")) == [
            'Basic realm="canarymw admin", charset="UTF-8"',
            'Bearer realm="canarymw admin"',
        ]
    page = api.call("GET", "/", auth=authorization)
    assert page.status == 401
    assert page.header("content-type") == "text/html; charset=utf-8"


def test_the_challenge_names_only_the_schemes_the_admin_takes(store: Store) -> None:
    bearer_only = Api(store, auth=BearerAuth({TOKEN: ("bot", "operate")}))
    assert bearer_only.call("GET", "/api/rollouts", auth=None).all("WWW-Authenticate") == [
        'Bearer realm="canarymw admin"'
    ]
    basic_only = Api(store, auth=BasicAuth({ALICE[0]: (ALICE[1], "operate")}))
    assert basic_only.call("GET", "/api/rollouts", auth=None).all("WWW-Authenticate") == [
        'Basic realm="canarymw admin", charset="UTF-8"'
    ]


# -- methods, paths, headers -------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_every_path_refuses_other_methods_with_405_and_allow(api: Api, path: str) -> None:
    takes = ROUTES[path]
    others = ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "BREW"]
    others += ["POST"] if takes == "GET" else ["GET", "HEAD"]
    for method in others:
        reply = api.call(method, path, f"name={NAME}")
        assert reply.status == 405, (method, path)
        assert reply.header("Allow") == ("GET, HEAD" if takes == "GET" else "POST")
        if path.startswith("/api/"):
            assert reply.error == f"use {takes} here, not {method}."


@pytest.mark.parametrize("path", sorted(p for p, m in ROUTES.items() if m == "GET"))
def test_head_answers_like_get(api: Api, path: str) -> None:
    get = api.call("GET", path, f"name={NAME}")
    head = api.call("HEAD", path, f"name={NAME}")
    assert get.status == head.status == 200
    assert [k for k, _ in get.headers] == [k for k, _ in head.headers]


def test_an_unknown_path_is_404_json_under_api_and_html_elsewhere(api: Api) -> None:
    for path in ("/api/", "/api/nope", "/api/rollouts/", "/api/ROLLOUTS", "/api/openapi.yaml"):
        reply = api.call("GET", path)
        assert reply.status == 404
        assert reply.error == f"there is no page at {path!r}."
    page = api.call("GET", "/nope")
    assert page.status == 404
    assert page.header("content-type") == "text/html; charset=utf-8"


def test_every_response_carries_the_security_headers(api: Api) -> None:
    # Api.call checks them on every response; here one of each kind, pages included.
    token = csrf_header(api, "alice")
    form = f"name={NAME}&action=pause&expected_version=1&csrf={token[1]}".encode()
    replies = [
        api.call("GET", "/"),
        api.call("GET", "/rollout", f"name={NAME}"),
        api.call("GET", "/static/admin.css"),
        api.call(
            "POST", "/action", body=form, content_type="application/x-www-form-urlencoded", auth=ALICE_BASIC
        ),
        api.call("GET", "/api/rollouts", auth=None),
        api.call("GET", "/nope"),
        api.call("DELETE", "/api/rollouts"),
        api.act("promote", version=99),
    ]
    assert [r.status for r in replies] == [200, 200, 200, 303, 401, 404, 405, 409]
    assert replies[3].header("Location") == f"/rollout?name={NAME}&done=pause"
    entry = api.store.history(NAME, 1)[0]
    assert (entry.by, entry.reason) == ("alice", "pause from the operator page")


def test_a_store_that_cannot_be_reached_is_503(store: Store) -> None:
    class Down(MemoryStore):
        def read(self, names: list[str]) -> dict[str, RolloutState]:
            raise StoreUnavailable("the store at redis://10.0.0.5:6379/0 did not answer within 1 s.")

        def names(self) -> list[str]:
            raise StoreUnavailable("the store at redis://10.0.0.5:6379/0 did not answer within 1 s.")

    api = Api(Down())
    for method, path, query in [
        ("GET", "/api/rollouts", ""),
        ("GET", "/api/rollout", "name=x"),
        ("GET", "/api/history", "name=x"),
        ("GET", "/api/series", "name=x"),
    ]:
        reply = api.call(method, path, query)
        assert reply.status == 503
        assert reply.error == "the store at redis://10.0.0.5:6379/0 did not answer within 1 s."
    reply = api.call("POST", "/api/action", json_body={"name": "x", "action": "pause", "expected_version": 1})
    assert reply.status == 503


def test_a_failure_the_admin_does_not_expect_is_a_json_500_not_a_crash(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(MemoryStore):
        def names(self) -> list[str]:
            raise RuntimeError("boom")

    api = Api(Broken())
    with caplog.at_level(logging.ERROR, logger="canarymw"):
        r = api.admin.handle("GET", "/api/rollouts", headers=[("Authorization", BEARER)])
    reply = Reply(*r)
    check_security_headers(reply)
    assert reply.status == 500
    assert reply.json() == {
        "error": "the admin failed on this request (RuntimeError); the server's log has the details.",
        "status": 500,
    }
    assert "GET /api/rollouts failed" in caplog.text


# -- the WSGI and ASGI adapters ----------------------------------------------------------


def wsgi_call(
    app: Any,
    method: str,
    path: str,
    *,
    query: str = "",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    content_length: str | None = None,
    chunked: bool = False,
    script_name: str = "",
) -> tuple[str, list[tuple[str, str]], bytes]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "wsgi.input": io.BytesIO(body),
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }
    if chunked:
        environ["wsgi.input_terminated"] = True
    elif content_length is not None or body:
        environ["CONTENT_LENGTH"] = content_length if content_length is not None else str(len(body))
    for k, v in (headers or {}).items():
        if k.lower() == "content-type":
            environ["CONTENT_TYPE"] = v
        else:
            environ["HTTP_" + k.upper().replace("-", "_")] = v
    got: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
        got["status"], got["headers"] = status, response_headers

    out = b"".join(app(environ, start_response))
    return got["status"], got["headers"], out


def test_wsgi_answers_head_without_a_body_and_refuses_a_large_body_unread(api: Api) -> None:
    auth = {"Authorization": BEARER}
    status, headers, body = wsgi_call(api.admin.wsgi, "HEAD", "/api/rollouts", headers=auth)
    assert status == "200 OK" and body == b""
    assert int(dict(headers)["Content-Length"]) > 100
    json_type = {**auth, "Content-Type": "application/json"}
    status, headers, body = wsgi_call(
        api.admin.wsgi, "POST", "/api/action", headers=json_type, content_length=str(MAX_BODY + 1)
    )
    assert status == "413 Content Too Large"
    assert json.loads(body)["status"] == 413
    big = json.dumps({"name": NAME, "action": "pause", "expected_version": 1, "pad": "x" * MAX_BODY}).encode()
    status, _, _ = wsgi_call(api.admin.wsgi, "POST", "/api/action", body=big, headers=json_type, chunked=True)
    assert status.startswith("413")
    small = json.dumps({"name": NAME, "action": "pause", "expected_version": 1}).encode()
    status, _, _ = wsgi_call(
        api.admin.wsgi, "POST", "/api/action", body=small, headers=json_type, chunked=True
    )
    assert status == "200 OK"
    status, _, _ = wsgi_call(
        api.admin.wsgi, "POST", "/api/action", body=small, headers=json_type, content_length="nonsense"
    )
    assert status.startswith("400")  # no usable length: an empty body, not valid JSON


def test_mount_wsgi_sends_the_prefix_to_the_admin_and_the_rest_to_the_app(api: Api) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"app:" + environ["PATH_INFO"].encode()]

    mounted = api.admin.mount_wsgi(app, "/canary/")
    auth = {"Authorization": BEARER}
    assert wsgi_call(mounted, "GET", "/canaryx", headers=auth)[2] == b"app:/canaryx"
    assert wsgi_call(mounted, "GET", "/", headers=auth)[2] == b"app:/"
    status, _, body = wsgi_call(mounted, "GET", "/canary/api/openapi.json", headers=auth)
    assert status == "200 OK"
    assert json.loads(body)["servers"][0]["url"] == "/canary"
    status, _, body = wsgi_call(mounted, "GET", "/canary/api/history", query=f"name={NAME}", headers=auth)
    assert json.loads(body)["rollout"] == NAME


async def _asgi(
    app: Any,
    method: str,
    path: str,
    *,
    body_parts: Sequence[bytes] = (b"",),
    headers: Sequence[tuple[str, str]] = (),
    root_path: str = "",
) -> tuple[int, list[tuple[str, str]], bytes]:
    scope = {
        "type": "http",
        "method": method,
        "path": root_path + path,
        "root_path": root_path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }
    parts = list(body_parts)
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received < len(parts):
            received += 1
            return {"type": "http.request", "body": parts[received - 1], "more_body": received < len(parts)}
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    got = [(k.decode(), v.decode()) for k, v in start["headers"]]
    return start["status"], got, b"".join(m.get("body", b"") for m in sent[1:])


def test_asgi_answers_head_without_a_body_and_refuses_a_large_body(api: Api) -> None:
    auth = [("Authorization", BEARER)]
    status, headers, body = asyncio.run(_asgi(api.admin.asgi, "HEAD", "/api/rollouts", headers=auth))
    assert status == 200 and body == b""
    assert int(dict(headers)["content-length"]) > 100
    json_type = [*auth, ("Content-Type", "application/json")]
    declared = [*json_type, ("Content-Length", str(MAX_BODY + 1))]
    status, _, body = asyncio.run(_asgi(api.admin.asgi, "POST", "/api/action", headers=declared))
    assert status == 413 and json.loads(body)["status"] == 413
    streamed = [b"x" * 8000] * 3
    status, _, _ = asyncio.run(
        _asgi(api.admin.asgi, "POST", "/api/action", headers=json_type, body_parts=streamed)
    )
    assert status == 413
    small = json.dumps({"name": NAME, "action": "pause", "expected_version": 1}).encode()
    status, _, body = asyncio.run(
        _asgi(
            api.admin.asgi,
            "POST",
            "/api/action",
            headers=json_type,
            body_parts=[small[:10], small[10:]],
            root_path="/canary",
        )
    )
    assert status == 200, body
    assert api.state().paused is True


def test_every_route_through_the_adapters_answers_as_handle_does(api: Api) -> None:
    # The adapters only translate: status and body of a few calls, both ways.
    auth = {"Authorization": BEARER}
    for path in ("/api/rollouts", "/api/openapi.json"):
        direct = api.call("GET", path)
        status, _, body = wsgi_call(api.admin.wsgi, "GET", path, headers=auth)
        assert int(status.split()[0]) == direct.status
        assert json.loads(body).keys() == direct.json().keys()
        status_a, _, body_a = asyncio.run(_asgi(api.admin.asgi, "GET", path, headers=list(auth.items())))
        assert status_a == direct.status
        assert json.loads(body_a).keys() == direct.json().keys()
