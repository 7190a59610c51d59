"""An AMQP URL whose scheme is not what its port speaks: `amqps://` at the broker's plain port,
`amqp://` at a TLS port (a TLS listener of the test's own). Both failed with an error naming
neither TLS nor the port (`WRONG_VERSION_NUMBER`, a connection closed unanswered), and the
`proxymq` commands advised starting a broker."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from yarl import URL

from shared.processes import free_port
from tests.conftest import AMQP_URL, Stack
from tests.reliability.conftest import make_certs
from tests.test_cli import proxymq

pytestmark = pytest.mark.rabbit
PLAIN = URL(AMQP_URL)
AMQPS_AT_PLAIN_PORT = str(PLAIN.with_scheme("amqps").with_port(PLAIN.port or 5672))


@pytest.fixture
async def tls_port(tmp_path: Path) -> AsyncIterator[int]:
    """A TLS listener that completes handshakes and closes: what a broker's TLS port does to
    a client that then speaks plain AMQP."""
    certs = make_certs(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)

    async def close(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    port = free_port()
    server = await asyncio.start_server(close, "127.0.0.1", port, ssl=context)
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


def amqp_at(port: int) -> str:
    return str(PLAIN.with_port(port))


async def test_proxymq_says_amqps_went_to_a_plain_port_and_amqp_to_a_tls_one(
    tls_port: int,
) -> None:
    for url, says in (
        (AMQPS_AT_PLAIN_PORT, "speaks plain AMQP: use amqp://, or the broker's TLS port"),
        (
            amqp_at(tls_port),
            f"asks for plain AMQP, but 127.0.0.1:{tls_port} speaks TLS: use amqps://",
        ),
    ):
        run = await proxymq("topology", "show", "--service", "s", "--amqp-url", url)
        assert run.code == 1, run.output
        assert says in run.stderr
        assert "make broker" not in run.stderr  # no broker to start: the URL is wrong


@pytest.mark.parametrize("scheme", ["amqps", "amqp"])
async def test_a_sidecar_says_its_url_asks_for_the_wrong_protocol(
    scheme: str, tls_port: int, stack: Stack, service: str
) -> None:
    url = AMQPS_AT_PLAIN_PORT if scheme == "amqps" else amqp_at(tls_port)
    says = "speaks plain AMQP: use amqp://" if scheme == "amqps" else "speaks TLS: use amqps://"
    await stack.dequeuer(service, "http://127.0.0.1:9", wait=False, env={"PROXYMQ_AMQP_URL": url})
    deadline = time.monotonic() + 20
    while says not in stack.log_text() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert f"the broker connection cannot work: {URL(url).with_password('***')}" in (
        stack.log_text()
    )
    assert says in stack.log_text()


async def test_a_cluster_list_mixing_amqp_and_amqps_is_refused(stack: Stack, service: str) -> None:
    """A list of nodes with both schemes reached its amqp:// nodes without TLS, the password
    sent in clear, without a word (the TLS options go to the amqps:// nodes only): the sidecars
    and `proxymq` now refuse it, exit 2, before they connect."""
    url = "amqps://guest:s3cret@127.0.0.1:1/,AMQP://guest:s3cret@127.0.0.1:2/"
    says = (
        "a list of nodes may not mix amqps:// and amqp://: amqp://guest:***@127.0.0.1:2/ would be "
        "reached without TLS, the password sent in clear; give every node amqps://"
    )
    env = {"PROXYMQ_AMQP_URL": url}
    enqueuer, _ = await stack.enqueuer(wait=False, env=env)
    dequeuer = await stack.dequeuer(service, "http://127.0.0.1:9", wait=False, env=env)
    cli = await proxymq("status", "--service", service, env=env)
    for process in (enqueuer, dequeuer):
        assert process.popen is not None
        assert await asyncio.to_thread(process.popen.wait, 20) == 2, stack.log_text()
        assert f"{process.name}: invalid configuration: " in stack.log_text()
    assert says in stack.log_text() and "s3cret" not in stack.log_text(), stack.log_text()
    assert cli.code == 2, cli.output
    assert says in cli.stderr and "s3cret" not in cli.stderr, cli.stderr
