"""Fixtures of the fault tests: RabbitMQ nodes this test session starts, breaks and removes.

The broker on 127.0.0.1:5672 is shared with other engineers' tests and is never touched here.
Every node lives under one state directory per session (`/tmp/proxymq-reliability-PID-*`), with
names and ports no other session uses, and is stopped by a finalizer whether the tests pass or
not. A session that died without its finalizers (SIGKILL, a power cut) leaves a directory whose
PID is gone: the next session stops those nodes and removes it first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from shared.cli.cluster import STATE_FILE, LocalCluster, Node
from tests.conftest import Stack, broker_answers
from tests.reliability.support import TimedTarget

STATE_PREFIX = "proxymq-reliability-"


def node_prefix(kind: str) -> str:
    """Node names unique to this session (`rel1234n1@localhost`), never `rabbit@localhost`."""
    return f"rel{os.getpid()}{kind}"


def sweep_stale(root: Path) -> None:
    for directory in root.glob(f"{STATE_PREFIX}*"):
        try:
            pid = int(directory.name[len(STATE_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        for state in directory.glob(f"*/{STATE_FILE}"):
            LocalCluster.load(state.parent).destroy()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    root = Path(tempfile.gettempdir())
    sweep_stale(root)
    path = Path(tempfile.mkdtemp(prefix=f"{STATE_PREFIX}{os.getpid()}-", dir=root))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Certs:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate it signed, and a
    client certificate from a CA nobody trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "rogue-ca"):
        _openssl(
            "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
            "-subj", f"/CN=ProxyMQ test {ca}", cwd=directory,
        )  # fmt: skip
    signed = [
        ("server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "ca", "extendedKeyUsage=clientAuth"),
        ("rogue", "rogue-ca", "extendedKeyUsage=clientAuth"),
    ]
    for name, ca, extensions in signed:
        (directory / f"{name}.ext").write_text(extensions + "\n")
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=proxymq-{name}", cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=directory,
        )  # fmt: skip
    d = directory
    return Certs(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "rogue.pem",
        d / "rogue.key",
    )


def tls_config(certs: Certs, *, require_client_cert: bool) -> list[str]:
    """verify_peer: a client certificate, when one is sent, must come from our CA;
    fail_if_no_peer_cert: one must be sent."""
    return [
        f"ssl_options.cacertfile = {certs.ca}",
        f"ssl_options.certfile = {certs.server_cert}",
        f"ssl_options.keyfile = {certs.server_key}",
        "ssl_options.verify = verify_peer",
        f"ssl_options.fail_if_no_peer_cert = {str(require_client_cert).lower()}",
    ]


@pytest.fixture(scope="session")
def certs(state_dir: Path) -> Certs:
    return make_certs(state_dir / "certs")


def start_nodes(
    directory: Path, count: int, kind: str, *, tls: bool = False, config: list[str] | None = None
) -> LocalCluster:
    cluster = LocalCluster.with_free_ports(
        directory, count, node_prefix(kind), tls=tls, config=config or []
    )
    started = time.monotonic()
    try:
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    print(f"{count} node(s) {node_prefix(kind)} up in {time.monotonic() - started:.1f} s")
    return cluster


@pytest.fixture(scope="session")
def single_node(state_dir: Path, certs: Certs) -> Iterator[LocalCluster]:
    """One node of our own with AMQP and a TLS listener where a client certificate is optional:
    shared by the restart, connection-cut, TLS and soak tests (each leaves it running)."""
    cluster = start_nodes(
        state_dir / "single", 1, "n", tls=True, config=tls_config(certs, require_client_cert=False)
    )
    yield cluster
    cluster.destroy()


def node_serves(node: Node) -> bool:
    return broker_answers("127.0.0.1", node.port)


@pytest.fixture
def node(single_node: LocalCluster) -> LocalCluster:
    """The single node, running and serving: a test that failed half way through a restart does
    not leave the next one without a broker."""
    only = single_node.nodes[0]
    if only.pid() is None:
        single_node.start_node(only)
    elif not node_serves(only):
        single_node.ctl(only, "start_app")
    return single_node


@pytest.fixture
def service() -> str:
    """A service name of this test alone (the nodes are thrown away, nothing to delete)."""
    return f"r-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def timed_target() -> AsyncIterator[TimedTarget]:
    server = TimedTarget()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def stacks(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[str], Stack]]:
    """`stacks(amqp_url)` gives a Stack whose sidecars use that broker URL; all are stopped at
    teardown, before any node fixture stops its nodes."""
    made: list[Stack] = []

    def make(amqp_url: str) -> Stack:
        logs = tmp_path / f"stack{len(made)}"
        logs.mkdir()
        made.append(Stack(amqp_url, logs))
        return made[-1]

    yield make
    # In parallel: each sidecar's graceful stop takes seconds, and the broker is ours.
    processes = [p for stack in made for p in stack.processes]
    if processes:
        with ThreadPoolExecutor(len(processes)) as pool:
            list(pool.map(lambda p: p.stop(grace=15), processes))
    report = getattr(request.node, "rep_call", None)
    if getattr(report, "failed", False):
        for stack in made:
            print(stack.log_text()[-8000:])
        # Every sidecar line about the requests a failure names (`id=...`), whenever logged.
        ids = set(re.findall(r"id=([0-9a-f-]{8,})", str(getattr(report, "longreprtext", ""))))
        for log in sorted(p for stack in made for p in stack.logs.glob("*.log")) if ids else ():
            text = log.read_text(errors="replace").splitlines()
            lines = [f"{log.name}: {line}" for line in text if any(i in line for i in ids)]
            print("\n".join(lines[-200:]))


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """Many keys at once: no connection limit (the enqueuer is the thing under test)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "reliability: injects real faults into RabbitMQ nodes of its own (slow; part of "
        "`make test`, deselect with -m 'not reliability')",
    )
