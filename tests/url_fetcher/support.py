"""Test helpers: a local target web server, the only thing these tests may fetch."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

from aiohttp import web

PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'>"
    "<title>\n  Caf\u00e9   au lait\n</title></head><body><p>Hello</p></body></html>"
).encode()
BIG_SIZE = 200_000


async def _page(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, content_type="text/html", charset="utf-8")


async def _latin1(request: web.Request) -> web.Response:
    body = "<title>Cr\u00e8me br\u00fbl\u00e9e</title>".encode("latin-1")
    return web.Response(body=body, content_type="text/html", charset="iso-8859-1")


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=b"<title>Big</title>" + b"x" * BIG_SIZE, content_type="text/html")


async def _utf32(request: web.Request) -> web.Response:
    """UTF-32 without the BOM its charset requires: Python's decoder refuses it."""
    body = "<title>x</title>".encode("utf-32-le")
    return web.Response(body=body, content_type="text/html", charset="utf-32")


async def _data(request: web.Request) -> web.Response:
    return web.Response(body=b"<title>not html</title>", content_type="application/octet-stream")


async def _missing(request: web.Request) -> web.Response:
    return web.Response(status=404, text="<title>Not here</title>", content_type="text/html")


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(10)
    return web.Response(text="too late")


async def _redirect_chain(request: web.Request) -> web.Response:
    """/redirect/3 -> /redirect/2 -> /redirect/1 -> /redirect/0 -> /page."""
    hops = int(request.match_info["hops"])
    location = "/page" if hops == 0 else f"/redirect/{hops - 1}"
    raise web.HTTPFound(location)


async def _redirect_to(request: web.Request) -> web.Response:
    """A 302 to `?location=` exactly as given (HTTPFound would normalise it as a URL)."""
    return web.Response(status=302, headers={"Location": request.query["location"]})


async def start_target() -> web.AppRunner:
    """Start a web server on 127.0.0.1 serving the routes above; `base_url(runner)` finds it."""
    app = web.Application()
    app.router.add_get("/page", _page)
    app.router.add_get("/latin1", _latin1)
    app.router.add_get("/big", _big)
    app.router.add_get("/data", _data)
    app.router.add_get("/utf32", _utf32)
    app.router.add_get("/missing", _missing)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/redirect/{hops:\\d+}", _redirect_chain)
    app.router.add_get("/redirect-to", _redirect_to)
    runner = web.AppRunner(app, shutdown_timeout=0.1, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def base_url(runner: web.AppRunner) -> str:
    """http://127.0.0.1:PORT of a started runner."""
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


def free_port() -> int:
    """A port nothing listens on (there is a small race before it is used; fine for tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def silent_dns_server(asked: set[str]) -> Iterator[str]:
    """A DNS server on a loopback UDP port that reads queries and never answers them, as a
    dead or firewalled one; yields its `127.0.0.1:PORT` and adds each name asked to `asked`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.1)
        stopped = threading.Event()

        def swallow() -> None:
            while not stopped.is_set():
                with contextlib.suppress(OSError):
                    asked.add(_query_name(sock.recv(4096)))

        reader = threading.Thread(target=swallow, daemon=True)
        reader.start()
        try:
            yield f"127.0.0.1:{sock.getsockname()[1]}"
        finally:
            stopped.set()
            reader.join()


def _query_name(packet: bytes) -> str:
    """The name a DNS query asks about (its first question, after the 12-byte header)."""
    labels, at = [], 12
    while at < len(packet) and packet[at]:
        labels.append(packet[at + 1 : at + 1 + packet[at]].decode("ascii", "replace"))
        at += 1 + packet[at]
    return ".".join(labels)
