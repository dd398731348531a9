"""The image, built and run: when a container engine (podman or docker) answers and the base
image is present or can be pulled. Otherwise each test skips and says which is missing (a
machine that reaches package registries but no image registry has no base image)."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

_BASE = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Containerfile").read_text(), re.M)
assert _BASE is not None
BASE_IMAGE = _BASE.group(1)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def find_engine() -> tuple[str | None, str]:
    """(the engine's executable, "") or (None, why there is none)."""
    why = []
    for name in ("podman", "docker"):
        path = shutil.which(name)
        if path is None:
            why.append(f"{name} is not installed")
            continue
        info = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode != 0:
            why.append(f"{name} cannot reach its engine ({_last_line(info.stderr)})")
            continue
        return path, ""
    return None, "; ".join(why)


@dataclass
class Engine:
    path: str
    image: str

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        done = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args[:3])}… exited {done.returncode}: {done.stderr}")
        return done.stdout.strip()

    def succeeds(self, *args: str) -> bool:
        return subprocess.run([self.path, *args], capture_output=True, timeout=120).returncode == 0

    def logs(self, container: str) -> str:
        done = subprocess.run(
            [self.path, "logs", container], capture_output=True, text=True, timeout=60
        )
        return done.stdout + done.stderr

    @property
    def is_podman(self) -> bool:
        return "podman" in self.path.rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    path, why = find_engine()
    if path is None:
        pytest.skip(f"no container engine to build the image with: {why}")
    present = subprocess.run(
        [path, "image", "inspect", BASE_IMAGE], capture_output=True, timeout=60
    )
    if present.returncode != 0:
        pulled = subprocess.run(
            [path, "pull", BASE_IMAGE], capture_output=True, text=True, timeout=600
        )
        if pulled.returncode != 0:
            pytest.skip(
                f"the base image {BASE_IMAGE} is not present and cannot be pulled "
                f"({_last_line(pulled.stderr)})"
            )
    image = f"localhost/tokenward-test:{secrets.token_hex(4)}"
    # podman's default (OCI) image format has no HEALTHCHECK: ask for docker's
    oci = ["--format", "docker"] if "podman" in path.rsplit("/", 1)[-1] else []
    built = subprocess.run(
        [path, "build", *oci, "-t", image, "-f", str(ROOT / "Containerfile"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    try:
        yield Engine(path, image)
    finally:
        subprocess.run([path, "image", "rm", "-f", image], capture_output=True, timeout=120)


def test_the_image_runs_as_an_unprivileged_user_without_build_tools(engine):
    assert engine("run", "--rm", "--entrypoint", "id", engine.image, "-u") == "10001"
    found = engine(
        "run", "--rm", "--entrypoint", "sh", engine.image,
        "-c", "command -v gcc cc make pip pip3 || true",
    )  # fmt: skip
    assert found == "", found
    no_pip = engine(
        "run", "--rm", "--entrypoint", "python", engine.image, "-m", "pip", "--version",
        check=False,
    )  # fmt: skip
    assert "pip " not in no_pip
    config = json.loads(engine("image", "inspect", engine.image))[0]["Config"]
    assert list(config["Volumes"]) == ["/var/lib/tokenward"]


def _wait_healthy(engine: Engine, container: str, deadline: float) -> None:
    """The image's own HEALTHCHECK passes (podman runs it on demand; docker on its timer)."""
    while True:
        if engine.is_podman:
            if engine.succeeds("healthcheck", "run", container):
                return
        else:
            state = engine("inspect", "--format", "{{.State.Health.Status}}", container)
            if state == "healthy":
                return
        assert time.monotonic() < deadline, "the health check never passed"
        time.sleep(1)


def test_init_then_serve_in_the_image(engine):
    volume = f"tokenward-test-{secrets.token_hex(4)}"
    container = f"tokenward-test-{secrets.token_hex(4)}"
    engine("volume", "create", volume)
    try:
        mount = f"{volume}:/var/lib/tokenward"
        created = json.loads(engine("run", "--rm", "-v", mount, engine.image, "init", "--json"))
        admin = created["admin_token"]
        engine(
            "run", "-d", "--name", container, "-p", "127.0.0.1::8080", "-v", mount,
            "-e", "TOKENWARD_ALLOW_INSECURE_HTTP=1", "--read-only", "--tmpfs", "/tmp",
            "--cap-drop", "ALL", engine.image,
        )  # fmt: skip
        published = engine("port", container, "8080/tcp").splitlines()[0]
        url = "http://" + published.replace("0.0.0.0", "127.0.0.1")
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, engine.logs(container)
            time.sleep(0.5)
        answer = httpx.post(
            f"{url}/v1/verify",
            json={"token": admin},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=10,
        )
        assert answer.status_code == 200 and answer.json()["valid"] is True, answer.text
        _wait_healthy(engine, container, time.monotonic() + 120)
        # SIGTERM to tokenward as PID 1: a graceful stop, exit code 0
        engine("stop", "--time", "40", container, timeout=90)
        assert engine("inspect", "--format", "{{.State.ExitCode}}", container) == "0"
        assert admin not in engine.logs(container)
    finally:
        engine("rm", "-f", container, check=False)
        engine("volume", "rm", "-f", volume, check=False)
