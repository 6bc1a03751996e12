"""Run another project's own test suite with every app it builds wrapped by canarymw.

    python scripts/foreign_suite.py starlette      # every app given to Starlette's TestClient
    python scripts/foreign_suite.py fastapi        # the same, for FastAPI's suite
    python scripts/foreign_suite.py flask          # every Flask app, through WSGICanaryMiddleware

Downloads the source distribution of the framework version installed next to this
script's Python (or the newest one), builds a virtual environment under a work
directory with this checkout and the suite's test requirements, and runs the suite
three times: unwrapped, wrapped with the compiled request path, and wrapped with the
pure-Python path (CANARYMW_NO_EXTENSIONS=1). The rollout splits visitors 50/50 between
two copies of the same app, so every test's app answers either way.

It prints the tests that fail only when wrapped, with pytest's one-line reason, and
exits non-zero if the compiled and the pure-Python paths fail different tests. Tests
that fail only when wrapped are expected where a suite asserts the exact response
headers: the middleware adds ``Vary: Cookie`` and ``Cache-Control: private`` to every
routed response and a ``Set-Cookie`` on a first visit (and on a websocket's accept).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEY = "foreign-suite-secret-key-0123456789"

STARLETTE_PLUGIN = f"""
import os
import starlette.testclient as tc
from canarymw import MemorySink, Rollout
from canarymw.asgi import ASGICanaryMiddleware

_init = tc.TestClient.__init__


def __init__(self, app, *args, **kw):
    if os.environ.get("CANARYMW_WRAP") == "1":
        rollout = Rollout("suite", percent=50, secret_key={KEY!r})
        app = ASGICanaryMiddleware(app, new=app, rollout=rollout, sink=MemorySink())
    _init(self, app, *args, **kw)


tc.TestClient.__init__ = __init__
"""

SUITES: dict[str, dict[str, Any]] = {
    "starlette": {
        "requirement": "starlette[full]",
        "test_deps": ["pytest", "trio", "anyio", "httpx2[zstd]", "blockbuster", "opentelemetry-sdk"],
        "plugin": STARLETTE_PLUGIN,
    },
    "fastapi": {
        "requirement": "fastapi[standard]",
        "test_deps": [
            "pytest<9.2",
            "pytest-xdist",
            "pytest-timeout",
            "strawberry-graphql",
            "a2wsgi",
            "orjson",
            "anyio[trio]",
            "dirty-equals",
            "inline-snapshot",
            "sqlmodel",
            "pyjwt",
            "pwdlib[argon2]",
            "pyyaml",
            "flask",
            "httpx2",
            "python-slugify",
            "typer",
            "opentelemetry-sdk",
        ],
        "plugin": STARLETTE_PLUGIN,  # FastAPI's TestClient is Starlette's
    },
    "flask": {
        "requirement": "flask[async,dotenv]",
        # Flask 3.1's test_cli imports a pytest internal that pytest 9 removed.
        "test_deps": ["pytest<9", "asgiref", "greenlet", "blinker"],
        "plugin": f"""
import os
from flask import Flask
from canarymw import MemorySink, Rollout, WSGICanaryMiddleware

_call = Flask.__call__


def __call__(self, environ, start_response):
    if os.environ.get("CANARYMW_WRAP") != "1":
        return _call(self, environ, start_response)
    mw = self.__dict__.get("_canarymw")
    if mw is None:
        def inner(environ, start_response):
            return _call(self, environ, start_response)

        rollout = Rollout("suite", percent=50, secret_key={KEY!r})
        mw = self.__dict__["_canarymw"] = WSGICanaryMiddleware(
            inner, new=inner, rollout=rollout, sink=MemorySink()
        )
    return mw(environ, start_response)


Flask.__call__ = __call__
""",
    },
}


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def _failures(output: str) -> dict[str, str]:
    """Test id -> one-line reason, from pytest's ``-rfE`` summary."""
    out: dict[str, str] = {}
    for line in output.splitlines():
        m = re.match(r"(FAILED|ERROR) (\S+)(?: - (.*))?$", line)
        if m:
            out[m.group(2)] = m.group(3) or ""
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", choices=sorted(SUITES))
    parser.add_argument("--version", help="the framework version (default: the installed one, else newest)")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a new temporary directory)")
    args = parser.parse_args()
    suite = SUITES[args.project]
    version = args.version
    if version is None:
        try:
            version = importlib.metadata.version(args.project)
        except importlib.metadata.PackageNotFoundError:
            version = None
    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"canarymw-{args.project}-"))
    work.mkdir(parents=True, exist_ok=True)
    pin = f"=={version}" if version else ""
    print(f"work directory: {work}")
    venv = work / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    print("installing this checkout, the framework and its test requirements ...")
    pip = [str(python), "-m", "pip"]
    _run([*pip, "install", "-q", "-e", str(ROOT), f"{suite['requirement']}{pin}", *suite["test_deps"]])
    version = _run([str(python), "-c", f"import importlib.metadata as m; print(m.version({args.project!r}))"])
    version = version.stdout.strip()
    src = work / f"{args.project}-{version}"
    if not src.exists():
        dist = work / "dist"
        _run(
            [
                *pip,
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(dist),
                f"{args.project}=={version}",
            ]
        )
        (sdist,) = dist.glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        (extracted,) = (p for p in work.iterdir() if p.is_dir() and p.name.lower() == src.name.lower())
        extracted.rename(src)
    (work / "canarymw_wrap.py").write_text(suite["plugin"])
    runs = {
        "unwrapped": {"CANARYMW_WRAP": "0"},
        "compiled": {"CANARYMW_WRAP": "1"},
        "pure-Python": {"CANARYMW_WRAP": "1", "CANARYMW_NO_EXTENSIONS": "1"},
    }
    results: dict[str, dict[str, str]] = {}
    for name, extra in runs.items():
        env = {k: v for k, v in os.environ.items() if k != "CANARYMW_NO_EXTENSIONS"}
        env.update(extra, PYTHONPATH=f"{work}{os.pathsep}{src}", COLUMNS="300")
        proc = subprocess.run(
            [
                str(python),
                "-m",
                "pytest",
                "-p",
                "canarymw_wrap",
                "-q",
                "-rfE",
                "-p",
                "no:cacheprovider",
                # A module that needs a package not installed here fails alike in every run.
                "--continue-on-collection-errors",
                "tests",
            ],
            cwd=src,
            env=env,
            text=True,
            capture_output=True,
        )
        results[name] = _failures(proc.stdout)
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        print(f"{args.project} {version}, {name}: {summary}")
        if " passed" not in summary:
            sys.exit(f"the {name} run did not get as far as running tests:\n{proc.stdout[-3000:]}")
    base = results["unwrapped"]
    for name in ("compiled", "pure-Python"):
        extra_failures = {t: r for t, r in results[name].items() if t not in base}
        print(f"\nfailing only when wrapped ({name} path): {len(extra_failures)}")
        for test, reason in sorted(extra_failures.items()):
            print(f"  {test}\n      {reason[:200]}")
    same = set(results["compiled"]) == set(results["pure-Python"])
    print(f"\ncompiled and pure-Python paths fail the same tests: {'yes' if same else 'NO'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
