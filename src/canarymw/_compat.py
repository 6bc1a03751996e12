"""Which build of the request path runs: compiled by mypyc, or the Python sources.

The modules in :data:`COMPILED` are compiled at install time by mypyc from these very
sources (see hatch_build.py), so both builds have one implementation. This module is
the one place that picks the build, once, before any of them is imported:

- the Python sources when ``CANARYMW_NO_EXTENSIONS`` is set (to rule the compiled build
  out, or to test the Python one), when the compiled modules were not built (no C
  compiler at install time), when they were built from other sources than the ones
  next to them (an edited checkout: reinstall to rebuild), in a sub-interpreter, or when
  they cannot be loaded in this interpreter;
- the compiled modules otherwise.

:data:`BUILD` says which one runs and why (``canarymw --version`` prints it).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

COMPILED = ("_asgi_core.py", "_headers.py", "wsgi.py", "sinks/_dispatch.py")
"""The modules mypyc compiles, as paths inside the package (read by hatch_build.py):
the adapters' per-request work. The cohort decision (``Rollout``) stays interpreted: a
returning visitor costs it one dict lookup, and its validation speaks in sentences."""

_HERE = Path(__file__).parent
_STAMP = "_compiled.sha256"  # written by the build: the digest of the sources compiled
_GROUP = "canarymw._compiled__mypyc"  # mypyc's shared library of the compiled modules


def _digest() -> str:
    h = hashlib.sha256()
    for name in COMPILED:
        h.update(name.encode() + b"\0" + (_HERE / name).read_bytes() + b"\0")
    return h.hexdigest()


def _in_subinterpreter() -> bool:
    for name in ("_interpreters", "_xxsubinterpreters"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return bool(module.get_current() != module.get_main())
    return False


def _choose() -> tuple[bool, str]:
    if os.environ.get("CANARYMW_NO_EXTENSIONS"):
        return False, "Python sources (CANARYMW_NO_EXTENSIONS is set)"
    if _in_subinterpreter():
        # mypyc's modules use single-phase initialisation: a second sub-interpreter that
        # loads them (mod_wsgi's application groups) finds their state gone.
        return False, "Python sources (a sub-interpreter: the compiled modules load in the main one only)"
    try:
        stamp = (_HERE / _STAMP).read_text("ascii").strip()
    except OSError:
        return False, "Python sources (the compiled modules were not built)"
    if stamp != _digest():
        return False, "Python sources (the compiled modules are older than the sources; reinstall)"
    try:
        importlib.import_module(_GROUP)
    except ImportError as exc:
        return False, f"Python sources (the compiled modules cannot be loaded here: {exc})"
    return True, "compiled (mypyc)"


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Loads canarymw's modules from their ``.py`` files, except those in ``compiled``.

    Without it a compiled module that should not run (switched off, stale, or left by an
    older build that compiled other modules) would win: extension modules come first.
    """

    def __init__(self, compiled: frozenset[str]) -> None:
        self.compiled = compiled

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("canarymw.") or fullname in self.compiled or not path:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path:
            candidate = os.path.join(entry, leaf)
            if os.path.isfile(candidate):
                return importlib.util.spec_from_file_location(fullname, candidate)
        return None  # a package, or not ours: the usual finders


_CLASS_DOC = re.compile(r'^class (\w+)\b[^\n]*:\n    ("""(?:[^"\\]|\\.|"(?!""))*""")', re.MULTILINE)


def restore_docstrings() -> None:
    """Give the compiled modules' classes their docstrings back (mypyc drops them).

    For ``help()`` and documentation tools that introspect; read from the sources that
    were compiled, which ship beside the compiled modules.
    """
    for name in COMPILED:
        module = sys.modules.get("canarymw." + name[:-3].replace("/", "."))
        if module is None:
            continue
        for match in _CLASS_DOC.finditer((_HERE / name).read_text("utf-8")):
            cls = getattr(module, match[1], None)
            if isinstance(cls, type) and not cls.__doc__:
                cls.__doc__ = ast.literal_eval(match[2])


IS_COMPILED, BUILD = _choose()
"""True when the compiled modules serve requests; BUILD: which build runs, and why."""

if not any(isinstance(f, _SourcesFirst) for f in sys.meta_path):
    _names = {"canarymw." + n[:-3].replace("/", ".") for n in COMPILED} if IS_COMPILED else set()
    sys.meta_path.insert(0, _SourcesFirst(frozenset(_names | {_GROUP})))
