"""tokenward's decisions against their floor: the least a durable, audited decision costs.

    .venv/bin/python bench/floor.py [--rounds 2]

The floor is a raw ASGI app on the same uvicorn options as ``tokenward serve``
(:func:`tokenward.server.uvicorn_options`): for ``POST /v1/verify`` it parses the JSON body,
checks the caller's credential and the presented token (a keyed hash and a dict lookup
each), their expiry and the scope, builds one event with orjson, chains it by SHA-256 to
the previous one and waits until it is committed to SQLite (WAL, one index) by a group-
committing writer (one future per batch), then answers JSON. ``GET /authz`` is the same
decision with the token in the ``Authorization`` header. ``GET /bare`` is a bare ASGI answer.

The same run measures tokenward (the bench server of serve.py, SQLite, durable audit on)
on the same core, rounds interleaved A B A B, and prints CPU µs per request (the steadiest
figure on a busy machine) and the ratios the targets are stated in.

``--baseline SRC`` also runs the tokenward whose ``src`` folder is SRC (e.g. an older commit,
``git archive COMMIT src | tar -x -C DIR``) on the same core, interleaved with the others: a
before and after from one run.

``python bench/floor.py serve PORT DB``: the floor server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

_OK = b'{"valid":true,"reason":"ok"}'
_JSON = [(b"content-type", b"application/json")]


class FloorApp:
    """The minimal decision, with a durable group-committed audit append."""

    def __init__(self, db_path: str) -> None:
        self.key = secrets.token_bytes(32)
        self.tokens: dict[bytes, dict[str, Any]] = {}
        self.db_path = db_path
        self.head = b"\x00" * 32
        self.seq = 0
        self.queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self.wake = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None
        self.db: sqlite3.Connection | None = None

    def issue(self, scopes: list[str]) -> str:
        token = "tw_live_" + secrets.token_urlsafe(30)[:38]
        self.tokens[self._hash(token)] = {
            "id": "tok_" + secrets.token_hex(8),
            "expires": time.time() + 86400,
            "scopes": frozenset(scopes),
        }
        return token

    def _hash(self, token: str) -> bytes:
        return hmac.new(self.key, token.encode(), hashlib.sha256).digest()

    def _open(self) -> None:
        db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, at REAL, "
            "token_id TEXT, body BLOB, hash BLOB)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS audit_at ON audit (at)")
        self.db = db

    def _commit(self, rows: list[tuple[int, float, str, bytes, bytes]]) -> None:
        assert self.db is not None
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?)", rows)
        self.db.execute("COMMIT")

    async def _write_forever(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.queue = self.queue, []
            rows = []
            now = time.time()
            for body, _ in batch:
                self.seq += 1
                self.head = hashlib.sha256(self.head + body).digest()
                rows.append((self.seq, now, "", body, self.head))
            await asyncio.to_thread(self._commit, rows)
            for _, future in batch:
                future.set_result(None)

    async def _audit(self, event: dict[str, Any]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append((orjson.dumps(event), future))
        self.wake.set()
        await future

    def _decide(self, token: str | None, scope: str) -> dict[str, Any] | None:
        if not token:
            return None
        record = self.tokens.get(self._hash(token))
        if record is None or record["expires"] < time.time() or scope not in record["scopes"]:
            return None
        return record

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._open()
                    self.writer = asyncio.create_task(self._write_forever())
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/bare":
            await send({"type": "http.response.start", "status": 200, "headers": _JSON})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1").removeprefix("Bearer ")
        if path == "/v1/verify":
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            request = orjson.loads(body)
            caller = self._decide(authorization, "verify")
            record = self._decide(request.get("token"), request.get("scope", ""))
            allowed = caller is not None and record is not None
        else:  # /authz
            caller = record = self._decide(authorization, "records:read")
            allowed = record is not None
        await self._audit(
            {
                "at": time.time(),
                "token_id": record["id"] if record else None,
                "decision": "allow" if allowed else "deny",
                "path": path,
                "ip": scope["client"][0] if scope.get("client") else None,
            }
        )
        status = 200 if allowed or path == "/v1/verify" else 401
        await send({"type": "http.response.start", "status": status, "headers": _JSON})
        await send({"type": "http.response.body", "body": _OK if allowed else b"{}"})


def serve(port: int, db_path: str, token_file: Path) -> None:
    import uvicorn
    import uvloop

    from tokenward.server import uvicorn_options

    app = FloorApp(db_path)
    token = app.issue(["records:read"])
    caller = app.issue(["verify"])
    token_file.write_text(token)
    token_file.with_suffix(".admin").write_text(caller)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, **uvicorn_options())
    uvloop.run(uvicorn.Server(config).serve())


def compare(rounds: int, baseline: Path | None = None) -> None:
    from common import (
        LOAD_CPUS,
        ROOT,
        SERVER_CPUS,
        Result,
        free_port,
        process,
        tokenward,
        write_policy,
        write_verify_script,
        wrk,
    )

    results: dict[str, list[Result]] = {}

    def keep(result: Result) -> None:
        results.setdefault(result.name, []).append(result)
        print(result.line(), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        floor_port = free_port()
        token_file = Path(tmp) / "floor-token"
        args = [
            sys.executable,
            str(ROOT / "bench" / "floor.py"),
            "serve",
            str(floor_port),
            str(Path(tmp) / "floor.db"),
            str(token_file),
        ]
        admin: list[str] = []
        tw_port = free_port()
        policy = write_policy(tmp, free_port())  # /authz decides the route /records/{rest}
        base_port = free_port()
        base = contextlib.nullcontext(("", 0))
        if baseline is not None:
            base = tokenward(  # type: ignore[assignment]
                "api", base_port, policy, cpus=SERVER_CPUS, admin_out=admin, source=baseline
            )
        with (
            process(args, floor_port, cpus=SERVER_CPUS) as floor_pid,
            tokenward("api", tw_port, policy, cpus=SERVER_CPUS, admin_out=admin) as (
                token,
                tw_pid,
            ),
            base as (base_token, base_pid),
        ):
            floor_token = token_file.read_text()
            floor_caller = token_file.with_suffix(".admin").read_text()
            floor = f"http://127.0.0.1:{floor_port}"
            tw = f"http://127.0.0.1:{tw_port}"
            floor_verify = write_verify_script(Path(tmp) / "f.lua", floor_token, floor_caller)
            tw_verify = write_verify_script(Path(tmp) / "t.lua", token, admin[0])
            floor_authz = {"Authorization": f"Bearer {floor_token}"}
            tw_authz = {
                "Authorization": f"Bearer {token}",
                "X-Original-Method": "GET",
                "X-Original-URI": "/records/7",
            }
            wrk("warm-up", f"{floor}/v1/verify", cpus=LOAD_CPUS, script=floor_verify)
            wrk("warm-up", f"{tw}/v1/verify", cpus=LOAD_CPUS, script=tw_verify)
            old = f"http://127.0.0.1:{base_port}"
            if base_pid:
                base_verify = write_verify_script(Path(tmp) / "b.lua", base_token, admin[1])
                wrk("warm-up", f"{old}/v1/verify", cpus=LOAD_CPUS, script=base_verify)
                base_authz = {**tw_authz, "Authorization": f"Bearer {base_token}"}
            for _ in range(rounds):
                if base_pid:
                    keep(
                        wrk(
                            "baseline POST /v1/verify",
                            f"{old}/v1/verify",
                            None,
                            [base_pid],
                            cpus=LOAD_CPUS,
                            script=base_verify,
                        )
                    )
                    keep(
                        wrk(
                            "baseline /authz",
                            f"{old}/authz",
                            base_authz,
                            [base_pid],
                            cpus=LOAD_CPUS,
                        )
                    )
                keep(wrk("bare ASGI", f"{floor}/bare", None, [floor_pid], cpus=LOAD_CPUS))
                keep(
                    wrk(
                        "floor POST /v1/verify",
                        f"{floor}/v1/verify",
                        None,
                        [floor_pid],
                        cpus=LOAD_CPUS,
                        script=floor_verify,
                    )
                )
                keep(
                    wrk(
                        "tokenward POST /v1/verify",
                        f"{tw}/v1/verify",
                        None,
                        [tw_pid],
                        cpus=LOAD_CPUS,
                        script=tw_verify,
                    )
                )
                keep(
                    wrk("floor /authz", f"{floor}/authz", floor_authz, [floor_pid], cpus=LOAD_CPUS)
                )
                keep(wrk("tokenward /authz", f"{tw}/authz", tw_authz, [tw_pid], cpus=LOAD_CPUS))

    def cpu(name: str) -> float:
        values = [r.cpu_us for r in results[name] if r.cpu_us]
        return sorted(values)[len(values) // 2]

    print()
    print("CPU µs per request (median of rounds)")
    for name in results:
        print(f"  {name:<28} {cpu(name):7.1f}")
    bare = cpu("bare ASGI")
    for kind in ("POST /v1/verify", "/authz"):
        ours, floor_cpu = cpu(f"tokenward {kind}"), cpu(f"floor {kind}")
        print(
            f"  {kind:<16} tokenward / floor = {ours / floor_cpu:.2f}x (target <= 1.3x); "
            f"throughput vs bare ASGI = {bare / ours:.2f}x (target >= 0.33x)"
        )
        if f"baseline {kind}" in results:
            print(f"  {kind:<16} baseline / floor = {cpu(f'baseline {kind}') / floor_cpu:.2f}x")
    failed = [r for rs in results.values() for r in rs if r.non_2xx]
    if failed:
        print("non-2xx answers in:", ", ".join(sorted({r.name for r in failed})))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
        parser.add_argument("--rounds", type=int, default=2)
        parser.add_argument("--baseline", type=Path, help="another checkout's src folder")
        parsed = parser.parse_args()
        os.chdir(Path(__file__).parent)
        sys.path.insert(0, str(Path(__file__).parent))
        compare(parsed.rounds, parsed.baseline.resolve() if parsed.baseline else None)
