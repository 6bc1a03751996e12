"""Upstream (proxy) mode under gunicorn: canarymw vs the upstream alone, werkzeug, nginx.

    python bench/bench_upstream.py                      # 3 interleaved rounds x 5 s each
    python bench/bench_upstream.py --tls                # the upstream speaks https (needs openssl)
    python bench/bench_upstream.py --rounds 5 --seconds 10 --no-nginx

Every contender proxies the same request to the same upstream (one uvicorn worker on
127.0.0.1 answering a 13-byte "Hello, World!"), and wrk measures from the outside:

- direct: wrk talks to the upstream itself, no proxy (the baseline);
- canarymw: ``WSGICanaryMiddleware(Upstream(U), new=Upstream(U))`` at 50%, under
  gunicorn; the visitor sends a valid cohort cookie, as returning visitors do;
- werkzeug: ``werkzeug.middleware.http_proxy.ProxyMiddleware`` to the same upstream,
  under the same gunicorn (it opens a new connection per request);
- nginx: the extra proxy tier teams would otherwise add, splitting the same cookie
  with ``split_clients`` between two upstream blocks (both the same server), with
  upstream keep-alive; started on loopback with a temporary configuration.

With ``--tls`` the upstream serves https with a throwaway self-signed certificate
that every proxy verifies (nginx: ``proxy_ssl_verify``); wrk still talks plain http
to the proxies, so the figure shows what pooling saves when every new upstream
connection costs a TLS handshake, as it does across hosts.

gunicorn runs ``-w 2`` workers for both Python proxies, each proxy once with sync
workers (one request at a time, no keep-alive to clients) and once with gthread workers
(``--threads`` per worker, keep-alive): the worker class gunicorn recommends for apps
that wait on other servers, which a proxy does. nginx runs 2 worker processes. Two
figures per contender, each the median over interleaved rounds (so drift hits every
contender alike): requests/second with ``wrk -t2 -c32`` (throughput), and the median
latency with ``wrk -t1 -c1`` (light load); "added" is that latency minus the direct one.
The floors this project holds itself to: canarymw >= 1.5x werkzeug's requests/second,
and < 1 ms added median latency. Needs wrk (Debian: apt-get install wrk) and, for the
nginx row, nginx (apt-get install nginx); the script says which is missing and skips
only the nginx row when nginx is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KEY = "bench-secret-key-0123456789abcdef"
PATH = "/p/hello"
BODY = b"Hello, World!"


# -- the apps the servers load (by module path: bench_upstream:NAME) ------------
async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The upstream: a minimal ASGI app, so the proxies, not the upstream, dominate."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


def _not_found(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not proxied"]


def _client_context() -> ssl.SSLContext | None:
    cafile = os.environ.get("BENCH_CAFILE")
    return ssl.create_default_context(cafile=cafile) if cafile else None


def __getattr__(name: str) -> Any:
    # Built on first access, in the gunicorn worker that imports this module.
    upstream = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8001")
    if name == "canarymw_app":
        from canarymw import Rollout, Upstream, WSGICanaryMiddleware

        rollout = Rollout("bench-upstream", percent=50, secret_key=KEY)
        ctx = _client_context()
        old, new = Upstream(upstream, ssl_context=ctx), Upstream(upstream, ssl_context=ctx)
        return WSGICanaryMiddleware(old, new=new, rollout=rollout)
    if name == "werkzeug_app":
        from werkzeug.middleware.http_proxy import ProxyMiddleware

        target = {"target": upstream + "/", "ssl_context": _client_context()}
        return ProxyMiddleware(_not_found, {"/p/": target})
    raise AttributeError(name)


# -- running servers and wrk --------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(port: int, proc: subprocess.Popen[bytes], what: str, tls: ssl.SSLContext | None) -> None:
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            sys.exit(f"{what} exited early ({proc.returncode}):\n{err[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
                s = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
                s.sendall(f"GET {PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{what} did not answer on port {port} within 20 s")
        time.sleep(0.1)


@contextlib.contextmanager
def _server(
    argv: list[str],
    port: int,
    what: str,
    env: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[str]:
    proc = subprocess.Popen(
        argv,
        cwd=HERE,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_ready(port, proc, what, tls)
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _gunicorn(
    app: str, port: int, upstream: str, cafile: str | None, threads: int
) -> contextlib.AbstractContextManager[str]:
    argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}"]
    if threads:
        argv += ["-k", "gthread", "--threads", str(threads)]
    argv += ["--log-level", "warning", "--chdir", str(HERE), f"bench_upstream:{app}"]
    env = {"BENCH_UPSTREAM": upstream, **({"BENCH_CAFILE": cafile} if cafile else {})}
    return _server(argv, port, f"gunicorn ({app})", env)


NGINX_CONF = """
worker_processes 2;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream blue {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}
    upstream green {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}
    {tls_directives}
    split_clients "${{cookie_canarymw}}" $variant {{
        50% green;
        *   blue;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass {scheme}://$variant;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


@contextlib.contextmanager
def _nginx(nginx: str, port: int, upstream_port: int, cafile: str | None) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="canarymw-bench-nginx-") as tmp:
        os.chmod(tmp, 0o755)  # workers may run as another user when started as root
        conf = Path(tmp) / "nginx.conf"
        tls = ""
        if cafile:
            tls = (
                f"proxy_ssl_trusted_certificate {cafile}; proxy_ssl_verify on; "
                "proxy_ssl_name 127.0.0.1; proxy_ssl_session_reuse on;"
            )
        text = NGINX_CONF.format(
            tmp=tmp,
            port=port,
            upstream_port=upstream_port,
            tls_directives=tls,
            scheme="https" if cafile else "http",
        )
        conf.write_text(text)
        with _server([nginx, "-p", tmp, "-c", str(conf)], port, "nginx") as base:
            yield base


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _wrk(url: str, seconds: float, cookie: str, *, connections: int, threads: int) -> tuple[float, float]:
    """Requests/second and median latency (s) of one wrk run."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    cmd += ["-H", f"Cookie: {cookie}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        print(f"  note: {url}: {errors.group(0)}", file=sys.stderr)
    return rps, float(value) * _UNITS[unit]


def _cookie() -> str:
    from canarymw import Rollout

    decision = Rollout("bench-upstream", percent=50, secret_key=KEY).decide(None)
    return (decision.set_cookie or "").split(";")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--seconds", type=float, default=5, help="seconds per wrk run")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx row")
    parser.add_argument("--tls", action="store_true", help="the upstream serves https (needs openssl)")
    parser.add_argument(
        "--workers",
        choices=("sync", "gthread", "both"),
        default="both",
        help="gunicorn worker class for the Python proxies (default: both, interleaved)",
    )
    parser.add_argument("--threads", type=int, default=4, help="threads per gthread worker")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install -y wrk); it generates the load.")
    nginx = None if args.no_nginx else (shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin"))
    if nginx is None and not args.no_nginx:
        print("nginx is not installed (Debian: apt-get install -y nginx): the nginx row is skipped.")
    if args.tls and shutil.which("openssl") is None:
        sys.exit(
            "openssl is not installed (Debian: apt-get install -y openssl); --tls needs it for a certificate."
        )
    cookie = _cookie()
    upstream_port = _free_port()
    argv = [sys.executable, "-m", "uvicorn", "bench_upstream:upstream_app", "--app-dir", str(HERE)]
    argv += ["--host", "127.0.0.1", "--port", str(upstream_port), "--log-level", "warning", "--no-access-log"]
    certs = tempfile.TemporaryDirectory(prefix="canarymw-bench-tls-")
    cafile: str | None = None
    tls: ssl.SSLContext | None = None
    if args.tls:
        key, cafile = f"{certs.name}/key.pem", f"{certs.name}/cert.pem"
        openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key]
        openssl += ["-out", cafile, "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        subprocess.run(openssl, check=True, capture_output=True)
        os.chmod(certs.name, 0o755)
        os.chmod(cafile, 0o644)
        argv += ["--ssl-keyfile", key, "--ssl-certfile", cafile]
        tls = ssl.create_default_context(cafile=cafile)
    kinds = ["sync", "gthread"] if args.workers == "both" else [args.workers]
    proxies = [f"{app} ({kind})" for kind in kinds for app in ("canarymw", "werkzeug")]
    names = ["direct", *proxies] + (["nginx"] if nginx else [])
    rps: dict[str, list[float]] = {n: [] for n in names}
    p50: dict[str, list[float]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        stack.enter_context(certs)
        upstream = stack.enter_context(_server(argv, upstream_port, "uvicorn upstream", tls=tls))
        bases = {"direct": upstream}
        for name in proxies:
            app, kind = name.split(" ")
            threads = args.threads if kind == "(gthread)" else 0
            bases[name] = stack.enter_context(
                _gunicorn(f"{app}_app", _free_port(), upstream, cafile, threads)
            )
        if nginx:
            bases["nginx"] = stack.enter_context(_nginx(nginx, _free_port(), upstream_port, cafile))
        for name in names:  # warm-up: connections, pools, caches
            _wrk(bases[name] + PATH, 1, cookie, connections=8, threads=2)
        for _ in range(args.rounds):
            for name in names:
                r, _ = _wrk(bases[name] + PATH, args.seconds, cookie, connections=32, threads=2)
                _, latency = _wrk(bases[name] + PATH, args.seconds, cookie, connections=1, threads=1)
                rps[name].append(r)
                p50[name].append(latency)
    med_rps = {n: statistics.median(v) for n, v in rps.items()}
    med_p50 = {n: statistics.median(v) for n, v in p50.items()}
    direct = med_p50["direct"]
    print(
        f"proxy to one uvicorn upstream ({'https' if args.tls else 'http'}); gunicorn -w 2 for the Python "
        f"proxies (gthread: {args.threads} threads each); {args.rounds} interleaved rounds x "
        f"{args.seconds:g} s, medians"
    )
    print(f"{'contender':20} {'req/s -c32':>11} {'p50 -c1':>9} {'added p50':>10}")
    for name in names:
        added = "" if name == "direct" else f"{(med_p50[name] - direct) * 1e3:8.2f}ms"
        print(f"{name:20} {med_rps[name]:11.0f} {med_p50[name] * 1e3:7.2f}ms {added:>10}")
    for kind in kinds:
        ours, theirs = f"canarymw ({kind})", f"werkzeug ({kind})"
        ratio_wz = med_rps[ours] / med_rps[theirs]
        added_ms = (med_p50[ours] - direct) * 1e3
        verdict = "ok" if ratio_wz >= 1.5 else "MISSED"
        print(f"{kind:8} canarymw / werkzeug req/s: {ratio_wz:.2f}x  (floor 1.5x: {verdict})")
        fast = "ok" if added_ms < 1 else "MISSED"
        print(f"{kind:8} canarymw added p50: {added_ms:.2f} ms  (floor < 1 ms: {fast})")
        print(f"{kind:8} canarymw / direct req/s: {med_rps[ours] / med_rps['direct']:.2f}x")
        if nginx:
            vs_nginx = med_rps[ours] / med_rps["nginx"]
            print(f"{kind:8} canarymw / nginx req/s: {vs_nginx:.2f}x (reported, not gated)")


if __name__ == "__main__":
    main()
