"""The deployment files say what docs/deploy.md says: compose.yaml (valid Compose, the order
of its services, secrets as files), deploy/nginx.conf, the Containerfile, the secrets that
deploy/make-secrets makes (used by a real Redis) and the systemd units (systemd-analyze)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
import yaml

from tests.conftest import ROOT
from tokenward.settings import FromFile, Settings

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
REPLICAS = ["tokenward-1", "tokenward-2", "tokenward-3"]
NGINX_CONF = (ROOT / "deploy" / "nginx.conf").read_text()
#: The Compose Specification's schema (tests/data/README.md says where it comes from)
COMPOSE_SCHEMA = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
SECRET_FIELDS = {
    name
    for name, field in Settings.model_fields.items()
    if any(isinstance(m, FromFile) for m in field.metadata)
}
#: an URL with a password in it: user:password@
CREDENTIAL_IN_URL = re.compile(r"://[^/@\s]*:[^/@\s]+@")


def _known_variable(name: str) -> bool:
    """A setting's variable, or the ``_FILE`` variant of a secret one."""
    field = name.removeprefix("TOKENWARD_").lower()
    return field in Settings.model_fields or field.removesuffix("_file") in SECRET_FIELDS


# -- compose.yaml --------------------------------------------------------------------------
def test_compose_is_valid_compose():
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(COMPOSE_SCHEMA).iter_errors(COMPOSE)
    ]
    assert not errors, errors


def test_the_schema_check_catches_a_mistake():
    wrong = {**COMPOSE, "services": {**SERVICES, "x": {"image": "a", "depends_on": {"redis": {}}}}}
    wrong["services"]["x"]["depends_on"]["redis"]["condition"] = "service_up"
    assert list(jsonschema.Draft7Validator(COMPOSE_SCHEMA).iter_errors(wrong))


