"""Start real servers (gunicorn, uvicorn) on free loopback ports, and always stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(
    argv: Sequence[str],
    port: int,
    *,
    env: dict[str, str] | None = None,
    ready_path: str = "/",
    timeout: float = 20,
    tls: bool = False,
) -> Iterator[str]:
    """Run ``argv`` (a server bound to 127.0.0.1:``port``) until the block ends.

    ``tls``: the server answers https (readiness is checked without verifying it).
    """
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    full_env.update(env or {})
    # stderr goes to a file, not a pipe: a chatty server must never block on a full pipe.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below, after the server
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                err = log.read().decode(errors="replace")
                raise RuntimeError(f"server exited early ({proc.returncode}):\n{err[-3000:]}")
            try:
                httpx.get(base + ready_path, timeout=1.0, verify=not tls)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server on port {port} not ready after {timeout}s") from None
                time.sleep(0.1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def gunicorn(app: str, port: int, workers: int = 2) -> list[str]:
    return ["gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}", "--log-level", "warning", app]
