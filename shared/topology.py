"""Names and typed specs of a service's RabbitMQ objects, and their idempotent declaration.

Per service `S`: exchange `S` (x-consistent-hash, the partition key is the routing key), quorum
queues `S.p0..S.p{N-1}` (single active consumer, delivery limit, dead-letter to `S.dlq`) and the
quorum queue `S.dlq`; `hash_ring` keeps the exchange's ring in partition order. Every name is
built here, so that one anchored pattern (`partition_pattern`) matches a service's partitions and
nothing else: not `S.dlq`, not another service's queues.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Literal, TypedDict

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from pamqp.common import FieldTable

from shared import hash_ring
from shared.broker import closed_within
from shared.errors import QueueInUse, TopologyMismatch, clipped

log = logging.getLogger(__name__)

_SERVICE = r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}"
SERVICE_NAME = re.compile(rf"^{_SERVICE}$")
# Any service's queues that ProxyMQ reads (requests, dead letters, heartbeats) or holds as a
# lock: never a reply queue, whatever a request's `reply_to` says.
SERVICE_QUEUE = re.compile(rf"^{_SERVICE}\.(?:p\d+|dlq|notify|ring-lock|members\..+)$")
# Quorum, like the partitions: a classic durable queue lives on one node, and while that node
# is down every dequeuer fails to declare it again and cannot reconnect at all. The TTL: no
# caller waits longer than that.
NOTIFY_ARGS: FieldTable = {"x-queue-type": "quorum", "x-message-ttl": 3_600_000}
DELETE_GAP = 8  # partitions missing in a row after which `delete` stops looking
LAYOUT_CHECKS, LAYOUT_CHECK_PAUSE = 10, 0.3
PLUGIN_HINT = "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"
REPLY_QUEUE_PREFIX = "proxymq.replies."


def check_service_name(service: str) -> str:
    """Dots are refused so that `S.p<N>` can never be another service's name plus a suffix."""
    if not SERVICE_NAME.fullmatch(service):
        raise ValueError(
            f"{clipped(service)!r} is not a service name: use letters, digits, '-' and '_' "
            "(at most 100)"
        )
    return service


def exchange_name(service: str) -> str:
    return service


def partition_queue(service: str, index: int) -> str:
    return f"{service}.p{index}"


def dead_letter_queue(service: str) -> str:
    return f"{service}.dlq"


def dead_letter_exchange(service: str) -> str:
    """Fanout: what the broker dead-letters reaches both `S.dlq` and `S.notify`."""
    return f"{service}.dead"


def reply_queue(instance_id: str) -> str:
    return f"{REPLY_QUEUE_PREFIX}{instance_id}"


def lease_queue(reply_queue: str) -> str:
    """An empty queue beside an enqueuer's reply queue, declared every 2 s with a 10-minute
    `x-expires`: it outlives a reply queue that expired (its enqueuer gone, or cut off for a
    minute), and goes with one a broker restart or the loss of its node takes."""
    return f"{reply_queue}.lease"


def notify_queue(service: str) -> str:
    """Dead letters the broker made itself (delivery limit), so a dequeuer answers their waiting
    callers with 502 at once instead of leaving them to time out."""
    return f"{service}.notify"


def members_exchange(service: str) -> str:
    """Fanout exchange of the dequeuers' membership heartbeats."""
    return f"{service}.members"


def members_queue(service: str, instance_id: str) -> str:
    """A dequeuer's heartbeat queue, named after its id (letters, digits and - _ . : @ # , / +).
    A pod name (up to 253) beside a long service name is over AMQP's 255 bytes: such a name
    keeps what fits and ends with the digest of the whole id, so that two ids are two queues."""
    name = f"{members_exchange(service)}.{instance_id}"
    if len(name) <= 255:
        return name
    return f"{name[:190]}.{hashlib.sha256(instance_id.encode()).hexdigest()}"


def ring_marker(service: str) -> str:
    """Transient exchange that exists while the hash ring is in partition order (`hash_ring`)."""
    return f"{service}.ring"


def ring_lock(service: str) -> str:
    """Exclusive queue held by the one sidecar binding the partitions (`hash_ring`)."""
    return f"{service}.ring-lock"


def partition_pattern(service: str) -> str:
    """The regex KEDA and `proxymq status` use to find exactly this service's partitions.

    Case-sensitive even where it is read as caseless: the management API filters queue names
    with `re:run(Name, Regex, [caseless])`, and `^S\\.p\\d+$` alone also matched the
    partitions of a service named S in other capitals."""
    return rf"(?-i:^{re.escape(service)}\.p\d+$)"


