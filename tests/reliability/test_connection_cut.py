"""Connections cut without a clean close, through a proxy between the sidecars and the broker:
an RST on every connection (a host crashed, a firewall reset) and a black hole (every packet
dropped, new connections too, no FIN, no RST). The first is seen at once; the second only by
AMQP heartbeats (`--amqp-heartbeat 1` here, so about 6 s) and by connection attempts that must
give up instead of waiting forever. Both sidecars recover by themselves once the path heals.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from shared.cli.cluster import LocalCluster
from tests.conftest import Stack, metric
from tests.reliability.proxy import FaultyProxy
from tests.reliability.support import (
    TimedTarget,
    Traffic,
    report,
    running,
    summary,
    verify,
    wait_recovered,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.reliability]
HEARTBEAT = 1  # seconds; aiormq gives a silent connection up after (1 + 1) * 3 = 6 s
BLACKHOLE = 8.0  # seconds the path drops everything: past heartbeat detection
# After the heal: the attempt under way is given up (CONNECT_TIMEOUT, 10 s), the next one
# connects, and the enqueuer's breaker may still be open for up to --breaker-reset (5 s).
RECOVERY_BOUND = 20.0


@pytest.fixture
async def proxy(node: LocalCluster) -> AsyncIterator[FaultyProxy]:
    running_proxy = await FaultyProxy(node.nodes[0].port).start()
    yield running_proxy
    await running_proxy.stop()


async def test_reset_and_black_hole_under_load(
    proxy: FaultyProxy,
    stacks: Callable[[str], Stack],
    service: str,
    timed_target: TimedTarget,
    client: aiohttp.ClientSession,
) -> None:
    stack = stacks(proxy.url)
    beat = ("--amqp-heartbeat", str(HEARTBEAT))
    dequeuer = await stack.dequeuer(service, timed_target.url, "--partitions", "4", *beat)
    enqueuer, base = await stack.enqueuer(*beat)
    ports = [p.admin_port for p in (enqueuer, dequeuer)]  # type: ignore[attr-defined]
    traffic = Traffic(f"{base}/{service}")
    timings: dict[str, dict[str, float]] = {}
    async with running(traffic, client):
        await asyncio.sleep(2)
        cut = time.monotonic()
        assert proxy.reset() >= 2
        timings["reset"] = {"recovery_s": round(await wait_recovered(traffic, cut, 15), 2)}
        await asyncio.sleep(2)
        await traffic.backlog(client, keys=4, per_key=6, work=0.5)
        cut = time.monotonic()
        assert proxy.blackhole() >= 2
        await asyncio.sleep(BLACKHOLE)
        proxy.heal()
        healed = time.monotonic()
        recovered = await wait_recovered(traffic, healed, RECOVERY_BOUND)
        timings["black hole"] = {
            "silent_s": round(healed - cut, 2),
            "recovery_after_heal_s": round(recovered, 2),
        }
        await asyncio.sleep(2)
    verdict = await verify(traffic, timed_target, client)
    reconnects = [await metric(client, port, "proxymq_broker_reconnects_total") for port in ports]
    report(
        "connection cut",
        {
            **verdict.figures,
            "timings": timings,
            "recovery_s": summary(
                [timings["reset"]["recovery_s"], timings["black hole"]["recovery_after_heal_s"]]
            ),
            "reconnects_per_sidecar": reconnects,
        },
    )
    verdict.check()
    assert all(r >= 2 for r in reconnects), reconnects


async def test_breaker_closes_when_the_connection_is_back(
    proxy: FaultyProxy,
    node: LocalCluster,
    stacks: Callable[[str], Stack],
    service: str,
    timed_target: TimedTarget,
    client: aiohttp.ClientSession,
) -> None:
    """Publishes that fail while the broker is unreachable open the enqueuer's breaker; once
    its connection is restored, the next call goes through, long before `--breaker-reset`."""
    stack = stacks(node.nodes[0].amqp_url())
    await stack.dequeuer(service, timed_target.url, "--partitions", "2")
    enqueuer, base = await stack.enqueuer(
        "--breaker-reset", "120", env={"PROXYMQ_AMQP_URL": proxy.url}
    )
    admin = enqueuer.admin_port  # type: ignore[attr-defined]
    url = f"{base}/{service}/echo"
    async with client.post(url, data=b"before") as response:
        assert response.status == 200
    proxy.refuse()
    assert proxy.reset() >= 1
    statuses = []
    for _ in range(20):  # each fails at once: the connection is gone
        async with client.post(url, data=b"during") as response:
            statuses.append(response.status)
            assert response.status == 503, await response.text()
        if await metric(client, admin, "proxymq_enqueuer_breaker_open") == 1:
            break
    assert await metric(client, admin, "proxymq_enqueuer_breaker_open") == 1, statuses
    proxy.heal()
    deadline = time.monotonic() + 30
    while await metric(client, admin, "proxymq_broker_reconnects_total") < 1:
        assert time.monotonic() < deadline, "the enqueuer did not reconnect"
        await asyncio.sleep(0.1)
    async with client.post(url, data=b"after") as response:
        assert response.status == 200, await response.text()
        assert base64.b64decode((await response.json())["body"]) == b"after"
    assert await metric(client, admin, "proxymq_enqueuer_breaker_open") == 0
