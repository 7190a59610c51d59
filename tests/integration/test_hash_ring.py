"""A key keeps its partition when RabbitMQ rebuilt the consistent hash ring in its own order.

A broker restart does two things the tests here do by hand: it binds the partitions again in
an order of its own (here: p0 unbound and bound again, so it comes last) and it forgets the
transient marker `S.ring`. Which partition a key reaches is read off the broker: one message
per key published to the exchange, then fetched back from the partition queues. The restart
itself, under load, is `tests/reliability/test_broker_restart.py`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from shared import hash_ring, topology
from tests.conftest import AMQP_URL, Stack
from tests.target import Target
from tests.test_cli import proxymq

pytestmark = pytest.mark.rabbit
PARTITIONS = 4
KEYS = [f"key-{i}" for i in range(40)]


async def partitions_of(connection: AbstractRobustConnection, service: str) -> dict[str, int]:
    """Key -> the partition the exchange routes it to, as the broker does it right now: a
    message per key, consumed back from the partitions (no basic.get on these queues)."""
    channel = await connection.channel()
    found: dict[str, int] = {}
    complete = asyncio.Event()
    try:
        names = topology.Topology(service, PARTITIONS).queues
        queues = [await channel.get_queue(name) for name in names]
        for queue in queues:
            await queue.purge()
        for index, queue in enumerate(queues):

            async def take(message: AbstractIncomingMessage, index: int = index) -> None:
                await message.ack()
                found[message.body.decode()] = index
                if len(found) == len(KEYS):
                    complete.set()

            await queue.consume(take)
        exchange = await channel.get_exchange(service)
        for key in KEYS:
            await exchange.publish(aio_pika.Message(key.encode()), routing_key=key)
        await asyncio.wait_for(complete.wait(), 10)
        return found
    finally:
        await channel.close()


async def scramble(connection: AbstractRobustConnection, service: str) -> None:
    """What a broker restart does: another order of the partitions, and no marker."""
    channel = await connection.channel()
    try:
        first = await channel.get_queue(topology.partition_queue(service, 0))
        await first.unbind(service, routing_key="1")
        await first.bind(service, routing_key="1")
        await channel.exchange_delete(topology.ring_marker(service))
    finally:
        await channel.close()


async def ctl(*args: str) -> None:
    await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", *args], check=True)


@pytest.fixture
async def moved(amqp: AbstractRobustConnection, service: str) -> dict[str, int]:
    """A layout whose ring was scrambled; returns the key -> partition map from before."""
    await topology.declare(amqp, topology.Topology(service, PARTITIONS))
    before = await partitions_of(amqp, service)
    await scramble(amqp, service)
    after = await partitions_of(amqp, service)
    assert after != before, "the scramble moved no key: the tests below would prove nothing"
    return before


async def test_the_enqueuer_puts_the_ring_back_before_it_publishes(
    stack: Stack,
    service: str,
    amqp: AbstractRobustConnection,
    http: aiohttp.ClientSession,
    moved: dict[str, int],
) -> None:
    _, url = await stack.enqueuer()
    async with http.post(
        f"{url}/{service}/x", headers={"Prefer": "respond-async", "X-Partition-Key": KEYS[0]}
    ) as response:
        assert response.status == 202
    assert await topology.exchange_exists(amqp, topology.ring_marker(service))
    assert await partitions_of(amqp, service) == moved
    assert f"bound the {PARTITIONS} partitions of service {service}" in stack.log_text()


async def test_a_starting_dequeuer_puts_the_ring_back(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
    moved: dict[str, int],
) -> None:
    await stack.dequeuer(service, target.url, "--partitions", str(PARTITIONS))
    await asyncio.to_thread(stack.stop)  # it would consume the probes
    assert await partitions_of(amqp, service) == moved


async def test_the_ring_is_rebuilt_once_when_sidecars_find_it_together(
    service: str, amqp: AbstractRobustConnection, moved: dict[str, int]
) -> None:
    """Four connections (four sidecars) find the marker missing at once: the broker's lock
    lets one of them rebuild; the others wait for it and then find the marker."""
    connections = [await aio_pika.connect(AMQP_URL) for _ in range(4)]
    try:
        rebuilt = await asyncio.gather(*(hash_ring.ensure(c, service) for c in connections))
    finally:
        for connection in connections:
            await connection.close()
    assert sorted(rebuilt) == [False, False, False, True]
    assert await partitions_of(amqp, service) == moved
    assert not await topology.queue_exists(amqp, topology.ring_lock(service))


async def test_a_sidecar_not_allowed_to_bind_goes_on_without_the_ring(
    service: str, amqp: AbstractRobustConnection, moved: dict[str, int]
) -> None:
    """Rebuilding needs the right to configure and bind; a user without it is told in the log
    and keeps publishing (availability first) rather than failing every call."""
    user, password = f"ring-{service}", "ring-test"
    await ctl("add_user", user, password)
    try:
        await ctl("set_permissions", "-p", "/", user, "^$", "^$", ".*")  # read only
        connection = await aio_pika.connect(f"amqp://{user}:{password}@127.0.0.1:5672/")
        try:
            assert await hash_ring.ensure(connection, service) is False
        finally:
            await connection.close()
    finally:
        await ctl("delete_user", user)
    assert await partitions_of(amqp, service) != moved  # nothing was changed


async def test_a_rebuild_cut_short_by_its_sidecars_death_is_finished_by_the_next(
    service: str, amqp: AbstractRobustConnection, moved: dict[str, int]
) -> None:
    """A sidecar dies holding the lock, half way through unbinding: the broker drops the lock
    with its connection, and the sidecar waiting for it rebuilds the whole ring."""
    dying = await aio_pika.connect(AMQP_URL)
    channel = await dying.channel()
    await channel.declare_queue(topology.ring_lock(service), exclusive=True)
    half = await channel.get_queue(topology.partition_queue(service, 1))
    await half.unbind(service, routing_key="1")
    waiting = await aio_pika.connect(AMQP_URL)
    try:
        ensured = asyncio.create_task(hash_ring.ensure(waiting, service))
        await asyncio.sleep(1)
        assert not ensured.done(), "it did not wait for the lock"
        await dying.close()
        assert await asyncio.wait_for(ensured, 10) is True
    finally:
        await waiting.close()
    assert await partitions_of(amqp, service) == moved


async def test_a_held_ring_lock_holds_up_its_service_only(
    stack: Stack,
    service: str,
    amqp: AbstractRobustConnection,
    http: aiohttp.ClientSession,
    moved: dict[str, int],
) -> None:
    """While another sidecar rebuilds one service's ring, the enqueuer's calls to it wait; calls
    to another service go on."""
    other = f"{service}-b"
    await topology.declare(amqp, topology.Topology(other, 2))
    holder = await aio_pika.connect(AMQP_URL)
    try:
        channel = await holder.channel()
        await channel.declare_queue(topology.ring_lock(service), exclusive=True)
        _, url = await stack.enqueuer()
        asynchronous = {"Prefer": "respond-async"}
        waiting = asyncio.create_task(http.post(f"{url}/{service}/x", headers=asynchronous))
        async with asyncio.timeout(5):
            async with http.post(f"{url}/{other}/x", headers=asynchronous) as response:
                assert response.status == 202
        assert not waiting.done(), "the call did not wait for the ring"
        await holder.close()
        async with asyncio.timeout(10):
            async with await waiting as response:
                assert response.status == 202
    finally:
        await holder.close()
        await topology.delete(amqp, topology.Topology(other, 2))
    assert await partitions_of(amqp, service) == moved


async def test_a_reconnecting_dequeuer_binds_only_under_the_ring_lock(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
) -> None:
    """A bind racing a rebuild can leave a partition out of the broker's ring (seen: three
    buckets for four partitions), so a dequeuer's robust channels must not bind the queues
    they restore after a reconnect; the dequeuer binds under the lock instead."""
    await stack.dequeuer(service, target.url, "--partitions", str(PARTITIONS))
    holder = await aio_pika.connect(AMQP_URL)
    try:
        channel = await holder.channel()
        await channel.declare_queue(topology.ring_lock(service), exclusive=True)
        first = await channel.get_queue(topology.partition_queue(service, 0))
        await first.unbind(service, routing_key="1")
        assert await close_connections(f"proxymq-dequeuer {service} ") == 1
        await asyncio.sleep(3)  # reconnected (after 1 s) and restored its channels
        assert not await bound(service, 0), "bound by a restored channel, outside the lock"
        await holder.close()
        async with asyncio.timeout(10):
            while not await bound(service, 0):
                await asyncio.sleep(0.2)
    finally:
        await holder.close()


async def close_connections(prefix: str) -> int:
    """Close, through the management API, the connections whose name starts with `prefix`
    (listed there a few seconds after they open)."""
    api = "http://127.0.0.1:15672/api/connections"
    guest = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
    names: list[str] = []
    async with aiohttp.ClientSession(headers=guest) as http, asyncio.timeout(15):
        while not names:
            await asyncio.sleep(0.5)
            async with http.get(api) as response:
                listed = await response.json()
            names = [c["name"] for c in listed if _name(c).startswith(prefix)]
        for name in names:
            async with http.delete(f"{api}/{quote(name, safe='')}") as response:
                assert response.status == 204, await response.text()
    return len(names)


def _name(connection: dict[str, Any]) -> str:
    return str((connection.get("client_properties") or {}).get("connection_name", ""))


async def bound(service: str, index: int) -> bool:
    done = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "list_bindings", "source_name", "destination_name"],
        capture_output=True,
        text=True,
        check=True,
    )
    return f"{service}\t{topology.partition_queue(service, index)}" in done.stdout


async def test_the_dequeuers_watch_binds_a_partition_that_lost_its_binding(
    service: str, amqp: AbstractRobustConnection
) -> None:
    """A partition queue deleted and declared again by its consumer's robust channel comes
    back unbound; the dequeuer's watch (`hash_ring.keep`) binds it at its next round."""
    layout = topology.Topology(service, PARTITIONS)
    await topology.declare(amqp, layout)
    channel = await amqp.channel()
    await channel.queue_delete(topology.partition_queue(service, 1))
    await topology.declare_partition(channel, layout, topology.partition_queue(service, 1))
    assert not await bound(service, 1)
    watch = asyncio.create_task(
        hash_ring.keep(amqp, service, layout.queues, asyncio.Event(), interval=0.2)
    )
    try:
        async with asyncio.timeout(10):
            while not await bound(service, 1):
                await asyncio.sleep(0.2)
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


