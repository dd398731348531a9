"""Transport: HTTPS with a self-signed development certificate, and no plain HTTP off loopback."""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import subprocess
import time

import httpx
import pytest

from tests.conftest import free_port, tokenward_cmd, wait_for_port
from tokenward.tokens.format import find_tokens

pytestmark = pytest.mark.slow


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1", COLUMNS="200")
    return env


def read_until(path, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if needle in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never printed; got {content!r}")


def test_self_signed_tls_and_refusal_of_plain_http_off_loopback(tmp_path):
    data_dir = tmp_path / "data"
    port = free_port()
    env = base_env()
    refusals = [
        subprocess.Popen(
            tokenward_cmd("serve", "--data-dir", str(data_dir), "--host", host, "--port", "0"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for host in ("0.0.0.0", "::")
    ]
    half_tls = subprocess.Popen(
        tokenward_cmd("serve", "--data-dir", str(data_dir), "--tls-cert", "x.pem"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "serve.out"
    with open(log, "w") as out:
        server = subprocess.Popen(
            tokenward_cmd(
                "serve",
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
                "--tls-self-signed",
                "--init",
            ),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Plain HTTP on a public address: refused, clearly, before anything listens.
        for proc in refusals:
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 2, (stdout, stderr)
            assert "refusing plain HTTP" in stderr and "--tls-self-signed" in stderr
            assert "Traceback" not in stderr and "listening" not in stdout
        stdout, stderr = half_tls.communicate(timeout=60)
        assert half_tls.returncode == 2 and "--tls-key" in stderr and "Traceback" not in stderr

        wait_for_port(port, timeout=60, proc=server)
        printed = read_until(log, f"https://127.0.0.1:{port}")
        cert = data_dir / "tls" / "cert.pem"
        assert (data_dir / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        expected = hashlib.sha256(der).hexdigest().upper()
        match = re.search(r"^SHA-256 fingerprint: ([0-9A-F:]+)$", printed, re.MULTILINE)
        assert match, printed
        shown = match.group(1)
        assert shown.replace(":", "") == expected, printed
        assert len(shown.split(":")) == 32

        trusting = ssl.create_default_context(cafile=str(cert))
        for host in ("127.0.0.1", "localhost"):
            response = httpx.get(f"https://{host}:{port}/healthz", verify=trusting)
            assert response.status_code == 200 and response.json() == {"status": "ok"}
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{port}/healthz")  # the system store does not trust it
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz")  # no plain HTTP on the TLS port

        # The CLI trusts the certificate through TOKENWARD_CA_CERT.
        admin_tokens = find_tokens(printed)
        assert len(admin_tokens) == 1
        cli = subprocess.run(
            tokenward_cmd("project", "list", "--json"),
            env={
                **env,
                "TOKENWARD_URL": f"https://127.0.0.1:{port}",
                "TOKENWARD_ADMIN_TOKEN": admin_tokens[0],
                "TOKENWARD_CA_CERT": str(cert),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) == [] and "Warning" not in cli.stderr
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for proc in [*refusals, half_tls]:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
