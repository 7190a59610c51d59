"""Every error of the contract, as a caller sees it: status, code, JSON body, X-ProxyMQ-Error,
X-Correlation-ID, Retry-After where the contract asks for it, and nothing accepted is lost."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import socket
import subprocess
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import pamqp.encode
import pytest
from aio_pika.abc import AbstractRobustConnection, HeadersType
from aio_pika.robust_channel import RobustChannel
from yarl import URL

from dequeuer.membership import Membership
from enqueuer.publisher import Publisher
from enqueuer.replies import ReplyWaiter
from shared import envelope, topology
from shared.breaker import ServiceBreaker
from shared.broker import BROKER_ERRORS, confirming_channel, unless_closed
from shared.errors import BrokerUnavailable, QueueInUse, UnknownService
from shared.processes import free_port
from tests.conftest import Stack, closed_port, foreign_replier, metric
from tests.integration.test_async import poll
from tests.reliability.proxy import FaultyProxy
from tests.reliability.support import rss_mib
from tests.target import Target

pytestmark = pytest.mark.rabbit


async def expect_error(response: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert response.status == status
    assert response.headers["X-ProxyMQ-Error"] == code
    assert response.headers["X-Correlation-ID"]
    assert response.headers["Content-Type"].startswith("application/json")
    body = await response.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"], body
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    if code in ("backpressure", "broker_unavailable"):  # the contract's "has Retry-After"
        assert int(response.headers["Retry-After"]) >= 1
    return str(body["error"]["message"])


async def test_unknown_service(stack: Stack, http: aiohttp.ClientSession) -> None:
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/no-such-service/x") as response:
        message = await expect_error(response, 404, "unknown_service")
    assert message == (  # the commands to run, as `proxymq status` says them (was `NAME`)
        "service 'no-such-service' has no topology on the broker: start its dequeuer "
        "(proxymq-dequeuer --service no-such-service) or declare it "
        "(proxymq topology declare --service no-such-service)"
    )
    async with http.get(f"{url}/") as response:
        await expect_error(response, 404, "unknown_service")
    async with http.get(f"{url}/bad.name/x") as response:
        assert "not a service name" in await expect_error(response, 404, "unknown_service")


async def raw_call(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request sent byte for byte, as no HTTP client library would send it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
    writer.write(body)
    async with asyncio.timeout(20):
        answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    fields, _, content = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode().split(": ", 1) for line in fields.split(b"\r\n"))
    return int(status_line.split()[1]), headers, content


async def test_header_bytes_that_are_no_utf8(
    stack: Stack, service: str, target: Target, tmp_path: Path
) -> None:
    """One byte that is no UTF-8 (latin-1 `é`) in a header the enqueuer reads was aiohttp's
    plain 500 and a traceback per request, also for callers without the token. Now: a partition
    key that is no text is a bad key, an Idempotency-Key is compared as the bytes it is, and a
    token that is no text is wrong."""
    await stack.dequeuer(service, target.url)
    token = tmp_path / "token"
    token.write_text("secret")
    _, url = await stack.enqueuer("--partition-key", "header:X-Partition-Key,json:/user/id")
    _, guarded = await stack.enqueuer("--auth-token-file", str(token))
    start = f"POST /{service}/echo/latin HTTP/1.1\r\nHost: x\r\n".encode()

    status, headers, body = await raw_call(url, start + b"X-Partition-Key: caf\xe9\r\n")
    assert (status, headers["X-ProxyMQ-Error"]) == (400, "bad_partition_key")
    assert json.loads(body)["error"]["message"] == (
        "the partition key from header:X-Partition-Key is not valid UTF-8"
    )
    lone = start + b"Content-Type: application/json\r\n"
    status, headers, _ = await raw_call(url, lone, b'{"user": {"id": "\\ud800"}}')
    assert (status, headers["X-ProxyMQ-Error"]) == (400, "bad_partition_key")

    repeat = start + b"Idempotency-Key: caf\xe9\r\n"
    first, second = [await raw_call(url, repeat, b"once") for _ in range(2)]
    assert first[0] == second[0] == 200
    assert first[1]["X-Correlation-ID"] == second[1]["X-Correlation-ID"]
    assert [seen.body for seen in target.seen] == [b"once"]

    status, headers, _ = await raw_call(guarded, start + b"Authorization: Bearer s\xe9cret\r\n")
    assert (status, headers["X-ProxyMQ-Error"]) == (401, "unauthorized")
    assert "Traceback" not in stack.log_text()


@pytest.mark.parametrize("request_line", ["CONNECT example.com:443", "OPTIONS *"])
async def test_a_target_that_is_no_path(stack: Stack, request_line: str) -> None:
    """`CONNECT host:port` and `OPTIONS *` match no route: they got aiohttp's plain 404,
    without a ProxyMQ code or an X-Correlation-ID."""
    _, url = await stack.enqueuer()
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(f"{request_line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), head
    assert b"X-ProxyMQ-Error: unknown_service" in head and b"X-Correlation-ID: " in head
    method, target = request_line.split()
    message = json.loads(body)["error"]["message"]
    assert message == f"{method} '{target}' names no service: call /{{service}}/{{path}}"


REFUSED_BY_THE_PARSER = {
    "an unknown method": (b"FOO /s/x HTTP/1.1\r\nHost: x\r\n", "Invalid method encountered"),
    "a request line over 8,190 bytes": (
        b"GET /s/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n",
        "Got more than 8190 bytes when reading",
    ),
    "a header over 8,190 bytes": (
        b"GET /s/x HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n",
        "Got more than 8190 bytes when reading",
    ),
    "more than twice --max-headers headers": (
        b"GET /s/x HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(300)),
        "Too many headers received",
    ),
    "a header without a colon": (
        b"GET /s/x HTTP/1.1\r\nHost: x\r\nNo Colon\r\n",
        "Invalid header token",
    ),
    "a bad Content-Length": (
        b"POST /s/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n",
        "Invalid character in Content-Length",
    ),
    "two Content-Lengths": (
        b"POST /s/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n",
        "Duplicate Content-Length",
    ),
    "Content-Length with Transfer-Encoding": (
        b"POST /s/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding can't be present with Content-Length",
    ),
    "a bad chunk size": (
        b"POST /s/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc",
        "Invalid character in chunk size",
    ),
    "a bad version": (b"GET /s/x HTTP/1.x\r\nHost: x\r\n", "Bad status line: Invalid minor"),
}


async def test_what_the_http_parser_refuses(stack: Stack) -> None:
    """A request aiohttp's parser refuses, before any middleware runs, got aiohttp's plain-text
    400 without X-Correlation-ID: now a `400 bad_request` like ProxyMQ's other errors, naming
    what was wrong, and the connection is closed (what follows such a head cannot be read)."""
    _, url = await stack.enqueuer()
    port = int(url.rsplit(":", 1)[1])
    for case, (head, reason) in REFUSED_BY_THE_PARSER.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + b"\r\n")
        async with asyncio.timeout(10):
            answer = await reader.read()  # until the enqueuer closes the connection
        writer.close()
        head_, _, body = answer.partition(b"\r\n\r\n")
        assert head_.startswith(b"HTTP/1.1 400 ") or head_.startswith(b"HTTP/1.0 400 "), case
        fields = dict(line.split(": ", 1) for line in head_.decode().split("\r\n")[1:])
        assert fields["X-ProxyMQ-Error"] == "bad_request", (case, answer[:300])
        assert fields["Content-Type"] == "application/json", case
        request_id = fields["X-Correlation-ID"]
        error = json.loads(body)["error"]
        assert error["code"] == "bad_request", case
        assert error["message"].startswith(f"malformed HTTP request: {reason}"), (case, error)
        if case != "an unknown method":  # as non-HTTP traffic (TLS, say): logged at debug
            assert request_id in stack.log_text(), case
    assert "Traceback" not in stack.log_text()


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_a_malformed_chunk_after_the_head(
    stack: Stack, service: str, target: Target, parser: str
) -> None:
    """A chunk the parser refuses after the head had arrived (a bad size, a chunk longer than
    it said) left the body being read open: with aiohttp's C parser the caller waited for its
    deadline (`--timeout`, 30 s) and got 504 "the body did not arrive", with its Python parser
    a plain 500 and a traceback. Now 400 bad_request at once, nothing published."""
    await stack.dequeuer(service, target.url)
    env = {"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "python" else {}
    _, url = await stack.enqueuer(env=env)
    port = int(url.rsplit(":", 1)[1])
    for bad in (b"zz\r\nabc\r\n", b"3\r\nabcXY\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST /{service}/chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head.encode() + b"3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # the head is read and the request under way
        writer.write(bad)
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 "), (bad, answer[:300])
        assert answer.count(b"HTTP/1.1 ") == 1, answer
        assert b"\r\nX-ProxyMQ-Error: bad_request\r\n" in answer
        assert b"\r\nX-Correlation-ID: " in answer
    assert target.seen == []
    assert "Traceback" not in stack.log_text()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/_proxymq"),
        ("GET", "/_proxymq/"),
        ("GET", "/_proxymq/requests/"),
        ("GET", "/_proxymq/requests/abc/more"),
        ("PUT", "/_proxymq/other"),
    ],
)
async def test_the_enqueuers_own_paths(
    stack: Stack, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    """Paths under /_proxymq/ are the enqueuer's: one it does not serve is named as such, not
    taken for a service called `_proxymq` that should be started."""
    _, url = await stack.enqueuer()
    async with http.request(method, f"{url}{path}") as response:
        message = await expect_error(response, 404, "unknown_request")
    assert f"{method} {path} is none of the enqueuer's own paths" in message
    assert "GET /_proxymq/requests/{id}" in message


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_a_request_status_is_read_with_get_or_head_only(
    stack: Stack, http: aiohttp.ClientSession, method: str
) -> None:
    """`/_proxymq/requests/{id}` is a resource with methods (RFC 9110 15.5.6: 405 and
    `Allow`): a DELETE or a POST to the Location of a 202 was answered 404, "none of the
    enqueuer's own paths", though it is the path the enqueuer gave."""
    _, url = await stack.enqueuer()
    async with http.request(method, f"{url}/_proxymq/requests/abc") as response:
        message = await expect_error(response, 405, "method_not_allowed")
        assert response.headers["Allow"] == "GET, HEAD"
    assert f"{method} /_proxymq/requests/{{id}}" in message
    async with http.head(f"{url}/_proxymq/requests/abc") as response:
        assert response.status == 404


