"""The two scripts the images carry (deploy/docker): the health check behind every HEALTHCHECK
and exec probe, and the preStop hook that drains the dequeuer before its microservice stops."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from dequeuer.settings import DequeuerSettings
from tests.deploy.support import (
    IMAGES,
    ROOT,
    dockerfile_command,
    dockerfile_lines,
    image_command,
    pod_specs,
)

HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
DRAIN = ROOT / "deploy" / "docker" / "drain.py"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = {"/healthz": 200, "/readyz": 503}.get(self.path, 404)
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b'{"ready": false}')

    def log_message(self, *_: object) -> None:
        pass


class Ready(Handler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()


def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    httpd = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server() -> Iterator[int]:
    yield from serve(Handler)


@pytest.fixture
def ready_server() -> Iterator[int]:
    """Healthy and ready."""
    yield from serve(Ready)


def healthcheck(*args: str, env: dict[str, str] | None = None) -> int:
    result = subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return result.returncode


def test_healthcheck_passes_on_2xx_only(server: int) -> None:
    assert healthcheck("/healthz", "--port", str(server)) == 0
    assert healthcheck("/readyz", "--port", str(server)) == 1  # 503: not ready
    assert healthcheck("/nothing", "--port", str(server)) == 1


def test_healthcheck_follows_the_containers_port_variable(server: int) -> None:
    env = {"PROXYMQ_ADMIN_PORT": str(server)}
    assert healthcheck("/healthz", "--port", "1", "--port-env", "PROXYMQ_ADMIN_PORT", env=env) == 0


# The variable that moves the port each check asks, in the container's own settings.
PORT_VARIABLE = {
    "proxymq-enqueuer": "PROXYMQ_ADMIN_PORT",
    "proxymq-dequeuer": "PROXYMQ_ADMIN_PORT",
    "url-fetcher": "PROXYMQ_PORT",
}


def health_checks() -> list[tuple[str, str, list[str]]]:
    """(where, command, arguments after the script) of every call of healthcheck.py: the
    images' HEALTHCHECK, compose's health checks and the manifests' exec probes."""
    found = []

    def add(where: str, command: str | None, argv: list[str]) -> None:
        scripts = [i for i, arg in enumerate(argv) if arg.endswith("/healthcheck.py")]
        if scripts:
            assert command is not None, where
            found.append((where, command, argv[scripts[0] + 1 :]))

    for dockerfile in sorted(ROOT.glob("*/Dockerfile")):
        for line in dockerfile_lines(dockerfile):
            if line.startswith("HEALTHCHECK "):
                argv = yaml.safe_load(line.split(" CMD ", 1)[1])
                add(str(dockerfile.relative_to(ROOT)), dockerfile_command(dockerfile), argv)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        image = service.get("image", "").rsplit(":", 1)[0]
        add(f"docker-compose.yml {name}", IMAGES.get(image), service["healthcheck"]["test"])
    for workload, spec in pod_specs():
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                argv = ((container.get(probe) or {}).get("exec") or {}).get("command") or []
                where = f"{workload} {container['name']} {probe}"
                add(where, image_command(container["image"]), argv)
    return found


HEALTH_CHECKS = health_checks()


@pytest.mark.parametrize(
    ("where", "command", "argv"), HEALTH_CHECKS, ids=[where for where, _, _ in HEALTH_CHECKS]
)
def test_every_health_check_follows_its_containers_port_variable(
    where: str, command: str, argv: list[str], ready_server: int
) -> None:
    """A port moved in the container's environment alone (PROXYMQ_ADMIN_PORT in compose, say)
    is the port checked: compose's checks and url-fetcher's probes asked the default one, and
    the container was marked unhealthy however well it ran."""
    assert healthcheck(*argv, env={PORT_VARIABLE[command]: str(ready_server)}) == 0, where


def test_healthcheck_fails_when_nothing_listens() -> None:
    assert healthcheck("/healthz", "--port", "1", "--timeout", "1") == 1