async def test_a_dlq_replay_puts_the_ring_back_before_it_publishes(
    service: str, amqp: AbstractRobustConnection, moved: dict[str, int]
) -> None:
    replay = await proxymq("dlq", "replay", "--service", service, "--yes")
    assert replay.code == 0, replay.output
    assert await partitions_of(amqp, service) == moved


async def test_a_key_reaches_the_same_partition_from_the_enqueuer_as_from_any_client(
    stack: Stack, service: str, amqp: AbstractRobustConnection, http: aiohttp.ClientSession
) -> None:
    """The contract: a client publishing to `S` with the key as routing key gets the same
    partitioning as the enqueuer."""
    await topology.declare(amqp, topology.Topology(service, PARTITIONS))
    foreign = await partitions_of(amqp, service)
    _, url = await stack.enqueuer()
    channel = await amqp.channel()
    found: dict[str, int] = {}
    complete = asyncio.Event()
    try:
        for index, name in enumerate(topology.Topology(service, PARTITIONS).queues):

            async def take(message: AbstractIncomingMessage, index: int = index) -> None:
                await message.ack()
                found[str(message.headers["x-proxymq-partition-key"])] = index
                if len(found) == len(KEYS):
                    complete.set()

            await (await channel.get_queue(name)).consume(take)
        for key in KEYS:
            async with http.post(
                f"{url}/{service}/x", headers={"Prefer": "respond-async", "X-Partition-Key": key}
            ) as response:
                assert response.status == 202
        await asyncio.wait_for(complete.wait(), 10)
    finally:
        await channel.close()
    assert found == foreign
    assert len(set(found.values())) == PARTITIONS  # the keys were spread: the check means something
