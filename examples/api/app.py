"""An example API that reaches url-fetcher only through its enqueuer sidecar on localhost.

    GET /fetch?url=https://example.org/   ->  POST http://127.0.0.1:8080/url-fetcher/fetch

It knows nothing about RabbitMQ: it makes a plain HTTP call to the sidecar in its own pod (or,
in compose, its own network namespace) and passes the answer on. The URL's host is the partition
key, so fetches of one site are served in order while different sites spread over partitions.

Configuration (environment): API_HOST (0.0.0.0), API_PORT (8090), ENQUEUER_URL
(http://127.0.0.1:8080), FETCH_SERVICE (url-fetcher), API_TIMEOUT (35 seconds, a little over
the enqueuer's own 30 s so the enqueuer's 504 reaches the caller rather than this API's own
timeout).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

PASSED_HEADERS = ("Content-Type", "X-Correlation-ID", "X-ProxyMQ-Error", "Retry-After")
TRACE_HEADERS = ("traceparent", "tracestate", "X-Request-Timeout")
ENQUEUER_URL = web.AppKey("enqueuer_url", str)
FETCH_PATH = web.AppKey("fetch_path", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def create_app(enqueuer_url: str, timeout: float, service: str = "url-fetcher") -> web.Application:
    app = web.Application()
    app[ENQUEUER_URL] = enqueuer_url.rstrip("/")
    app[FETCH_PATH] = f"/{service}/fetch"

    async def session(app: web.Application) -> AsyncIterator[None]:
        """One session per process, closed on shutdown: a session per call leaks sockets."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            app[SESSION] = s
            yield

    app.cleanup_ctx.append(session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/fetch", fetch)
    return app


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def fetch(request: web.Request) -> web.Response:
    url = request.query.get("url", "")
    host = urlsplit(url).hostname
    if not host:
        return web.json_response({"error": "pass ?url=https://..."}, status=400)
    headers = {"X-Partition-Key": host}
    headers.update(
        {name: request.headers[name] for name in TRACE_HEADERS if name in request.headers}
    )
    target = request.app[ENQUEUER_URL] + request.app[FETCH_PATH]
    try:
        async with request.app[SESSION].post(target, json={"url": url}, headers=headers) as reply:
            body = await reply.read()
            passed = {name: reply.headers[name] for name in PASSED_HEADERS if name in reply.headers}
            return web.Response(status=reply.status, body=body, headers=passed)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.json_response(
            {"error": f"enqueuer sidecar unreachable at {target}: {exc or type(exc).__name__}"},
            status=503,
        )


def main() -> None:
    app = create_app(
        os.environ.get("ENQUEUER_URL", "http://127.0.0.1:8080"),
        float(os.environ.get("API_TIMEOUT", "35")),
        os.environ.get("FETCH_SERVICE", "url-fetcher"),
    )
    web.run_app(
        app,
        host=os.environ.get("API_HOST", "0.0.0.0"),
        port=int(os.environ.get("API_PORT", "8090")),
        access_log=None,
    )


if __name__ == "__main__":
    main()
