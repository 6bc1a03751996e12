from __future__ import annotations

import subprocess
import sys
import types

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
