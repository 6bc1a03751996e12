"""Load one local server with wrk and count the CPU its processes spent doing so; the one
way the benchmarks compare contenders measured in the same rounds; and what the scripts
share besides: starting a server (with any interpreter, so another checkout's build can
be a contender), naming the build of canarymw that an interpreter runs, and ``--both``.

Requests/second of a server that shares two vCPUs with its load generator scatter by
10% and more between runs. The CPU time the server's processes use per request served
scatters far less, so the server benchmarks report both: ``cpu_bare / cpu_this`` is the
throughput ratio the two would have if the server were the only thing on the machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def paired_added(samples: dict[str, list[float]], base: str = "bare") -> dict[str, float]:
    """Per contender, the median over rounds of (its value - ``base``'s in that round)."""
    return {
        name: statistics.median(a - b for a, b in zip(values, samples[base], strict=True))
        for name, values in samples.items()
    }


@dataclass
class Run:
    rps: float
    requests: int
    cpu: float  # seconds of user + system time of the server's processes

    @property
    def cpu_per_request(self) -> float:
        return self.cpu / self.requests if self.requests else float("inf")


def _group_of(port: int) -> int:
    """Process group of the server started with this port in its command line."""
    needles = (f"--port\0{port}\0", f"127.0.0.1:{port}\0")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_text()
            if any(n in cmdline for n in needles):
                return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
        except OSError:
            continue
    raise LookupError(f"no process with port {port} in its command line")


def _cpu(group: int) -> float:
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / _TICK


_MIX = """local n = 0
request = function()
  n = n + 1
  if n % {every} == 0 then
    return wrk.format(nil, nil, {{["Cookie"] = "{new}"}})
  end
  return wrk.format(nil, nil, {{["Cookie"] = "{returning}"}})
end
"""


def wrk(
    url: str,
    seconds: float,
    cookie: str | None,
    port: int,
    *,
    threads: int = 2,
    new_cookie: str | None = None,
    new_every: int = 0,
    group: int | None = None,
) -> Run:
    """One ``wrk -t<threads> -c32`` run against the server listening on ``port``.

    ``new_every`` N > 0: every Nth request of each wrk thread is a new visitor's, sent
    with ``new_cookie`` (the other cookies, no cohort cookie) instead of ``cookie``.
    ``group``: the server's process group, when its command line does not show ``port``
    (gunicorn rewrites it where setproctitle is installed); :func:`serve` starts one.
    """
    group = _group_of(port) if group is None else group
    cmd = ["wrk", f"-t{threads}", "-c32", f"-d{seconds:g}s", url]
    script = None
    if new_every > 0:
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)  # noqa: SIM115
        with script:
            script.write(_MIX.format(every=new_every, new=new_cookie or "", returning=cookie or ""))
        cmd[1:1] = ["-s", script.name]
    elif cookie:
        cmd[1:1] = ["-H", f"Cookie: {cookie}"]
    before = _cpu(group)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        if script is not None:
            os.unlink(script.name)
    cpu = _cpu(group) - before
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(out)
    return Run(float(rps.group(1)), int(total.group(1)), cpu)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            return conn.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


@dataclass
class Server:
    pid: int
    log: Any  # the temporary file that holds the process's stderr

    def stderr_text(self) -> str:
        self.log.seek(0)
        return str(self.log.read().decode(errors="replace"))


@contextlib.contextmanager
def serve(
    argv: Sequence[str],
    port: int,
    *,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    prefix: Sequence[str] = (),
    timeout: float = 60,
    stop_timeout: float = 30,
) -> Iterator[Server]:
    """Run ``[*prefix, python, "-m", *argv]`` (a server on 127.0.0.1:``port``) in a session
    of its own until the block ends; then SIGTERM, and SIGKILL after ``stop_timeout`` s.

    The process's stderr is kept in a temporary file: ``Server.stderr_text()`` after the
    block (what valgrind prints at exit), and in the error when the server dies early.
    """
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the process is reaped
    proc = subprocess.Popen(
        [*prefix, python, "-m", *argv],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )

    server = Server(proc.pid, log)
    stderr_text = server.stderr_text
    try:
        deadline = time.monotonic() + timeout
        while not _ready(port):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early ({proc.returncode}):\n{stderr_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on port {port} not ready after {timeout}s")
            time.sleep(0.2)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_BUILD = """
import os
try:
    from canarymw._compat import BUILD
except ImportError:  # a checkout from before ac4eb6c: the hand-written C twin, if built
    import canarymw.wsgi as w
    c = getattr(w, "accelerated", None) is not None and not os.environ.get("CANARYMW_NO_EXTENSIONS")
    BUILD = "hand-written C (canarymw._speedups)" if c else "Python sources (no C extension)"
import canarymw
print(BUILD, "from", os.path.dirname(canarymw.__file__))
"""


def build_of(python: str = sys.executable, env: dict[str, str] | None = None) -> str:
    """Which build of canarymw ``python`` runs (with ``env`` added), and from where."""
    out = subprocess.run(
        [python, "-c", _BUILD], env={**os.environ, **(env or {})}, capture_output=True, text=True
    )
    return out.stdout.strip() or f"canarymw cannot be imported: {out.stderr.strip()[-300:]}"


def run_both(script: str) -> None:
    """``--both``: after this process's table (its own build), the same command again in a
    subprocess with ``CANARYMW_NO_EXTENSIONS=1``, for the Python sources' table. The two
    builds cannot share a process, so the second table is measured after the first."""
    argv = [a for a in sys.argv[1:] if a != "--both"]
    print(f"\n--both: {script} again with CANARYMW_NO_EXTENSIONS=1 (the Python sources)\n", flush=True)
    env = {**os.environ, "CANARYMW_NO_EXTENSIONS": "1"}
    subprocess.run([sys.executable, script, *argv], env=env, check=True)
