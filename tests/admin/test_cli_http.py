"""The store commands against an admin URL, and ``canarymw serve-admin`` itself.

Real servers: ``canarymw serve-admin`` (uvicorn, and once wsgiref) on free 127.0.0.1
ports, serving a SQLite store in a temporary directory; the test seeds rollouts in that
file as a process running them would. The commands run in this process
(``canarymw.cli.main``) with ``--store http://127.0.0.1:PORT``: the same output and exit
codes as against the store itself (4 unknown rollout, 5 version conflict, 3 refused
token or no admin), and every change recorded with the name the token belongs to.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from canarymw import cli
from canarymw.store import Counts, RolloutState, Store, on_start, open_store

from ..servers import free_port, serve

TOKEN = "cli-http-operate-token-0123456789abcdef"
READ_TOKEN = "cli-http-read-token-0123456789abcdef0123"

pytestmark = pytest.mark.server


@dataclass
class Admins:
    store_url: str
    store: Store
    operate: str  # the URL of an admin whose token may operate
    read: str  # ... and of one whose token may only read


def _serve_admin(store_url: str, port: int, token_env: str, *extra: str) -> Any:
    argv = [
        "canarymw.cli",
        "serve-admin",
        "--store",
        store_url,
        "--port",
        str(port),
        "--token-env",
        token_env,
    ]
    env = {"ADMIN_TOKEN": TOKEN, "ADMIN_READ_TOKEN": READ_TOKEN, "ADMIN_KEY": "k" * 40}
    return serve([*argv, *extra], port, env=env, ready_path="/api/rollouts")


@pytest.fixture(scope="module")
def admins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admins]:
    url = f"sqlite:///{tmp_path_factory.mktemp('cli-http') / 'state.db'}"
    store = open_store(url)
    store.names()  # creates the file, as the first process running a rollout does
    p1, p2 = free_port(), free_port()
    with (
        _serve_admin(
            url, p1, "ADMIN_TOKEN", "--token-name", "ci-bot", "--secret-key-env", "ADMIN_KEY"
        ) as one,
        _serve_admin(url, p2, "ADMIN_READ_TOKEN", "--token-role", "read", "--server", "wsgiref") as two,
    ):
        yield Admins(url, store, one, two)
    store.close()


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (cli.STORE_ENV, cli.BY_ENV, cli.DEBUG_ENV, cli.TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(cli.TOKEN_ENV, TOKEN)


def seed(store: Store, percent: float = 10.0) -> str:
    name = f"checkout-{uuid.uuid4().hex[:8]}"
    made = on_start(name, None, percent)
    assert made is not None
    store.write(name, 0, *made)
    return name


def state(store: Store, name: str) -> RolloutState:
    return store.read([name])[name]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].endswith((".", "?")), lines[0]
    return lines[0]


def _steady(data: dict[str, Any]) -> dict[str, Any]:
    """A report without what changes from one call to the next (when it was made, ages)."""
    got = {**data, "at": None}
    if "processes" in got:
        got["processes"] = {**got["processes"], "since": None}
    got["rollouts"] = {n: {**r, "age": None} for n, r in data["rollouts"].items()}
    return got


# -- reads -------------------------------------------------------------------------------


def test_status_prints_what_it_prints_from_the_store(
    admins: Admins, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = seed(admins.store, 25.0)
    now = int(time.time()) // 10 * 10
    admins.store.add_counts(
        [
            Counts(name, "old", now - 20, requests=900, errors=1, latency_sum=9.0, buckets={180: 900}),
            Counts(name, "new", now - 20, requests=300, errors=6, latency_sum=3.6, buckets={182: 300}),
        ]
    )
    code, remote, err = run(capsys, "status", name, "--json", "--store", admins.operate)
    assert (code, err) == (0, "")
    code, local, _ = run(capsys, "status", name, "--json", "--store", admins.store_url)
    assert code == 0
    assert _steady(json.loads(remote)) == _steady(json.loads(local))
    assert json.loads(remote)["rollouts"][name]["variants"]["new"]["errors"] == 6
    # The table too, but for the age column.
    code, remote, _ = run(capsys, "status", name, "--store", admins.operate, "--window", "600")
    _, local, _ = run(capsys, "status", name, "--store", admins.store_url, "--window", "600")
    assert code == 0
    age = re.compile(r"\b\d+ s\b")
    assert age.sub("N s", remote) == age.sub("N s", local)
    assert "the last 600 s" in remote and "blended estimate" in remote
    # Every rollout: CANARYMW_STORE may name the admin as well.
    monkeypatch.setenv(cli.STORE_ENV, admins.operate)
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0 and name in json.loads(out)["rollouts"]


def test_history_prints_what_it_prints_from_the_store(
    admins: Admins, capsys: pytest.CaptureFixture[str]
) -> None:
    name = seed(admins.store)
    for percent in ("20", "30%", "40"):
        code, _, err = run(
            capsys, "set", name, percent, "--reason", f"to {percent}", "--store", admins.operate
        )
        assert (code, err) == (0, "")
    for extra in ([], ["--json"], ["--limit", "2"]):
        code, remote, _ = run(capsys, "history", name, *extra, "--store", admins.operate)
        assert code == 0
        _, local, _ = run(capsys, "history", name, *extra, "--store", admins.store_url)
        assert remote == local
    assert "ci-bot" in remote
    entries = json.loads(run(capsys, "history", name, "--json", "--store", admins.operate)[1])["history"]
    assert [(e["action"], e["by"], e["reason"]) for e in entries[1:]] == [
        ("set", "ci-bot", "to 20"),
        ("set", "ci-bot", "to 30%"),
        ("set", "ci-bot", "to 40"),
    ]


def test_watch_refreshes_from_the_admin(admins: Admins, capsys: pytest.CaptureFixture[str]) -> None:
    name = seed(admins.store)
    code, out, _ = run(capsys, "watch", name, "--count", "2", "--interval", "0.1", "--store", admins.operate)
    assert code == 0
    assert out.count("canarymw watch") == 2 and name in out


# -- changes -----------------------------------------------------------------------------


def test_every_change_goes_through_the_api_and_is_audited_with_the_tokens_name(
    admins: Admins, capsys: pytest.CaptureFixture[str]
) -> None:
    name = seed(admins.store)
    steps = [
        (["set", name, "25"], 25.0, False, "set"),
        (["pause", name], 25.0, True, "pause"),
        (["resume", name], 25.0, False, "resume"),
        (["promote", name], 100.0, False, "promote"),
        (["rollback", name], 0.0, False, "rollback"),
    ]
    for version, (argv, percent, paused, action) in enumerate(steps, start=2):
        code, out, err = run(capsys, *argv, "--reason", f"{action} it", "--store", admins.operate)
        assert (code, err) == (0, "")
        held = "paused" if paused else "running"
        assert (
            out
            == f"{name}: {percent:g}% to new, {held}, version {version} ({action} by ci-bot: {action} it)\n"
        )
        got = state(admins.store, name)
        assert (got.percent, got.paused, got.version, got.updated_by) == (percent, paused, version, "ci-bot")
    code, out, _ = run(capsys, "set", name, "5", "--json", "--if-version", "6", "--store", admins.operate)
    assert code == 0
    data = json.loads(out)
    assert (data["rollout"], data["action"], data["state"]["percent"], data["state"]["version"]) == (
        name,
        "set",
        5.0,
        7,
    )
    assert [c.by for c in admins.store.history(name)][1:] == ["ci-bot"] * 6


def test_a_stale_if_version_exits_5_and_changes_nothing(
    admins: Admins, capsys: pytest.CaptureFixture[str]
) -> None:
    name = seed(admins.store)
    code, _, err = run(capsys, "set", name, "50", "--if-version", "7", "--store", admins.operate)
    assert code == cli.EXIT_CONFLICT == 5
    assert one_sentence(err) == (
        f"canarymw set: rollout '{name}' is at version 1, not 7: someone else changed it meanwhile; "
        "look at it again and retry."
    )
    assert state(admins.store, name).version == 1


def test_an_unknown_rollout_exits_4_as_it_does_from_the_store(
    admins: Admins, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["status", "nope"], ["history", "nope"], ["pause", "nope"], ["set", "nope", "5"]):
        code, out, err = run(capsys, *argv, "--store", admins.operate)
        assert (code, out) == (cli.EXIT_UNKNOWN, ""), argv
        remote = one_sentence(err)
        _, _, local = run(capsys, *argv, "--store", admins.store_url)
        assert remote == one_sentence(local)
        assert "the store has no rollout 'nope'" in remote


# -- refusals ----------------------------------------------------------------------------


def test_a_token_the_admin_does_not_know_exits_3(
    admins: Admins, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = seed(admins.store)
    code, out, err = run(capsys, "status", name, "--store", admins.operate, "--token", "x" * 40)
    assert (code, out) == (cli.EXIT_STORE, "")
    assert one_sentence(err) == (
        f"canarymw status: the admin at {admins.operate} did not accept the token (authentication required)."
    )
    monkeypatch.delenv(cli.TOKEN_ENV)
    code, _, err = run(capsys, "status", "--store", admins.operate + "/")
    assert code == cli.EXIT_STORE
    assert one_sentence(err) == (
        f"canarymw status: the admin at {admins.operate}/ needs a bearer token; "
        "pass --token or set CANARYMW_TOKEN."
    )


def test_a_read_only_token_may_look_but_a_change_exits_3(
    admins: Admins, capsys: pytest.CaptureFixture[str]
) -> None:
    name = seed(admins.store)
    code, out, _ = run(capsys, "status", name, "--store", admins.read, "--token", READ_TOKEN)
    assert code == 0 and name in out
    code, _, err = run(capsys, "promote", name, "--store", admins.read, "--token", READ_TOKEN)
    assert code == cli.EXIT_STORE
    assert one_sentence(err) == (
        f"canarymw promote: the admin at {admins.read} refused: "
        "admin-token may look but not change rollouts (role 'read')."
    )
    assert state(admins.store, name).version == 1


def test_no_admin_at_the_url_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    code, _, err = run(capsys, "status", "--store", f"http://127.0.0.1:{port}")
    assert code == cli.EXIT_STORE
    assert one_sentence(err).startswith(
        f"canarymw status: the admin at http://127.0.0.1:{port} cannot be reached ("
    )


def test_a_url_that_is_not_the_admin_exits_3_and_says_so(
    admins: Admins, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "status", "--store", admins.operate + "/elsewhere")
    assert code == cli.EXIT_STORE  # the admin's own 404 for a path it has not
    assert one_sentence(err) == (
        f"canarymw status: the admin at {admins.operate}/elsewhere answered 404 Not Found, not with its "
        "JSON API; is the URL where the admin is mounted?"
    )


def test_by_and_malformed_urls_are_usage_errors(admins: Admins, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "pause", "x", "--by", "alice", "--store", admins.operate)
    assert code == cli.EXIT_USAGE
    assert one_sentence(err) == (
        "canarymw pause: --by cannot be used with an admin URL; "
        "the admin records the name its token belongs to."
    )
    for url in ("http://", "https://user:pw@example.invalid/canary", "http://127.0.0.1:99999/"):
        code, _, err = run(capsys, "status", "--store", url)
        assert code == cli.EXIT_USAGE, url
        one_sentence(err)
        assert "pw" not in err


# -- serve-admin -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        ([], {}, "serve-admin needs credentials: --token-file PATH or --token-env VAR"),
        (
            ["--token-env", "NOPE"],
            {},
            "the environment variable NOPE (the bearer token) is not set or is empty.",
        ),
        (["--token-env", "T"], {"T": "short"}, "must be at least 32 printable characters without spaces"),
        (["--token-env", "T"], {"T": "a b" * 20}, "must be at least 32 printable characters without spaces"),
        (["--token-file", "/nonexistent/token"], {}, "the token file /nonexistent/token cannot be read"),
        (["--token-env", "T", "--host", "0.0.0.0"], {"T": TOKEN}, "--host 0.0.0.0 is not a loopback address"),
        (["--token-env", "T", "--host", "example.com"], {"T": TOKEN}, "pass --allow-remote if you mean it"),
        (
            ["--token-env", "T", "--basic-user", "alice"],
            {"T": TOKEN},
            "--basic-user and --basic-password-env go",
        ),
        (
            ["--token-env", "T", "--basic-user", "alice", "--basic-password-env", "P"],
            {"T": TOKEN, "P": "short"},
            "BasicAuth needs a password of at least 12 characters for 'alice'.",
        ),
        (["--token-env", "T", "--secret-key-env", "K"], {"T": TOKEN, "K": "short"}, "at least 32 characters"),
    ],
)
def test_serve_admin_refuses_to_start_without_sound_settings(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    says: str,
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    store = f"sqlite:///{tmp_path / 'state.db'}"
    made = open_store(store)
    made.names()  # creates the file
    made.close()
    code, out, err = run(capsys, "serve-admin", "--store", store, "--port", str(free_port()), *argv)
    assert (code, out) == (cli.EXIT_USAGE, "")
    assert says in one_sentence(err)


def test_serve_admin_says_when_it_cannot_listen_or_has_no_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("T", TOKEN)
    store = f"sqlite:///{tmp_path / 'state.db'}"
    made = open_store(store)
    made.names()  # creates the file
    made.close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, _, err = run(capsys, "serve-admin", "--store", store, "--port", str(port), "--token-env", "T")
    assert code == cli.EXIT_STORE
    assert one_sentence(err).startswith(f"canarymw serve-admin: cannot listen on 127.0.0.1 port {port} (")
    code, _, err = run(
        capsys, "serve-admin", "--store", f"sqlite:///{tmp_path / 'missing.db'}", "--token-env", "T"
    )
    assert code == cli.EXIT_STORE and "does not exist" in one_sentence(err)
    code, _, err = run(capsys, "serve-admin", "--store", "https://admin.example/canary", "--token-env", "T")
    assert code == cli.EXIT_USAGE and "not an admin URL" in one_sentence(err)
    code, _, err = run(capsys, "serve-admin", "--token-env", "T")
    assert code == cli.EXIT_STORE and "no store given" in one_sentence(err)


def test_serve_admin_reads_its_token_from_a_file_and_takes_basic_auth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import base64

    import httpx

    store_url = f"sqlite:///{tmp_path / 'state.db'}"
    store = open_store(store_url)
    name = seed(store)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    argv = ["canarymw.cli", "serve-admin", "--store", store_url, "--port", str(port)]
    argv += ["--token-file", str(token_file), "--basic-user", "alice", "--basic-password-env", "ALICE_PW"]
    with serve(argv, port, env={"ALICE_PW": "alice-password-1234"}, ready_path="/api/rollouts") as base:
        code, out, _ = run(capsys, "status", name, "--store", base)
        assert code == 0 and name in out
        alice = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-password-1234").decode()}
        r = httpx.get(base + "/api/rollout", params={"name": name}, headers=alice)
        assert r.status_code == 200
        version = r.json()["rollouts"][name]["state"]["version"]
        body = {"name": name, "action": "pause", "reason": "incident", "expected_version": version}
        assert httpx.post(base + "/api/action", json=body, headers=alice).status_code == 403  # no CSRF token
        csrf = {**alice, "X-CSRF-Token": r.headers["x-csrf-token"]}
        assert httpx.post(base + "/api/action", json=body, headers=csrf).status_code == 200
        assert state(store, name).updated_by == "alice"
        page = httpx.get(base + "/", headers=alice)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    store.close()
