"""The dequeuer's `POST /drain`: answered to the pod's loopback only, and again while draining."""

from __future__ import annotations

import json
import logging
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from prometheus_client import CollectorRegistry

from shared.admin import admin_app, drain_endpoint, from_loopback


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),  # all of 127.0.0.0/8
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # an IPv4 peer of a dual-stack socket
        ("192.0.2.2", False),  # the pod's own IP: the kubelet, other pods
        ("10.0.0.7", False),
        ("0.0.0.0", False),
        ("::", False),
        ("::ffff:10.0.0.7", False),
        ("fe80::1%eth0", False),
        ("128.0.0.1", False),
        ("localhost", False),  # a name is no peer address
        ("", False),
        (None, False),  # not a TCP peer
    ],
)
def test_only_loopback_peers_are_loopback(peer: str | None, loopback: bool) -> None:
    assert from_loopback(peer) is loopback


def drain_request(peer: str) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default
    )
    return make_mocked_request("POST", "/drain", transport=transport)


async def test_a_peer_off_the_loopback_stops_nothing() -> None:
    calls: list[None] = []

    def drain() -> float:
        calls.append(None)
        return 25.0

    endpoint = drain_endpoint(drain)
    refused = await endpoint(drain_request("192.0.2.2"))
    assert refused.status == 403 and not calls
    assert refused.headers["X-ProxyMQ-Error"] == "forbidden"
    assert json.loads(refused.text or "") == {
        "error": {"code": "forbidden", "message": "POST /drain is for 127.0.0.1 and ::1 only"}
    }
    for _ in range(2):  # a second request while draining is answered the same
        accepted = await endpoint(drain_request("127.0.0.1"))
        assert accepted.status == 202
        assert json.loads(accepted.text or "") == {"draining": True, "grace": 25.0}
    assert len(calls) == 2


def test_drain_is_the_dequeuers_alone() -> None:
    """The enqueuer's admin port has no /drain: Kubernetes already stops it after its API."""

    def posts(app: web.Application) -> set[str]:
        return {
            r.resource.canonical for r in app.router.routes() if r.method == "POST" and r.resource
        }

    assert posts(admin_app(lambda: {}, CollectorRegistry())) == set()
    assert posts(admin_app(lambda: {}, CollectorRegistry(), lambda: 1.0)) == {"/drain"}


async def test_a_crash_in_an_admin_handler_is_a_json_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def readiness() -> dict[str, bool]:
        raise KeyError("a defect")

    app = admin_app(readiness, CollectorRegistry())
    with caplog.at_level(logging.ERROR, logger="shared.admin"):
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/readyz")
            body = await response.json()
    assert response.status == 500
    assert response.headers["X-ProxyMQ-Error"] == "internal_error"
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert body == {
        "error": {
            "code": "internal_error",
            "message": "GET /readyz failed unexpectedly; the sidecar's log has the details",
        }
    }
    crashed = [r for r in caplog.records if r.exc_info and r.name == "shared.admin"]
    assert len(crashed) == 1 and "a defect" in caplog.text
