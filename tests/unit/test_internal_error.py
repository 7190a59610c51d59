"""A defect in an enqueuer handler is answered as ProxyMQ's other errors are: a JSON
`500 internal_error` with its X-Correlation-ID, and its traceback logged under that id."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from enqueuer.app import ENQUEUER, correlate, create_app
from enqueuer.settings import EnqueuerSettings
from shared.settings import load


async def crash(_: web.Request) -> web.Response:
    raise KeyError("a defect")


async def test_a_crash_in_a_handler_is_a_json_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = web.Application(middlewares=[correlate])
    app[ENQUEUER] = create_app(load(EnqueuerSettings, []))[ENQUEUER]
    app.router.add_get("/{tail:.*}", crash)
    with caplog.at_level(logging.INFO, logger="enqueuer.app"):
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/svc/x")
            body = await response.json()
    assert response.status == 500
    assert response.headers["X-ProxyMQ-Error"] == "internal_error"
    assert response.headers["Content-Type"] == "application/json"
    request_id = response.headers["X-Correlation-ID"]
    assert body == {
        "error": {
            "code": "internal_error",
            "message": "the enqueuer failed unexpectedly; its log has the details under this "
            "request's X-Correlation-ID",
        }
    }
    crashed = [r for r in caplog.records if r.exc_info]
    assert len(crashed) == 1 and crashed[0].levelno == logging.ERROR
    assert crashed[0].fields["correlation_id"] == request_id  # type: ignore[attr-defined]
    assert "a defect" in caplog.text
