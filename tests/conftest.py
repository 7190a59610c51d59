"""Fixtures for integration tests: the real broker, the sidecars started as console scripts the way
a user starts them, and an HTTP target of the test's own that records what it saw."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
    HeadersType,
)
from aiohttp import web

from shared import envelope, processes, topology
from shared.processes import Process, free_port
from shared.settings import DEFAULT_AMQP_URL
from tests.target import Target

AMQP_URL = os.environ.get("PROXYMQ_AMQP_URL", DEFAULT_AMQP_URL)
# The fault tests' figures, appended by each worker of `pytest -n` and printed by the controller.
REPORT_ENV = "PROXYMQ_RELIABILITY_REPORT"
REPORT_FILE = Path(tempfile.gettempdir()) / f"proxymq-reliability-report-{os.getpid()}.jsonl"
os.environ.setdefault(REPORT_ENV, str(REPORT_FILE))
# Each pytest-xdist worker picks its processes' ports from a slice of its own: two workers
# once picked the same admin port, and a test's readiness check was answered by the other
# worker's enqueuer while its own was still starting (its API port then refused the call).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and _WORKER[2:].isdigit():
    processes.LISTEN_PORTS = processes.LISTEN_PORTS[
        int(_WORKER[2:]) :: int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    ]


def broker_answers(host: str = "127.0.0.1", port: int = 5672) -> bool:
    """The broker answers the AMQP protocol header with its own (a connection.start frame)."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> str:
    if not broker_answers():
        pytest.fail("RabbitMQ does not answer on 127.0.0.1:5672: run `make broker` first")
    return AMQP_URL


@pytest.fixture
async def amqp(
    amqp_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": f"test {request.node.nodeid}"}
    )
    yield connection
    await connection.close()


@pytest.fixture
async def service(amqp: AbstractRobustConnection) -> AsyncIterator[str]:
    """A service name of this test alone; its topology is deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    yield name
    await topology.delete(amqp, topology.Topology(name))


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    server = Target()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@contextlib.asynccontextmanager
async def serving(app: web.Application, **runner: Any) -> AsyncIterator[str]:
    """A microservice of the test's own on a free loopback port: its base URL while inside."""
    started = web.AppRunner(app, access_log=None, **runner)
    await started.setup()
    try:
        port = free_port()
        await web.TCPSite(started, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await started.cleanup()


@dataclass
class Stack:
    """What a test started; stopped in reverse order at teardown."""

    amqp_url: str
    logs: Path
    processes: list[Process] = field(default_factory=list)

    async def start(
        self,
        name: str,
        *args: str,
        ready_path: str | None = "/readyz",
        admin_port: int | None = None,
        wait: bool = True,
        env: dict[str, str] | None = None,
        api_port: bool = False,
    ) -> Process:
        """`api_port`: also a `--port` of its own (`process.api_port`). A port found free may
        be taken by another test's process before this one binds it (two workers, and anything
        else on the machine, pick from the same range): started again on others, up to 3 times."""
        for attempt in range(3):
            port = admin_port or free_port()
            ready = None if ready_path is None else f"http://127.0.0.1:{port}{ready_path}"
            path = self.logs / f"{name}-{len(self.processes)}.log"
            extra = ["--admin-port", str(port)] if name.startswith("proxymq-") else []
            api = free_port() if api_port else None
            first = [] if api is None else ["--port", str(api)]  # a `--port` in `args` wins
            process = Process(
                name,
                [*first, *args, *extra],
                ready_url=ready,
                log=path.open("ab"),
                env={"PROXYMQ_AMQP_URL": self.amqp_url, **(env or {})},
            )
            process.admin_port = port  # type: ignore[attr-defined]
            process.api_port = api  # type: ignore[attr-defined]
            self.processes.append(process.start())
            if not wait:
                return process
            try:
                return await asyncio.to_thread(process.wait_ready, 30)
            except RuntimeError:
                taken = "address already in use" in path.read_text(errors="replace")
                if not taken or attempt == 2 or admin_port is not None:
                    raise
                self.processes.remove(process)
                path.unlink()
        raise AssertionError("unreachable")

    async def dequeuer(
        self,
        service: str,
        target: str,
        *args: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> Process:
        return await self.start(
            "proxymq-dequeuer", "--service", service, "--target", target, *args, wait=wait, env=env
        )

    async def enqueuer(
        self,
        *args: str,
        wait: bool = True,
        ready_path: str | None = "/readyz",
        env: dict[str, str] | None = None,
    ) -> tuple[Process, str]:
        process = await self.start(
            "proxymq-enqueuer", *args, wait=wait, ready_path=ready_path, env=env, api_port=True
        )
        return process, f"http://127.0.0.1:{process.api_port}"  # type: ignore[attr-defined]

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop(grace=15)


@pytest.fixture
def stack(
    amqp_url: str, service: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """Depends on `service` so that the processes stop before the topology is deleted."""
    running = Stack(amqp_url, tmp_path)
    yield running
    running.stop()
    report = getattr(request.node, "rep_call", None)
    if getattr(report, "failed", False):
        print(running.log_text()[-6000:])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keeps each phase's report on the item, so fixtures can print logs of failed tests."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


async def metric(
    http: aiohttp.ClientSession, admin_port: int, name: str, labels: dict[str, str] | None = None
) -> float:
    """The value of one sample of a sidecar's /metrics (0 when absent)."""
    async with http.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, sample_labels = sample.partition("{")
        if sample_name != name:
            continue
        present = dict(
            part.split("=", 1) for part in sample_labels.rstrip("}").split(",") if "=" in part
        )
        if all(present.get(k) == f'"{v}"' for k, v in (labels or {}).items()):
            total += float(value)
    return total


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port where nothing listens (held bound but not listening, so nobody takes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Under `pytest -n` (`make test`), every fault test runs on one worker, one after another:
    each starts RabbitMQ nodes of its own, and two clusters at once on two cores would compete
    for the CPU their figures measure. Every other test is scheduled on its own, as with
    `--dist load`."""
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    class FaultTestsTogether(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "reliability" if nodeid.startswith("tests/reliability/") else nodeid

    return FaultTestsTogether(config, log)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures of this run's fault tests, one line each (also kept in the report file when
    PROXYMQ_RELIABILITY_REPORT names one)."""
    path = Path(os.environ.get(REPORT_ENV, REPORT_FILE))
    if not path.exists():
        return
    terminalreporter.section("reliability figures")
    for line in path.read_text().splitlines():
        row = json.loads(line)
        name = row.pop("test")
        terminalreporter.write_line(f"{name}: {json.dumps(row)}")
    if path == REPORT_FILE:
        path.unlink()


async def foreign_replier(
    amqp: AbstractRobustConnection, service: str, headers: HeadersType, body: bytes
) -> AbstractChannel:
    """A replier that is no dequeuer (any AMQP client may answer a service's requests): it
    answers every request with these AMQP headers and body. Close the channel it returns."""
    layout = topology.Topology(service, partitions=1)
    await topology.declare(amqp, layout)
    channel = await amqp.channel()
    queue = await channel.get_queue(layout.queues[0])

    async def reply(message: AbstractIncomingMessage) -> None:
        answer = aio_pika.Message(body, headers=headers, correlation_id=message.correlation_id)
        await channel.default_exchange.publish(answer, routing_key=message.reply_to or "")
        await message.ack()

    await queue.consume(reply)
    return channel


def reply_headers(status: int, headers: list[tuple[str, str]]) -> HeadersType:
    return {envelope.H_STATUS: status, envelope.H_HEADERS: json.dumps(headers)}
