"""A poison message: one that keeps coming back (it crashes whoever takes it) is dead-lettered by
RabbitMQ at the delivery limit, and its caller gets 502 service_failed at once."""

from __future__ import annotations

import asyncio
import time
from functools import partial

import aiohttp
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from shared import topology
from tests.conftest import Stack, metric

pytestmark = pytest.mark.rabbit


async def test_delivery_limit_answers_the_caller(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    await topology.declare(amqp, topology.Topology(service, delivery_limit=2))
    _, url = await stack.enqueuer()
    # A "dequeuer" that crashes on every delivery: its message comes back until the limit.
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=1)
    queues = [
        await channel.declare_queue(name, passive=True)
        for name in topology.Topology(service).queues
    ]
    deliveries: list[int] = []
    crashed_in: set[str] = set()

    async def crash(queue: str, message: AbstractIncomingMessage) -> None:
        deliveries.append(int(message.headers.get("x-delivery-count", 0) or 0))  # type: ignore[arg-type]
        crashed_in.add(queue)
        await message.nack(requeue=True)

    for queue in queues:
        await queue.consume(partial(crash, queue.name))
    # The real dequeuer's microservice never gets ready: it only answers dead-letter notices.
    dequeuer = await stack.dequeuer(
        service, "http://127.0.0.1:1", "--delivery-limit", "2", wait=False
    )
    started = time.monotonic()
    async with http.get(
        f"{url}/{service}/poison", headers={"X-Partition-Key": "p", "X-Request-Timeout": "20"}
    ) as resp:
        assert resp.status == 502
        assert resp.headers["X-ProxyMQ-Error"] == "service_failed"
        assert "delivery_limit" in (await resp.json())["error"]["message"]
    assert time.monotonic() - started < 10
    assert len(deliveries) == 3
    [partition] = crashed_in  # counted against the partition it died in, as the others are
    admin = dequeuer.admin_port  # type: ignore[attr-defined]
    counted = {"outcome": "dead_lettered", "partition": partition}
    assert await metric(http, admin, "proxymq_dequeuer_messages_total", counted) == 1
    dlq = await channel.declare_queue(topology.dead_letter_queue(service), passive=True)
    for _ in range(20):
        dead = await dlq.get(fail=False)
        if dead is not None:
            break
        await asyncio.sleep(0.1)
    assert dead is not None
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    await dead.ack()
