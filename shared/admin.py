"""The admin port of both sidecars: `/healthz` (alive), `/readyz` (ready for work), `/metrics`;
the dequeuer's also `POST /drain`, for its pod's preStop hook (deploy/docker/drain.py)."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shared.errors import ERROR_HEADER, clipped, error_body

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Mapping[str, bool]]
# Starts the same stop as SIGTERM (again: nothing more) and returns its grace in seconds.
Drain = Callable[[], float]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, code: str, message: str, **headers: str) -> web.Response:
    """An admin port's error in the form of the API's (`X-ProxyMQ-Error`, JSON body)."""
    return web.json_response(
        error_body(code, message),
        status=status,
        headers={ERROR_HEADER: code, **headers},
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's plain-text 404 and 405 as `not_found` and `method_not_allowed`, naming what
    the port serves, and its plain-text 500 for a defect as the API's `internal_error`."""
    try:
        return await handler(request)
    except web.HTTPException as refused:
        if refused.status < 400:
            raise
        serves = ", ".join(
            sorted(
                f"{route.method} {route.resource.canonical}"
                for route in request.app.router.routes()
                if route.method != "HEAD" and route.resource is not None
            )
        )
        return error(
            refused.status,
            refused.reason.lower().replace(" ", "_"),
            f"{request.method} {clipped(request.path)}: {refused.reason}; "
            f"the admin port serves {serves}",
            **{name: refused.headers[name] for name in ("Allow",) if name in refused.headers},
        )
    except Exception:
        log.exception("%s %s failed", request.method, clipped(request.path))
        return error(
            500,
            "internal_error",
            f"{request.method} {clipped(request.path)} failed unexpectedly; "
            "the sidecar's log has the details",
        )


def from_loopback(peer: str | None) -> bool:
    """Whether `peer` (aiohttp's `request.remote`) is this host's loopback: 127.0.0.0/8, ::1,
    or 127.x mapped into IPv6 by a dual-stack socket. Only the containers of the pod share
    it: the admin port listens on every address for the kubelet's probes, and nobody else in
    the cluster may stop the dequeuer."""
    try:
        address = ipaddress.ip_address(peer or "")
    except ValueError:  # None (not a TCP peer) or no address at all
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def drain_endpoint(drain: Drain) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A peer off the loopback gets 403 and stops nothing."""

    async def drained(request: web.Request) -> web.Response:
        if not from_loopback(request.remote):
            log.warning("POST /drain from %s refused: only the pod's loopback", request.remote)
            return error(403, "forbidden", "POST /drain is for 127.0.0.1 and ::1 only")
        log.info("drain requested on the admin port")
        return web.json_response({"draining": True, "grace": drain()}, status=202)

    return drained


def admin_app(
    readiness: ReadinessCheck, registry: CollectorRegistry, drain: Drain | None = None
) -> web.Application:
    """`readiness` names each condition, so a 503 from `/readyz` says which one is failing.
    `drain` adds `POST /drain` (a POST: a GET, all that url-fetcher or a probe sends, cannot
    stop anything)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        checks = dict(readiness())
        ready = all(checks.values())
        return web.Response(
            status=200 if ready else 503,
            text=json.dumps({"ready": ready, "checks": checks}),
            content_type="application/json",
        )

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if drain is not None:
        app.router.add_post("/drain", drain_endpoint(drain))
    return app
