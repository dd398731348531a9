"""Shared parts of the benchmarks: ports, wrk, nginx, and a tokenward server to measure.

Benchmarks print numbers; they are never tests. Each run is short (wrk -t1 -c32 -d5s by
default; BENCH_DURATION and BENCH_CONNECTIONS change it).

On a machine with two cores or more, a benchmark may pin the servers it measures to
:data:`SERVER_CPUS` and wrk (and the servers it does not measure) to :data:`LOAD_CPUS`, so
that neither steals the other's core (BENCH_PIN=0 turns this off).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DURATION = os.environ.get("BENCH_DURATION", "5s")
CONNECTIONS = os.environ.get("BENCH_CONNECTIONS", "32")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
_CPUS = sorted(os.sched_getaffinity(0))
_PIN = os.environ.get("BENCH_PIN", "1") != "0" and len(_CPUS) >= 2
#: where the measured servers run, and where wrk and the upstreams run (None: anywhere)
SERVER_CPUS: frozenset[int] | None = frozenset(_CPUS[:1]) if _PIN else None
LOAD_CPUS: frozenset[int] | None = frozenset(_CPUS[1:]) if _PIN else None


def _pinned(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child (and every thread it starts) to ``cpus``."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    requests: int = 0
    cpu_us: float | None = None  # CPU time of the measured server per request

    def line(self) -> str:
        bad = f"  non-2xx {self.non_2xx}" if self.non_2xx else ""
        cpu = f"   CPU {self.cpu_us:6.0f} us/req" if self.cpu_us is not None else ""
        return (
            f"{self.name:<44} {self.rps:>10,.0f} req/s   p50 {self.p50_ms:6.2f} ms"
            f"   p99 {self.p99_ms:6.2f} ms{cpu}{bad}"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes so far (Linux /proc), in seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wrk(
    name: str,
    url: str,
    headers: dict[str, str] | None = None,
    pids: list[int] | None = None,
    connections: str = CONNECTIONS,
    cpus: frozenset[int] | None = None,
    script: str | None = None,
) -> Result:
    """Run wrk (on ``cpus``); with ``pids``, also the CPU those processes spent per request
    (robust to a busy machine, unlike req/s). ``script``: a wrk Lua script (method, body)."""
    before = cpu_seconds(pids) if pids else 0.0
    args = [WRK, "-t1", f"-c{connections}", f"-d{DURATION}", "--latency"]
    if script is not None:
        args += ["-s", script]
    for key, value in (headers or {}).items():
        args += ["-H", f"{key}: {value}"]
    out = subprocess.run(
        [*args, url], capture_output=True, text=True, check=True, preexec_fn=_pinned(cpus)
    ).stdout
    cpu = cpu_seconds(pids) - before if pids else None
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+(?:us|ms|s))", out, re.M))
    p50 = re.match(r"([\d.]+)(us|ms|s)", lat["50"])
    p99 = re.match(r"([\d.]+)(us|ms|s)", lat["99"])
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Result(
        name,
        rps,
        _ms(*p50.groups()),  # type: ignore[union-attr]
        _ms(*p99.groups()),  # type: ignore[union-attr]
        int(bad.group(1)) if bad else 0,
        requests,
        cpu * 1e6 / requests if cpu is not None and requests else None,
    )


def ratio(a: Result, b: Result) -> str:
    text = f"{a.rps / b.rps:.2f}x throughput"
    if a.cpu_us and b.cpu_us:
        text += f", {b.cpu_us / a.cpu_us:.2f}x by CPU per request"
    return text


@contextlib.contextmanager
def process(
    args: list[str],
    port: int,
    env: dict[str, str] | None = None,
    cpus: frozenset[int] | None = None,
) -> Iterator[int]:
    proc = subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_pinned(cpus),
    )
    try:
        wait_port(port)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


NGINX_MAIN = """
daemon off;
master_process off;
worker_processes 1;
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
    {body}
}}
"""


@contextlib.contextmanager
def nginx(body: str, port: int, cpus: frozenset[int] | None = None) -> Iterator[int]:
    """An nginx (one process) with ``body`` in its http block, listening on ``port``."""
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_MAIN.format(tmp=tmp, body=body))
        args = [NGINX, "-p", tmp, "-c", str(conf), "-e", f"{tmp}/error.log"]
        with process(args, port, cpus=cpus) as pid:
            yield pid


def upstream_nginx_conf(port: int) -> str:
    """The fast upstream: nginx answering 200 with a small body."""
    return (
        f"server {{ listen 127.0.0.1:{port}; keepalive_requests 100000;"
        ' location / { default_type text/plain; return 200 "ok\\n"; } }'
    )


@contextlib.contextmanager
def tokenward(
    mode: str,
    port: int,
    config: str | None = None,
    rate: str | None = None,
    redis: bool = False,
    cpus: frozenset[int] | None = None,
    audit: bool = True,
    admin_out: list[str] | None = None,
    source: Path | None = None,
) -> Iterator[tuple[str, int]]:
    """A tokenward bench server (see serve.py) in a child process; yields a valid token
    (and appends the admin credential to ``admin_out``). ``audit=False``: see serve.py.
    ``source``: another checkout's ``src`` folder to run instead of this one (a baseline
    measured in the same run, e.g. ``git archive`` of an older commit)."""
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        args = [sys.executable, str(ROOT / "bench" / "serve.py"), mode, str(port), str(token_file)]
        env = {"TOKENWARD_DATA_DIR": tmp, "TOKENWARD_SECRET_KEY": secrets.token_hex(32)}
        if config:
            env["TOKENWARD_GATEWAY_CONFIG"] = config
        if not audit:
            env["BENCH_AUDIT"] = "off"
        if rate:
            env["BENCH_RATE"] = rate
        if source is not None:
            env["PYTHONPATH"] = str(source)
        if redis:
            env["TOKENWARD_REDIS_URL"] = os.environ.get(
                "BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"
            )
        with process(args, port, env, cpus) as pid:
            if admin_out is not None:
                admin_out.append(token_file.with_suffix(".admin").read_text().strip())
            yield token_file.read_text().strip(), pid


def write_verify_script(path: Path, token: str, caller: str) -> str:
    """A wrk script that posts ``POST /v1/verify`` for ``token`` as ``caller``."""
    body = json.dumps({"token": token, "scope": "records:read"})
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {caller}"\n'
    )
    return str(path)


def write_policy(directory: str, upstream_port: int) -> str:
    path = Path(directory) / "tokenward.toml"
    path.write_text(
        f'[[upstreams]]\nname = "fast"\nurl = "http://127.0.0.1:{upstream_port}"\n\n'
        '[[routes]]\nupstream = "fast"\npath = "/records/{rest:path}"\nmethods = ["GET"]\n'
        'scope = "records:read"\n'
    )
    return str(path)