# What Docker's client proxy settings (~/.docker/config.json "proxies") or a cluster's proxy
# policy put in every container: a proxy, with localhost (not 127.0.0.1) exempted.
PROXY_ENV = {
    "http_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "no_proxy": "localhost",
    "NO_PROXY": "localhost",
}


def test_healthcheck_never_asks_a_proxy(server: int) -> None:
    """The check is of this container's own port: sent to a proxy, it fails however healthy
    the sidecar is (and compose never starts what depends on it)."""
    assert healthcheck("/healthz", "--port", str(server), env=PROXY_ENV) == 0


def example_api_checks() -> list[tuple[str, list[str]]]:
    """The example API's health checks (its image carries no healthcheck.py)."""
    dockerfile = ROOT / "examples" / "api" / "Dockerfile"
    (line,) = [x for x in dockerfile_lines(dockerfile) if x.startswith("HEALTHCHECK ")]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return [
        ("examples/api/Dockerfile", yaml.safe_load(line.split(" CMD ", 1)[1])),
        ("docker-compose.yml api", compose["services"]["api"]["healthcheck"]["test"][1:]),
    ]


@pytest.mark.parametrize(("where", "command"), example_api_checks())
def test_example_api_checks_follow_its_port_and_never_ask_a_proxy(
    server: int, where: str, command: list[str]
) -> None:
    assert command[0] == "python", where
    env = {**os.environ, **PROXY_ENV, "API_PORT": str(server)}
    result = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, timeout=30, check=False, env=env
    )
    assert result.returncode == 0, f"{where}: {result.stderr.decode()[-300:]}"


FAKE_DEQUEUER = """\
import signal, sys, time
def stop(*_):
    time.sleep(0.6)  # the drain
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_drain_signals_the_dequeuer_and_waits_until_it_is_gone(tmp_path: Path) -> None:
    name = f"fake-dequeuer-{uuid.uuid4().hex[:8]}"  # never a real dequeuer of another test
    script = tmp_path / name
    script.write_text(FAKE_DEQUEUER)
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, str(DRAIN), "--name", name, "--timeout", "20"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert "drained" in result.stdout
        assert elapsed >= 0.5, "the hook returned before the drain finished"
        assert child.wait(timeout=5) == 0, "the dequeuer got SIGTERM and exited cleanly"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def load_drain() -> Any:
    spec = importlib.util.spec_from_file_location("drain", DRAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("env", "args", "wait"),
    [
        ({}, [], 25 + 10),  # the dequeuer's default grace
        ({"PROXYMQ_SHUTDOWN_GRACE": "60"}, [], 60 + 10),  # raised as operations.md says
        ({"PROXYMQ_SHUTDOWN_GRACE": "60"}, ["--shutdown-grace", "90"], 90 + 10),  # flag wins
        ({}, ["--shutdown-grace=5.5"], 5.5 + 10),
        ({"PROXYMQ_SHUTDOWN_GRACE": "soon"}, [], 25 + 10),  # unreadable: the default
    ],
)
def test_drain_waits_as_long_as_the_dequeuers_own_grace(
    env: dict[str, str], args: list[str], wait: float
) -> None:
    """Without --timeout the hook outwaits the drain the dequeuer was given: a fixed 35 s in the
    manifest cut a drain raised to 60 s short, and url-fetcher stopped under its calls."""
    drain = load_drain()
    assert DequeuerSettings.model_fields["shutdown_grace"].default == drain.DEFAULT_GRACE
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", *args],
        env={k: v for k, v in os.environ.items() if k != "PROXYMQ_SHUTDOWN_GRACE"} | env,
    )
    try:
        for _ in range(100):  # until the exec is done and /proc shows the child's own command
            if b"sleep(30)" in Path(f"/proc/{child.pid}/cmdline").read_bytes():
                break
            time.sleep(0.02)
        assert drain.drain_wait([child.pid]) == wait
    finally:
        child.kill()
        child.wait()


def test_drain_returns_at_once_when_no_dequeuer_is_visible() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(DRAIN), "--name", f"absent-{uuid.uuid4().hex}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert "shareProcessNamespace" in result.stderr
    assert time.monotonic() - started < 5
