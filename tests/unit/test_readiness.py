"""Why the dequeuer waits for its microservice, in the words the log gives."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestServer

from dequeuer.readiness import Readiness


async def test_a_tls_failure_is_told_as_one_not_as_an_errno() -> None:
    """An ssl error carries OpenSSL's error number (1), which os.strerror reads as `Operation
    not permitted`: an https:// --target that speaks plain HTTP, or whose certificate is not
    trusted, was logged as a permission problem."""

    async def up(_: web.Request) -> web.Response:
        return web.Response(text="up")

    app = web.Application()
    app.router.add_get("/", up)
    async with TestServer(app, host="127.0.0.1") as server:
        readiness = Readiness(f"https://127.0.0.1:{server.port}", None, timeout=2, interval=1)
        try:
            why = await readiness.probe()
        finally:
            await readiness.stop()
    assert why is not None
    assert "not permitted" not in why
    assert "SSL" in why
