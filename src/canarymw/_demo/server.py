"""Run the demo service under a real server (gunicorn or uvicorn) on 127.0.0.1.

The server is a child process in a session of its own, so a Ctrl-C in the terminal
reaches only the demo, which then stops the server itself (SIGTERM, then SIGKILL of
that one process group if it does not exit in time). :class:`DemoServer` is a context
manager: the server is stopped on every way out, including errors and interrupts.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType
from typing import Literal

from .settings import HEALTH_PATH, PID_HEADER

Kind = Literal["gunicorn", "uvicorn"]

FLASK_TARGET = "canarymw._demo.flask_app:create_app()"
STARLETTE_TARGET = "canarymw._demo.starlette_app:create_app"


class ServerError(RuntimeError):
    """The server could not be started; the message says why (with its log tail)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_command(kind: Kind, port: int, workers: int) -> list[str]:
    """The command line that serves the demo app with ``workers`` worker processes."""
    if kind == "gunicorn":
        # The sync worker (gunicorn's default, what most deployments run) closes the
        # connection after each response, so consecutive requests of one user land on
        # whichever worker accepts first: the cross-worker stickiness check gets exercised.
        return [
            sys.executable, "-m", "gunicorn",
            "--workers", str(workers),
            "--bind", f"{DemoServer.host}:{port}",
            "--log-level", "warning",
            "--graceful-timeout", "5",
            FLASK_TARGET,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "uvicorn",
        "--factory", STARLETTE_TARGET,
        "--host", DemoServer.host,
        "--port", str(port),
        "--workers", str(workers),
        "--log-level", "warning",
        "--no-access-log",
        "--timeout-graceful-shutdown", "5",
    ]  # fmt: skip


class DemoServer:
    """One demo server process: started and ready on enter, stopped on exit.

    Args:
        kind: ``"gunicorn"`` (the Flask demo) or ``"uvicorn"`` (the Starlette demo).
        workers: Worker processes.
        env: Extra environment variables for the server (the demo settings).
        startup_timeout: Seconds to wait for the first answer on the health path.
    """

    host = "127.0.0.1"
    """Loopback only: the demo never listens on a public interface."""

    def __init__(
        self, kind: Kind, *, workers: int, env: dict[str, str], startup_timeout: float = 30.0
    ) -> None:
        self.kind = kind
        self.workers = workers
        self.env = env
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path: str | None = None
        self.pids: set[int] = set()
        """Worker pids seen answering the health path during start-up."""

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> DemoServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the server and wait until it answers; retry on a port taken meanwhile."""
        for attempt in range(3):
            self.port = free_port()
            self._spawn()
            try:
                self._wait_ready()
                return
            except ServerError as exc:
                log = self.log_tail()
                self.stop()
                # Another process may grab the free port between our probe and the bind.
                if "already in use" in log.lower() and attempt < 2:
                    continue
                raise ServerError(f"{exc}\n{log}".rstrip()) from None

    def _spawn(self) -> None:
        if self._log_path is None:
            fd, self._log_path = tempfile.mkstemp(prefix="canarymw-demo-", suffix=".log")
            os.close(fd)
        with open(self._log_path, "wb"):
            pass  # a retry starts with an empty log
        env = {**os.environ, **self.env}
        # Append mode: the server's writes always land at the end, while we read the
        # file through a handle of our own.
        with open(self._log_path, "ab") as log:
            self.proc = subprocess.Popen(
                server_command(self.kind, self.port, self.workers),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise ServerError(f"{self.kind} exited with code {code} during start-up.")
            if self._healthy():
                self._wait_for_workers(grace=5.0)
                return
            if "Traceback (most recent call last)" in self.log_tail(200):
                # uvicorn's supervisor restarts a worker that cannot import the app
                # forever; the traceback in the log is the real answer, so stop waiting.
                raise ServerError(f"{self.kind} could not load the demo app.")
            if time.monotonic() > deadline:
                raise ServerError(f"{self.kind} did not answer within {self.startup_timeout:.0f} s.")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        pid = self._health_pid()
        if pid is None:
            return False
        self.pids.add(pid)
        return True

    def _health_pid(self) -> int | None:
        """The pid of the worker that answered the health path, or None if none did."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2.0)
        try:
            conn.request("GET", HEALTH_PATH, headers={"Connection": "close"})
            response = conn.getresponse()
            response.read()
            pid = response.getheader(PID_HEADER, "")
            return int(pid) if response.status == 200 and pid.isdigit() else None
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def _wait_for_workers(self, grace: float) -> None:
        # Workers boot one after the other; load sent before the last one is up would
        # all land on the first, and the cross-worker check would see less. Best effort:
        # after ``grace`` seconds the demo goes on with the workers that answered.
        deadline = time.monotonic() + grace
        while len(self.pids) < self.workers and time.monotonic() < deadline:
            pid = self._health_pid()
            if pid is not None:
                self.pids.add(pid)
            else:
                time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server wrote (stdout and stderr)."""
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as log:
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (gracefully, then by force) and wait for it. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # The master is still alive (not reaped), so its process group is
                # certainly ours: take the workers down with it.
                _kill_group(proc)
                proc.wait(timeout=10)
            except KeyboardInterrupt:
                # A second Ctrl-C while stopping: stop at once rather than leave workers behind.
                _kill_group(proc)
                proc.wait(timeout=10)
                raise

    def close(self) -> None:
        """Stop the server and delete its log file."""
        self.stop()
        path, self._log_path = self._log_path, None
        if path is not None:
            with contextlib.suppress(OSError):
                os.remove(path)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if sys.platform == "win32":  # pragma: no cover - gunicorn does not run on Windows
        with contextlib.suppress(OSError):
            proc.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
