"""Benchmark: PostgreSQL through tokenward vs direct vs PgBouncer, ``pgbench -S``, one run.

    python bench/pg_gateway.py            # BENCH_PG_SECONDS=10 BENCH_PG_CLIENTS=8 to change

Three paths to the same server (``BENCH_PG_URL``, default the local one as ``postgres`` over
trust auth), each measured with ``pgbench -S`` (select-only) in ``-M prepared`` and
``-M simple``:

* direct: pgbench → PostgreSQL;
* PgBouncer in session mode (the peer a user would otherwise deploy; ``apt-get install
  pgbouncer``, it is skipped when absent), no authentication of its own (trust);
* tokenward: token as the password, ``Verifier.verify`` per connection, a read-only session,
  one audit event per query (SQLite store, the durable writer in its default sync mode),
  on uvloop, as ``tokenward serve --config`` runs it.

Target: tokenward >= 0.6x direct for ``-S -M prepared``. Numbers only; never a test.

Also printed: the tokenward process's CPU µs per query (from /proc, over the run; the
gateway is pinned to the first core when there are two or more). ``BENCH_BASELINE_SRC=DIR``
runs a second gateway from another checkout's ``src`` (e.g. an older commit, from
``git archive``) in the same run, for a before and after.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import SERVER_CPUS, _pinned, cpu_seconds, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
SECONDS = os.environ.get("BENCH_PG_SECONDS", "10")
CLIENTS = os.environ.get("BENCH_PG_CLIENTS", "8")
HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
USER = os.environ.get("BENCH_PG_USER", "postgres")

GATEWAY = """
import asyncio, os, secrets, sys
from pathlib import Path

import uvloop

from tokenward.app import open_services
from tokenward.gateway import parse_policy
from tokenward.gateway.postgres import PostgresGateway
from tokenward.service import TokenSpec, issue_bootstrap_record
from tokenward.settings import Settings

data, port_file, token_file, policy = sys.argv[1:5]


async def main():
    settings = Settings(data_dir=Path(data), database_url=f"sqlite+aiosqlite:///{data}/tw.db",
                        secret_key=secrets.token_hex(32))
    services = await open_services(settings)
    admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
    await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
    await services.tokens.create_project(admin.record, "bench")
    issued = await services.tokens.create_token(
        admin.record, TokenSpec(project="bench", scopes=["db:bench:read"]))
    if os.environ.get("BENCH_AUDIT") == "off":  # a diagnostic only: no audit, no detectors
        services.events.subscribers.clear()
    gateway = PostgresGateway(services.enforcement, parse_policy(Path(policy).read_text()).postgres)
    await gateway.start()
    Path(token_file).write_text(issued.secret)
    Path(port_file).write_text(str(gateway.ports["bench"]))
    try:
        await asyncio.Event().wait()
    finally:
        await gateway.aclose()
        await services.close()

