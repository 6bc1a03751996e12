"""The two builds of the request path: which one runs, and that both are the same code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import canarymw
from canarymw import _compat

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(canarymw.__file__).parent


def probe(env: dict[str, str], path: Path | None = None) -> list[str]:
    """BUILD and where canarymw.wsgi and canarymw.asgi were loaded from, in a fresh interpreter."""
    code = (
        "import canarymw, canarymw.wsgi as w, canarymw._asgi_core as a\n"
        "print(canarymw._compat.BUILD); print(w.__file__); print(a.__file__)"
    )
    full = {k: v for k, v in os.environ.items() if k != "CANARYMW_NO_EXTENSIONS"} | env
    if path is not None:
        full["PYTHONPATH"] = str(path)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_the_build_hook_compiles_what_compat_names() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import hatch_build
    finally:
        sys.path.remove(str(ROOT))
    assert hatch_build.compiled_modules(ROOT) == _compat.COMPILED
    if (PACKAGE / "_compiled.sha256").exists():
        assert hatch_build.source_digest(ROOT, _compat.COMPILED) == _compat._digest()


def test_ci_runs_the_compiled_build() -> None:
    # .ci/run installs with a compiler and requires the compiled build in its first run.
    if os.environ.get("CANARYMW_REQUIRE_COMPILED"):
        assert _compat.IS_COMPILED, _compat.BUILD
    assert canarymw.wsgi.__file__.endswith(".so") is _compat.IS_COMPILED, _compat.BUILD


def test_no_extensions_selects_the_python_sources() -> None:
    build, wsgi, asgi = probe({"CANARYMW_NO_EXTENSIONS": "1"})
    assert build == "Python sources (CANARYMW_NO_EXTENSIONS is set)"
    assert wsgi.endswith("wsgi.py") and asgi.endswith("_asgi_core.py")


@pytest.mark.skipif(not _compat.IS_COMPILED, reason="the compiled build is not installed here")
def test_compiled_modules_load_and_a_stale_build_falls_back(tmp_path: Path) -> None:
    build, wsgi, asgi = probe({})
    assert build == "compiled (mypyc)" and wsgi.endswith(".so") and asgi.endswith(".so")
    # A checkout edited after the build: the compiled modules no longer match their
    # sources, so the sources run (never stale compiled code).
    copy = tmp_path / "canarymw"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "wsgi.py").open("a") as f:
        f.write("\n# edited\n")
    build, wsgi, asgi = probe({}, tmp_path)
    assert build.startswith("Python sources (the compiled modules are older than the sources")
    assert wsgi == str(copy / "wsgi.py") and asgi == str(copy / "_asgi_core.py")
    (copy / "_compiled.sha256").unlink()
    assert probe({}, tmp_path)[0] == "Python sources (the compiled modules were not built)"


def test_public_classes_keep_their_docstrings() -> None:
    # mypyc drops docstrings; help() and documentation tools still find them.
    assert canarymw.asgi._Core.__doc__ and canarymw.asgi._Core.__doc__.startswith("The compiled part")
    for cls in (canarymw.WSGICanaryMiddleware, canarymw.ASGICanaryMiddleware):
        assert cls.__doc__ and cls.__doc__.startswith("Route each request to ``old_app``")
        assert "    Args:\n" in cls.__doc__


@pytest.mark.parametrize("base", [canarymw.WSGICanaryMiddleware, canarymw.ASGICanaryMiddleware])
def test_the_middlewares_can_be_subclassed(base: type) -> None:
    rollout = canarymw.Rollout("sub", percent=50, secret_key="k" * 32)

    class Mine(base):  # type: ignore[misc, valid-type]
        """A user's subclass adding an attribute and overriding a property."""

        @property
        def sink_errors(self) -> int:
            return 42

    mine = Mine(lambda *a: None, new=None, rollout=rollout)
    mine.note = "kept"
    assert mine.sink_errors == 42 and mine.note == "kept" and mine.rollout is rollout


def test_version_names_the_build() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "canarymw"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"canarymw {canarymw.__version__}, {_compat.BUILD}"


SUB_CODE = """
import canarymw, canarymw._compat as c, canarymw.wsgi as w
from canarymw import Rollout, WSGICanaryMiddleware
def app(env, sr):
    sr("200 OK", [("Content-Type", "text/plain")])
    return [b"hi"]
mw = WSGICanaryMiddleware(app, new=None, rollout=Rollout("x", percent=50, secret_key="k" * 32))
seen = []
body = b"".join(mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http"},
                   lambda status, headers, exc_info=None: seen.append(status)))
assert body == b"hi" and seen == ["200 OK"], (body, seen)
assert w.__file__.endswith("wsgi.py"), w.__file__
assert c.BUILD.startswith("Python sources ("), c.BUILD
"""


@pytest.mark.skipif(
    sys.version_info >= (3, 13), reason="_xxsubinterpreters (3.10-3.12) drives the sub-interpreters here"
)
def test_sub_interpreters_run_the_python_sources() -> None:
    # mod_wsgi runs each application group in a sub-interpreter: several of them, one
    # after another, must all serve (the compiled modules cannot be loaded twice).
    driver = (
        "import _xxsubinterpreters as si, canarymw\n"
        f"code = {SUB_CODE!r}\n"
        "for _ in range(3):\n"
        "    interp = si.create(); si.run_string(interp, code); si.destroy(interp)\n"
        "print(canarymw._compat.BUILD)\n"
    )
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _compat.BUILD  # the main interpreter keeps its build


def test_a_compiled_module_left_by_an_older_build_is_never_loaded(tmp_path: Path) -> None:
    # Extension modules win over sources by default: a leftover asgi.so (asgi.py was
    # compiled once) or one of a module never compiled must not shadow the source.
    import importlib.machinery

    copy = tmp_path / "canarymw"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for leftover in ("asgi", "_rollout", "sinks/memory"):
        (copy / f"{leftover}{suffix}").write_bytes(b"not a shared library")
    code = (
        "import canarymw, canarymw.asgi as a, canarymw._rollout as r, canarymw.sinks.memory as m\n"
        "print(a.__file__); print(r.__file__); print(m.__file__)"
    )
    for env in ({}, {"CANARYMW_NO_EXTENSIONS": "1"}):
        full = {k: v for k, v in os.environ.items() if k != "CANARYMW_NO_EXTENSIONS"} | env
        full["PYTHONPATH"] = str(tmp_path)
        out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [
            str(copy / "asgi.py"),
            str(copy / "_rollout.py"),
            str(copy / "sinks/memory.py"),
        ]
