"""Transport: HTTPS with a self-signed development certificate, and no plain HTTP off loopback."""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import subprocess

import httpx
import pytest

from tests.conftest import serve_tokenward, tokenward_cmd
from tokenward.tokens.format import find_tokens

pytestmark = pytest.mark.slow


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1", COLUMNS="200")
    return env


def test_self_signed_tls_and_refusal_of_plain_http_off_loopback(tmp_path):
    data_dir = tmp_path / "data"
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
    served = None
    try:
        # Plain HTTP on a public address: refused, clearly, before anything listens.
        for proc in refusals:
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 2, (stdout, stderr)
            assert "refusing plain HTTP" in stderr and "--tls-self-signed" in stderr
            assert "Traceback" not in stderr and "listening" not in stdout
        stdout, stderr = half_tls.communicate(timeout=60)
        assert half_tls.returncode == 2 and "--tls-key" in stderr and "Traceback" not in stderr

        with open(tmp_path / "serve.err", "w") as err:
            served = serve_tokenward(
                "--data-dir", str(data_dir), "--tls-self-signed", "--init", env=env, stderr=err
            )
        port, printed = served.port, served.printed
        assert served.url == f"https://127.0.0.1:{port}"
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
        if served is not None:
            served.stop()
        for proc in [*refusals, half_tls]:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
