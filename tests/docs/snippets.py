"""Run the code blocks of README.md and docs/*.md with sybil.

Sybil finds the blocks; this module says how to run them:

- ```` ```python ```` blocks (and sybil's ``<!-- invisible-code-block: python -->``) run in
  order, in one namespace per page, seeded by :func:`namespace` (a secret ``KEY``, tiny
  blue and green WSGI and ASGI apps, a Flask ``app``, ...) and by :data:`PAGE_SETUP`;
- ```` ```sh ````, ```` ```bash ```` and ```` ```console ```` blocks (the ``$ `` lines of
  the last) run in bash, in a temporary folder, with this checkout's ``canarymw`` on the
  ``PATH``; each command must succeed;
- a block that cannot run says why in the page, with sybil's ``<!-- skip: next "why" -->``
  (visible in the Markdown source, not on the site). Pages this harness may not edit
  (README.md, docs/demo.md) list their skips in :data:`SKIPS` instead, with the reason.

Addresses that point away from this machine (``10.0.0.5``, ``/var/log/...``) are rewritten
to the local services before a block runs (:data:`REWRITES`): Redis on 127.0.0.1:6379 under
a key prefix of this run's own, SQLite and log files in a temporary folder, upstreams
served on loopback. A block that still names a non-loopback address fails: a test never
sends traffic anywhere but this machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import SkipTest

from sybil import Document, Example, Sybil
from sybil.evaluators.python import pad
from sybil.parsers.markdown import CodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
REDIS = os.environ.get("CANARYMW_TEST_REDIS", "redis://127.0.0.1:6379/0")
KEY = "docs-secret-key-0123456789abcdef"

#: Every page whose blocks run: the README and every page of the site.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Blocks of pages this harness does not edit that cannot run, and why: (page, a text
#: found in exactly one block of it) -> reason. tests/docs/test_snippets.py checks that
#: each entry still matches a block.
SKIPS: dict[tuple[str, str], str] = {
    ("README.md", "pip install -e '.[demo]'"): "creates a virtual environment and installs from PyPI",
    ("README.md", "pip install -e '.[dev]' && .venv/bin/python -m pytest"): "the test suite itself",
    ("README.md", "pip install canarymw "): "installs from PyPI",
    (
        "docs/demo.md",
        "pip install 'canarymw[demo]'",
    ): "installs from PyPI; the demo runs in tests/real_servers/test_demo.py",
    (
        "docs/demo.md",
        "# about 65 s",
    ): "guarded demos of 5 to 65 s each; tests/real_servers/test_demo_guard.py runs them",
    ("docs/demo.md", "export CANARYMW_DEMO_KEY"): "starts a server that runs until stopped",
}

#: Text in a block -> what runs instead: production addresses become local services.
#: Values are formatted with the run's ``redis`` URL (its own key prefix) and ``tmp`` folder.
REWRITES: dict[str, str] = {
    "redis://127.0.0.1:6379/0": "{redis}",
    "redis://10.0.0.5:6379/0": "{redis}",
    "sqlite:////var/lib/app/canary.db": "sqlite:///{tmp}/canary.db",
    "/var/log/shop/canary/": "{tmp}/canary/",
    "/run/shop/prometheus": "{tmp}/prometheus",
    "http://10.0.0.1:8001": "{blue_url}",
    "http://10.0.0.2:8002": "{green_url}",
    "http://127.0.0.1:8002": "{green_url}",
}

#: Code run in a page's namespace before its first block: names that page takes as given.
PAGE_SETUP: dict[str, str] = {
    "docs/stores.md": """
from canarymw import ASGICanaryMiddleware, MemorySink
blue, green = blue_app, green_app
""",
    "docs/django.md": """
from tests.docs.snippets import configure_django
configure_django()
""",
    "docs/upstreams.md": """
from starlette.routing import Route
routes = [Route("/", blue_endpoint)]
""",
}

#: Code run just before one block: (page, a text found in exactly one block) -> code.
BLOCK_SETUP: dict[tuple[str, str], str] = {
    # The commands operate a rollout that a process running it has put in the store.
    ("docs/cli.md", "export CANARYMW_STORE="): """
from canarymw import Rollout
_running = Rollout("checkout-v2", percent=10, secret_key=KEY, store=__run__.redis)
""",
    # GuardCollector reports a guarded rollout; the page's `rollout` has no guard.
    ("docs/outcomes.md", "GuardCollector(rollout)"): """
