"""Who may call: a bearer token when configured, header limits, and no way for a caller to set
ProxyMQ's own message headers."""

from __future__ import annotations

import asyncio
import base64
import uuid
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection

from shared import topology
from tests.conftest import Stack
from tests.integration.test_errors import expect_error
from tests.target import Target

pytestmark = pytest.mark.rabbit


async def test_bearer_token(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--auth-token-file", str(token))
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret-token"},
        {"Authorization": "Basic s3cret-token"},
    ):
        async with http.get(f"{url}/{service}/echo/x", headers=headers) as response:
            assert "Authorization: Bearer" in await expect_error(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert target.seen == []
    async with http.get(
        f"{url}/{service}/echo/x", headers={"Authorization": "Bearer s3cret-token"}
    ) as response:
        assert response.status == 200
        forwarded = {name.lower() for name, _ in (await response.json())["headers"]}
    assert "authorization" not in forwarded  # the enqueuer's token stays with the enqueuer
    assert "s3cret-token" not in stack.log_text()


async def test_unreadable_token_file_is_a_clear_startup_error(stack: Stack, tmp_path: Path) -> None:
    enqueuer, _ = await stack.enqueuer("--auth-token-file", str(tmp_path / "missing"), wait=False)
    assert enqueuer.popen is not None
    assert enqueuer.popen.wait(10) == 2  # a configuration error, like any other
    assert "--auth-token-file: cannot read the auth token file" in stack.log_text()


async def test_header_limits(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--max-headers", "20", "--max-header-bytes", "2KiB")
    many = {f"X-H{i}": "v" for i in range(30)}
    async with http.get(f"{url}/{service}/echo/x", headers=many) as response:
        assert "at most 20" in await expect_error(response, 431, "headers_too_large")
    async with http.get(f"{url}/{service}/echo/x", headers={"X-Big": "v" * 3000}) as response:
        assert "at most 2048" in await expect_error(response, 431, "headers_too_large")
    assert target.seen == []


async def test_callers_cannot_set_internal_headers(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """Whatever a caller puts in HTTP headers travels as data inside x-proxymq-headers: it
    cannot change the status, route or reply of a message."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    async with http.get(
        f"{url}/{service}/echo/x",
        headers={
            "x-proxymq-status": "200",
            "x-proxymq-path": "/status/500",
            "x-proxymq-error": "service_failed",
            "reply-to": "amq.rabbitmq.reply-to",
        },
    ) as response:
        assert response.status == 200
        echoed = await response.json()
    assert echoed["path"] == "/echo/x"
    assert ["x-proxymq-path", "/status/500"] in [[k.lower(), v] for k, v in echoed["headers"]]


async def test_a_body_that_stalls_is_answered_at_the_deadline(
    stack: Stack, service: str, target: Target
) -> None:
    """A body must arrive within the request's deadline (at most --timeout, asynchronous
    requests too). One that stalled after its first byte held its handler, its connection and
    what it had sent, up to --max-body, for good: no deadline ran before the body was read."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--timeout", "1")
    host, port = url.removeprefix("http://").split(":")
    for extra in (b"", b"Prefer: respond-async\r\n", b"X-Request-Timeout: 0.5\r\n"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /%s/echo/stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n%s\r\nA"
            % (service.encode(), extra)
        )
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        assert head.startswith(b"HTTP/1.1 504 "), head
        assert b"X-ProxyMQ-Error: timeout\r\n" in head
        assert b"X-Correlation-ID: " in head
    assert target.seen == []


async def test_a_head_that_trickles_in_is_closed_at_the_idle_timeout(
    stack: Stack, service: str
) -> None:
    """aiohttp closes a connection with no complete request head only at its keep-alive
    timeout, 3,630 s by default: a caller sending a header line now and then held its
    connection and its growing head (up to 8 KiB a line) for an hour. `--idle-timeout`
    bounds a head's arrival and a keep-alive connection's idle time alike."""
    _, url = await stack.enqueuer("--idle-timeout", "1")
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /%s/echo/x HTTP/1.1\r\nHost: x\r\n" % service.encode())

    async def trickle() -> None:
        for i in range(200):
            writer.write(b"X-Slow-%d: v\r\n" % i)
            await asyncio.sleep(0.1)

    trickling = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(20):
            assert await reader.read() == b""  # closed by the enqueuer, nothing answered
    finally:
        trickling.cancel()
        writer.close()


async def test_a_target_with_a_password_is_called_with_it_whatever_the_caller_sends(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A `--target` with a user and password authenticates the dequeuer to the microservice.
    A caller's own `Authorization` beside it made aiohttp refuse the call ("Cannot combine
    AUTHORIZATION header with ... credentials encoded in URL"): taken for a defect of the
    dequeuer's, the request was dead-lettered with a traceback and its caller got 502."""
    await stack.dequeuer(service, f"http://probe:s3cret@127.0.0.1:{target.port}")
    _, url = await stack.enqueuer()
    async with http.get(
        f"{url}/{service}/echo/x", headers={"Authorization": "Bearer the-callers"}
    ) as response:
        assert response.status == 200
        sent = [v for n, v in (await response.json())["headers"] if n.lower() == "authorization"]
    assert sent == ["Basic " + base64.b64encode(b"probe:s3cret").decode()]
    assert "Traceback" not in stack.log_text()


async def test_a_reply_to_naming_a_heartbeat_queue_gets_no_reply(
    stack: Stack, service: str, target: Target, amqp: AbstractRobustConnection
) -> None:
    """A dequeuer's heartbeat queue (`S.members.ID`) takes any message as a heartbeat: a reply
    put there by `reply_to`, whose body the caller chose (an echo), made a member up, and the
    dequeuer handed it partitions that nobody then served."""
    instance = f"d-{uuid.uuid4().hex[:8]}"
    beat = b'{"id": "phantom", "available": true, "leaving": false}'
    target.raw_response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(beat), beat)
    await stack.dequeuer(
        service,
        f"http://127.0.0.1:{target.raw_port}",
        "--partitions",
        "2",
        "--instance-id",
        instance,
    )
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(service)
    reply_to = f"{topology.members_exchange(service)}.{instance}"
    await exchange.publish(aio_pika.Message(b"x", correlation_id="c", reply_to=reply_to), "k")
    async with asyncio.timeout(10):
        while not target.raw_seen:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1)  # a heartbeat it was taken for would be in the members line by now
    await channel.close()
    assert "phantom" not in stack.log_text()
    assert f"reply_to {reply_to} names a queue" in stack.log_text()


