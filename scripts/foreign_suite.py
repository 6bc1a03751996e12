"""Run another project's own test suite with every app it builds wrapped by canarymw.

    python scripts/foreign_suite.py starlette      # every app given to Starlette's TestClient
    python scripts/foreign_suite.py fastapi        # the same, for FastAPI's suite
    python scripts/foreign_suite.py flask          # every Flask app, through WSGICanaryMiddleware

Downloads the source distribution of the framework version installed next to this
script's Python (or the newest one), builds a virtual environment under a work
directory with this checkout and the suite's test requirements, and runs the suite
three times: unwrapped, wrapped on the compiled build (the adapters' modules compiled
by mypyc), and wrapped on the pure-Python build (CANARYMW_NO_EXTENSIONS=1). The rollout
splits visitors 50/50 between two copies of the same app, so every test's app answers
either way.

The checkout is installed as a wheel, not in editable mode, from a copy of its sources
in the work directory: building the wheel compiles the adapters with mypyc
(hatch_build.py), which writes the compiled modules next to the sources it builds from,
so the copy keeps this checkout's src/ untouched. ``--rev REV`` builds commit REV
instead of the work tree (whose uncommitted changes are listed otherwise). Before each
run the script prints ``canarymw._compat.BUILD`` as the venv's Python sees it with that
run's environment, and the pytest plugin records the build the suite's own process
imported; a wrapped run on the wrong build stops the script.

It prints the tests that fail only when wrapped, with pytest's one-line reason, and
exits non-zero if the compiled and the pure-Python builds fail different tests. Tests
that fail only when wrapped are expected where a suite asserts the exact response
headers: the middleware adds ``Vary: Cookie`` and ``Cache-Control: private`` to every
routed response and a ``Set-Cookie`` on a first visit (and on a websocket's accept).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEY = "foreign-suite-secret-key-0123456789"

# Recorded by every run's plugin, in the suite's own pytest process: which build of
# canarymw it imported, and the file its adapter module came from.
BUILD_RECORDER = """
import os as _os

if _os.environ.get("CANARYMW_BUILD_FILE"):
    import canarymw._compat as _compat
    import canarymw._asgi_core as _asgi
    import canarymw.wsgi as _wsgi

    with open(_os.environ["CANARYMW_BUILD_FILE"], "w") as _f:
        _f.write(f"{_compat.IS_COMPILED}\\n{_compat.BUILD}\\n{_asgi.__file__}\\n{_wsgi.__file__}\\n")
"""

# What the wheel is built from: the checkout's sources, without what a build leaves in them.
BUILD_INPUTS = ("pyproject.toml", "hatch_build.py", "README.md", "LICENSE", "CHANGELOG.md", "src")
BUILD_LEFTOVERS = shutil.ignore_patterns(
    "*.so", "*.pyd", ".*.partial", "_compiled.sha256", "__pycache__", "*.egg-info"
)

PROBE = (
    "import canarymw._compat as c, canarymw._asgi_core as a, canarymw.wsgi as w; "
    "print(c.IS_COMPILED); print(c.BUILD); print(a.__file__); print(w.__file__)"
)

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
        # Not for Flask: mypyc type-checks the whole package when it compiles the adapters,
        # and without anyio and httpcore (imported by _lifespan and upstream) that check
        # fails and the build falls back to a pure-Python wheel with only a warning.
        "build_deps": ["anyio", "httpcore"],
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
    proc: subprocess.CompletedProcess[str] = subprocess.run(cmd, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _snapshot(work: Path, rev: str | None) -> Path:
    """A copy of the checkout's build inputs (of its work tree, or of commit ``rev``)."""
    dest = work / "canarymw-src"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    if rev is not None:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "--", *BUILD_INPUTS],
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        print(f"canarymw built from commit {rev}")
        return dest
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", *BUILD_INPUTS],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    changed = [line[3:] for line in changed if line.strip()]
    print(f"canarymw built from the work tree; uncommitted: {', '.join(changed) or 'none'}")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=BUILD_LEFTOVERS)
        elif path.exists():
            shutil.copy2(path, dest / name)
    return dest


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
    parser.add_argument("--rev", help="build canarymw from this commit (default: the work tree as it is)")
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
    print("installing this checkout (a mypyc-compiled wheel), the framework and its test requirements ...")
    pip = [str(python), "-m", "pip"]
    _run(
        [
            *pip,
            "install",
            "-q",
            f"{suite['requirement']}{pin}",
            *suite["test_deps"],
            *suite.get("build_deps", ()),
        ]
    )
    # Its own step, so that a reused work directory gets the checkout as it is now.
    _run([*pip, "install", "-q", "--force-reinstall", str(_snapshot(work, args.rev))])
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
    (work / "canarymw_wrap.py").write_text(suite["plugin"] + BUILD_RECORDER)
    # run -> (its environment, whether canarymw must run compiled in it; None: either)
    runs: dict[str, tuple[dict[str, str], bool | None]] = {
        "unwrapped": ({"CANARYMW_WRAP": "0"}, None),
        "compiled": ({"CANARYMW_WRAP": "1"}, True),
        "pure-Python": ({"CANARYMW_WRAP": "1", "CANARYMW_NO_EXTENSIONS": "1"}, False),
    }
    results: dict[str, dict[str, str]] = {}
    for name, (extra, compiled) in runs.items():
        env = {k: v for k, v in os.environ.items() if k != "CANARYMW_NO_EXTENSIONS"}
        build_file = work / f"build-{name}.txt"
        build_file.unlink(missing_ok=True)
        env.update(
            extra,
            PYTHONPATH=f"{work}{os.pathsep}{src}",
            COLUMNS="300",
            CANARYMW_BUILD_FILE=str(build_file),
        )
        probe = _run([str(python), "-c", PROBE], cwd=src, env=env).stdout.splitlines()
        print(f"{args.project} {version}, {name}: canarymw build {probe[1]!r}")
        print(f"    canarymw._asgi_core from {probe[2]}\n    canarymw.wsgi from {probe[3]}")
        want = "compiled" if compiled else "pure-Python"
        if compiled is not None and (probe[0] == "True") != compiled:
            sys.exit(f"the {name} run would not run the {want} build")
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
        (work / f"pytest-{name}.log").write_text(proc.stdout + proc.stderr)  # the whole report
        results[name] = _failures(proc.stdout)
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        print(f"{args.project} {version}, {name}: {summary}")
        if " passed" not in summary:
            sys.exit(f"the {name} run did not get as far as running tests:\n{proc.stdout[-3000:]}")
        seen = build_file.read_text().splitlines() if build_file.exists() else []
        if not seen:
            sys.exit(f"the {name} run's pytest process did not record which canarymw build it imported")
        print(f"    in pytest's process: {seen[1]!r}, canarymw._asgi_core from {Path(seen[2]).name}")
        if compiled is not None and (seen[0] == "True") != compiled:
            sys.exit(f"the {name} run's pytest process did not run the {want} build")
    base = results["unwrapped"]
    print(f"\nfailing unwrapped too (in every run): {len(base)}")
    for test, reason in sorted(base.items()):
        print(f"  {test}\n      {reason[:200]}")
    for name in ("compiled", "pure-Python"):
        extra_failures = {t: r for t, r in results[name].items() if t not in base}
        print(f"\nfailing only when wrapped ({name} build): {len(extra_failures)}")
        for test, reason in sorted(extra_failures.items()):
            print(f"  {test}\n      {reason[:200]}")
    same = set(results["compiled"]) == set(results["pure-Python"])
    print(f"\ncompiled and pure-Python builds fail the same tests: {'yes' if same else 'NO'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