async def test_a_flood_of_unknown_services(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """Callers choose the service names, and each new one is looked up on the broker. 2,000
    names that do not exist, 64 at a time: each is a 404 (or a 429 while too many wait), and
    the enqueuer stays connected and small. Its lookups on robust channels raced for channel
    numbers and left thousands of channels to restore: its connection closed, came back over
    channel_max, and never served again (503), while it grew to 375 MB at 20,000 names."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer()
    assert enqueuer.popen is not None
    rss_before = rss_mib(enqueuer.popen.pid)
    statuses: Counter[tuple[int, str]] = Counter()
    turns = asyncio.Semaphore(64)

    async def call(i: int) -> None:
        async with turns, http.get(f"{url}/no-such-{i}-{'x' * 80}/x") as response:
            statuses[response.status, response.headers.get("X-ProxyMQ-Error", "")] += 1

    await asyncio.gather(*(call(i) for i in range(2000)))
    assert set(statuses) <= {(404, "unknown_service"), (429, "backpressure")}, statuses
    async with http.get(f"{url}/{service}/echo/still") as response:
        assert response.status == 200
    port = enqueuer.admin_port  # type: ignore[attr-defined]
    assert await metric(http, port, "proxymq_broker_reconnects_total") == 0
    assert rss_mib(enqueuer.popen.pid) - rss_before < 20


def open_channels(connection_name: str) -> int:
    """Channels the broker counts on the connection whose client named it so."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "channels", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [line] = [line for line in listed.splitlines() if connection_name in line]
    return int(line.split("\t")[0])


async def test_unknown_services_leave_no_channel_open(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Each lookup of a missing service got a channel the broker then closed, which aio-pika
    reopened and kept: a caller calling a service that does not exist (a typo in its
    configuration) added one open channel a second, and after 2,047 (about half an hour) the
    enqueuer's connection reached channel_max and never served again."""
    instance = f"lookups-{uuid.uuid4().hex[:8]}"
    _, url = await stack.enqueuer("--instance-id", instance)
    before = await asyncio.to_thread(open_channels, instance)
    for i in range(12):
        async with http.get(f"{url}/missing-{i}/x") as response:
            await expect_error(response, 404, "unknown_service")
    await asyncio.sleep(1)
    assert await asyncio.to_thread(open_channels, instance) == before


async def test_service_not_in_allowlist(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--services", "other,another")
    async with http.get(f"{url}/{service}/x") as response:
        assert "--services" in await expect_error(response, 404, "unknown_service")
    assert target.seen == []


async def test_body_too_large(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--max-body", "1KiB")
    async with http.post(f"{url}/{service}/x", data=b"x" * 1024) as response:
        assert response.status == 200
    async with http.post(f"{url}/{service}/x", data=b"x" * 1025) as response:
        await expect_error(response, 413, "body_too_large")

    async def chunked() -> object:
        for _ in range(3):
            yield b"y" * 600

    async with http.post(f"{url}/{service}/x", data=chunked()) as response:
        await expect_error(response, 413, "body_too_large")
    assert len(target.seen) == 1


async def test_a_body_too_large_is_refused_before_it_is_sent(
    stack: Stack, service: str, target: Target
) -> None:
    """With `Expect: 100-continue` (curl sends it for large uploads) a body over --max-body is
    refused at once, before the caller uploads it: aiohttp's default said `100 Continue` to
    every request. A body that fits gets its `100 Continue`; an unknown expectation is
    ignored, not aiohttp's plain 417. The 413 closes the connection: kept open, the enqueuer
    took the caller's next request on it for the body it had refused, and never answered it."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--max-body", "1KiB")
    port = int(url.rsplit(":", 1)[1])

    async def exchange(expect: str, body: bytes, *, length: int = 0, wait: bool = True) -> bytes:
        """The answer's head; the body is sent after a `100 Continue` when `wait`, at once when
        not, and never when `length` says more than it holds."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST /{service}/up HTTP/1.1\r\nHost: x\r\nExpect: {expect}\r\n"
        writer.write(f"{head}Content-Length: {length or len(body)}\r\n\r\n".encode())
        async with asyncio.timeout(10):
            if not length and wait:
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            if not length:
                writer.write(body)
            answer = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        return answer

    refused = await exchange("100-continue", b"", length=2048)
    assert refused.startswith(b"HTTP/1.1 413 ")
    assert b"X-ProxyMQ-Error: body_too_large" in refused and b"X-Correlation-ID: " in refused
    assert b"\r\nConnection: close\r\n" in refused
    assert (await exchange("100-continue", b"hello")).startswith(b"HTTP/1.1 200 ")
    assert (await exchange("something-else", b"other", wait=False)).startswith(b"HTTP/1.1 200 ")
    assert [seen.body for seen in target.seen] == [b"hello", b"other"]


async def test_body_refused_by_rabbitmq(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A --max-body above RabbitMQ's max_message_size (128 MiB by default) is warned about at
    startup; a body the broker then refuses is 413 body_too_large naming the cause, not 503.
    The broker closed the publishing channel: once it is reopened, the enqueuer goes on."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--max-body", "200MiB")
    assert "--max-body 209715200 is above RabbitMQ's default max_message_size" in stack.log_text()
    async with http.post(f"{url}/{service}/x", data=b"x" * (129 * 1024 * 1024)) as response:
        assert "max_message_size" in await expect_error(response, 413, "body_too_large")
    statuses = []
    for _ in range(50):
        async with http.post(f"{url}/{service}/x", data=b"small") as response:
            statuses.append(response.status)
            if response.status == 200:
                break
            # read inside the block: once it is left, a body not yet arrived is cut off
            await expect_error(response, 503, "broker_unavailable")
        await asyncio.sleep(0.1)
    assert statuses[-1] == 200 and len(statuses) <= 3, statuses
    assert [seen.body for seen in target.seen] == [b"small"]


async def test_partition_keys(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer(
        "--partition-key",
        "json:/user/id",
        "--partition-key",
        "query:user",
        "--require-partition-key",
    )
    async with http.post(f"{url}/{service}/echo", json={"user": {"id": 7}}) as response:
        assert response.status == 200
    async with http.post(
        f"{url}/{service}/echo", data=b"plain text", params={"user": "u1"}
    ) as response:
        assert response.status == 200
    async with http.post(f"{url}/{service}/echo", json={"user": {}}) as response:
        assert "no partition key" in await expect_error(response, 400, "bad_partition_key")
    async with http.post(
        f"{url}/{service}/echo", data=b"{broken", headers={"Content-Type": "application/json"}
    ) as response:
        assert "not valid JSON" in await expect_error(response, 400, "bad_partition_key")
    async with http.post(  # the body is no JSON, the next source has the key
        f"{url}/{service}/echo",
        data=b"{broken",
        params={"user": "u2"},
        headers={"Content-Type": "application/json"},
    ) as response:
        assert response.status == 200
    async with http.post(f"{url}/{service}/echo", json={"user": {"id": "k" * 300}}) as response:
        assert "255" in await expect_error(response, 400, "bad_partition_key")
    assert len(target.seen) == 3


async def test_header_key_keeps_one_partition(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """The same key lands in the same partition queue as any AMQP client publishing with it."""
    _, url = await stack.enqueuer()
    await topology.declare(amqp, topology.Topology(service))
    for _ in range(5):
        async with http.post(
            f"{url}/{service}/x", headers={"X-Partition-Key": "same", "Prefer": "respond-async"}
        ) as response:
            assert response.status == 202
    channel = await amqp.channel()
    depths = []
    for name in topology.Topology(service).queues:
        queue = await channel.declare_queue(name, passive=True)
        depths.append(queue.declaration_result.message_count or 0)
    assert sorted(depths) == [0] * 7 + [5]


async def test_a_callers_tiny_timeouts_do_not_open_the_breaker(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A deadline that passes before RabbitMQ's confirm is the caller's 504, not a broker
    failure: before, a caller's X-Request-Timeout of 0.0001 answered 503 and, five times,
    opened the enqueuer's breaker for every caller."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--breaker-failures", "2")
    for _ in range(6):
        async with http.get(
            f"{url}/{service}/x", headers={"X-Request-Timeout": "0.0001"}
        ) as response:
            assert "deadline" in await expect_error(response, 504, "timeout")
    async with http.get(f"{url}/{service}/x") as response:
        assert response.status == 200


async def test_timeout_and_late_reply(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer()
    started = time.monotonic()
    async with http.get(
        f"{url}/{service}/delay/2", headers={"X-Request-Timeout": "0.5"}
    ) as response:
        await expect_error(response, 504, "timeout")
    assert time.monotonic() - started < 1.5
    port = enqueuer.admin_port  # type: ignore[attr-defined]
    for _ in range(50):
        if await metric(http, port, "proxymq_enqueuer_late_replies_total") == 1:
            break
        await asyncio.sleep(0.1)
    assert await metric(http, port, "proxymq_enqueuer_late_replies_total") == 1
    assert await metric(http, port, "proxymq_enqueuer_in_flight_requests") == 0


async def test_reply_never_comes(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    """A topology with nobody consuming: the caller gets 504 at its deadline, the request stays
    in the queue for a dequeuer that starts later."""
    await topology.declare(amqp, topology.Topology(service))
    _, url = await stack.enqueuer("--timeout", "0.5")
    async with http.get(f"{url}/{service}/x", headers={"X-Request-Timeout": "30"}) as response:
        await expect_error(response, 504, "timeout")


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({envelope.H_STATUS: 101}, "101"),  # a switch of protocol with nothing behind it
        ({envelope.H_STATUS: 100}, "100"),  # the caller would wait for the answer after it
        ({envelope.H_STATUS: 200, envelope.H_HEADERS: "not json"}, "JSON list"),
    ],
)
async def test_a_reply_that_is_no_answer_is_a_502(
    stack: Stack,
    service: str,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
    headers: HeadersType,
    why: str,
) -> None:
    """A reply from any AMQP client that cannot be the caller's answer is `service_failed`, at
    once and in the contract's shape (it was a plain 500, a 101, or a caller left waiting).
    The error logged about it carries the request's correlation id as a field, as every line
    about a request does (it had the id in its text only, unseen by a search on the field)."""
    channel = await foreign_replier(amqp, service, headers, b"body")
    _, url = await stack.enqueuer("--json-logs")
    async with http.get(f"{url}/{service}/x", headers={"X-Request-Timeout": "5"}) as response:
        message = await expect_error(response, 502, "service_failed")
    assert "reply could not be read" in message and why in message
    errors = [
        line
        for line in map(json.loads, stack.log_text().splitlines())
        if line["level"] == "error" and line["msg"].startswith("malformed reply")
    ]
    assert [line.get("correlation_id") for line in errors] == [response.headers["X-Correlation-ID"]]
    async with http.get(
        f"{url}/{service}/x", headers={"Prefer": "respond-async", "X-Request-Timeout": "5"}
    ) as accepted:
        location = accepted.headers["Location"]
    for _ in range(50):
        async with http.get(f"{url}{location}") as result:
            if result.status != 202:
                await expect_error(result, 502, "service_failed")
                break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the asynchronous request never finished")
    await channel.close()


@pytest.mark.parametrize(
    ("status", "code"), [(429, "backpressure"), (503, "broker_unavailable"), (504, "timeout")]
)
async def test_a_replier_may_answer_with_any_code_of_the_contract(
    stack: Stack,
    service: str,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
    status: int,
    code: str,
) -> None:
    """A reply's `x-proxymq-error` (any AMQP client may reply) is answered in the contract's
    shape: a 429 or a 503 had no Retry-After, which the contract promises with them."""
    headers: HeadersType = {
        envelope.H_STATUS: status,
        envelope.H_ERROR: code,
        envelope.H_ERROR_MESSAGE: "said the replier",
    }
    channel = await foreign_replier(amqp, service, headers, b"")
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/x", headers={"X-Request-Timeout": "5"}) as response:
        assert await expect_error(response, status, code) == "said the replier"
    await channel.close()


async def test_microservice_fails(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """Every attempt fails (the connection drops): 502 service_failed at once, not a timeout,
    and the request is in S.dlq with the reason, attempts and its partition key."""
    dequeuer = await stack.dequeuer(service, target.url, "--retry-backoff-ms", "10")
    _, url = await stack.enqueuer()
    async with http.post(
        f"{url}/{service}/drop", data=b"payload", headers={"X-Partition-Key": "k"}
    ) as response:
        message = await expect_error(response, 502, "service_failed")
        request_id = response.headers["X-Correlation-ID"]
    assert "3 time(s)" in message
    assert len(target.seen) == 3
    attempts = [dict(seen.headers)["X-ProxyMQ-Attempt"] for seen in target.seen]
    assert attempts == ["1", "2", "3"]  # the microservice knows which attempt it serves
    channel = await amqp.channel()
    dlq = await channel.declare_queue(topology.dead_letter_queue(service), passive=True)
    dead = await dlq.get(timeout=5)
    assert dead is not None
    await dead.ack()
    assert dead.body == b"payload"
    assert dead.correlation_id == request_id
    assert dead.headers["x-proxymq-attempts"] == 3
    assert "connect" in str(dead.headers["x-proxymq-dead-reason"])
    assert dead.headers[envelope.H_KEY] == "k"
    port = dequeuer.admin_port  # type: ignore[attr-defined]
    assert (
        await metric(http, port, "proxymq_dequeuer_messages_total", {"outcome": "dead_lettered"})
        == 1
    )
    assert await metric(http, port, "proxymq_dequeuer_retries_total") == 2


async def test_only_retries_made_are_counted(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A retry the deadline leaves no time for, or one its partition is given up before, is
    no call: proxymq_dequeuer_retries_total ("calls attempted again") counted each of them."""
    dequeuer = await stack.dequeuer(service, target.url, "--retry-backoff-ms", "4000")
    _, url = await stack.enqueuer()
    hurried = {"X-Request-Timeout": "1.5"}
    async with http.get(f"{url}/{service}/status/503", headers=hurried) as response:
        assert "1 time(s)" in await expect_error(response, 502, "service_failed")
    assert len(target.seen) == 1
    port = dequeuer.admin_port  # type: ignore[attr-defined]
    assert await metric(http, port, "proxymq_dequeuer_retries_total") == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_a_dropped_idempotent_call_is_made_once_per_attempt(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession, method: str
) -> None:
    """A connection the microservice closes without an answer (a worker killed mid-request by
    its server's timeout) may have done the work: it is one attempt, counted, backed off and
    limited by --max-attempts. aiohttp's client sent a GET, PUT or DELETE again at once on its
    own: each attempt reached the microservice twice, both as `X-ProxyMQ-Attempt: 1`, with
    --max-attempts 1 as well."""
    await stack.dequeuer(service, target.url, "--retry-backoff-ms", "10", "--max-attempts", "2")
    _, url = await stack.enqueuer()
    async with http.request(method, f"{url}/{service}/drop") as response:
        assert "2 time(s)" in await expect_error(response, 502, "service_failed")
    attempts = [dict(seen.headers)["X-ProxyMQ-Attempt"] for seen in target.seen]
    assert attempts == ["1", "2"]


async def test_a_call_never_sent_is_no_attempt(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A refused connection (a microservice restarting) never reached it: it is retried after
    the backoff but is none of --max-attempts, and `X-ProxyMQ-Attempt` counts only calls
    that were sent. Counted, a microservice down for a second got requests it was never sent
    dead-lettered (502 after 2 refused connections with --max-attempts 2)."""
    await stack.dequeuer(
        service,
        target.url,
        *("--retry-backoff-ms", "100", "--max-attempts", "2", "--ready-interval", "60"),
    )
    _, url = await stack.enqueuer()
    await target.stop()
    try:
        async with http.post(
            f"{url}/{service}/echo/restart", headers={"Prefer": "respond-async"}
        ) as response:
            assert response.status == 202
            location = url + response.headers["Location"]
        await asyncio.sleep(2)
    finally:
        await target.start()
    result = await poll(http, location, timeout=20)
    assert result.status == 200
    assert [dict(seen.headers)["X-ProxyMQ-Attempt"] for seen in target.seen] == ["1"]


async def test_retryable_status_is_dead_lettered(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url, "--retry-backoff-ms", "10", "--max-attempts", "2")
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/status/503") as response:
        assert "last: 503" in await expect_error(response, 502, "service_failed")
    assert len(target.seen) == 2


async def test_service_failed_names_no_address_of_the_microservice(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The microservice refusing connections: the caller's 502 said "Cannot connect to host
    127.0.0.1:PORT", the microservice's address inside the deployment. The dequeuer's log and
    the dead letter keep it."""
    await stack.dequeuer(
        service,
        target.url,
        *("--retry-backoff-ms", "300", "--ready-interval", "60", "--breaker-failures", "100"),
    )
    _, url = await stack.enqueuer()
    address = target.url.removeprefix("http://")
    await target.stop()
    try:
        async with http.get(f"{url}/{service}/x", headers={"X-Request-Timeout": "2"}) as response:
            message = await expect_error(response, 502, "service_failed")
    finally:
        await target.start()
    assert address not in message and "127.0.0.1" not in message, message
    assert "could not connect to the microservice" in message, message
    assert f"Cannot connect to host {address}" in stack.log_text()


async def test_every_attempt_timing_out_is_service_failed(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A timeout is retryable by default, as the contract says: every attempt timing out is
    502 service_failed with the caller's deadline still far, not the caller's 504."""
    await stack.dequeuer(
        service, target.url, "--call-timeout", "0.5", "--max-attempts", "2",
        "--retry-backoff-ms", "10",
    )  # fmt: skip
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/delay/5", headers={"X-Request-Timeout": "25"}) as r:
        assert "timeout" in await expect_error(r, 502, "service_failed")
    assert len(target.seen) == 2


async def dead_letters(amqp: AbstractRobustConnection, service: str) -> list[dict[str, object]]:
    """The headers of every message in the service's S.dlq, taken off it."""
    channel = await amqp.channel()
    dlq = await channel.declare_queue(topology.dead_letter_queue(service), passive=True)
    found: list[dict[str, object]] = []
    while (dead := await dlq.get(fail=False)) is not None:
        await dead.ack()
        found.append(dict(dead.headers))
    await channel.close()
    return found


async def test_response_over_max_response(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """An answer larger than --max-response is not carried back: 502 service_failed at once,
    never retried (it would be as large again), the request in S.dlq with the reason, and the
    dequeuer goes on serving. With or without a Content-Length; a HEAD's is no body."""
    dequeuer = await stack.dequeuer(service, target.url, "--max-response", "1KiB")
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/bytes/1024") as response:
        assert response.status == 200
        assert await response.read() == b"x" * 1024
    for query in ("", "?chunked=1"):
        async with http.get(f"{url}/{service}/bytes/1025{query}") as response:
            message = await expect_error(response, 502, "service_failed")
        assert "too_large" in message and "--max-response" in message
    async with http.head(f"{url}/{service}/bytes/100000") as response:
        assert response.status == 200
    async with http.get(f"{url}/{service}/bytes/10") as response:
        assert response.status == 200
    assert [seen.path for seen in target.seen] == [
        "/bytes/1024",
        "/bytes/1025",
        "/bytes/1025",
        "/bytes/100000",
        "/bytes/10",
    ]
    dead = await dead_letters(amqp, service)
    assert len(dead) == 2
    assert all("--max-response" in str(d[envelope.H_DEAD_REASON]) for d in dead)
    port = dequeuer.admin_port  # type: ignore[attr-defined]
    assert await metric(http, port, "proxymq_dequeuer_retries_total") == 0


async def test_an_answer_that_is_not_http_is_dead_lettered(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """An answer the dequeuer's client cannot parse (a NUL in a header) is 502
    service_failed at once, never retried, and dead-lettered as `bad_answer`. It escaped as an
    unknown error: the request stayed held and its caller waited for the deadline (504). A
    header line of 10 KB, which aiohttp's default limit took for no HTTP, is carried."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}", "--retry-backoff-ms", "10")
    _, url = await stack.enqueuer()
    good = target.raw_response
    target.raw_response = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n"
    async with (
        aiohttp.ClientSession(max_field_size=16_384) as roomy,
        roomy.get(f"{url}/{service}/fine", headers={"X-Request-Timeout": "10"}) as response,
    ):
        assert response.status == 200 and response.headers["X-Big"] == "a" * 10_000
    target.raw_response = b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 0\r\n\r\n"
    async with http.get(f"{url}/{service}/big", headers={"X-Request-Timeout": "10"}) as response:
        assert "bad_answer" in await expect_error(response, 502, "service_failed")
    assert len([head for head, _ in target.raw_seen if head.startswith(b"GET /big ")]) == 1
    [dead] = await dead_letters(amqp, service)
    assert str(dead["x-proxymq-dead-reason"]).startswith("bad_answer: the answer is not valid HTTP")
    target.raw_response = good
    async with http.get(f"{url}/{service}/after") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 600 Beyond", b"HTTP/1.1 099 Below", b"HTTP/1.1 101 Switching Protocols"],
)
async def test_an_answer_without_a_final_status_is_dead_lettered(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
    status_line: bytes,
) -> None:
    """HTTP's final statuses are 200 to 599; aiohttp's client takes any three digits (and a
    101 as an answer). Carried back, such a status became the caller's 502 `service_failed`
    ("the reply could not be read") while the dequeuer counted the request as replied: it was
    in no dead-letter queue, and no log said what the microservice had done. Now it is a
    `bad_answer`, dead-lettered at once."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}")
    _, url = await stack.enqueuer()
    good = target.raw_response
    target.raw_response = status_line + b"\r\nContent-Length: 2\r\n\r\nok"
    async with http.get(f"{url}/{service}/odd", headers={"X-Request-Timeout": "10"}) as response:
        assert "bad_answer" in await expect_error(response, 502, "service_failed")
    [dead] = await dead_letters(amqp, service)
    assert "no final HTTP status" in str(dead[envelope.H_DEAD_REASON])
    target.raw_response = good
    async with http.get(f"{url}/{service}/after") as response:
        assert response.status == 200


async def test_an_answers_headers_over_frame_max(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """Answer headers that cannot fit in one AMQP frame (RabbitMQ's frame_max, 128 KiB): 502
    at once, dead-lettered `too_large`, the microservice called once. Published anyway, the
    reply made RabbitMQ close the dequeuer's whole connection, again on every redelivery, with
    the microservice called each time until the delivery limit."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}")
    _, url = await stack.enqueuer()
    good = target.raw_response
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 8000) for i in range(20))
    target.raw_response = b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok"
    async with http.get(f"{url}/{service}/many", headers={"X-Request-Timeout": "10"}) as response:
        message = await expect_error(response, 502, "service_failed")
    assert "too_large" in message and "frame_max" in message
    [dead] = await dead_letters(amqp, service)
    assert str(dead["x-proxymq-dead-reason"]).startswith("too_large")
    target.raw_response = good
    async with http.get(f"{url}/{service}/after") as response:
        assert response.status == 200
    assert len([head for head, _ in target.raw_seen if head.startswith(b"GET /many ")]) == 1
    assert "frame_too_large" not in stack.log_text()


async def test_an_answers_head_is_not_read_past_what_a_reply_carries(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    """1,000 header lines of 100 KB, each within what the client takes (a line up to 128 KiB,
    up to 1,024 lines): the dequeuer read all 100 MB before the reply's frame check refused
    them. Nothing past one AMQP frame can be carried back, so the read stops there: the
    microservice cannot send it all, and the request is dead-lettered `too_large`."""
    sent: list[bool] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if b"readiness probe" in await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            writer.close()
            return
        line = b"X-Big: " + b"a" * 100_000 + b"\r\n"
        try:
            writer.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(1000):
                writer.write(line)
                await writer.drain()
            writer.write(b"Content-Length: 2\r\n\r\nok")
            await writer.drain()
            sent.append(True)
        except ConnectionError:
            sent.append(False)
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        await stack.dequeuer(service, f"http://127.0.0.1:{port}")
        _, url = await stack.enqueuer()
        async with http.get(f"{url}/{service}/big", headers={"X-Request-Timeout": "20"}) as got:
            message = await expect_error(got, 502, "service_failed")
    finally:
        server.close()
    assert "too_large" in message and "frame_max" in message
    assert sent == [False]
    [dead] = await dead_letters(amqp, service)
    assert str(dead["x-proxymq-dead-reason"]).startswith("too_large")


async def test_request_headers_over_frame_max(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """Headers within --max-header-bytes can still exceed one AMQP frame as JSON (non-ASCII
    text is escaped to six bytes a character): 431, and the requests beside it are served.
    Published anyway, RabbitMQ closed the enqueuer's connection and failed them all (503)."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    wide = {f"X-Wide-{i}": "é" * 4000 for i in range(8)}  # 64 KB as UTF-8, 192 KB as JSON

    async def call(headers: dict[str, str]) -> tuple[int, str]:
        async with http.get(f"{url}/{service}/echo/x", headers=headers) as response:
            return response.status, response.headers.get("X-ProxyMQ-Error", "")

    beside = [call({"X-Partition-Key": str(i)}) for i in range(8)]
    wide_call, *others = await asyncio.gather(call(wide), *beside)
    assert wide_call == (431, "headers_too_large")
    assert others == [(200, "")] * 8
    async with http.get(f"{url}/{service}/echo/x", headers=wide) as response:
        assert "frame_max" in await expect_error(response, 431, "headers_too_large")


async def test_response_refused_by_rabbitmq(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """An answer within --max-response but over RabbitMQ's max_message_size (128 MiB by
    default): the broker closes the reply channel instead of taking it. The caller gets 502
    at once instead of a timeout, the request goes to S.dlq and is acked, not held for ever
    (before, it stayed unacked on its live channel, its key's later requests waiting behind
    it), and the replies that shared the closed channel still arrive."""
    too_large = 129 * 1024 * 1024
    await stack.dequeuer(service, target.url, "--max-response", "200MiB")
    _, url = await stack.enqueuer()
    headers = {"X-Partition-Key": "k"}

    async def small(i: int) -> int:
        async with http.get(f"{url}/{service}/delay/0.2?i={i}") as response:
            return response.status

    others = [asyncio.create_task(small(i)) for i in range(5)]
    async with http.get(f"{url}/{service}/bytes/{too_large}", headers=headers) as response:
        message = await expect_error(response, 502, "service_failed")
    assert "max_message_size" in message
    assert await asyncio.gather(*others) == [200] * 5
    async with http.get(f"{url}/{service}/bytes/10", headers=headers) as response:
        assert response.status == 200
    assert [s.path for s in target.seen].count(f"/bytes/{too_large}") == 1
    dead = await dead_letters(amqp, service)
    assert len(dead) == 1 and "max_message_size" in str(dead[0][envelope.H_DEAD_REASON])
    assert "could not settle" not in stack.log_text()


async def test_a_reply_queue_that_refuses_replies(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """A reply nacked by a full `reject-publish` reply queue (any AMQP client may name one) is
    tried again like a returned one, then dropped at the request's deadline, and the request
    is acked. It was left unacked on its live channel for good, never delivered again."""
    dequeuer = await stack.dequeuer(service, target.url)
    channel = await amqp.channel()
    full = await channel.declare_queue(
        exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    headers: HeadersType = {
        envelope.H_PATH: "/echo/full",
        envelope.H_DEADLINE: int(time.time() * 1000) + 2000,
    }
    exchange = await channel.get_exchange(service)
    await exchange.publish(
        aio_pika.Message(b"x", correlation_id="full-1", reply_to=full.name, headers=headers),
        routing_key="k",
    )
    port = dequeuer.admin_port  # type: ignore[attr-defined]
    replied = {"outcome": "replied"}
    async with asyncio.timeout(10):
        while await metric(http, port, "proxymq_dequeuer_messages_total", replied) < 1:
            await asyncio.sleep(0.2)
    assert "reply dropped: reply queue" in stack.log_text()
    assert [seen.path for seen in target.seen] == ["/echo/full"]
    await channel.close()


async def test_a_request_that_cannot_be_dead_lettered_as_it_is(
    stack: Stack, service: str, target: Target, amqp: AbstractRobustConnection
) -> None:
    """A request from another AMQP client whose headers nearly fill RabbitMQ's frame_max fails
    for good; its dead-letter copy, with the reason added, no longer fits in a frame. Sent
    anyway, the broker closed the dequeuer's connection, again on every redelivery. Now the
    request is rejected, and the broker dead-letters it to S.dlq itself."""
    await stack.dequeuer(service, target.url, "--max-attempts", "1")
    channel = await amqp.channel()
    replies = await channel.declare_queue(exclusive=True)
    headers: HeadersType = {envelope.H_PATH: "/status/503", envelope.H_HEADERS: ""}

    def request() -> aio_pika.Message:
        return aio_pika.Message(b"x", headers=headers, correlation_id="c1", reply_to=replies.name)

    properties = request().properties
    room = 131_064 - 12 - len(properties.marshal()) - 60  # frame_max 128 KiB, less 60 bytes
    pads = [[f"X-Pad-{i:02}", "a" * 8000] for i in range(room // 8020)]  # lines under 8 KiB
    pads.append(["X-Pad", "a" * (room - len(json.dumps(pads)) - 16)])
    headers[envelope.H_HEADERS] = json.dumps(pads)
    exchange = await channel.get_exchange(service)
    await exchange.publish(request(), routing_key="k")
    dlq = await channel.declare_queue(topology.dead_letter_queue(service), passive=True)
    async with asyncio.timeout(15):
        while (dead := await dlq.get(fail=False)) is None:
            await asyncio.sleep(0.2)
    await dead.ack()
    assert dead.correlation_id == "c1"
    deaths = dead.headers["x-death"]
    assert isinstance(deaths, list) and isinstance(deaths[0], dict)
    assert deaths[0]["reason"] == "rejected"
    async with asyncio.timeout(10):
        while (reply := await replies.get(fail=False)) is None:
            await asyncio.sleep(0.2)
    answer = envelope.decode_response(reply.headers, reply.body)
    assert answer.error == "service_failed"
    assert "could not handle the request" in (answer.error_message or "")
    assert len([s for s in target.seen if s.path == "/status/503"]) == 1
    assert "frame_too_large" not in stack.log_text()
    await channel.close()


async def test_retry_recovers(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url, "--retry-backoff-ms", "10")
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/flaky/2") as response:
        assert response.status == 200
        assert await response.text() == "recovered"
    assert len(target.seen) == 3


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize("which", ["enqueuer API", "enqueuer admin", "dequeuer admin"])
async def test_a_taken_port_is_a_clear_startup_error(
    stack: Stack, service: str, taken_port: int, which: str
) -> None:
    """The sidecar says which address it cannot listen on and exits 1 at once. Before, the
    enqueuer hung for good: its broker connection, opened first, was never closed, and took
    the cancellation at exit for a lost attempt."""
    if which == "enqueuer API":
        process, _ = await stack.enqueuer("--port", str(taken_port), wait=False)
    elif which == "enqueuer admin":
        process = await stack.start(
            "proxymq-enqueuer", "--port", str(free_port()), admin_port=taken_port, wait=False
        )
    else:
        process = await stack.start(
            "proxymq-dequeuer", "--service", service, admin_port=taken_port, wait=False
        )
    assert process.popen is not None
    assert await asyncio.to_thread(process.popen.wait, 15) == 1
    logged = stack.log_text()
    assert f":{taken_port}: address already in use\n" in logged, logged
    assert "cannot listen on " in logged and "error while attempting to bind" not in logged
    assert "Traceback" not in logged and "Unclosed" not in logged


@pytest.mark.parametrize("name", ["proxymq-enqueuer", "proxymq-dequeuer"])
async def test_stopping_while_the_broker_does_not_answer(
    stack: Stack, service: str, http: aiohttp.ClientSession, taken_port: int, name: str
) -> None:
    """SIGTERM while the first connection attempt waits on a broker that accepted the TCP
    connection and says nothing (a frozen node): the sidecar stops at once. Before, the
    enqueuer never ended: the attempt, cancelled, was taken for a lost one and made again."""
    silent = {"PROXYMQ_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{taken_port}/"}
    args = ["--service", service] if name == "proxymq-dequeuer" else ["--port", str(free_port())]
    process = await stack.start(name, *args, wait=False, env=silent)
    admin = process.admin_port  # type: ignore[attr-defined]
    for _ in range(100):
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with http.get(f"http://127.0.0.1:{admin}/healthz") as response:
                if response.status == 200:
                    break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"{name} never answered /healthz")
    assert process.popen is not None
    process.signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.popen.wait, 15) == 0


@pytest.mark.parametrize("heartbeat", ["1", "15"])
async def test_stopping_while_the_broker_has_gone_silent(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession, heartbeat: str
) -> None:
    """SIGTERM while the connection is black-holed (a frozen node, a route gone): the dequeuer
    hands its partitions over and exits 0, within Kubernetes' 30 s grace. It waited for a
    confirm of its leave notice until the heartbeats gave the connection up, then ended with a
    traceback and exit code 1, skipping its drain and cleanup; later, with the default
    heartbeat (15 s), each close waited for the broker's close-ok until the heartbeats gave
    the connection up, and it took 32 s to exit."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        dequeuer = await stack.dequeuer(
            service,
            target.url,
            *("--amqp-heartbeat", heartbeat),
            env={"PROXYMQ_AMQP_URL": proxy.url},
        )
        assert dequeuer.popen is not None
        admin = dequeuer.admin_port  # type: ignore[attr-defined]
        async with asyncio.timeout(10):
            while await metric(http, admin, "proxymq_dequeuer_partitions_owned") < 8:
                await asyncio.sleep(0.1)
        proxy.blackhole()
        dequeuer.signal(signal.SIGTERM)
        assert await asyncio.to_thread(dequeuer.popen.wait, 25) == 0
    finally:
        await proxy.stop()
    logged = stack.log_text()
    assert "Traceback" not in logged and "Unclosed" not in logged
    assert f"released {service}.p0" in logged


async def test_stopping_with_replies_stuck_in_a_silent_broker(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
    http: aiohttp.ClientSession,
) -> None:
    """The broker goes silent while calls are in flight: their replies wait for confirms that
    never come, so the drain takes the whole --shutdown-grace. After it, the dequeuer closed
    each partition's channel, then its membership channel, then its connection, each close
    given up only after 2 s: 6 s past the grace (31 s with the default 25 s, past Kubernetes'
    30 s). It closes its connection once now; the requests it held go back to their queues."""
    grace = 2.0
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        _, url = await stack.enqueuer()
        dequeuer = await stack.dequeuer(
            service,
            target.url,
            *("--shutdown-grace", str(grace), "--partitions", "2"),
            env={"PROXYMQ_AMQP_URL": proxy.url},
        )
        assert dequeuer.popen is not None
        calls = [
            asyncio.ensure_future(http.get(f"{url}/{service}/delay/0.5?{i}")) for i in range(4)
        ]
        async with asyncio.timeout(10):
            while len(target.seen) < 4:
                await asyncio.sleep(0.05)
        proxy.blackhole()
        started = time.monotonic()
        dequeuer.signal(signal.SIGTERM)
        assert await asyncio.to_thread(dequeuer.popen.wait, 30) == 0
        took = time.monotonic() - started
    finally:
        await proxy.stop()
    assert took < grace + 5, f"stopped {took:.1f} s after SIGTERM, with a {grace:g} s grace"
    logged = stack.log_text()
    assert "Traceback" not in logged and "Unclosed" not in logged

    async def held() -> int:
        count = 0
        for queue in topology.Topology(service, partitions=2).queues:
            channel = await amqp.channel()
            declared = await channel.declare_queue(queue, passive=True)
            count += declared.declaration_result.message_count or 0
            await channel.close()
        return count

    def answered() -> int:  # a reply confirmed before the black hole: its request was acked
        return sum(
            c.done() and not c.cancelled() and not c.exception() and c.result().status == 200
            for c in calls
        )

    # Nothing was acked without its reply: the rest are back in their partitions, once the
    # broker has seen the connection go.
    async with asyncio.timeout(10):
        while await held() + answered() < 4:
            await asyncio.sleep(0.1)
    assert await held() + answered() == 4
    for call in calls:
        call.cancel()


async def test_a_draining_dequeuer_is_not_ready(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """After SIGTERM the dequeuer finishes the call in flight before it exits; meanwhile its
    `/readyz` said 200, as if it would take more work (a rollout counted it as a ready pod)."""
    _, url = await stack.enqueuer()
    dequeuer = await stack.dequeuer(service, target.url)
    assert dequeuer.popen is not None
    admin = dequeuer.admin_port  # type: ignore[attr-defined]
    call = asyncio.create_task(http.get(f"{url}/{service}/delay/3"))
    async with asyncio.timeout(10):
        while not any(seen.path == "/delay/3" for seen in target.seen):
            await asyncio.sleep(0.05)
    dequeuer.signal(signal.SIGTERM)
    async with asyncio.timeout(2):
        while True:
            async with http.get(f"http://127.0.0.1:{admin}/readyz") as response:
                if response.status == 503:
                    checks = (await response.json())["checks"]
                    break
            await asyncio.sleep(0.05)
    assert checks["not_stopping"] is False, checks
    async with await call as response:  # and the call in flight still gets its answer
        assert response.status == 200
        assert await response.text() == "late"
    assert await asyncio.to_thread(dequeuer.popen.wait, 15) == 0


def own_address() -> str | None:
    """This machine's IPv4 address on its default route, not a loopback one (a UDP socket's
    connect picks it and sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_a_drain_from_off_the_loopback_stops_nothing(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The admin port listens on every address, for the kubelet's probes: a `POST /drain` from
    anywhere but the pod's own loopback (another pod, the node) is refused and the dequeuer
    goes on serving."""
    address = own_address()
    # A failure, not a skip: a skip would count the refusal as tested.
    assert address is not None, "this test needs an address besides the loopback (eth0, say)"
    _, url = await stack.enqueuer()
    dequeuer = await stack.dequeuer(service, target.url)
    assert dequeuer.popen is not None
    admin = dequeuer.admin_port  # type: ignore[attr-defined]
    async with http.post(f"http://{address}:{admin}/drain") as response:
        assert response.status == 403
    async with http.get(f"http://127.0.0.1:{admin}/readyz") as response:
        assert response.status == 200, await response.text()
    async with http.get(f"{url}/{service}/delay/0") as response:
        assert response.status == 200
    assert dequeuer.popen.poll() is None
    assert f"POST /drain from {address} refused" in stack.log_text()


async def test_the_admin_ports_answer_their_errors_in_json(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """An unknown path or a wrong method on either admin port got aiohttp's plain-text 404 or
    405, where every other error of ProxyMQ's is JSON with X-ProxyMQ-Error."""
    enqueuer, _ = await stack.enqueuer()
    dequeuer = await stack.dequeuer(service, target.url)
    for process, serves in (
        (enqueuer, "GET /healthz, GET /metrics, GET /readyz"),
        (dequeuer, "GET /healthz, GET /metrics, GET /readyz, POST /drain"),
    ):
        admin = f"http://127.0.0.1:{process.admin_port}"  # type: ignore[attr-defined]
        async with http.get(f"{admin}/nope") as response:
            message = await expect_admin_error(response, 404, "not_found")
        assert message == f"GET /nope: Not Found; the admin port serves {serves}"
        async with http.delete(f"{admin}/readyz") as response:
            message = await expect_admin_error(response, 405, "method_not_allowed")
            assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}
        assert message == f"DELETE /readyz: Method Not Allowed; the admin port serves {serves}"


async def expect_admin_error(response: aiohttp.ClientResponse, status: int, code: str) -> str:
    """As `expect_error`, without X-Correlation-ID: the admin port serves no API call."""
    assert response.status == status
    assert response.headers["X-ProxyMQ-Error"] == code
    assert response.headers["Content-Type"].startswith("application/json")
    body = await response.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"], body
    assert body["error"]["code"] == code
    return str(body["error"]["message"])


async def test_broker_down_at_startup(
    stack: Stack, service: str, http: aiohttp.ClientSession
) -> None:
    """The sidecars start, say they are not ready, and refuse with 503 + Retry-After."""
    with closed_port() as port:
        broker = f"amqp://guest:guest@127.0.0.1:{port}/"
        enqueuer, url = await stack.enqueuer(
            wait=False, ready_path=None, env={"PROXYMQ_AMQP_URL": broker}
        )
        dequeuer = await stack.dequeuer(
            service, "http://127.0.0.1:1", wait=False, env={"PROXYMQ_AMQP_URL": broker}
        )
        for process in (enqueuer, dequeuer):
            admin = process.admin_port  # type: ignore[attr-defined]
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{admin}/readyz") as response:
                        assert response.status == 503
                        checks = (await response.json())["checks"]
                        assert checks["broker_connected"] is False
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail(f"{process.name} never answered /readyz")
        async with http.get(f"{url}/{service}/x") as response:
            await expect_error(response, 503, "broker_unavailable")
            assert int(response.headers["Retry-After"]) >= 1


async def test_expired_request_is_not_forwarded(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    dequeuer = await stack.dequeuer(service, target.url)
    channel = await amqp.channel(publisher_confirms=True)
    message = envelope.encode_request(
        envelope.RequestEnvelope(
            request_id="expired-1",
            service=service,
            request=envelope.HttpRequest("GET", "/x", "", (), b""),
            partition_key="k",
            deadline=time.time() - 1,
            reply_to=None,
        )
    )
    await envelope.publish(channel, message, service, "k", mandatory=True)
    port = dequeuer.admin_port  # type: ignore[attr-defined]
    for _ in range(50):
        if await metric(http, port, "proxymq_dequeuer_messages_total", {"outcome": "expired"}):
            break
        await asyncio.sleep(0.1)
    assert await metric(http, port, "proxymq_dequeuer_messages_total", {"outcome": "expired"}) == 1
    assert target.seen == []


async def test_a_request_expired_in_its_queue_is_a_timeout(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """A request of another AMQP client whose `expiration` passed while it waited in its
    partition (RabbitMQ dead-letters it, `expired`) is answered 504 `timeout`, as its deadline
    passed, and counted as expired: it was answered 502 `service_failed`, which says that the
    microservice failed every attempt, though it was never called."""
    await topology.declare(amqp, topology.Topology(service, partitions=1))
    channel = await amqp.channel(publisher_confirms=True)
    replies = await channel.declare_queue(exclusive=True)
    exchange = await channel.get_exchange(service)
    message = aio_pika.Message(b"", correlation_id="late-1", reply_to=replies.name, expiration=0.2)
    await exchange.publish(message, routing_key="k")
    dlq = topology.dead_letter_queue(service)
    for _ in range(100):
        declared = await channel.declare_queue(dlq, passive=True)
        if declared.declaration_result.message_count:
            break
        await asyncio.sleep(0.1)
    dequeuer = await stack.dequeuer(service, target.url, "--partitions", "1")
    async with asyncio.timeout(15):
        async with replies.iterator() as answers:
            reply = await anext(answers)
    answer = envelope.decode_response(reply.headers, reply.body)
    assert (answer.status, answer.error) == (504, "timeout")
    body = json.loads(answer.body)
    assert body["error"]["code"] == "timeout" and "expired" in body["error"]["message"]
    assert target.seen == []
    port = dequeuer.admin_port  # type: ignore[attr-defined]
    assert await metric(http, port, "proxymq_dequeuer_messages_total", {"outcome": "expired"}) == 1
    assert (
        await metric(http, port, "proxymq_dequeuer_messages_total", {"outcome": "dead_lettered"})
        == 0
    )
    await channel.close()


@pytest.mark.parametrize(
    ("headers", "reason", "correlation_id"),
    [
        ({envelope.H_VERSION: 99}, "unsupported", "bad-1"),
        ({envelope.H_HEADERS: "not json"}, "JSON list", "bad-1"),
        ({envelope.H_PATH: "no-slash"}, "does not start", "bad-1"),
        ({envelope.H_METHOD: "GE T"}, "not an HTTP method", "bad-1"),
        (
            {envelope.H_HEADERS: json.dumps([["X-A", "a\r\nInjected: 1"]])},
            "invalid HTTP header",
            "bad-1",
        ),
        # Sent on as X-Correlation-ID, which aiohttp refused: a traceback, and the broker's
        # dead letter without a reason of ours.
        ({}, "correlation_id holds a line break", "bad\r\nInjected: 1"),
    ],
)
async def test_malformed_message_is_dead_lettered(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
    headers: dict[str, object],
    reason: str,
    correlation_id: str,
) -> None:
    """Dead-lettered at once, and its caller answered 502 at once (a newer enqueuer's request
    that an older dequeuer cannot read, in a rolling upgrade): it waited for its deadline."""
    await stack.dequeuer(service, target.url)
    channel = await amqp.channel(publisher_confirms=True)
    replies = await channel.declare_queue(exclusive=True)
    exchange = await channel.get_exchange(service)
    await exchange.publish(
        aio_pika.Message(
            b"x",
            headers=headers,  # type: ignore[arg-type]
            correlation_id=correlation_id,
            reply_to=replies.name,
        ),
        routing_key="k",
    )
    dlq = await channel.declare_queue(topology.dead_letter_queue(service), passive=True)
    for _ in range(50):
        dead = await dlq.get(fail=False)
        if dead is not None:
            break
        await asyncio.sleep(0.1)
    assert dead is not None
    await dead.ack()
    assert reason in str(dead.headers["x-proxymq-dead-reason"])
    async with asyncio.timeout(5):
        while (reply := await replies.get(fail=False)) is None:
            await asyncio.sleep(0.1)
    await reply.ack()
    assert reply.correlation_id == correlation_id
    answer = envelope.decode_response(reply.headers, reply.body)
    assert (answer.status, answer.error) == (502, "service_failed")
    assert answer.error_message is not None and reason in answer.error_message
    assert f"{service}.dlq" in answer.error_message
    assert target.seen == []
    assert "Traceback" not in stack.log_text()


async def test_a_malformed_message_without_a_usable_reply_to_gets_no_reply(
    stack: Stack, service: str, target: Target, amqp: AbstractRobustConnection
) -> None:
    """No correlation_id to answer with, or a reply_to naming a request queue: dead-lettered
    and not answered (a reply into a partition is taken for a request)."""
    await stack.dequeuer(service, target.url)
    channel = await amqp.channel(publisher_confirms=True)
    replies = await channel.declare_queue(exclusive=True)
    exchange = await channel.get_exchange(service)
    partition = topology.Topology(service).queues[0]
    bad = {envelope.H_PATH: "no-slash"}
    for correlation_id, reply_to in [(None, replies.name), ("bad-1", partition)]:
        message = aio_pika.Message(
            b"x",
            headers=bad,  # type: ignore[arg-type]
            correlation_id=correlation_id,
            reply_to=reply_to,
        )
        await exchange.publish(message, routing_key="k")
    dlq = await channel.declare_queue(topology.dead_letter_queue(service), passive=True)
    async with asyncio.timeout(10):
        while ((await dlq.declare()).message_count or 0) < 2:
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    assert await replies.get(fail=False) is None
    assert "names a queue of a service's" in stack.log_text()
    assert target.seen == []
    await channel.close()


async def test_topology_mismatch_stops_the_dequeuer(
    stack: Stack, service: str, amqp: AbstractRobustConnection
) -> None:
    await topology.declare(amqp, topology.Topology(service, partitions=4))
    dequeuer = await stack.dequeuer(service, "http://127.0.0.1:1", "--partitions", "8", wait=False)
    assert dequeuer.popen is not None
    code = await asyncio.to_thread(dequeuer.popen.wait, 20)
    assert code == 1
    assert "fewer than 8 partitions" in stack.log_text()


async def test_a_reply_queue_the_broker_refuses_stops_the_enqueuer_in_one_line(
    stack: Stack, amqp: AbstractRobustConnection
) -> None:
    """The broker refuses the enqueuer's reply queue (here: one of that name exists with other
    arguments; a user without permission to declare it is refused alike): the enqueuer says
    why in one line and exits 1, as the dequeuer does when it cannot serve. It ended in a
    40-line traceback."""
    instance = f"t{uuid.uuid4().hex[:10]}"
    channel = await amqp.channel()
    await channel.declare_queue(f"proxymq.replies.{instance}", durable=True)
    try:
        enqueuer, _ = await stack.enqueuer("--instance-id", instance, wait=False)
        assert enqueuer.popen is not None
        assert await asyncio.to_thread(enqueuer.popen.wait, 20) == 1
    finally:
        await channel.queue_delete(f"proxymq.replies.{instance}")
        await channel.close()
    logged = stack.log_text()
    assert "cannot serve: " in logged and "PRECONDITION_FAILED" in logged
    assert "Traceback" not in logged


async def test_two_enqueuers_with_one_instance_id(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A second enqueuer with the same --instance-id would share the first one's reply queue,
    and each would take about half of the other's replies: every second call was a 504, with
    nothing in any log. It stops at startup instead (after the heartbeats a dead process's
    consumer may take to go), and the first serves every call. An enqueuer restarted after a
    crash with the same id starts."""
    await stack.dequeuer(service, target.url)
    instance = f"same-{service}"
    first, url = await stack.enqueuer("--instance-id", instance)
    second, _ = await stack.enqueuer("--instance-id", instance, "--amqp-heartbeat", "1", wait=False)
    assert second.popen is not None
    assert await asyncio.to_thread(second.popen.wait, 20) == 1
    assert "give each enqueuer its own --instance-id" in stack.log_text()
    for i in range(6):
        async with http.get(f"{url}/{service}/echo/{i}") as response:
            assert response.status == 200
    assert first.popen is not None
    first.popen.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.popen.wait, 10)
    _, url = await stack.enqueuer("--instance-id", instance)
    async with http.get(f"{url}/{service}/echo/again") as response:
        assert response.status == 200


async def test_an_enqueuer_whose_reply_queue_another_took_while_it_was_away_stops(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A second enqueuer with the same --instance-id (a fixed id on every replica, the second
    one restarting after its refusal) that starts while the first is cut off from the broker
    takes the reply queue over. The first reconnected, found the queue consumed and took that
    for its own consumer: it served on, and every call through it was a 504, with nothing in
    any log. It stops instead, once its own consumer of before the cut would be gone."""
    await stack.dequeuer(service, target.url)
    instance = f"taken-{service}"
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        first, _ = await stack.enqueuer(
            *("--instance-id", instance, "--amqp-heartbeat", "1"),
            env={"PROXYMQ_AMQP_URL": proxy.url},
        )
        proxy.refuse()
        proxy.reset()
        _, url = await stack.enqueuer("--instance-id", instance)
        proxy.heal()
        assert first.popen is not None
        assert await asyncio.to_thread(first.popen.wait, 30) == 1
    finally:
        await proxy.stop()
    assert "give each enqueuer its own --instance-id" in stack.log_text()
    async with http.get(f"{url}/{service}/echo/after") as response:
        assert response.status == 200


async def test_two_dequeuers_with_one_instance_id(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A second dequeuer with the same --instance-id shared the first one's heartbeat queue,
    took itself for the first and claimed the same partitions: the second sat idle behind
    single active consumer, and no log said why. It stops at startup instead; the first
    serves every partition, and a dequeuer restarted after a crash with the same id starts."""
    instance = f"same-{service}"
    first = await stack.dequeuer(service, target.url, "--instance-id", instance)
    second = await stack.dequeuer(
        service, target.url, "--instance-id", instance, "--amqp-heartbeat", "1", wait=False
    )
    assert second.popen is not None
    assert await asyncio.to_thread(second.popen.wait, 20) == 1
    assert "give each dequeuer its own --instance-id" in stack.log_text()
    _, url = await stack.enqueuer()
    for i in range(16):
        headers = {"X-Partition-Key": f"key-{i}"}
        async with http.get(f"{url}/{service}/echo/{i}", headers=headers) as response:
            assert response.status == 200
    assert first.popen is not None
    first.popen.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.popen.wait, 10)
    await stack.dequeuer(service, target.url, "--instance-id", instance)
    async with http.get(f"{url}/{service}/echo/again") as response:
        assert response.status == 200


async def test_two_long_pod_names_alike_in_their_first_100_are_two_dequeuers(
    amqp: AbstractRobustConnection,
) -> None:
    """The dequeuer cut its id to 100 characters (its heartbeat queue S.members.ID must fit
    AMQP's 255 bytes): two pods whose names began alike were one id, and the second stopped
    with "give each dequeuer its own --instance-id". Pod names (up to 253) of a service named
    with 100 characters both join, each on a queue of its own."""
    service = f"t-{uuid.uuid4().hex[:10]}".ljust(100, "x")
    pods = [("a" * 62 + ".") * 4 + end for end in "bc"]
    members = [Membership(service, pod) for pod in pods]
    try:
        for one in members:
            await one.start(amqp, linger=0)
        for pod in pods:
            assert await consumers_of(amqp, topology.members_queue(service, pod)) == 1
    finally:
        for one in members:
            await one.stop()
        await topology.delete(amqp, topology.Topology(service))


async def consumers_of(connection: aio_pika.abc.AbstractRobustConnection, queue: str) -> int:
    """0 when the queue is gone: a heartbeat queue goes with the last of its consumers."""
    channel = await connection.channel()
    try:
        found = await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return 0
    count = found.declaration_result.consumer_count or 0
    await channel.close()
    return count


@pytest.mark.parametrize("sidecar", ["enqueuer", "dequeuer"])
async def test_two_sidecars_with_one_instance_id_started_at_one_instant(
    amqp_url: str, service: str, monkeypatch: pytest.MonkeyPatch, sidecar: str
) -> None:
    """Two replicas given the same --instance-id that start together both found the queue
    named after it unconsumed, and both consumed it: `claim` looks before the consumer is
    there. No more than one of them may serve; the instant is made certain by holding each
    after its look until the other has looked too."""
    looked = asyncio.Barrier(2)
    claim = topology.claim

    async def claim_together(*args: Any) -> None:
        await claim(*args)
        await looked.wait()

    monkeypatch.setattr(topology, "claim", claim_together)
    connections = [await aio_pika.connect_robust(amqp_url) for _ in range(2)]
    instance = f"together-{service}"
    sidecars: list[ReplyWaiter | Membership] = [
        ReplyWaiter(instance, 10, 10, lambda: None)
        if sidecar == "enqueuer"
        else Membership(service, instance)
        for _ in connections
    ]
    queue = (
        topology.reply_queue(instance)
        if sidecar == "enqueuer"
        else topology.members_queue(service, instance)
    )
    try:
        started = await asyncio.gather(
            *(
                one.start(connection, 0)
                for one, connection in zip(sidecars, connections, strict=True)
            ),
            return_exceptions=True,
        )
        assert all(result is None or isinstance(result, QueueInUse) for result in started)
        assert started.count(None) <= 1
        assert await consumers_of(connections[0], queue) <= 1
    finally:
        for one in sidecars:
            if isinstance(one, ReplyWaiter):
                await one.stop(0, RuntimeError("stopped"))
            else:
                await one.stop()
        channel = await connections[0].channel()
        for name in (queue, topology.lease_queue(queue)):
            await channel.queue_delete(name)
        for connection in connections:
            await connection.close()


async def test_channels_lost_with_their_connection_are_not_kept(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every reconnect kept the lost channel of each step watched by `unless_closed` (the
    enqueuer's publishing channel, each partition's channel in the dequeuer) for good: its
    watch held the close reason, whose traceback holds the channel, in a map meant to forget
    it. 30 connection resets left 30 channels, and what their frames held, in the enqueuer."""
    caplog.set_level(logging.CRITICAL)  # a captured record's traceback would hold them
    proxy = await FaultyProxy(URL(amqp_url).port or 5672).start()
    connection = await aio_pika.connect_robust(proxy.url, reconnect_interval=0.1)
    try:
        channel = await connection.channel()
        lost: list[weakref.ref[object]] = []
        for _ in range(3):
            async with asyncio.timeout(10):
                while True:  # the channel restored after the last reset
                    with contextlib.suppress(*BROKER_ERRORS):
                        underlay = await channel.get_underlay_channel()
                        if not underlay.is_closed and all(r() is not underlay for r in lost):
                            break
                    await asyncio.sleep(0.05)
            await unless_closed(underlay, asyncio.sleep(0))
            lost.append(weakref.ref(underlay))
            del underlay
            proxy.reset()
        # The last one may still be in the frames of the reconnect under way, and on a busy
        # machine the one before it for a moment: kept for good is what fails.
        for _ in range(50):
            await asyncio.sleep(0.1)
            gc.collect()
            if all(r() is None for r in lost[:-1]):
                break
        assert [r() for r in lost[:-1]] == [None, None]
    finally:
        await connection.close()
        await proxy.stop()


async def test_connections_lost_are_not_kept_by_service_lookups(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each service looked up kept the connection it was found on (or missing on), to know a
    verdict made on an earlier connection: a lost connection went only once every service it
    had looked up was looked up again. Names called once, made up by callers or rarely used,
    are not: every reconnect kept the lost connection, its channels and what their frames held,
    for as long as the enqueuer ran (each service looked up on it, up to 10,000 names)."""
    caplog.set_level(logging.CRITICAL)  # a captured record's traceback would hold them
    proxy = await FaultyProxy(URL(amqp_url).port or 5672).start()
    connection = await aio_pika.connect_robust(proxy.url, reconnect_interval=0.1)
    publisher = Publisher(frozenset(), ServiceBreaker(5, 10))
    try:
        await publisher.start(connection)
        lost: list[weakref.ref[object]] = []
        for i in range(3):
            async with asyncio.timeout(10):
                while True:  # the connection restored after the last reset
                    transport = connection.transport
                    if transport is not None and all(r() is not transport for r in lost):
                        with contextlib.suppress(*BROKER_ERRORS, BrokerUnavailable):
                            with pytest.raises(UnknownService):
                                await publisher.check(f"gone-{uuid.uuid4().hex[:8]}-{i}")
                            break
                    await asyncio.sleep(0.05)
            lost.append(weakref.ref(transport))
            del transport
            proxy.reset()
        await asyncio.sleep(0.5)
        gc.collect()
        # The last one may still be in the frames of the reconnect under way.
        kept = sum(r() is not None for r in lost[:-1])
        assert kept == 0, f"{kept} of 2 lost connections kept"
    finally:
        await connection.close()
        await proxy.stop()


async def test_channels_closed_leave_nothing_behind_on_their_connection(
    amqp: AbstractRobustConnection,
) -> None:
    """aio-pika kept an observer of the connection's close, with its callbacks, for every
    channel opened on it, closed or not, for as long as the connection lived: 4 KB for each
    publishing channel the enqueuer replaced after a nack (one a second while a partition
    refuses), and for each partition a dequeuer gave up."""
    publisher = Publisher(frozenset(), ServiceBreaker(5, 10))
    await publisher.start(amqp)

    def futures() -> int:
        gc.collect()
        return sum(isinstance(o, asyncio.Future) for o in gc.get_objects())

    publisher._channels["s"] = await confirming_channel(amqp)
    for _ in range(3):
        await publisher._replace_channel(amqp, "s")
    before = futures()
    for _ in range(50):
        await publisher._replace_channel(amqp, "s")
    kept = futures() - before
    assert kept < 10, f"{kept} futures more after 50 channels replaced"
    await publisher._channels["s"].close()


async def test_a_reply_queue_lost_without_notice_comes_back(
    amqp: AbstractRobustConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient reply queue goes with its node. In the cluster failover test the cluster
    removed it after the enqueuer had restored it on another node, and no consumer cancel
    reached the enqueuer (aio-pika recovers from one): every later reply was returned to its
    dequeuer and dropped, every call got 504, for good. The waiter declares and consumes its
    queue again. The lost notice is simulated by ignoring the broker's cancel."""
    monkeypatch.setattr(RobustChannel, "_on_consumer_cancel", lambda self, frame: None)
    monkeypatch.setattr("enqueuer.replies.WATCH_INTERVAL", 0.2, raising=False)
    waiter = ReplyWaiter(f"lost-{uuid.uuid4().hex[:8]}", 10, 10, lambda: None)
    await waiter.start(amqp, linger=0)
    channel = await amqp.channel(on_return_raises=True)
    try:
        await channel.queue_delete(waiter.queue_name)
        future = waiter.expect("r-1", "s")
        reply = aio_pika.Message(b"back", correlation_id="r-1", headers={"x-proxymq-status": 200})
        async with asyncio.timeout(10):
            while True:
                try:
                    await channel.default_exchange.publish(
                        reply, routing_key=waiter.queue_name, mandatory=True
                    )
                    break
                except aio_pika.exceptions.DeliveryError:
                    await asyncio.sleep(0.1)  # not there yet
            assert (await future).body == b"back"
    finally:
        await waiter.stop(0, RuntimeError("stopped"))
        await channel.queue_delete(waiter.queue_name)
        await channel.close()


async def test_replies_sent_into_a_black_hole_are_delivered_after_it(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A reply the broker hands to the enqueuer's consumer while the path between them has gone
    silent (RabbitMQ sees that only after two heartbeats: 30 s by default) is delivered again
    once the enqueuer is back. The reply queue was consumed without acks, so the broker took
    every reply written into the dead connection as delivered: the 202's result stayed
    "pending" for good, and a synchronous caller got 504 even with time left."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        await stack.dequeuer(service, target.url)
        enqueuer, url = await stack.enqueuer(
            "--amqp-heartbeat", "1", env={"PROXYMQ_AMQP_URL": proxy.url}
        )
        admin = enqueuer.admin_port  # type: ignore[attr-defined]
        async with http.get(f"{url}/{service}/x") as response:  # the service is known
            assert response.status == 200
        headers = {"Prefer": "respond-async"}
        async with http.get(f"{url}/{service}/delay/1", headers=headers) as response:
            assert response.status == 202
            location = url + response.headers["Location"]
        async with asyncio.timeout(5):
            while not any(seen.path == "/delay/1" for seen in target.seen):
                await asyncio.sleep(0.02)
        proxy.blackhole()  # the reply comes about a second later, into the silence
        async with asyncio.timeout(20):  # the enqueuer gives its connection up
            while True:
                async with http.get(f"http://127.0.0.1:{admin}/readyz") as response:
                    if response.status == 503:
                        break
                await asyncio.sleep(0.2)
        proxy.heal()
        async with asyncio.timeout(30):
            while True:
                async with http.get(location) as response:
                    if response.status != 202:
                        assert response.status == 200
                        assert await response.text() == "late"
                        break
                await asyncio.sleep(0.2)
    finally:
        await proxy.stop()


@pytest.mark.parametrize("expired", [True, False], ids=["expired", "broker restart"])
async def test_replies_lost_with_an_expired_reply_queue_end_their_requests(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
    expired: bool,
) -> None:
    """An enqueuer cut off from the broker for over a minute finds its reply queue expired
    (`x-expires`), with the replies in it. Its asynchronous request without a deadline stayed
    "pending", and held its --max-in-flight slot, until the enqueuer restarted. The expiry is
    simulated by deleting the queue, with the reply in it, while the connection is cut.

    A queue gone with a broker restart (simulated: its lease queue deleted too, before the
    reply) had no replies in it: the dequeuer holds the reply until the queue is back."""
    instance = f"expired-{uuid.uuid4().hex[:8]}"
    queue = f"proxymq.replies.{instance}"
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    channel = await amqp.channel()
    try:
        await stack.dequeuer(service, target.url)
        _, url = await stack.enqueuer(
            "--instance-id", instance, "--max-in-flight", "1", env={"PROXYMQ_AMQP_URL": proxy.url}
        )
        async with http.get(f"{url}/{service}/x") as response:  # the service is known
            assert response.status == 200
        headers = {"Prefer": "respond-async"}
        async with http.get(f"{url}/{service}/delay/2", headers=headers) as response:
            assert response.status == 202
            location = url + response.headers["Location"]
        proxy.refuse()
        proxy.reset()
        if expired:
            replies = await channel.declare_queue(queue, passive=True, robust=False)
            async with asyncio.timeout(20):  # the reply waits in the queue nobody consumes
                while not (await replies.declare()).message_count:
                    await asyncio.sleep(0.1)
        else:
            await channel.queue_delete(queue + ".lease")
        await channel.queue_delete(queue)
        if not expired:
            async with asyncio.timeout(10):  # the dequeuer's reply is returned: it waits
                while "/delay/2" not in {seen.path for seen in target.seen}:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(3)
        proxy.heal()
        async with asyncio.timeout(30):
            while True:
                async with http.get(location) as response:
                    if response.status != 202:
                        body = await response.read()
                        break
                await asyncio.sleep(0.2)
        if expired:
            assert response.status == 504
            assert response.headers["X-ProxyMQ-Error"] == "timeout"
            assert b"reply queue expired" in body
        else:
            assert (response.status, body) == (200, b"late")
        async with http.get(f"{url}/{service}/x") as response:  # its in-flight slot is free
            assert response.status == 200
    finally:
        await proxy.stop()
        for name in (queue, queue + ".lease"):
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        await channel.close()


async def test_a_heartbeat_nobody_hears_is_dropped_quietly(
    amqp: AbstractRobustConnection, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reset deletes a dequeuer's auto-delete heartbeat queue until the robust connection
    declares it again: a heartbeat published meanwhile was returned (mandatory), and aiormq
    logged 'Unhandled message ... returning' as an ERROR, for a heartbeat meant to be lost."""
    members = Membership(service, "me", expiry=2.5)
    await members.start(amqp, linger=0)
    try:
        channel = await amqp.channel()
        await channel.queue_delete(topology.members_queue(service, "me"))
        await channel.close()
        with caplog.at_level(logging.WARNING):
            await members.publish()
            await asyncio.sleep(0.5)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        await members.stop()


@pytest.mark.parametrize("name", ["proxymq-enqueuer", "proxymq-dequeuer"])
async def test_a_connection_reset_is_one_line_without_a_traceback(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession, name: str
) -> None:
    """A connection reset (an RST: a firewall, a crashed host) is an event the robust
    connection handles. Each one logged aiormq's two chained tracebacks, and an aio-pika ERROR
    per channel whose restore found the connection closed: about 30 lines, 2 of them ERROR,
    for nothing to act on."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        env = {"PROXYMQ_AMQP_URL": proxy.url}
        if name == "proxymq-dequeuer":
            await stack.enqueuer()
            process = await stack.dequeuer(service, target.url, env=env)
        else:
            await stack.dequeuer(service, target.url)
            process, _ = await stack.enqueuer(env=env)
        admin = process.admin_port  # type: ignore[attr-defined]
        for reset in range(3):
            assert proxy.reset()
            async with asyncio.timeout(10):
                while await metric(http, admin, "proxymq_broker_reconnects_total") <= reset:
                    await asyncio.sleep(0.1)
    finally:
        await proxy.stop()
    logged = stack.log_text()
    assert "Traceback" not in logged
    assert " ERROR " not in logged
    assert "connection lost" in logged


async def test_a_connection_lost_while_the_enqueuer_sets_up_is_set_up_again(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A connection lost while the enqueuer declares its reply queue (a broker going down as
    the enqueuer comes up, an RST) is made again and the set-up with it. The enqueuer took the
    loss for the broker refusing its set-up and exited 1 ("cannot serve"), though it answers
    503 and reconnects when the broker is down at its start or later."""
    await stack.dequeuer(service, target.url)
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        proxy.reset_when = [
            ReplyWaiter("x", 1, 1, lambda: None).queue_name.removesuffix("x").encode()
        ]
        _, url = await stack.enqueuer(env={"PROXYMQ_AMQP_URL": proxy.url})
        assert not proxy.reset_when  # the cut happened
        async with http.get(f"{url}/{service}/x") as response:
            assert response.status == 200
    finally:
        await proxy.stop()
    assert "Traceback" not in stack.log_text()


async def test_a_connection_lost_while_the_dequeuer_sets_up_is_set_up_again(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A connection lost at each step of the dequeuer's set-up in turn (looking at the layout,
    declaring it, binding the hash ring, joining the members, consuming the notices) is made
    again and the step with it; the dequeuer is ready once the last is done, and the channel of
    a failed step is not restored beside the new one. It took each loss for the broker refusing
    its set-up and exited 1 ("cannot serve")."""
    _, url = await stack.enqueuer()
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        steps = [".p8", ".dead", ".ring-lock", ".members", ".notify"]
        proxy.reset_when = [f"{service}{step}".encode() for step in steps]
        await stack.dequeuer(
            service, target.url, "--partitions", "8", env={"PROXYMQ_AMQP_URL": proxy.url}
        )
        assert not proxy.reset_when  # every cut happened
        assert proxy.accepted == len(steps) + 1
        async with http.get(f"{url}/{service}/x") as response:
            assert response.status == 200
        # Its members', reply and notices' channels, one per partition and the depth watch's
        # (opened within its 5 s): none of a failed step, restored with the connection.
        kept = [3 + 8 + 1]
        async with asyncio.timeout(20):
            while await channels_of(f"proxymq-dequeuer {service} ") != kept:
                await asyncio.sleep(0.5)
        await asyncio.sleep(6)
        assert await channels_of(f"proxymq-dequeuer {service} ") == kept
    finally:
        await proxy.stop()
    logged = stack.log_text()
    assert "Traceback" not in logged
    assert logged.count("the connection was lost while") == len(steps)


async def channels_of(prefix: str) -> list[int]:
    """The channels open on each connection whose name starts with `prefix`, right now."""
    done = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "list_connections", "client_properties", "channels"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [
        int(line.rsplit("\t", 1)[1])
        for line in done.stdout.splitlines()
        if f'{{"connection_name","{prefix}' in line
    ]


async def test_stopping_answers_the_callers_still_waiting(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """SIGTERM: a reply that comes within the few seconds of grace still reaches its caller,
    and a caller whose reply does not gets 503 with Retry-After. Both got a dropped
    connection instead of an answer."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer()
    assert enqueuer.popen is not None

    async def call(path: str) -> tuple[int, str, bytes]:
        headers = {"X-Request-Timeout": "30"}
        async with http.get(f"{url}/{service}/{path}", headers=headers) as response:
            code = response.headers.get("X-ProxyMQ-Error", "")
            return response.status, code, await response.read()

    soon, late = asyncio.ensure_future(call("delay/2")), asyncio.ensure_future(call("delay/15"))
    await asyncio.sleep(0.5)
    enqueuer.popen.send_signal(signal.SIGTERM)
    assert (await soon)[:2] == (200, "")
    status, code, body = await late
    assert (status, code) == (503, "broker_unavailable")
    assert b"the enqueuer is stopping" in body
    assert await asyncio.to_thread(enqueuer.popen.wait, 15) == 0


async def test_a_stopping_enqueuer_waits_its_shutdown_grace(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """PROXYMQ_SHUTDOWN_GRACE sets how long a stopping enqueuer waits for the replies its
    callers await: a call still running 7 s after SIGTERM is answered 200 with 15 s of grace.
    The grace was a fixed 5 s: that caller got 503 while its request went on, and its retry
    could run it twice."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer(env={"PROXYMQ_SHUTDOWN_GRACE": "15"})
    assert enqueuer.popen is not None
    headers = {"X-Request-Timeout": "60"}
    call = asyncio.ensure_future(http.get(f"{url}/{service}/delay/7", headers=headers))
    async with asyncio.timeout(30):
        while not target.seen:
            await asyncio.sleep(0.05)
    enqueuer.popen.send_signal(signal.SIGTERM)
    async with await call as response:
        assert (response.status, response.headers.get("X-ProxyMQ-Error")) == (200, None)
        assert await response.text() == "late"
    assert await asyncio.to_thread(enqueuer.popen.wait, 30) == 0


async def test_a_stopping_enqueuer_slow_to_hear_from_the_broker_still_takes_replies(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """At SIGTERM the enqueuer deletes its lease queue, for at most a second, on its reply
    queue's channel; an answer later than that (a busy broker) made aiormq close the channel,
    and with it the reply queue's consumer: the grace then waited for replies that were in the
    queue, and their callers got 503. The proxy holds what the broker sends for 2 s."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        await stack.dequeuer(service, target.url)
        enqueuer, url = await stack.enqueuer(
            env={"PROXYMQ_AMQP_URL": proxy.url, "PROXYMQ_SHUTDOWN_GRACE": "8"}
        )
        assert enqueuer.popen is not None
        call = asyncio.ensure_future(http.get(f"{url}/{service}/delay/4"))
        async with asyncio.timeout(10):
            while not target.seen:
                await asyncio.sleep(0.05)
        proxy.hold()
        enqueuer.popen.send_signal(signal.SIGTERM)
        await asyncio.sleep(2)
        proxy.release()
        async with await call as response:
            assert (response.status, response.headers.get("X-ProxyMQ-Error")) == (200, None)
        assert await asyncio.to_thread(enqueuer.popen.wait, 30) == 0
    finally:
        proxy.release()
        await proxy.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
async def test_a_second_signal_stops_at_once(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession, sig: signal.Signals
) -> None:
    """The first signal starts a graceful stop that waits for the call in flight (up to
    --shutdown-grace); a second one, as an operator pressing Ctrl-C again, ends the process at
    once, with a line that says so. A second SIGINT was a traceback mid-stop, a second SIGTERM
    an exit without a word."""
    dequeuer = await stack.dequeuer(service, target.url, "--shutdown-grace", "60")
    _, url = await stack.enqueuer()
    assert dequeuer.popen is not None
    call = asyncio.ensure_future(http.get(f"{url}/{service}/delay/8"))
    while not target.seen:
        await asyncio.sleep(0.05)
    dequeuer.signal(sig)
    while "stop signal received" not in stack.log_text():
        await asyncio.sleep(0.05)
    dequeuer.signal(sig)
    assert await asyncio.to_thread(dequeuer.popen.wait, 20) == 128 + sig
    log = stack.log_text()
    assert f"second stop signal ({sig.name}): stopping now" in log
    assert "Traceback" not in log
    call.cancel()


async def test_caller_disconnects(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A caller who hangs up leaves nothing behind: the waiter is freed, the reply dropped.
    Its request is counted and logged as `disconnected` (it was neither, so a caller who
    always gave up was invisible)."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer()
    port = enqueuer.admin_port  # type: ignore[attr-defined]
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.3):
            await http.get(f"{url}/{service}/delay/1")
    await asyncio.sleep(0.2)
    assert await metric(http, port, "proxymq_enqueuer_in_flight_requests") == 0
    for _ in range(30):
        if await metric(http, port, "proxymq_enqueuer_late_replies_total") == 1:
            break
        await asyncio.sleep(0.1)
    assert await metric(http, port, "proxymq_enqueuer_late_replies_total") == 1
    labels = {"service": service, "outcome": "disconnected"}
    assert await metric(http, port, "proxymq_enqueuer_requests_total", labels) == 1
    assert "the caller hung up before the answer" in stack.log_text()


async def test_delete_removes_a_partial_layout(
    service: str, amqp: AbstractRobustConnection
) -> None:
    """What a mismatch error tells users to do must work on a half-deleted layout too."""
    layout = topology.Topology(service, partitions=6)
    await topology.declare(amqp, layout)
    channel = await amqp.channel()
    await channel.queue_delete(topology.partition_queue(service, 0))
    await channel.queue_delete(topology.partition_queue(service, 2))
    await topology.delete(amqp, layout)
    assert [q for q in layout.queues if await topology.queue_exists(amqp, q)] == []
    assert not await topology.exchange_exists(amqp, service)


async def test_header_strings_that_are_no_utf8(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another AMQP client may send a string header whose bytes are no UTF-8 (pamqp reads it as
    `bytes`). As the partition key it raised in the dequeuer before anything was decided, and
    as any header of a request to dead-letter it made the copy unwritable: either way the
    request stayed held on a live channel for good, never answered, never dead-lettered."""

    def raw_strings(value: object) -> bytes:
        if isinstance(value, bytes):  # pamqp writes no `bytes`; other clients do, as `S`
            return b"S" + len(value).to_bytes(4, "big") + value
        return encode_table_value(value)  # type: ignore[arg-type]

    encode_table_value = pamqp.encode.encode_table_value
    monkeypatch.setattr(pamqp.encode, "encode_table_value", raw_strings)
    await stack.dequeuer(service, target.url)
    channel = await amqp.channel(publisher_confirms=True)
    replies = await channel.declare_queue(exclusive=True)
    exchange = await channel.get_exchange(service)
    requests: list[tuple[str, dict[str, object]]] = [
        ("keyed", {envelope.H_PATH: "/echo", envelope.H_KEY: b"\xff"}),
        ("malformed", {envelope.H_PATH: "no-slash", "x-note": b"caf\xe9"}),
    ]
    for correlation_id, headers in requests:
        message = aio_pika.Message(
            b"x",
            headers=headers,  # type: ignore[arg-type]
            correlation_id=correlation_id,
            reply_to=replies.name,
        )
        await exchange.publish(message, routing_key="k")
    answered: dict[str | None, int] = {}
    async with asyncio.timeout(10):
        while len(answered) < 2:
            if (reply := await replies.get(fail=False)) is None:
                await asyncio.sleep(0.1)
                continue
            await reply.ack()
            answered[reply.correlation_id] = envelope.decode_response(
                reply.headers, reply.body
            ).status
    assert answered == {"keyed": 200, "malformed": 502}
    dlq = await channel.declare_queue(topology.dead_letter_queue(service), passive=True)
    async with asyncio.timeout(10):
        while (dead := await dlq.get(fail=False)) is None:
            await asyncio.sleep(0.1)
    await dead.ack()
    assert dead.correlation_id == "malformed"
    assert "does not start" in str(dead.headers[envelope.H_DEAD_REASON])
    assert bytes(dead.headers["x-note"]) == b"caf\xe9"  # type: ignore[arg-type]
    await channel.close()


async def test_a_property_that_is_no_utf8(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another AMQP client may send a short string (correlation_id, message_id, a header's
    name) whose bytes are no UTF-8. pamqp's strict decoding raised in aiormq's frame reader,
    which closed the dequeuer's whole connection, again at every redelivery: no partition of
    the service was served until the broker dead-lettered the message (and the others held
    with it) at the delivery limit. Now the strings are read with replacement characters."""

    def raw(value: str) -> bytes:
        if value.startswith("raw:"):  # pamqp writes only UTF-8; other clients write bytes
            data = bytes.fromhex(value[4:])
            return len(data).to_bytes(1, "big") + data
        return short_string(value)

    short_string = pamqp.encode.METHODS["shortstr"]
    monkeypatch.setitem(pamqp.encode.METHODS, "shortstr", raw)
    await stack.dequeuer(service, target.url)
    channel = await amqp.channel(publisher_confirms=True)
    replies = await channel.declare_queue(exclusive=True)
    exchange = await channel.get_exchange(service)
    for correlation_id in ("raw:ff62616431", "good"):  # "\xffbad1", then a request behind it
        message = aio_pika.Message(
            b"x",
            headers={envelope.H_PATH: "/echo"},
            correlation_id=correlation_id,
            message_id="raw:ff",
            reply_to=replies.name,
        )
        await exchange.publish(message, routing_key="k")
    answered: set[str | None] = set()
    async with asyncio.timeout(10):
        while len(answered) < 2:
            reply = await replies.get(fail=False)
            if reply is None:
                await asyncio.sleep(0.1)
                continue
            await reply.ack()
            assert envelope.decode_response(reply.headers, reply.body).status == 200
            answered.add(reply.correlation_id)
    assert answered == {"\ufffdbad1", "good"}
    assert "InvalidFrameError" not in stack.log_text()
    await channel.close()