async def test_a_reply_to_naming_a_request_queue_gets_no_reply(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """A reply goes through the default exchange to the queue `reply_to` names, any queue. A
    client allowed to publish to one service's exchange (and no more: docs/deploy.md's users)
    named another service's partition, or this one's, or a dead-letter queue: the dequeuer,
    which may write to every queue, put the reply there, and it was taken for a request (a
    `POST /` to the other microservice, carrying this one's answer)."""
    other = topology.Topology(f"t-{uuid.uuid4().hex[:10]}", partitions=1)
    await topology.declare(amqp, other)
    try:
        await stack.dequeuer(service, target.url, "--partitions", "1")
        channel = await amqp.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(service)
        queues = [other.queues[0], other.dead_letters, f"{service}.p0", f"{service}.dlq"]
        for index, queue in enumerate(queues):
            message = aio_pika.Message(b"x", correlation_id=f"c{index}", reply_to=queue)
            await exchange.publish(message, routing_key="k")
        async with asyncio.timeout(10):
            while len(target.seen) < len(queues):
                await asyncio.sleep(0.05)
        await asyncio.sleep(1)  # a reply taken for a request would be called by now
        assert len(target.seen) == len(queues)
        for queue in queues:
            declared = await channel.declare_queue(queue, passive=True)
            assert declared.declaration_result.message_count == 0, queue
        assert stack.log_text().count("names a queue of a service's") == len(queues)
        await channel.close()
    finally:
        await topology.delete(amqp, other)
