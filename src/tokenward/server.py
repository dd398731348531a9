"""Running the server: uvicorn, with TLS (given or self-signed) or loopback-only plain HTTP."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = structlog.get_logger("tokenward.server")


class InsecureBind(ValueError):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tls: bool, allow_insecure_http: bool) -> None:
    if not tls and not is_loopback(host) and not allow_insecure_http:
        raise InsecureBind(
            f"refusing plain HTTP on {host}: tokens would cross the network in clear. "
            "Give --tls-cert/--tls-key or --tls-self-signed, or, behind a TLS-terminating "
            "proxy, --allow-insecure-http (TOKENWARD_ALLOW_INSECURE_HTTP=1)."
        )


def self_signed(directory: Path, host: str) -> tuple[Path, Path, str]:
    """Create (or reuse) a development certificate; returns cert, key and its SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if not (cert_path.exists() and key_path.exists()):
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if host not in ("localhost", ""):
                names.append(x509.DNSName(host))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenward development")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    return cert_path, key_path, fingerprint


class CorkedTransport:
    """A transport whose writes made in one turn of the event loop leave in one send.

    uvicorn writes a response's status line and headers, then its body, each with a send of
    its own: two system calls and two TCP segments for every small answer, which on a
    loopback connection cost about as much as the rest of a bare route. Here they are
    joined, and sent as soon as the code that wrote them lets the loop run.
    """

    __slots__ = ("_buffer", "_loop", "_scheduled", "_transport")

    def __init__(self, transport: Any, loop: Any) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._buffer.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._buffer:
            data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
            self._buffer.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._buffer.clear()
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def get_write_buffer_size(self) -> int:
        return int(self._transport.get_write_buffer_size()) + sum(map(len, self._buffer))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:  # pause_reading, set_protocol, …
        return getattr(self._transport, name)


def uvicorn_options(tls_cert: Path | None = None, tls_key: Path | None = None) -> dict[str, Any]:
    """How ``tokenward serve`` runs uvicorn (the benchmarks' servers run it the same way).

    Client addresses behind a proxy are read by tokenward itself, from trusted proxies only
    (``TOKENWARD_TRUSTED_PROXIES``), so uvicorn's own proxy-header handling is off. uvicorn
    installs no logging configuration of its own (``log_config=None``): its lines go to the
    root logger's JSON handler like every other (logs.py); tokenward writes the access log.
    """
    return dict(
        http=http_protocol(),
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
    )


#: The most a request line and its headers may take on the API port (the gateway has its
#: own bounds). Large enough for long DPoP proofs and identity tokens.
MAX_HEAD_BYTES = 65536


