"""The API's connections answer what aiohttp's parser refuses: this fails when aiohttp stops
making its connections through `Server.__call__` or stops calling `handle_error`."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from enqueuer.protocol import ApiRequestHandler, ApiRunner
from shared.processes import free_port


async def test_a_refused_request_gets_a_bad_request_with_an_id() -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = ApiRunner(app, access_log=None, max_headers=300)
    await runner.setup()
    try:
        assert runner.server is not None
        connection = runner.server()
        assert isinstance(connection, ApiRequestHandler)
        assert connection.max_headers == 300  # the parser's options reach each connection
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nNo Colon\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
    finally:
        await runner.cleanup()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"400"
    assert b"\r\nX-ProxyMQ-Error: bad_request\r\n" in head
    assert b"\r\nX-Correlation-ID: " in head
    assert json.loads(body) == {
        "error": {"code": "bad_request", "message": "malformed HTTP request: Invalid header token"}
    }