from canarymw.guard import Guard
rollout = Rollout("checkout-v2", percent=0, secret_key=KEY, guard=Guard(steps=(5, 100)))
""",
}

_NON_LOOPBACK = re.compile(
    r"\b(?:10\.\d+\.\d+\.\d+|172\.(?:1[6-9]|2\d|3[01])\.\d+\.\d+|192\.168\.\d+\.\d+)\b|"
    r"://(?!127\.0\.0\.1|localhost|\[::1\]|\{)[a-z][\w.-]*[.:]"
)


def configure_django() -> None:
    """Configure Django in this process with examples/django_app's settings (once: Django's
    settings are global; the example's folder stays on sys.path)."""
    import importlib

    import django
    from django.conf import settings

    example = str(ROOT / "examples" / "django_app")
    if example not in sys.path:
        sys.path.insert(0, example)
    if not settings.configured:
        module = importlib.import_module("hello_site.settings")
        settings.configure(**{name: getattr(module, name) for name in dir(module) if name.isupper()})
        django.setup()
    if settings.ROOT_URLCONF != "hello_site.urls":  # pragma: no cover - another Django project
        raise SkipTest(f"Django is already configured for {settings.ROOT_URLCONF} in this process")


def _wsgi(body: str, status: str = "200 OK") -> Callable[..., list[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(status, [("Content-Type", "text/plain")])
        return [body.encode()]

    return app


def _asgi(body: str) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": body.encode()})

    return app


def namespace() -> dict[str, Any]:
    """The names every page may use without defining them."""
    import time

    from flask import Flask
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse

    def blue_endpoint(request: Any) -> PlainTextResponse:
        return PlainTextResponse("Hello, Blue World!\n")

    def green_endpoint(request: Any) -> PlainTextResponse:
        return PlainTextResponse("Hello, Green World!\n")

    shop = Flask("shop")
    shop.add_url_rule("/", "index", lambda: "Hello, Blue World!\n")
    return {
        "os": os,
        "re": re,
        "time": time,
        "Path": Path,
        "KEY": KEY,
        "key": KEY,
        "Flask": Flask,
        "Starlette": Starlette,
        "Middleware": Middleware,
        "app": shop,  # a Flask app: `app.wsgi_app = ...`
        "old_app": _wsgi("Hello, Blue World!\n"),
        "new_app": _wsgi("Hello, Green World!\n"),
        "v2": _wsgi("Hello, Green World!\n"),
        "blue_app": _asgi("Hello, Blue World!\n"),
        "green_app": _asgi("Hello, Green World!\n"),
        "blue_endpoint": blue_endpoint,
        "green_endpoint": green_endpoint,
    }


class _Servers:
    """Blue and green WSGI servers on loopback, for pages that proxy to an upstream."""

    def __init__(self) -> None:
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.servers = [
            make_server("127.0.0.1", 0, _wsgi(f"Hello, {colour} World!\n"), handler_class=Quiet)
            for colour in ("Blue", "Green")
        ]
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self.servers]
        for thread in self.threads:
            thread.start()
        self.urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@dataclass
class Run:
    """One page's run: its namespace, temporary folder, Redis prefix and what to clean up."""

    page: str
    document: Document
    tmp: Path
    prefix: str = field(default_factory=lambda: f"canarymw-docs-{uuid.uuid4().hex[:12]}:")
    servers: _Servers | None = None
    done: int = 0  # examples evaluated so far
    failed: list[int] = field(default_factory=list)
    _env: dict[str, str | None] = field(default_factory=dict)
    _followers: set[int] = field(default_factory=set)
    _collectors: set[int] = field(default_factory=set)

    @property
    def redis(self) -> str:
        return f"{REDIS}?prefix={self.prefix}"

    def values(self) -> dict[str, str]:
        if self.servers is None:
            self.servers = _Servers()
        blue, green = self.servers.urls
        return {"redis": self.redis, "tmp": str(self.tmp), "blue_url": blue, "green_url": green}

    def rewrite(self, source: str) -> str:
        for text, replacement in REWRITES.items():
            if text in source:
                source = source.replace(text, replacement.format(**self.values()))
        bad = _NON_LOOPBACK.search(source)
        if bad:
            raise AssertionError(
                f"{self.page}: a block names {bad.group(0)!r}, not on this machine: add a rewrite "
                "to REWRITES in tests/docs/snippets.py, or a skip marker with the reason"
            )
        return source

    def start(self) -> None:
        from canarymw.store import _follow

        self._followers = set(_follow._followers)
        self._collectors = _registered()
        self._env = {name: os.environ.get(name) for name in ("CANARY_KEY",)}
        os.environ["CANARY_KEY"] = KEY
        ns = self.document.namespace
        ns.update(namespace())
        ns["__run__"] = self
        setup = PAGE_SETUP.get(self.page, "").strip()
        if setup:
            exec(compile(setup, f"<setup of {self.page}>", "exec"), ns)
            ns.pop("__builtins__", None)

    def close(self) -> None:
        from canarymw import Rollout
        from canarymw.sinks import BackgroundSink
        from canarymw.sinks.store import StoreSink
        from canarymw.store import _follow

        for value in list(self.document.namespace.values()):
            with contextlib.suppress(Exception):
                if isinstance(value, Rollout) and value.controller is not None:
                    value.controller.stop()
                elif isinstance(value, (BackgroundSink, StoreSink)):
                    value.close()
        for key, follower in list(_follow._followers.items()):
            if key not in self._followers:
                follower.stop()
                with contextlib.suppress(Exception):
                    follower.store.close()
        _unregister(self._collectors)
        if self.servers is not None:
            self.servers.close()
        for name, value in self._env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _delete_redis_keys(self.prefix)
        self.document.namespace.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _registered() -> set[int]:
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # pragma: no cover - in the dev extra
        return set()
    return {id(c) for c in list(REGISTRY._collector_to_names)}


def _unregister(before: set[int]) -> None:
    # A page that makes a PrometheusSink registers its metrics in the default registry;
    # the next page (or test) that makes one must find it empty again.
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # pragma: no cover
        return
    for collector in list(REGISTRY._collector_to_names):
        if id(collector) not in before:
            REGISTRY.unregister(collector)


def _delete_redis_keys(prefix: str) -> None:
    try:
        import redis
    except ImportError:  # pragma: no cover - in the dev extra
        return
    client = redis.Redis.from_url(REDIS)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


def _lookup(table: dict[tuple[str, str], str], example: Example) -> str | None:
    page = _page(example)
    for (where, text), value in table.items():
        if where == page and text in str(example.parsed):
            return value
    return None


def _page(example: Example) -> str:
    return Path(example.path).relative_to(ROOT).as_posix()


def _before(example: Example) -> Run:
    run: Run = example.namespace["__run__"]
    reason = _lookup(SKIPS, example)
    if reason is not None:
        raise SkipTest(reason)
    setup = _lookup(BLOCK_SETUP, example)
    if setup:
        exec(compile(setup, f"<setup of {_page(example)}:{example.line}>", "exec"), example.namespace)
        example.namespace.pop("__builtins__", None)
    return run


def evaluate_python(example: Example) -> None:
    __tracebackhide__ = True
    run = _before(example)
    source = run.rewrite(str(example.parsed))
    code = compile(pad(source, example.line + example.parsed.line_offset), example.path, "exec")
    exec(code, example.namespace)
    example.namespace.pop("__builtins__", None)


#: Seconds a shell block may take. A command documented to run "until Ctrl-C" gets a
#: SIGINT after INTERRUPT_AFTER seconds, and must then exit with 0, as documented.
SHELL_TIMEOUT = 60.0
INTERRUPT_AFTER = 8  # seconds: time for a loaded machine to start the command and show a table


def evaluate_shell(example: Example) -> None:
    __tracebackhide__ = True
    run = _before(example)
    source = run.rewrite(str(example.parsed))
    if example.region.lexemes.get("arguments") == "console":
        source = "\n".join(line[2:] for line in source.splitlines() if line.startswith("$ "))
    source = "\n".join(
        f"timeout --preserve-status -s INT {INTERRUPT_AFTER} {line}" if "until Ctrl-C" in line else line
        for line in source.splitlines()
    )
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "CANARY_KEY": KEY,
        "CANARYMW_BY": "docs-test",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        done = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + source],
            cwd=run.tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=SHELL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{_page(example)}:{example.line}: still running after {SHELL_TIMEOUT} s"
        ) from None
    if done.returncode != 0:
        raise AssertionError(
            f"{_page(example)}:{example.line}: exited with {done.returncode}:\n{source}\n"
            f"--- output:\n{done.stdout}"
        )


SYBIL = Sybil(
    parsers=[
        CodeBlockParser("python", evaluate_python),
        CodeBlockParser("sh", evaluate_shell),
        CodeBlockParser("bash", evaluate_shell),
        CodeBlockParser("console", evaluate_shell),
        SkipParser(),
    ],
    patterns=["*.md"],
)


def is_block(example: Example) -> bool:
    """A code block (a test of its own), not a directive such as ``skip``."""
    return example.region.evaluator in (evaluate_python, evaluate_shell)


@dataclass
class Page:
    path: Path
    document: Document
    examples: list[Example]

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def parse(path: Path) -> Page:
    document = SYBIL.parse(path)
    return Page(path, document, list(document.examples()))


@contextlib.contextmanager
def page_run(page: Page) -> Iterator[Run]:
    run = Run(page.name, page.document, Path(tempfile.mkdtemp(prefix="canarymw-docs-")))
    run.start()
    try:
        yield run
    finally:
        run.close()