uvloop.run(main())
"""


def psql(database: str, sql: str) -> None:
    subprocess.run(
        ["psql", "-X", "-q", "-h", HOST, "-p", str(PORT), "-U", USER, "-d", database, "-c", sql],
        check=True,
        capture_output=True,
    )


def pgbench(
    port: int, database: str, mode: str, password: str | None = None, pid: int | None = None
) -> float:
    """Transactions per second; with ``pid``, also sets ``LAST_CPU_US``: that process's CPU
    µs per transaction over the run."""
    global LAST_CPU_US
    before = cpu_seconds([pid]) if pid else 0.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGSSLMODE"] = "disable"
    if password is not None:
        env["PGPASSWORD"] = password
    args = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-n", "-S", "-M", mode]
    args += ["-c", CLIENTS, "-j", "2", "-T", SECONDS, database]
    result = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"tps = ([0-9.]+)", result.stdout)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed: {result.stdout}{result.stderr}")
    done = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    if pid and done is not None and int(done.group(1)):
        LAST_CPU_US = (cpu_seconds([pid]) - before) * 1e6 / int(done.group(1))
    return float(found.group(1))


LAST_CPU_US = 0.0


@contextlib.contextmanager
def pgbouncer(tmp: Path, database: str) -> Iterator[int | None]:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        yield None
        return
    port = free_port()
    (tmp / "users.txt").write_text(f'"{USER}" ""\n')
    (tmp / "pgbouncer.ini").write_text(
        f"[databases]\n{database} = host={HOST} port={PORT} dbname={database}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
        f"unix_socket_dir =\nauth_type = trust\nauth_file = {tmp}/users.txt\n"
        f"pool_mode = session\ndefault_pool_size = {int(CLIENTS) + 2}\n"
        f"max_client_conn = 200\nlogfile = {tmp}/pgbouncer.log\n"
        f"pidfile = {tmp}/pgbouncer.pid\n"
    )
    args = [binary, str(tmp / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        os.chmod(tmp.parent, 0o755)
        for path in (tmp, tmp / "users.txt", tmp / "pgbouncer.ini"):
            shutil.chown(path, "postgres")
        args = ["runuser", "-u", "postgres", "--", *args]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def tokenward(tmp: Path, database: str, source: Path) -> Iterator[tuple[int, str, int]]:
    script, policy = tmp / "gateway.py", tmp / "tokenward.toml"
    script.write_text(GATEWAY)
    policy.write_text(
        f'[[postgres]]\nname = "bench"\nlisten = "127.0.0.1:0"\n'
        f'upstream = "postgresql://{USER}@{HOST}:{PORT}/{database}"\n'
        f'read_scope = "db:bench:read"\nmax_connections_per_token = {int(CLIENTS) + 2}\n'
    )
    data = tmp / "data"
    data.mkdir()
    port_file, token_file = tmp / "port", tmp / "token"
    env = {**os.environ, "PYTHONPATH": str(source)}
    args = [sys.executable, str(script), str(data), str(port_file), str(token_file), str(policy)]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, preexec_fn=_pinned(SERVER_CPUS)
    )
    try:
        for _ in range(600):
            if port_file.exists() and port_file.read_text():
                break
            if proc.poll() is not None:
                raise RuntimeError("the tokenward gateway did not start")
            time.sleep(0.05)
        yield int(port_file.read_text()), token_file.read_text(), proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> None:
    database = f"tw_bench_{secrets.token_hex(3)}"
    psql("postgres", f'CREATE DATABASE "{database}"')
    try:
        subprocess.run(
            ["pgbench", "-h", HOST, "-p", str(PORT), "-U", USER, "-i", "-q", "-s", "10", database],
            check=True,
            capture_output=True,
        )
        results: dict[str, dict[str, float]] = {}
        cpu: dict[str, dict[str, float]] = {}
        baseline = os.environ.get("BENCH_BASELINE_SRC")
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = Path(tmp_dir)
            bouncer_dir, gateway_dir, base_dir = tmp / "pgbouncer", tmp / "tokenward", tmp / "b"
            for folder in (bouncer_dir, gateway_dir, base_dir):
                folder.mkdir()
            old = (
                tokenward(base_dir, database, Path(baseline).resolve())
                if baseline
                else contextlib.nullcontext((0, "", 0))
            )
            with (
                pgbouncer(bouncer_dir, database) as bouncer,
                tokenward(gateway_dir, database, ROOT / "src") as (gateway, token, pid),
                old as (base_port, base_token, base_pid),
            ):
                for mode in ("prepared", "simple"):
                    pgbench(PORT, database, mode)  # warm-up: caches, plans
                    row = results.setdefault(mode, {})
                    row["direct"] = pgbench(PORT, database, mode)
                    if bouncer is not None:
                        row["pgbouncer"] = pgbench(bouncer, database, mode)
                    if base_pid:
                        row["baseline"] = pgbench(base_port, database, mode, base_token, base_pid)
                        cpu.setdefault(mode, {})["baseline"] = LAST_CPU_US
                    row["tokenward"] = pgbench(gateway, database, mode, token, pid)
                    cpu.setdefault(mode, {})["tokenward"] = LAST_CPU_US
    finally:
        psql("postgres", f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    print(f"pgbench -S, {CLIENTS} clients, {SECONDS} s each, scale 10, {os.cpu_count()} cores")
    for mode, row in results.items():
        line = f"-M {mode:8} " + "  ".join(f"{k} {v:9.0f} tps" for k, v in row.items())
        print(line)
        direct = row["direct"]
        ratios = f"  tokenward/direct {row['tokenward'] / direct:.2f}x"
        if "pgbouncer" in row:
            ratios += f"  pgbouncer/direct {row['pgbouncer'] / direct:.2f}x"
            ratios += f"  tokenward/pgbouncer {row['tokenward'] / row['pgbouncer']:.2f}x"
        if "baseline" in row:
            ratios += f"  baseline/direct {row['baseline'] / direct:.2f}x"
        print(ratios)
        print(
            "  CPU µs per query: "
            + "  ".join(f"{name} {value:.0f}" for name, value in cpu.get(mode, {}).items())
        )
    print("target: tokenward >= 0.6x direct for -S -M prepared")


if __name__ == "__main__":
    main()