class QuorumQueueArgs(TypedDict, total=False):
    """The `x-` arguments a partition or dead-letter queue is declared with."""

    x_queue_type: Literal["quorum"]
    x_single_active_consumer: bool
    x_delivery_limit: int
    x_dead_letter_exchange: str
    x_dead_letter_strategy: Literal["at-most-once", "at-least-once"]
    x_overflow: Literal["drop-head", "reject-publish"]
    x_max_length: int


def _amqp_args(args: QuorumQueueArgs) -> FieldTable:
    return {key.replace("_", "-"): value for key, value in args.items()}  # type: ignore[misc]


MAX_PARTITIONS = 1024
INT64_MAX = 2**63 - 1  # the largest integer an AMQP table (a queue argument) carries


@dataclass(frozen=True)
class Topology:
    """One service's layout. `delivery_limit` is generous on purpose: on RabbitMQ 3.10 every
    channel close over a prefetched message counts as a delivery (see docs/architecture.md)."""

    service: str
    partitions: int = 8
    delivery_limit: int = 20
    max_length: int | None = None

    def __post_init__(self) -> None:
        check_service_name(self.service)
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ValueError(
                f"partitions must be between 1 and {MAX_PARTITIONS}, not {self.partitions}"
            )

    @property
    def exchange(self) -> str:
        return exchange_name(self.service)

    @property
    def queues(self) -> list[str]:
        return [partition_queue(self.service, i) for i in range(self.partitions)]

    @property
    def dead_letters(self) -> str:
        return dead_letter_queue(self.service)

    def partition_args(self) -> QuorumQueueArgs:
        args: QuorumQueueArgs = {
            "x_queue_type": "quorum",
            "x_single_active_consumer": True,
            "x_delivery_limit": self.delivery_limit,
            "x_dead_letter_exchange": dead_letter_exchange(self.service),
            "x_dead_letter_strategy": "at-least-once",
            "x_overflow": "reject-publish",
        }
        if self.max_length is not None:
            args["x_max_length"] = self.max_length
        return args

    def dead_letter_args(self) -> QuorumQueueArgs:
        return {"x_queue_type": "quorum"}


async def queue_exists(connection: AbstractConnection, name: str) -> bool:
    return await _exists(connection, name, exchange=False)


async def exchange_exists(connection: AbstractConnection, name: str) -> bool:
    return await _exists(connection, name, exchange=True)


async def plain_channel(connection: AbstractConnection) -> aiormq.abc.AbstractChannel:
    """A channel for passive declares, which the broker closes when the object is missing: a
    plain AMQP one, not aio-pika's. aio-pika reopens a robust channel the broker closed, and
    keeps it: each lookup of a service that did not exist left one more channel open, until
    the connection reached the broker's channel_max (2,047) and never came back."""
    if connection.transport is None:
        raise ConnectionError("not connected to RabbitMQ")
    return await connection.transport.connection.channel()


async def close_plain(channel: aiormq.abc.AbstractChannel) -> None:
    """Closed to the end even when its caller is cancelled (a timeout, a watch stopped): a
    close cut short let the next channel take its number while the broker still held it open,
    and the broker closed the whole connection ("second 'channel.open' seen")."""
    if not channel.is_closed:
        await asyncio.shield(channel.close())


async def claim(queue: AbstractQueue, linger: float, hint: str) -> None:
    """Wait until no one else consumes `queue`, a queue named after this instance: a second
    process started with the same instance id would share it and take half of what is meant
    for the first, silently. The consumer of a process that just died may linger until the
    broker misses its heartbeats, so it is given `linger` seconds to go before this gives up."""
    give_up_at = time.monotonic() + linger
    while (others := queue.declaration_result.consumer_count or 0) > 0:
        if time.monotonic() >= give_up_at:
            raise in_use(queue.name, others, hint)
        log.warning("%s has %d other consumer(s); waiting", queue.name, others)
        await asyncio.sleep(1)
        await queue.declare()


async def alone(queue: AbstractQueue, hint: str) -> None:
    """After consuming `queue`: a process started with the same instance id at the same
    instant found it unconsumed too (`claim` looks before the consumer is there), and both
    consumed it. Each then sees the other, and stops; started again, one of them serves."""
    await queue.declare()
    others = (queue.declaration_result.consumer_count or 0) - 1
    if others > 0:
        raise in_use(queue.name, others, hint)


def in_use(queue: str, others: int, hint: str) -> QueueInUse:
    return QueueInUse(f"another process consumes {queue} ({others} consumer(s)): {hint}")


