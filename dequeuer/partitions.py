"""This dequeuer's consumers on its partitions, taken and given up one at a time.

Each partition is consumed on a channel of its own so it can be given up alone. Giving up is
always: stop starting requests from it, finish those already started, then CLOSE the channel.
Never a basic.cancel first: on RabbitMQ 3.10 a cancel with unacked messages activates the next
single active consumer at once, and two consumers would run one partition side by side. A close
returns the held, unstarted messages first and in order, then activates the next consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from shared.broker import being_cancelled
from shared.topology import Topology, declare_partition

log = logging.getLogger(__name__)


class Subscription:
    """One partition consumed by this process; `releasing` makes its held messages wait."""

    def __init__(self, index: int, queue: str, channel: AbstractChannel) -> None:
        self.index = index
        self.queue = queue
        self.channel = channel
        self.releasing = asyncio.Event()
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def job_added(self) -> None:
        self._pending += 1
        self._idle.clear()

    def job_done(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()

    @property
    def pending(self) -> int:
        return self._pending

    async def drained(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False


OnMessage = Callable[[Subscription, AbstractIncomingMessage], Awaitable[None]]


class Partitions:
    """Moves this process's subscriptions towards the wanted set, one partition at a time, in
    the background; `want()` never waits for a handover."""

    def __init__(
        self,
        topology: Topology,
        prefetch: int,
        on_message: OnMessage,
        *,
        grace: float,
        on_handover: Callable[[], None] = lambda: None,
    ) -> None:
        self.topology = topology
        self.prefetch = prefetch
        self.on_message = on_message
        self.grace = grace
        self._stopping = False
        self.on_handover = on_handover
        self.subscriptions: dict[int, Subscription] = {}
        self._releasing: dict[int, asyncio.Task[None]] = {}
        self._wanted: frozenset[int] = frozenset()
        self._wake = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        self._task = asyncio.create_task(self._reconcile(), name="partition reconcile")

    @property
    def owned(self) -> frozenset[int]:
        """Partitions subscribed and not being given up. Whether the broker made this process
        their active consumer is not signalled by AMQP; see `proxymq status` for that."""
        return frozenset(i for i, s in self.subscriptions.items() if not s.releasing.is_set())

    def want(self, partitions: frozenset[int]) -> None:
        self._wanted = partitions
        self._wake.set()

    async def _reconcile(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            wanted = self._wanted
            for index in sorted(set(self.subscriptions) - wanted - set(self._releasing)):
                task = asyncio.create_task(self._release(index))
                self._releasing[index] = task
            for index in sorted(wanted - set(self.subscriptions)):
                try:
                    await self._subscribe(index)
                except (Exception, asyncio.CancelledError) as exc:
                    if being_cancelled():
                        raise
                    reason = str(exc) or "connection lost"
                    log.warning("could not subscribe to partition %d: %s; retrying", index, reason)
                    await asyncio.sleep(1)
                    self._wake.set()

    async def _subscribe(self, index: int) -> None:
        """A subscription cut off by a lost connection is closed, not left half made: aiormq
        fails the pending step with CancelledError, and that used to end `_reconcile` for good
        (no partition taken or given up again, and SIGTERM waited for ever on the handover)."""
        assert self._connection is not None
        name = self.topology.queues[index]
        channel = await self._connection.channel()
        try:
            await channel.set_qos(prefetch_count=self.prefetch)
            # Not bound here: a robust channel binds its queues again when it is restored, and
            # a bind racing the ring's rebuild by another sidecar left a partition out of the
            # ring or ahead of the others. Bindings are `hash_ring`'s alone.
            queue = await declare_partition(channel, self.topology, name)
            subscription = Subscription(index, name, channel)
            await queue.consume(partial(self.on_message, subscription))
        except BaseException:
            if not self._stopping:  # at exit, left to the connection's close, as in `_release`
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await channel.close()
            raise
        self.subscriptions[index] = subscription
        log.info("subscribed to %s", name)

    async def _release(self, index: int) -> None:
        subscription = self.subscriptions[index]
        subscription.releasing.set()
        try:
            if not await subscription.drained(self.grace):
                log.warning(
                    "%s: %d requests unfinished after %.0f s; they will be delivered again",
                    subscription.queue,
                    subscription.pending,
                    self.grace,
                )
            if not self._stopping:  # at exit, the connection's close returns them all at once
                with contextlib.suppress(Exception):
                    await subscription.channel.close()
            log.info("released %s", subscription.queue)
            self.on_handover()
        finally:
            del self.subscriptions[index]
            del self._releasing[index]
            self._wake.set()

    async def release_all(self) -> None:
        """For a graceful stop: every partition given up in parallel, each after its drain.

        The task that moves subscriptions stops first: given up by it, the partitions waited
        for any subscribe it was in, and one into a broker gone silent ended only when the
        heartbeats gave the connection up (48 s by default), past the grace. The channels are
        left to the connection's close, which follows: each closed on its own first, a broker
        gone silent held the stop 2 s more for each (`closed_within`)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for index in self.subscriptions.keys() - self._releasing.keys():
            self._releasing[index] = asyncio.create_task(self._release(index))
        await asyncio.gather(*self._releasing.values(), return_exceptions=True)
