"""The two scripts the images carry (deploy/docker): the health check behind every HEALTHCHECK
and exec probe, and the preStop hook that drains the dequeuer before its microservice stops."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import aiohttp
import pytest
import yaml

from dequeuer.settings import DequeuerSettings
from shared.processes import Process
from tests.conftest import Stack, closed_port
from tests.deploy.support import (
    IMAGES,
    ROOT,
    dockerfile_command,
    dockerfile_lines,
    image_command,
    pod_specs,
)
from tests.target import Target

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


class FakeDequeuer(BaseHTTPRequestHandler):
    """Answers POST /drain as the dequeuer does, and stops listening a moment later (it exits)."""

    answer = b'{"draining": true, "grace": 0.5}'
    drains: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.drains.append(self.path)
        self.send_response(202 if self.path == "/drain" else 404)
        self.end_headers()
        self.wfile.write(self.answer)
        if self.path == "/drain":
            threading.Timer(0.5, self.exit, args=(self.server,)).start()

    @staticmethod
    def exit(server: Any) -> None:
        server.shutdown()
        server.server_close()
        server.closed = True

    def log_message(self, *_: object) -> None:
        pass


def drain_hook(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DRAIN), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "PROXYMQ_ADMIN_PORT"} | (env or {}),
    )


@pytest.mark.parametrize("by", ["flag", "variable"])
def test_drain_posts_to_the_dequeuers_admin_port_and_waits_until_it_is_closed(by: str) -> None:
    httpd = HTTPServer(("127.0.0.1", 0), FakeDequeuer)
    httpd.closed = False  # type: ignore[attr-defined]
    FakeDequeuer.drains = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = str(httpd.server_address[1])
    if by == "flag":
        result = drain_hook("--port", port, env={"PROXYMQ_ADMIN_PORT": "1"})  # the flag wins
    else:
        result = drain_hook(env={"PROXYMQ_ADMIN_PORT": port})
    assert result.returncode == 0, result.stderr
    assert FakeDequeuer.drains == ["/drain"]
    assert "drained" in result.stdout
    assert httpd.closed, "the hook returned while the dequeuer still listened"  # type: ignore[attr-defined]


def load_drain() -> Any:
    spec = importlib.util.spec_from_file_location("drain", DRAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("answer", "grace"),
    [
        (b'{"draining": true, "grace": 60.0}', 60.0),  # raised as operations.md says
        (b'{"draining": true, "grace": 0}', 0.0),
        (b'{"draining": true}', 25.0),  # no grace said: the dequeuer's default
        (b"not json", 25.0),
    ],
)
def test_drain_waits_as_long_as_the_dequeuers_own_grace(answer: bytes, grace: float) -> None:
    """Without --timeout the hook outwaits the drain the dequeuer was given: a fixed 35 s in the
    manifest cut a drain raised to 60 s short, and url-fetcher stopped under its calls."""
    drain = load_drain()
    assert DequeuerSettings.model_fields["shutdown_grace"].default == drain.DEFAULT_GRACE
    assert DequeuerSettings.model_fields["admin_port"].default == drain.DEFAULT_PORT

    class Answer(FakeDequeuer):
        def do_POST(self) -> None:
            self.send_response(202)
            self.end_headers()
            self.wfile.write(answer)

    for port in serve(Answer):
        assert drain.request_drain(port) == grace


def test_drain_gives_up_after_its_timeout() -> None:
    """A dequeuer that never exits holds the hook for --timeout, not for good."""

    class Stuck(FakeDequeuer):
        def do_POST(self) -> None:
            self.send_response(202)
            self.end_headers()
            self.wfile.write(b'{"draining": true, "grace": 600}')

    for port in serve(Stuck):
        result = drain_hook("--port", str(port), "--timeout", "0.5")
        assert result.returncode == 0
        assert "still runs after 0.5 s" in result.stderr


def test_drain_waits_for_a_dequeuer_too_busy_to_answer() -> None:
    """A port that accepts and never answers is a dequeuer all the same: the POST may still be
    read, and the microservice must not stop under its calls."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # never accepted: the connection waits in the backlog
        result = drain_hook("--port", str(listener.getsockname()[1]), "--timeout", "0.5")
    assert result.returncode == 0
    assert "waiting all the same" in result.stderr
    assert "still runs after 0.5 s" in result.stderr


