"""10k requests in flight at once: all accepted, memory bounded (and measured), the cap answers
429, and every accepted request is answered once a dequeuer runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection

from shared import topology
from tests.conftest import Stack, metric
from tests.target import Target

pytestmark = pytest.mark.rabbit
IN_FLIGHT = 10_000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_ten_thousand_in_flight(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    await topology.declare(amqp, topology.Topology(service))
    enqueuer, url = await stack.enqueuer("--max-in-flight", str(IN_FLIGHT), "--services", service)
    admin = enqueuer.admin_port  # type: ignore[attr-defined]
    before = rss_mib(enqueuer.pid)
    counter = iter(range(IN_FLIGHT))
    locations: list[str] = []

    async def worker() -> None:
        for i in counter:
            async with http.post(
                f"{url}/{service}/echo/{i}",
                data=b"x" * 100,
                headers={"Prefer": "respond-async", "X-Partition-Key": str(i)},
            ) as response:
                assert response.status == 202
                locations.append(response.headers["Location"])

    await asyncio.gather(*(worker() for _ in range(32)))
    assert await metric(http, admin, "proxymq_enqueuer_in_flight_requests") == IN_FLIGHT
    during = rss_mib(enqueuer.pid)
    async with http.post(f"{url}/{service}/one-more", headers={"Prefer": "respond-async"}) as r:
        assert r.status == 429
        assert r.headers["X-ProxyMQ-Error"] == "backpressure"
        assert r.headers["Retry-After"]
    print(f"enqueuer RSS {before:.1f} MiB idle, {during:.1f} MiB with {IN_FLIGHT} in flight")
    assert during - before < 150, "memory per request in flight is out of bounds"

    await stack.dequeuer(service, target.url)
    async with asyncio.timeout(120):
        while await metric(http, admin, "proxymq_enqueuer_in_flight_requests") > 0:
            await asyncio.sleep(0.5)
    assert len(target.seen) == IN_FLIGHT
    assert {s.path for s in target.seen} == {f"/echo/{i}" for i in range(IN_FLIGHT)}
    for location in locations[:: IN_FLIGHT // 50]:
        async with http.get(url + location) as response:
            assert response.status == 200
