"""`--ordering`: one request at a time per key (keys in parallel), per partition, or none."""

from __future__ import annotations

import asyncio
import random

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection

from shared import envelope, topology
from tests.conftest import Stack
from tests.target import Target

pytestmark = pytest.mark.rabbit
KEYS, PER_KEY = 20, 10


async def send_keyed(http: aiohttp.ClientSession, url: str, sleep: float = 0.01) -> None:
    """Each key's requests are sent in order, async, so they all wait in the queue together."""
    for seq in range(PER_KEY):
        keys = list(range(KEYS))
        random.shuffle(keys)
        for key in keys:
            async with http.post(
                f"{url}/keyed/k{key}/{seq}?sleep={sleep}",
                headers={"X-Partition-Key": f"k{key}", "Prefer": "respond-async"},
            ) as response:
                assert response.status == 202


async def wait_all(target: Target, total: int) -> None:
    async with asyncio.timeout(30):
        while sum(len(v) for v in target.order.values()) < total:
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("ordering", ["key", "partition"])
async def test_order_per_key(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
    ordering: str,
) -> None:
    """All requests wait in the queues before the dequeuer starts, so keys of one partition are
    there to run side by side however slowly they were sent."""
    await topology.declare(amqp, topology.Topology(service, 4))
    _, url = await stack.enqueuer()
    await send_keyed(http, f"{url}/{service}")
    await stack.dequeuer(
        service, target.url, "--ordering", ordering, "--partitions", "4", "--concurrency", "16"
    )
    await wait_all(target, KEYS * PER_KEY)
    for key, seqs in target.order.items():
        assert seqs == list(range(PER_KEY)), key
    assert target.max_in_flight_per_key == 1
    if ordering == "key":
        assert target.max_in_flight > 4  # keys of one partition ran side by side
    else:
        assert target.max_in_flight <= 4  # one per partition


async def test_ordering_none_runs_a_key_in_parallel(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    _, url = await stack.enqueuer()
    await stack.dequeuer(service, target.url, "--ordering", "none", "--partitions", "2")
    await send_keyed(http, f"{url}/{service}", sleep=0.05)
    await wait_all(target, KEYS * PER_KEY)
    assert target.max_in_flight_per_key > 1


async def test_a_foreign_publishers_routing_key_is_its_partition_key(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
) -> None:
    """message-format.md: the routing key is the partition key, `x-proxymq-partition-key` is
    only kept for replays. A client that sends no such header still gets one at a time per key;
    its requests of one key used to run side by side, out of order."""
    await topology.declare(amqp, topology.Topology(service, 2))
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(service)
    for seq in range(PER_KEY):
        await exchange.publish(
            aio_pika.Message(
                b"",
                headers={envelope.H_PATH: f"/keyed/k/{seq}", envelope.H_QUERY: "sleep=0.05"},
                correlation_id=f"r{seq}",
            ),
            routing_key="k",
        )
    await stack.dequeuer(service, target.url, "--partitions", "2")
    await wait_all(target, PER_KEY)
    assert target.order["k"] == list(range(PER_KEY))
    assert target.max_in_flight_per_key == 1
    await channel.close()
