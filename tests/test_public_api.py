from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import canarymw


def test_all_is_unique_and_complete() -> None:
    assert len(set(canarymw.__all__)) == len(canarymw.__all__)  # order: ruff RUF022
    public = {
        n
        for n in dir(canarymw)
        if not n.startswith("_") and not isinstance(getattr(canarymw, n), types.ModuleType)
    } - {"annotations"}
    assert public <= set(canarymw.__all__)
    for name in canarymw.__all__:
        assert getattr(canarymw, name) is not None
        obj = getattr(canarymw, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


def test_import_pulls_no_optional_dependency() -> None:
    code = (
        "import sys, canarymw, canarymw.wsgi;"
        "bad = [m for m in ('flask', 'starlette', 'httpx', 'gunicorn', 'uvicorn', 'prometheus_client',"
        " 'opentelemetry', 'werkzeug', 'anyio') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_starts_no_thread() -> None:
    code = "import threading, canarymw; print(threading.active_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_public_names_live_in_canarymw() -> None:
    for name in canarymw.__all__:
        obj = getattr(canarymw, name)
        if isinstance(obj, (type, types.FunctionType)):
            assert obj.__module__ == "canarymw", name


def test_import_loads_no_proxy() -> None:
    code = (
        "import sys, canarymw, canarymw.wsgi, canarymw.asgi;"
        "print(sorted(m for m in sys.modules if 'upstream' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _imports(path: Path, package: str) -> set[str]:
    """The canarymw modules a module imports anywhere in it, except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
                names = [f"{module}.{a.name}" for a in node.names]
                found.update(n for n in [module, *names] if n in MODULES)
            elif node.module and node.module.startswith("canarymw"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("canarymw"))
    return found & MODULES


SRC = Path(canarymw.__file__).parent
MODULES = {
    ".".join(("canarymw", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
    for p in SRC.rglob("*.py")
}


def test_the_import_graph_has_no_circle() -> None:
    """Each module may import only modules below it: no two import each other, even
    lazily inside a function. A package's ``__init__`` re-exporting its children is the
    one allowed way up."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        module = ".".join(("canarymw", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        graph[module] = {m for m in _imports(path, package) if m != module}
    for module, deps in graph.items():
        # A child importing its own package's __init__ is fine only if that __init__ is not
        # what imports it; drop edges up into packages, which re-export their children.
        graph[module] = {d for d in deps if not module.startswith(d + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circle = [*path[path.index(dep) :], dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_a_middleware_keeps_the_sink_it_was_given() -> None:
    from canarymw import MemorySink, Rollout, WSGICanaryMiddleware
    from canarymw.asgi import ASGICanaryMiddleware

    def app(environ: object, start_response: object) -> list[bytes]:
        return []

    rollout = Rollout("api", percent=10, secret_key="api-secret-key-0123456789")
    one, two = MemorySink(), MemorySink()
    for cls in (WSGICanaryMiddleware, ASGICanaryMiddleware):
        assert cls(app, new=None, rollout=rollout, sink=one).sink is one
        pair = [one, two]
        assert cls(app, new=None, rollout=rollout, sink=pair).sink is pair
        assert cls(app, new=None, rollout=rollout).sink is None


def test_the_store_package_documents_its_public_names() -> None:
    import inspect

    import canarymw.store
    from canarymw.sinks.store import StoreSink

    assert len(set(canarymw.store.__all__)) == len(canarymw.store.__all__)
    for name in canarymw.store.__all__:
        obj = getattr(canarymw.store, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
    for name in ("switch_off", "store_status"):
        assert len((getattr(canarymw.Rollout, name).__doc__ or "").strip()) > 20, name
    assert StoreSink.__doc__ and "Args:" in StoreSink.__doc__
