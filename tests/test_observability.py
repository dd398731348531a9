"""Health, structured logs, and the audit log surviving a SIGTERM under load (metrics:
test_metrics.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import time

import httpx

from tests.conftest import serve_tokenward, tokenward_cmd
from tokenward.tokens.format import generate_token


async def test_health_and_readiness(api):
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"


def test_sigterm_mid_load_loses_no_audit_event_and_logs_are_json(tmp_path):
    """Every request acknowledged before a SIGTERM has its audit event written (0 lost)."""
    env = {**os.environ, "TOKENWARD_DATA_DIR": str(tmp_path), "TOKENWARD_LOG_LEVEL": "info"}
    init = subprocess.run(
        tokenward_cmd("init", "--json"), env=env, capture_output=True, check=True, timeout=60
    )
    admin = json.loads(init.stdout)["admin_token"]
    log_file = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed below)
    served = serve_tokenward(env=env, stderr=log_file)
    server, port = served.proc, served.port
    acked: list[str] = []
    try:
        acked = asyncio.run(_load(port, admin, server))
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
        log_file.close()
    logs = (tmp_path / "server.log").read_text()
    # uvicorn shuts down gracefully, then re-raises the signal: exit status is SIGTERM's.
    assert server.returncode in (0, -signal.SIGTERM)
    assert len(acked) >= 50
    with sqlite3.connect(tmp_path / "tokenward.db") as db:
        written = {
            r[0]
            for r in db.execute(
                "SELECT request_id FROM audit_events WHERE source = 'verify_api'"
            ).fetchall()
        }
    assert set(acked) <= written, f"{len(set(acked) - written)} acknowledged events lost"
    # Structured logs: one JSON object per line, request ids included, no secret anywhere.
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    requests = [entry for entry in lines if entry.get("event") == "request"]
    assert requests and {"request_id", "status", "duration_ms", "level", "timestamp"} <= set(
        requests[0]
    )
    assert acked[0] in {entry.get("request_id") for entry in requests}
    assert admin not in logs


async def _load(port: int, admin: str, server: subprocess.Popen) -> list[str]:
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {admin}"}
    acked: list[str] = []
    stop = asyncio.Event()

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as client:

        async def worker(n: int) -> None:
            i = 0
            while not stop.is_set():
                request_id = f"load-{n}-{i}"
                i += 1
                try:
                    response = await client.post(
                        "/v1/verify",
                        json={"token": generate_token("live")},
                        headers={"X-Request-ID": request_id},
                    )
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    acked.append(request_id)
                else:
                    return

        workers = [asyncio.create_task(worker(n)) for n in range(16)]
        deadline = time.monotonic() + 20
        while len(acked) < 150 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        server.send_signal(signal.SIGTERM)
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*workers)
    return acked
