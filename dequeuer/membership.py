"""Who serves a service right now, learned through RabbitMQ itself: no coordinator to run.

Every dequeuer publishes a heartbeat to the fanout exchange `S.members` and reads everyone's from a
queue of its own. A member not heard from within `expiry` is gone; one that says `leaving` is gone
at once, which makes a graceful scale-down hand over without waiting for the expiry. A stalled
member (GC pause, CPU starvation) is only ever taken for gone: the partition queues' single active
consumer keeps it from ever running beside its successor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from shared import topology
from shared.broker import closed_within
from shared.topology import members_exchange

log = logging.getLogger(__name__)
ONE_ID_EACH = "give each dequeuer its own --instance-id, or none for a random one"
FORGET_AFTER = 60.0  # seconds: as long as the broker keeps a gone member's heartbeat queue


@dataclass
class Member:
    last_seen: float
    available: bool
    expiry: float  # the member's own --member-expiry, which spans two of its heartbeats


class Membership:
    def __init__(
        self,
        service: str,
        instance_id: str,
        *,
        interval: float = 0.5,
        expiry: float = 2.5,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.service = service
        self.instance_id = instance_id
        self.interval = interval
        self.expiry = expiry
        self.on_change = on_change
        self.available = False
        self.leaving = False
        self._peers: dict[str, Member] = {}
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_view: frozenset[str] = frozenset()

    async def start(self, connection: AbstractRobustConnection, linger: float) -> None:
        """Heartbeats are transient and expire in the queue: a member that was away long reads
        only recent ones.

        The queue is named after the instance: a second dequeuer with the same `--instance-id`
        would read half of its heartbeats and, taking itself for the other, claim the same
        partitions (single active consumer kept the order, but one of the two sat idle). It
        stops at startup instead (`claim`)."""
        # No publisher confirms: a lost heartbeat is replaced by the next one, and the leave
        # notice of a SIGTERM must not wait for a confirm from a broker gone silent (it waited
        # until the connection was given up, and its CancelledError ended the dequeuer with a
        # traceback and exit code 1 before it had drained anything).
        channel = connection.channel(publisher_confirms=False)
        try:
            await channel
            exchange = await channel.declare_exchange(
                members_exchange(self.service), aio_pika.ExchangeType.FANOUT, durable=True
            )
            queue = await channel.declare_queue(
                topology.members_queue(self.service, self.instance_id),
                auto_delete=True,
                arguments={"x-message-ttl": int(self.expiry * 1000), "x-expires": 60_000},
            )
            await topology.claim(queue, linger, ONE_ID_EACH)
            await queue.bind(exchange)
            await queue.consume(self._on_heartbeat, no_ack=True)
            await topology.alone(queue, ONE_ID_EACH)
        except BaseException:  # closed, it is not restored with the connection
            await closed_within(channel.close())
            raise
        self._channel, self._exchange = channel, exchange
        self._task = asyncio.create_task(self._beat(), name="membership heartbeat")

    def view(self) -> frozenset[str]:
        """Available members, this one included when it is available. Members unheard for
        long are forgotten: a dequeuer killed under a random id never says it leaves, and each
        one stayed, scanned at every heartbeat, for the life of the others."""
        now = time.monotonic()
        for member in [
            member
            for member, state in self._peers.items()
            if now - state.last_seen > max(FORGET_AFTER, 2 * state.expiry)
        ]:
            del self._peers[member]
        alive = {
            member
            for member, state in self._peers.items()
            if state.available and now - state.last_seen <= state.expiry
        }
        alive.discard(self.instance_id)
        if self.available and not self.leaving:
            alive.add(self.instance_id)
        return frozenset(alive)

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        try:
            beat = json.loads(message.body)
            member, available, leaving = beat["id"], bool(beat["available"]), bool(beat["leaving"])
            if not isinstance(member, str):  # a number among the names broke every sort of them
                raise TypeError(f"member id {member!r} is no string")
            expiry = announced_expiry(beat.get("expiry"), self.expiry)
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed heartbeat on %s", members_exchange(self.service))
            return
        if member == self.instance_id:
            return
        if leaving:
            self._peers.pop(member, None)
        else:
            self._peers[member] = Member(time.monotonic(), available, expiry)
        self._check_change()

    def _check_change(self) -> None:
        view = self.view()
        if view != self._last_view:
            log.info("members of %s: %s", self.service, ", ".join(sorted(view)) or "none")
            self._last_view = view
            self.on_change()

    async def publish(self) -> None:
        if self._exchange is None:
            return
        body = json.dumps(
            {
                "id": self.instance_id,
                "available": self.available,
                "leaving": self.leaving,
                "expiry": self.expiry,
                "at": time.time(),
            }
        ).encode()
        try:
            # Not mandatory: with no queue bound (its own is declared again after a reset), a
            # heartbeat is lost as meant; returned, aiormq logged each as an ERROR.
            await self._exchange.publish(
                aio_pika.Message(body, expiration=self.expiry), routing_key="", mandatory=False
            )
        except Exception as exc:  # a heartbeat lost is retried at the next tick
            log.debug("heartbeat not sent: %s", exc)

    async def _beat(self) -> None:
        while True:
            await self.publish()
            self._check_change()
            await asyncio.sleep(self.interval)

    async def leave(self) -> None:
        """Tell the others at once, so they take over without waiting for the expiry."""
        self.leaving = True
        await self.publish()
        self._check_change()

    async def stop(self) -> None:
        """The heartbeats end; the channel goes with the connection's close, which follows."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def announced_expiry(value: object, default: float) -> float:
    """How long a member may go unheard: what it announces, since only it knows how often it
    beats. Judged by the reader's own expiry, a member beating every 3 s among dequeuers with
    the default 2.5 s (a rollout changing `--heartbeat-interval`) was taken for gone between
    its heartbeats, and partitions changed hands for ever. A member that announces nothing
    (an older dequeuer) or something unusable gets the reader's own."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value) if 0 < value < math.inf else default