def test_drain_returns_at_once_when_no_dequeuer_answers() -> None:
    with closed_port() as port:
        started = time.monotonic()
        result = drain_hook("--port", str(port))
    assert result.returncode == 0
    assert "no dequeuer drained" in result.stderr and "refused" in result.stderr
    assert time.monotonic() - started < 5


def test_drain_refused_by_the_dequeuer_returns_at_once() -> None:
    """An answer other than 2xx (a dequeuer older than /drain: 404) started no stop to wait
    for; the hook says what it got."""

    class Older(FakeDequeuer):
        def do_POST(self) -> None:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"404: Not Found")

    for port in serve(Older):
        result = drain_hook("--port", str(port))
        assert result.returncode == 0
        assert "no dequeuer drained" in result.stderr and "404" in result.stderr


def test_drain_refuses_an_admin_port_variable_that_is_no_port() -> None:
    result = drain_hook(env={"PROXYMQ_ADMIN_PORT": "90x"})
    assert result.returncode == 2
    assert "PROXYMQ_ADMIN_PORT='90x' is not a port" in result.stderr


async def a_call_in_flight(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> tuple[Process, int, asyncio.Task[aiohttp.ClientResponse]]:
    """An enqueuer, a dequeuer with a 10 s grace and its admin port, and a 2 s call the target
    has begun: what a drain must let finish."""
    _, url = await stack.enqueuer()
    dequeuer = await stack.dequeuer(service, target.url, "--shutdown-grace", "10")
    call = asyncio.create_task(http.get(f"{url}/{service}/delay/2"))
    async with asyncio.timeout(10):
        while not any(seen.path == "/delay/2" for seen in target.seen):
            await asyncio.sleep(0.05)
    return dequeuer, dequeuer.admin_port, call  # type: ignore[attr-defined]


@pytest.mark.rabbit
async def test_drain_hook_lets_a_real_dequeuer_finish_its_call_and_exit(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The pod's stop as Kubernetes runs it: the hook drains the dequeuer over its admin port
    (no shared process namespace), which finishes the call in flight and exits 0 within its
    grace; a second POST /drain meanwhile changes nothing."""
    dequeuer, admin, call = await a_call_in_flight(stack, service, target, http)
    assert dequeuer.popen is not None
    started = time.monotonic()
    hook = asyncio.create_task(asyncio.to_thread(drain_hook, "--port", str(admin)))
    async with asyncio.timeout(5):  # the hook's POST started the stop
        while True:
            async with http.get(f"http://127.0.0.1:{admin}/readyz") as response:
                if response.status == 503 and not (await response.json())["checks"]["not_stopping"]:
                    break
            await asyncio.sleep(0.05)
    async with http.post(f"http://127.0.0.1:{admin}/drain") as response:
        assert response.status == 202
        assert await response.json() == {"draining": True, "grace": 10.0}
    result = await hook
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "drained and stopped" in result.stdout
    assert took < 10 + 10
    # The admin port closes as the dequeuer's last step, its connection already closed.
    assert await asyncio.to_thread(dequeuer.popen.wait, 5) == 0
    async with await call as answered:
        assert answered.status == 200
        assert await answered.text() == "late"
    logged = stack.log_text()
    assert "drain requested on the admin port" in logged
    assert "second stop signal" not in logged and "Traceback" not in logged


@pytest.mark.rabbit
async def test_a_signal_during_a_drain_is_the_first_not_the_second(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A dequeuer run as a plain container gets its SIGTERM while the preStop hook's drain is
    under way: that is its first stop signal, and the call in flight still finishes (it was
    taken for a second one, and the dequeuer exited at once)."""
    dequeuer, admin, call = await a_call_in_flight(stack, service, target, http)
    assert dequeuer.popen is not None
    async with http.post(f"http://127.0.0.1:{admin}/drain") as response:
        assert response.status == 202
    async with asyncio.timeout(10):
        while "drain requested on the admin port" not in stack.log_text():
            await asyncio.sleep(0.05)
    dequeuer.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(dequeuer.popen.wait, 15) == 0
    async with await call as answered:
        assert answered.status == 200
        assert await answered.text() == "late"
    assert "second stop signal" not in stack.log_text()
