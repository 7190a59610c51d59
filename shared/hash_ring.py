"""Keeping a service's consistent hash ring in partition order, so a key keeps its partition.

RabbitMQ 3.10 keeps the ring of an `x-consistent-hash` exchange in memory only: bucket `i` goes
to the `i`-th queue bound, and when the whole broker (every node of a cluster) starts again it
binds the queues anew in an order of its own, different at each boot. Most keys then route to
another partition than before, and a key's new requests can overtake its older ones still
queued in the old partition (measured: every key of a test moved; docs/reliability.md).

So the ring is ours to put back: a transient exchange `S.ring` is declared once the ring is in
partition order. It goes away exactly when the ring is rebuilt (a full broker restart; one node
of a cluster restarting keeps both), so a sidecar that finds it missing binds the partitions
again in order, p0 first, before anything is published, which gives every key the bucket it
had before. Sidecars doing so at once take turns through an exclusive queue `S.ring-lock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Sequence

import aiormq
from aio_pika.abc import AbstractConnection

from shared import topology
from shared.broker import BROKER_ERRORS
from shared.errors import BrokerUnavailable

log = logging.getLogger(__name__)
WEIGHT = "1"  # the binding key: every partition takes one bucket of the ring
LOCK_PAUSE = 0.1  # seconds between two tries for the lock another sidecar holds
# The lock's holder finishes in well under a second, or its connection dies and the broker
# drops the exclusive queue within two heartbeats.
LOCK_WAIT = 60.0
KEEP_INTERVAL = 30.0  # seconds between two checks of a dequeuer's partitions, reconnects aside
# The broker's lock keeps other connections out, not other tasks on the one that holds it:
# a lock per connection and service does.
_turns: weakref.WeakKeyDictionary[AbstractConnection, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


async def ensure(
    connection: AbstractConnection, service: str, queues: Sequence[str] | None = None
) -> bool:
    """Make sure the ring of `service` routes in partition order; True if this call rebuilt it.

    `queues` are the partitions in order, as a dequeuer knows them: they are bound under the
    lock even when the ring is in order already, so partitions added by a layout being created
    right now are appended in order, never in between a rebuild. Without them (the enqueuer)
    the partitions present are found on the broker, and only a missing marker costs a call."""
    marker = topology.ring_marker(service)
    if queues is None and await topology.exchange_exists(connection, marker):
        return False
    async with _turns.setdefault(connection, {}).setdefault(service, asyncio.Lock()):
        return await _ensure_in_turn(connection, service, queues)


async def keep(
    connection: AbstractConnection,
    service: str,
    queues: Sequence[str],
    wake: asyncio.Event,
    interval: float = KEEP_INTERVAL,
) -> None:
    """The dequeuer's watch: `ensure` whenever `wake` is set (a reconnect: the broker may have
    started again) and every `interval` seconds, which binds a partition queue that was
    deleted and declared again by its consumer's robust channel (at the end of the ring: its
    keys move, as they did when it was deleted)."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval)
        wake.clear()
        try:
            await ensure(connection, service, queues)
        except Exception as exc:  # the next round tries again
            log.warning("could not check the hash ring of service %s: %s", service, exc)


async def _ensure_in_turn(
    connection: AbstractConnection, service: str, queues: Sequence[str] | None
) -> bool:
    marker = topology.ring_marker(service)
    give_up_at = time.monotonic() + LOCK_WAIT
    try:
        while not await _lock(connection, service):
            if queues is None and await topology.exchange_exists(connection, marker):
                return False
            if time.monotonic() >= give_up_at:
                raise BrokerUnavailable(
                    f"the hash ring of service {service!r} is being rebuilt by another "
                    f"sidecar for over {LOCK_WAIT:.0f} s",
                )
            await asyncio.sleep(LOCK_PAUSE)
        try:
            return await _settle(connection, service, queues)
        finally:
            await _unlock(connection, service)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        log.warning(
            "cannot bind the partitions of service %s (%s): after a restart of RabbitMQ its "
            "keys may route to other partitions until a sidecar allowed to bind them does it",
            service,
            exc,
        )
        return False


async def _lock(connection: AbstractConnection, service: str) -> bool:
    """An exclusive queue: the broker refuses it to every other connection while it exists,
    and drops it with the connection of a holder that dies."""
    channel = await topology.plain_channel(connection)
    try:
        await channel.queue_declare(topology.ring_lock(service), exclusive=True, auto_delete=True)
    except aiormq.exceptions.ChannelLockedResource:
        return False
    finally:
        await topology.close_plain(channel)
    return True


async def _unlock(connection: AbstractConnection, service: str) -> None:
    """On a channel of its own: a refused bind closed the one `_settle` used."""
    with contextlib.suppress(*BROKER_ERRORS):  # a lost connection took the lock with it
        channel = await topology.plain_channel(connection)
        try:
            await channel.queue_delete(topology.ring_lock(service))
        finally:
            await topology.close_plain(channel)


async def _settle(
    connection: AbstractConnection, service: str, queues: Sequence[str] | None
) -> bool:
    """Under the lock: rebuild when the marker is missing, else bind what is not bound yet."""
    marker = topology.ring_marker(service)
    in_order = await topology.exchange_exists(connection, marker)
    if in_order and queues is None:
        return False
    channel = await topology.plain_channel(connection)
    try:
        if in_order:
            for queue in queues or ():  # bound ones stay where they are; new ones are appended
                await channel.queue_bind(queue, service, routing_key=WEIGHT)
            return False
        found = queues or await topology.partitions_present(connection, service)
        await rebuild(channel, service, found)
        await channel.exchange_declare(marker, exchange_type="fanout", durable=False)
        return True
    finally:
        await topology.close_plain(channel)


async def rebuild(channel: aiormq.abc.AbstractChannel, service: str, queues: Sequence[str]) -> None:
    """Move each partition to the end of the ring in turn, p0 first: unbound, the ring closes
    up behind it; bound again, it takes the last bucket. After the last one, bucket `i` is
    partition `i`, whatever the order before.

    One at a time, so that at most one partition is out of the ring: another client's publish
    meanwhile reaches a neighbouring partition rather than being returned (the sidecars
    publish only once the marker is there). No one else may bind these queues meanwhile: on
    RabbitMQ 3.10 a bind racing the unbind of the same queue left it bound but out of the ring
    (seen: three buckets for four queues, once none), hence the lock, and no robust channel of
    ours binds a partition."""
    started = time.monotonic()
    for queue in queues:
        await channel.queue_unbind(queue, service, routing_key=WEIGHT)
        await channel.queue_bind(queue, service, routing_key=WEIGHT)
    log.info(
        "bound the %d partitions of service %s to its exchange in order, in %.0f ms: a new "
        "layout, or RabbitMQ started again and rebuilt the hash ring in an order of its own",
        len(queues),
        service,
        1000 * (time.monotonic() - started),
    )
