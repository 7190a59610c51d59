"""A ProxyMQ error may be kept and raised again (an Idempotency-Key's first answer, an async
result): each raise chained that handler's frames, its request's body among them, onto the one
kept error, held as long as the entry. The middleware lets go of them once it has answered."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from enqueuer.app import ENQUEUER, correlate, create_app
from enqueuer.settings import EnqueuerSettings
from shared.errors import ServiceFailed
from shared.settings import load

KEPT = ServiceFailed("the reply could not be read")


async def fail_as_before(request: web.Request) -> web.Response:
    body = await request.read()  # noqa: F841 - a local the traceback's frames would keep
    try:
        raise ValueError("what the reply said")
    except ValueError:
        raise KEPT from None


async def test_a_kept_error_holds_no_frames_once_answered() -> None:
    app = web.Application(middlewares=[correlate])
    app[ENQUEUER] = create_app(load(EnqueuerSettings, []))[ENQUEUER]
    app.router.add_post("/{tail:.*}", fail_as_before)
    async with TestClient(TestServer(app)) as client:
        for _ in range(3):
            async with client.post("/svc/x", data=b"x" * 100_000) as response:
                assert response.status == 502
                assert response.headers["X-ProxyMQ-Error"] == "service_failed"
    assert KEPT.__traceback__ is None
    assert KEPT.__context__ is None
