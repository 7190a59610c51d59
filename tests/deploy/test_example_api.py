"""The example API against a stand-in enqueuer: it calls the sidecar with the URL's host as the
partition key and passes the answer (status, body, correlation id) back unchanged."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.deploy.support import ROOT


def example_api() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_api", ROOT / "examples/api/app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_fetch_goes_through_the_enqueuer_with_the_host_as_key() -> None:
    seen: list[tuple[str, str | None, bytes]] = []

    async def enqueuer(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("X-Partition-Key"), await request.read()))
        return web.json_response(
            {"status": 200, "title": "Example"}, status=200, headers={"X-Correlation-ID": "abc"}
        )

    fake = web.Application()
    fake.router.add_post("/url-fetcher/fetch", enqueuer)
    async with TestServer(fake) as upstream:
        app = example_api().create_app(str(upstream.make_url("")), 5.0)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/fetch", params={"url": "https://example.org/a?b=1"})
            assert response.status == 200
            assert response.headers["X-Correlation-ID"] == "abc"
            assert (await response.json())["title"] == "Example"
            missing = await client.get("/fetch")
            assert missing.status == 400
    path, key, body = seen[0]
    assert (path, key) == ("/url-fetcher/fetch", "example.org")
    assert json.loads(body) == {"url": "https://example.org/a?b=1"}


async def test_an_absent_enqueuer_is_a_503_not_a_crash() -> None:
    app = example_api().create_app("http://127.0.0.1:1", 2.0)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/fetch", params={"url": "https://example.org/"})
        assert response.status == 503
        assert "unreachable" in (await response.json())["error"]