async def _exists(connection: AbstractConnection, name: str, *, exchange: bool) -> bool:
    """A passive declare on a plain channel of its own (`plain_channel`)."""
    channel = await plain_channel(connection)
    try:
        if exchange:
            await channel.exchange_declare(name, passive=True)
        else:
            await channel.queue_declare(name, passive=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        await close_plain(channel)


async def check_layout(connection: AbstractConnection, topology: Topology) -> None:
    """Refuse to add a second layout beside an existing one: consistent hashing over another
    partition count would send a key's next requests to another queue and break its order.

    A layout half there may be another dequeuer declaring it right now: it is looked at again
    for a few seconds before it counts as a mismatch."""
    n, service = topology.partitions, topology.service
    if await queue_exists(connection, partition_queue(service, n)):
        raise TopologyMismatch(
            f"service {service!r} already has more than {n} partitions "
            f"({partition_queue(service, n)} exists); start with the same --partitions "
            "or delete the old layout first (proxymq topology delete)"
        )
    for _ in range(LAYOUT_CHECKS):
        first = await queue_exists(connection, partition_queue(service, 0))
        if first == await queue_exists(connection, partition_queue(service, n - 1)):
            return
        await asyncio.sleep(LAYOUT_CHECK_PAUSE)
    missing = partition_queue(service, n - 1 if first else 0)
    raise TopologyMismatch(
        f"service {service!r} already has fewer than {n} partitions "
        f"({missing} is missing); start with the same "
        "--partitions or delete the old layout first (proxymq topology delete)"
    )


async def declare(connection: AbstractConnection, topology: Topology) -> None:
    """Declare the layout idempotently; any difference from what exists is a `TopologyMismatch`.

    It runs on a channel of its own because a refused declaration closes the channel. The
    partitions are bound last, by `hash_ring.ensure`: in order, one sidecar at a time."""
    await check_layout(connection, topology)
    channel = connection.channel()
    try:
        await channel
        dead = await channel.declare_exchange(
            dead_letter_exchange(topology.service), aio_pika.ExchangeType.FANOUT, durable=True
        )
        dlq = await channel.declare_queue(
            topology.dead_letters, durable=True, arguments=_amqp_args(topology.dead_letter_args())
        )
        await dlq.bind(dead)
        notify = await channel.declare_queue(
            notify_queue(topology.service), durable=True, arguments=NOTIFY_ARGS
        )
        await notify.bind(dead)
        await channel.declare_exchange(
            topology.exchange, aio_pika.ExchangeType.X_CONSISTENT_HASH, durable=True
        )
        for name in topology.queues:
            await declare_partition(channel, topology, name)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyMismatch(
            f"service {topology.service!r} exists with other settings than ours: {_reason(exc)}; "
            "start with the settings it was created with or delete it (proxymq topology delete)"
        ) from exc
    except aiormq.exceptions.ConnectionCommandInvalid as exc:
        raise TopologyMismatch(
            f"the broker refused exchange type x-consistent-hash ({_reason(exc)}): "
            f"run `{PLUGIN_HINT}`"
        ) from exc
    finally:  # also once lost or refused: a robust channel left so is restored, and kept
        await closed_within(channel.close())
    await hash_ring.ensure(connection, topology.service, topology.queues)


async def declare_partition(
    channel: AbstractChannel, topology: Topology, name: str
) -> AbstractQueue:
    """Consumers declare their queue again on their own channel, so a robust channel restores it."""
    return await channel.declare_queue(
        name, durable=True, arguments=_amqp_args(topology.partition_args())
    )


async def partitions_present(connection: AbstractConnection, service: str) -> list[str]:
    """Every partition queue there, whatever count it was made with: a half-deleted layout may
    miss some in between (up to DELETE_GAP in a row), p0 included."""
    names: list[str] = []
    index, missing = 0, 0
    while missing < DELETE_GAP:
        name = partition_queue(service, index)
        if await queue_exists(connection, name):
            names.append(name)
            missing = 0
        else:
            missing += 1
        index += 1
    return names


async def delete(connection: AbstractConnection, topology: Topology) -> None:
    """Remove every partition found (whatever the count it was made with), the dead letters and
    the exchange, messages included: for tests and `proxymq topology delete`."""
    names = [
        topology.dead_letters,
        notify_queue(topology.service),
        *await partitions_present(connection, topology.service),
    ]
    channel = await connection.channel()
    try:
        for name in names:
            await channel.queue_delete(name)
        await channel.exchange_delete(topology.exchange)
        await channel.exchange_delete(members_exchange(topology.service))
        await channel.exchange_delete(ring_marker(topology.service))
        await channel.exchange_delete(dead_letter_exchange(topology.service))
    finally:
        await channel.close()


def _reason(exc: aiormq.exceptions.AMQPError) -> str:
    frame = exc.args[0] if exc.args else None
    text = getattr(frame, "reply_text", None)
    return str(text or exc)