def http_protocol() -> type:
    """uvicorn's HTTP/1.1 protocol (httptools), with three changes.

    * Its writes go through :class:`CorkedTransport`: a small answer leaves in one send.
    * A request it cannot parse (a bad request line, a malformed header) is answered before
      the application sees it; uvicorn does that with a plain-text 400, this one says the
      same as JSON, like every other error of tokenward's. Neither quotes the request back.
    * A request line and headers longer than :data:`MAX_HEAD_BYTES` are refused with 431
      (uvicorn sets no bound of its own with httptools: a client could send megabytes of
      header, held in memory until the line ends).
    """
    import json

    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    bad_request = json.dumps(
        {"error": "bad_request", "message": "the request is not valid HTTP/1.1"}
    ).encode()
    too_large = json.dumps(
        {
            "error": "headers_too_large",
            "message": f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
        }
    ).encode()
    status_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\n"

    class HttpProtocol(HttpToolsProtocol):
        #: bytes received since the last request head ended (so: of the head in progress)
        _head_bytes = 0
        _heads = 0  # request heads parsed on this connection
        _measure = False  # whether the head that ends next must be measured
        _lingering = False
        _in_head = True  # between requests or inside a head (not inside a body)

        def connection_made(self, transport: Any) -> None:
            corked: Any = CorkedTransport(transport, self.loop)  # a Transport, duck-typed
            super().connection_made(corked)

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return  # refused: what the client still sends is read and dropped
            in_head = self._in_head
            heads = self._heads
            # A head that ends in this chunk can only be too large if the bytes since the
            # last head, this chunk included, are: then (only) it is measured exactly.
            self._measure = self._head_bytes + len(data) > MAX_HEAD_BYTES
            super().data_received(data)
            # A head still incomplete after the chunk (one that was begun, not a body):
            # its bytes so far count (held in memory by the parser until the line ends).
            if in_head and heads == self._heads and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse(status_431, too_large, linger=True)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True  # what comes next is the next request's head

        def on_headers_complete(self) -> None:
            self._heads += 1
            self._in_head = False  # a body follows, if any: it never counts
            self._head_bytes = 0
            if self._measure:
                size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
                if size > MAX_HEAD_BYTES:
                    self._refuse(status_431, too_large, linger=True)
                    raise ValueError("request head too large")  # stops the parser
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if not self._lingering and not self.transport.is_closing():  # not refused (431)
                self._refuse(STATUS_LINE[400], bad_request)

        def _refuse(self, status_line: bytes, body: bytes, linger: bool = False) -> None:
            """Answer ``status_line`` with a JSON ``body`` and end the connection.

            With ``linger``, for a client likely still sending: the answer goes out with
            a half-close and what arrives next is dropped for a second before the
            connection closes (closing at once would reset it, and the client might never
            read why)."""
            content = [status_line]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend(
                [
                    b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                    b"cache-control: no-store\r\n",
                    b"connection: close\r\n",
                    b"\r\n",
                    body,
                ]
            )
            self.transport.write(b"".join(content))
            if linger and self.transport.can_write_eof():
                self._lingering = True
                self.transport.write_eof()
                self.loop.call_later(1.0, self.transport.close)
            else:
                self.transport.close()

    return HttpProtocol


#: seconds a worker has to finish its requests and flush its audit events after SIGTERM
WORKER_STOP_SECONDS = 30.0
#: a worker that dies this soon after it started, this many times in a row, stops them all
WORKER_EARLY_DEATH_SECONDS = 5.0
WORKER_EARLY_DEATHS = 3


def run_workers(count: int, serve_one: Callable[[], None]) -> int:
    """Run ``serve_one`` in ``count`` forked processes on the sockets the caller bound, and
    supervise them; the exit code for the command.

    Each worker is a replica of its own (services, cache, audit chain), sharing the listening
    sockets it inherits; the kernel hands each new connection to one of them. SIGINT or
    SIGTERM is passed on to every worker, which stops gracefully (finishes its requests,
    flushes its audit events); past :data:`WORKER_STOP_SECONDS` it is killed. A worker that
    dies is started again; one that keeps dying at start stops the server (exit 3).
    """
    import multiprocessing

    context = multiprocessing.get_context("fork")
    stopping = False
    early_deaths = 0
    workers: dict[int, tuple[Any, float]] = {}

    def start(slot: int) -> None:
        process = context.Process(target=_worker_main, args=(serve_one,), name=f"worker-{slot}")
        process.start()
        workers[slot] = (process, time.monotonic())

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for slot in range(count):
            start(slot)
        while not stopping:
            time.sleep(0.2)
            for slot, (process, started) in list(workers.items()):
                if process.is_alive() or stopping:
                    continue
                early = time.monotonic() - started < WORKER_EARLY_DEATH_SECONDS
                early_deaths = early_deaths + 1 if early else 0
                log.error("worker_exited", worker=slot, pid=process.pid, code=process.exitcode)
                if early_deaths >= WORKER_EARLY_DEATHS:
                    log.error("workers_failing_at_start", deaths=early_deaths)
                    stopping = True
                    break
                start(slot)
        for process, _ in workers.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for process, _ in workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 3 if early_deaths >= WORKER_EARLY_DEATHS else 0


def _worker_main(serve_one: Callable[[], None]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # the server installs its own
    serve_one()
