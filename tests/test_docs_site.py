"""The documentation site builds with ``mkdocs build --strict``, and its API reference is complete.

Strict mode turns every warning into a failure: a broken link or anchor between pages, a
page in the nav that does not exist, a snippet include (``--8<--``) of a missing file, an
API reference (``::: module``) that cannot be resolved, a docstring griffe cannot parse.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import canarymw

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"

#: Every public module, each documented in docs/api/.
PUBLIC_MODULES = [
    "canarymw",
    "canarymw.asgi",
    "canarymw.flask",
    "canarymw.starlette",
    "canarymw.sinks",
    "canarymw.sinks.jsonl",
    "canarymw.sinks.prometheus",
    "canarymw.sinks.otel",
    "canarymw.sinks.store",
    "canarymw.store",
    "canarymw.guard",
    "canarymw.upstream",
    "canarymw.shadow",
    "canarymw.admin",
]
#: Modules that are not private by name but have no API of their own, and why.
NOT_REFERENCED = {
    "canarymw.cli": "the command line, documented in docs/cli.md",
    "canarymw.wsgi": "its middleware is canarymw.WSGICanaryMiddleware",
    "canarymw.sinks.background": "its sink is canarymw.BackgroundSink",
    "canarymw.sinks.memory": "its sink is canarymw.MemorySink",
    "canarymw.store.memory": "its store is canarymw.store.MemoryStore",
    "canarymw.store.sqlite": "its store is canarymw.store.SQLiteStore",
    "canarymw.store.redis": "its store is canarymw.store.RedisStore",
}
#: Names a module exports without an ``__all__``.
EXPORTS = {"canarymw.sinks.store": ["StoreSink"]}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not MKDOCS.exists():
        pytest.skip(f"mkdocs is not installed in this environment ({MKDOCS}); it is in the dev extra")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def _anchors(site: Path) -> set[str]:
    found: set[str] = set()
    for page in (site / "api").rglob("*.html"):
        found |= set(re.findall(r'id="(canarymw[\w.]*)"', page.read_text()))
    return found


def test_the_site_builds_strictly_with_every_section(site: Path) -> None:
    for page in [
        "index.html",
        "quickstart/index.html",
        "concepts/index.html",
        "django/index.html",
        "deployment/index.html",
        "security/index.html",
        "benchmarks/index.html",
        "api/index.html",
        "faq/index.html",
        "changelog/index.html",
    ]:
        assert (site / page).is_file(), page
    home = (site / "index.html").read_text()
    for title in [
        "Quickstart",
        "Concepts",
        "Guides",
        "Security model",
        "Benchmarks",
        "API reference",
        "FAQ",
        "Changelog",
    ]:
        assert title in home, title


def test_the_changelog_is_included_not_copied(site: Path) -> None:
    source = (ROOT / "docs" / "changelog.md").read_text()
    assert '--8<-- "CHANGELOG.md"' in source and len(source.splitlines()) < 5
    first_entry = next(
        line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")
    )
    assert (
        first_entry.removeprefix("## ").strip("[]").split("]")[0]
        in (site / "changelog" / "index.html").read_text()
    )


def test_included_example_code_is_the_tested_file(site: Path) -> None:
    page = (site / "django" / "index.html").read_text()
    assert "get_wsgi_application" in page and "--8&lt;--" not in page and "--8<--" not in page


def test_every_public_module_is_referenced() -> None:
    modules = {
        m.name
        for m in pkgutil.walk_packages(canarymw.__path__, "canarymw.")
        if not any(part.startswith("_") for part in m.name.split(".")[1:])
    }
    missing = modules - set(PUBLIC_MODULES) - set(NOT_REFERENCED) - {"canarymw"}
    assert not missing, f"public modules missing from the API reference (docs/api/): {sorted(missing)}"


def test_every_public_name_is_in_the_api_reference(site: Path) -> None:
    anchors = _anchors(site)
    loaded = {name: importlib.import_module(name) for name in PUBLIC_MODULES}
    missing = []
    for module_name, module in loaded.items():
        for name in getattr(module, "__all__", EXPORTS.get(module_name, [])):
            obj = getattr(module, name)
            # A name re-exported from another public module is documented there.
            homes = {module_name} | {
                other
                for other, mod in loaded.items()
                if other != module_name and getattr(mod, name, None) is obj
            }
            if not any(f"{home}.{name}" in anchors for home in homes):
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names without an entry in the API reference: {missing}"