def test_compose_services_and_their_order():
    assert set(SERVICES) == {"postgres", "redis", "migrate", "nginx", *REPLICAS}
    assert SERVICES["migrate"]["command"] == ["migrate"]
    assert SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in REPLICAS:
        replica = SERVICES[name]
        assert replica["command"] == ["serve", "--no-migrate"], name
        assert replica["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }, name
        assert "/healthz" in " ".join(replica["healthcheck"]["test"]), name
        assert replica["build"]["dockerfile"] == "Containerfile"
        assert replica["image"] == SERVICES["migrate"]["image"]  # the one image
        assert replica["read_only"] is True and replica["cap_drop"] == ["ALL"]
    assert SERVICES["nginx"]["depends_on"] == {
        name: {"condition": "service_healthy"} for name in REPLICAS
    }
    assert SERVICES["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert SERVICES["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_only_nginx_is_published_and_on_loopback():
    published = {name: s["ports"] for name, s in SERVICES.items() if "ports" in s}
    assert published == {"nginx": ["127.0.0.1:8080:8080"]}


def test_compose_volumes():
    assert "postgres-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert set(COMPOSE["volumes"]) == {"postgres-data"}
    (mount,) = SERVICES["nginx"]["volumes"]
    source, target, mode = mount.split(":")
    assert (ROOT / source).resolve() == ROOT / "deploy" / "nginx.conf"
    assert target == "/etc/nginx/conf.d/default.conf" and mode == "ro"


def test_the_replicas_settings_are_real_and_their_secrets_files():
    for name in ["migrate", *REPLICAS]:
        service = SERVICES[name]
        env = service["environment"]
        for variable in env:
            assert _known_variable(variable), f"{name}: {variable} is no tokenward setting"
        mounted = set(service["secrets"])
        for field in [*SECRET_FIELDS, "secret_key"]:
            variable = f"TOKENWARD_{field.upper()}"
            assert variable not in env, f"{name}: {variable} is written in compose.yaml"
            path = env[f"{variable}_FILE"]
            assert path.startswith("/run/secrets/"), (name, variable, path)
            assert path.removeprefix("/run/secrets/") in mounted, (name, path)
    assert SERVICES["tokenward-1"]["environment"]["TOKENWARD_TRUSTED_PROXIES"] == (
        SERVICES["nginx"]["networks"]["backend"]["ipv4_address"] + "/32"
    )


def test_no_secret_is_written_in_compose():
    declared = COMPOSE["secrets"]
    for name, secret in declared.items():
        assert set(secret) == {"file"}, f"secret {name} is not a file"
        assert secret["file"] == f"./secrets/{name}"
    assert "/secrets/" in (ROOT / ".gitignore").read_text().split()
    for name, service in SERVICES.items():
        env = service.get("environment", {})
        for variable, value in env.items():
            assert not CREDENTIAL_IN_URL.search(str(value)), f"{name}: {variable}"
            secretive = re.search(r"(^|_)(PASSWORD|SECRET|TOKEN|KEY)(_|$)", variable)
            if secretive and not variable.endswith("_FILE"):
                pytest.fail(f"{name}: {variable} holds a secret inline")
        for secret in service.get("secrets", []):
            assert secret in declared, (name, secret)
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == (
        "/run/secrets/postgres_password"
    )
    assert "/run/secrets/redis_acl" in SERVICES["redis"]["command"]


# -- deploy/nginx.conf ---------------------------------------------------------------------
def test_nginx_balances_the_three_replicas_with_keepalive():
    upstream = re.search(r"upstream tokenward \{(.*?)\n\}", NGINX_CONF, re.S)
    assert upstream is not None
    body = "\n".join(line.split("#")[0] for line in upstream.group(1).splitlines())
    servers = re.findall(r"^\s*server\s+(\S+)", body, re.M)
    assert servers == [f"{name}:8080" for name in REPLICAS]
    assert re.search(r"^\s*keepalive\s+\d+;", body, re.M)
    assert "proxy_pass http://tokenward;" in NGINX_CONF
    assert "proxy_http_version 1.1;" in NGINX_CONF
    assert 'proxy_set_header Connection "";' in NGINX_CONF  # else no keep-alive upstream
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in NGINX_CONF
    assert re.search(r"^\s*listen 8080;", NGINX_CONF, re.M)


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
def test_nginx_accepts_the_configuration(tmp_path):
    """``nginx -t`` on deploy/nginx.conf as compose mounts it (the replicas' names made
    local: nginx resolves them when it loads the file)."""
    site = NGINX_CONF
    for name in REPLICAS:
        site = site.replace(f"{name}:8080", "127.0.0.1:9")
    site = site.replace("listen 8080;", "listen 127.0.0.1:9;")
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"
        " events {} http { include site.conf; }"
    )
    checked = subprocess.run(
        [NGINX, "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr


# -- Containerfile -------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Containerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Containerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_containerfile_is_multi_stage_and_its_final_stage_lean():
    instructions = _instructions()
    froms = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert len(froms) == 2
    assert instructions[froms[0]][1].endswith(" AS builder")
    builder, final = instructions[froms[0] : froms[1]], instructions[froms[1] :]
    assert any(w == "RUN" and "pip wheel" in a for w, a in builder)
    assert ("COPY", "--from=builder /opt/tokenward /opt/tokenward") in final
    for word, args in final:
        assert not re.search(r"\b(apt-get|gcc|build-essential|pip install)\b", args), args
    assert [a for w, a in final if w == "ENTRYPOINT"] == ['["tokenward"]']


def test_containerfile_runs_unprivileged_with_a_health_check_and_a_volume():
    final = _instructions()[[w for w, _ in _instructions()].index("FROM", 1) :]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    (health,) = [a for w, a in final if w == "HEALTHCHECK"]
    assert "/healthz" in health and "CMD" in health
    env = " ".join(a for w, a in final if w == "ENV")
    data_dir = re.search(r"TOKENWARD_DATA_DIR=(\S+)", env)
    assert data_dir is not None
    (volume,) = [a for w, a in final if w == "VOLUME"]
    assert json.loads(volume) == [data_dir.group(1)]
    for variable in re.findall(r"(TOKENWARD_[A-Z_]+)=", env):
        assert _known_variable(variable), variable


def test_the_build_context_is_what_the_containerfile_copies():
    """.dockerignore (podman reads it too) lets in exactly the sources COPY names: no
    secrets/, data folder or virtualenv is sent to the builder."""
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for word, args in _instructions():
        if word == "COPY" and not args.startswith("--from"):
            copied.update(args.split()[:-1])
    assert allowed == copied == {"pyproject.toml", "README.md", "LICENSE", "src", "client"}


# -- deploy/make-secrets, and Redis with its ACL -------------------------------------------
def test_make_secrets_makes_consistent_files_and_keeps_them(tmp_path):
    folder = tmp_path / "secrets"
    script = str(ROOT / "deploy" / "make-secrets")
    made = subprocess.run([script, str(folder)], capture_output=True, text=True, check=True)
    names = set(COMPOSE["secrets"])
    assert {p.name for p in folder.iterdir()} == names
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    read = {name: (folder / name).read_text() for name in names}
    for name in names:
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name
        assert read[name].endswith("\n") and read[name].strip(), name
    assert len(bytes.fromhex(read["secret_key"].strip())) == 32
    password = read["postgres_password"].strip()
    assert read["database_url"].strip() == (
        f"postgresql+asyncpg://tokenward:{password}@postgres:5432/tokenward"
    )
    assert made.stdout.count("made ") == len(names)
    again = subprocess.run([script, str(folder)], capture_output=True, text=True, check=True)
    assert again.stdout.count("kept ") == len(names)
    assert {name: (folder / name).read_text() for name in names} == read
    # a lost URL is made again from the password that is kept
    (folder / "redis_url").unlink()
    subprocess.run([script, str(folder)], capture_output=True, check=True)
    assert (folder / "redis_url").read_text() == read["redis_url"]


REDIS_SERVER = shutil.which("redis-server")


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_redis_with_the_made_acl_and_tokenward_with_the_made_files(tmp_path, monkeypatch):
    """Redis started as compose starts it, on a Unix socket: the health check's ping works
    without a password, nothing else does; the URL file tokenward reads gets everything."""
    folder = tmp_path / "secrets"
    subprocess.run([str(ROOT / "deploy" / "make-secrets"), str(folder)], check=True)
    command = [c for c in SERVICES["redis"]["command"] if c != "redis-server"]
    command = [c.replace("/run/secrets", str(folder)) for c in command]
    sock = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [REDIS_SERVER, *command, "--port", "0", "--unixsocket", str(sock), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():  # redis-server makes its socket once it is ready
            assert server.poll() is None, f"redis-server exited with {server.returncode}"
            assert time.monotonic() < deadline, "redis-server never made its socket"
            time.sleep(0.02)
        anyone = redis.Redis(unix_socket_path=str(sock))
        assert anyone.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            anyone.get("tokenward:x")
        anyone.close()
        # the URL tokenward reads, pointed at this socket
        monkeypatch.setenv("TOKENWARD_REDIS_URL_FILE", str(folder / "redis_url"))
        monkeypatch.setenv("TOKENWARD_DATABASE_URL_FILE", str(folder / "database_url"))
        settings = Settings.load()
        assert settings.redis_url == (folder / "redis_url").read_text().strip()
        assert settings.database_url == (folder / "database_url").read_text().strip()
        user, password = re.match(r"redis://(\w+):(\w+)@", settings.redis_url).groups()
        client = redis.Redis(unix_socket_path=str(sock), username=user, password=password)
        assert client.set("tokenward:x", "1") and client.get("tokenward:x") == b"1"
        assert client.publish("tokenward:revoked", "x") == 0
        client.close()
        wrong = redis.Redis(unix_socket_path=str(sock), username=user, password="nope")
        with pytest.raises(redis.exceptions.AuthenticationError):
            wrong.ping()
    finally:
        server.terminate()
        server.wait(timeout=10)


# -- deploy/systemd ------------------------------------------------------------------------
UNITS = ROOT / "deploy" / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def test_the_units_run_migrate_then_serve_no_migrate_with_credentials():
    migrate = (UNITS / "tokenward-migrate.service").read_text()
    replica = (UNITS / "tokenward@.service").read_text()
    assert "Type=oneshot" in migrate
    assert "ExecStart=/opt/tokenward/bin/tokenward migrate\n" in migrate
    assert "ExecStart=/opt/tokenward/bin/tokenward serve --no-migrate --port %i\n" in replica
    assert "Requires=tokenward-migrate.service" in replica
    assert re.search(r"^After=.*tokenward-migrate\.service", replica, re.M)
    for unit in (migrate, replica):
        assert "User=tokenward" in unit and "NoNewPrivileges=yes" in unit
        for variable in re.findall(r"^Environment=(TOKENWARD_\w+)=", unit, re.M):
            assert _known_variable(variable), variable
        for name, _path in re.findall(r"^LoadCredential=(\w+):(\S+)", unit, re.M):
            assert f"Environment=TOKENWARD_{name.upper()}_FILE=%d/{name}\n" in unit
        assert not CREDENTIAL_IN_URL.search(unit)
    assert "LoadCredential=secret_key:" in replica and "LoadCredential=database_url:" in replica


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path):
    """``systemd-analyze verify`` warns about a bad line and still exits 0: no output at all
    is the pass. It also wants each command to exist: the units name /opt/tokenward's
    tokenward, here replaced by the one installed with this Python."""
    installed = Path(sys.executable).parent / "tokenward"
    assert installed.exists()
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/opt/tokenward/bin/tokenward", str(installed))
        # a template is verified as an instance of it
        (tmp_path / unit.name.replace("@.", "@8081.")).write_text(text)
    names = sorted(str(p) for p in tmp_path.iterdir())
    assert len(names) == 3
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    checked = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *names],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout + checked.stderr == "", checked.stdout + checked.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_would_catch_a_mistake(tmp_path):
    unit = tmp_path / "tokenward@8081.service"
    text = (UNITS / "tokenward@.service").read_text()
    text = text.replace("/opt/tokenward/bin/tokenward", str(Path(sys.executable)))
    unit.write_text(text.replace("KillMode=mixed", "KillMode=gently"))
    checked = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    assert "Failed to parse kill mode specification, ignoring: gently" in checked.stderr


# -- docs ----------------------------------------------------------------------------------
def test_deploy_docs_are_linked_and_name_the_files():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/deploy.md)" in readme
    assert readme.index("## Two commands") < readme.index("### Run it in a container")
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for needle in (
        "../Containerfile",
        "../compose.yaml",
        "../deploy/nginx.conf",
        "../deploy/systemd/",
        "../deploy/make-secrets",
        "operations.md#workers-and-replicas",
        "tokenward migrate",
        "serve --no-migrate",
        "## Backups",
        "## Upgrades",
        "## Secrets from files",
    ):
        assert needle in docs, needle
    for field in [*SECRET_FIELDS, "secret_key"]:
        assert f"`TOKENWARD_{field.upper()}_FILE`" in docs, field
