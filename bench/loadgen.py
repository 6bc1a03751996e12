"""Load one local server with wrk and count the CPU its processes spent doing so; and the
one way the benchmarks compare contenders measured in the same rounds.

Requests/second of a server that shares two vCPUs with its load generator scatter by
10% and more between runs. The CPU time the server's processes use per request served
scatters far less, so the server benchmarks report both: ``cpu_bare / cpu_this`` is the
throughput ratio the two would have if the server were the only thing on the machine.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

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


def wrk(url: str, seconds: float, cookie: str | None, port: int) -> Run:
    """One ``wrk -t2 -c32`` run against the server listening on ``port``."""
    group = _group_of(port)
    cmd = ["wrk", "-t2", "-c32", f"-d{seconds:g}s", url]
    if cookie:
        cmd[1:1] = ["-H", f"Cookie: {cookie}"]
    before = _cpu(group)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu = _cpu(group) - before
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(out)
    return Run(float(rps.group(1)), int(total.group(1)), cpu)
