"""The tests' own microservice: records every request it receives and answers in ways chosen by
the path, so tests can assert on what the microservice saw."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from aiohttp import web

from dequeuer.readiness import PROBE_HEADERS
from shared.processes import free_port


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Target:
    port: int = field(default_factory=free_port)
    raw_port: int = field(default_factory=free_port)
    seen: list[Seen] = field(default_factory=list)
    raw_response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    raw_seen: list[tuple[bytes, bytes]] = field(default_factory=list)  # head, body
    order: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight_per_key: int = 0
    max_in_flight: int = 0
    failures_left: dict[str, int] = field(default_factory=dict)
    ready: bool = True  # what /ready answers: 200, or 503 when False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/status/{code}", self.status)
        app.router.add_route("*", "/redirect", self.redirect)
        app.router.add_route("*", "/cookies", self.cookies)
        app.router.add_route("*", "/gzip", self.gzipped)
        app.router.add_route("*", "/delay/{seconds}", self.delay)
        app.router.add_route("*", "/keyed/{key}/{seq}", self.keyed)
        app.router.add_route("*", "/flaky/{times}", self.flaky)
        app.router.add_route("*", "/drop", self.drop)
        app.router.add_route("GET", "/ready", self.readiness)
        app.router.add_route("*", "/bytes/{size}", self.sized)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._raw = await asyncio.start_server(self._serve_raw, "127.0.0.1", self.raw_port)

    async def stop(self) -> None:
        self._raw.close()
        await self._runner.cleanup()

    async def record(self, request: web.Request) -> Seen:
        """The dequeuer's readiness probes are not requests of the test: not recorded."""
        path, _, query = request.raw_path.partition("?")
        seen = Seen(
            request.method, path, query, list(request.headers.items()), await request.read()
        )
        if request.headers.get("User-Agent") != PROBE_HEADERS["User-Agent"]:
            self.seen.append(seen)
        return seen

    async def echo(self, request: web.Request) -> web.Response:
        seen = await self.record(request)
        return web.json_response(
            {
                "method": seen.method,
                "path": seen.path,
                "query": seen.query,
                "headers": seen.headers,
                "body": base64.b64encode(seen.body).decode(),
            }
        )

    async def status(self, request: web.Request) -> web.Response:
        await self.record(request)
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"status {code}" if code not in (204, 304) else None)

    async def redirect(self, request: web.Request) -> web.Response:
        await self.record(request)
        raise web.HTTPFound("/echo/after-redirect")

    async def cookies(self, request: web.Request) -> web.Response:
        await self.record(request)
        response = web.Response(text="cookies", headers={"X-Custom": "1"})
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        response.headers.add("X-Multi", "one")
        response.headers.add("X-Multi", "two")
        return response

    async def gzipped(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(
            body=gzip.compress(b"hello " * 100, mtime=0),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    async def delay(self, request: web.Request) -> web.Response:
        await self.record(request)
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(text="late")

    async def keyed(self, request: web.Request) -> web.Response:
        """Records arrival order and concurrency per key, the heart of the ordering tests."""
        key, seq = request.match_info["key"], int(request.match_info["seq"])
        self.order[key].append(seq)
        self.in_flight[key] += 1
        self.max_in_flight_per_key = max(self.max_in_flight_per_key, self.in_flight[key])
        self.max_in_flight = max(self.max_in_flight, sum(self.in_flight.values()))
        try:
            await asyncio.sleep(float(request.query.get("sleep", "0.01")))
        finally:
            self.in_flight[key] -= 1
        return web.json_response({"key": key, "seq": seq})

    async def flaky(self, request: web.Request) -> web.Response:
        """Fails `times` times per correlation id with 503, then succeeds."""
        await self.record(request)
        request_id = request.headers.get("X-Correlation-ID", "")
        left = self.failures_left.setdefault(request_id, int(request.match_info["times"]))
        if left > 0:
            self.failures_left[request_id] = left - 1
            return web.Response(status=503, text="busy")
        return web.Response(text="recovered")

    async def sized(self, request: web.Request) -> web.StreamResponse:
        """`size` bytes, with a Content-Length, or streamed without one (`?chunked=1`)."""
        await self.record(request)
        size = int(request.match_info["size"])
        if not request.query.get("chunked"):
            return web.Response(body=b"x" * size, content_type="application/octet-stream")
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, size, 1024):
            await response.write(b"x" * min(1024, size - start))
        await response.write_eof()
        return response

    async def readiness(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503)

    async def drop(self, request: web.Request) -> web.Response:
        """Closes the connection without an answer: a microservice that crashed mid-call."""
        await self.record(request)
        assert request.transport is not None
        request.transport.close()
        raise asyncio.CancelledError

    async def _serve_raw(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers with `raw_response` byte for byte: things aiohttp would not send (no
        Content-Type). Like many servers it never sends `100 Continue`, and it reads the body
        its Content-Length announces (for at most a second); `raw_seen` keeps what came."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lengths = re.findall(rb"(?im)^content-length:\s*(\d+)", head)
            body = b""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    while len(body) < sum(map(int, lengths)):
                        chunk = await reader.read(65536)
                        if not chunk:
                            break
                        body += chunk
            self.raw_seen.append((head, body))
            writer.write(self.raw_response)
            await writer.drain()
        finally:
            writer.close()
