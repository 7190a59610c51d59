"""The API's connections answer what aiohttp's parser refuses: these fail when aiohttp stops
making its connections through `Server.__call__`, stops calling `handle_error`, or changes how
`data_received` queues a refusal."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from enqueuer.protocol import ApiRequestHandler, ApiRunner
from shared.errors import malformed
from shared.processes import free_port


async def read_body(request: web.Request) -> web.Response:
    try:
        return web.Response(body=await request.read())
    except web.RequestPayloadError as error:
        return web.Response(status=422, text=f"refused: {malformed(error).message}")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_post("/", read_body)
    runner = ApiRunner(app, access_log=None, max_headers=300, shutdown_timeout=1)
    await runner.setup()
    try:
        assert runner.server is not None
        connection = runner.server()
        assert isinstance(connection, ApiRequestHandler)
        assert connection.max_headers == 300  # the parser's options reach each connection
        listening = free_port()
        await web.TCPSite(runner, "127.0.0.1", listening).start()
        yield listening
    finally:
        await runner.cleanup()


async def exchange(port: int, *parts: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for part in parts:
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.1)  # each part arrives on its own
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    return answer


async def test_a_refused_head_gets_a_bad_request_with_an_id(port: int) -> None:
    answer = await exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nNo Colon\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"400"
    assert b"\r\nX-ProxyMQ-Error: bad_request\r\n" in head
    assert b"\r\nX-Correlation-ID: " in head
    assert json.loads(body) == {
        "error": {"code": "bad_request", "message": "malformed HTTP request: Invalid header token"}
    }


async def test_a_body_refused_after_its_head_fails_its_read(port: int) -> None:
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    answer = await exchange(port, head + b"3\r\nabc\r\n", b"zz\r\n")
    assert answer.startswith(b"HTTP/1.1 422 "), answer
    assert answer.endswith(b"refused: malformed HTTP request: Invalid character in chunk size")


LONG = "Got more than 8190 bytes when reading"


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nCookie: session=s3cret" + b"a" * 9000 + b"\r\n", LONG),
        (b"POST /?token=s3cret" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n", LONG),
        (b"GET http:///?token=s3cret HTTP/1.1\r\nHost: x\r\n", "Invalid URL"),
        (b"CONNECT x:1?token=s3cret HTTP/1.1\r\nHost: x\r\n", "Invalid URL"),
    ],
)
async def test_a_refusal_quotes_no_header_value_or_target(
    port: int, head: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A line over 8,190 bytes was refused with its first 100 bytes quoted, a target aiohttp
    could not read with the whole target, in the answer and in its warning line: a session
    cookie's or a token's, where the logs hold no header value."""
    answer = await exchange(port, head + b"\r\n")
    assert answer.split(b"\r\n")[0].split()[1] == b"400"
    message = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert message == f"malformed HTTP request: {reason}"
    assert "refused a malformed HTTP request" in caplog.text
    assert "s3cret" not in caplog.text
