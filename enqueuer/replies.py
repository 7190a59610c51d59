"""The reply waiter: one reply queue per enqueuer instance and a map correlation id -> future.

Modelled on aio-pika's RPC pattern: the future's done callback removes the entry, so a reply, a
deadline and a cancelled caller all clean up the same way; the map has a cap; replies nobody waits
for are counted and dropped. Never a queue per request (4x slower, see docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Container

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection, AbstractRobustQueue
from pamqp.commands import Queue

from shared import logs, topology
from shared.broker import BROKER_ERRORS, closed_within, unless_closed
from shared.envelope import HttpResponse, MalformedMessage, decode_response
from shared.errors import Backpressure, GatewayTimeout, QueueInUse, ServiceFailed

log = logging.getLogger(__name__)
REPLY_QUEUE_EXPIRES_MS = 60_000  # survives a reconnect, gone a minute after its enqueuer
LEASE_EXPIRES_MS = 600_000  # the lease queue outlives its reply queue by nine minutes
WATCH_INTERVAL = 2.0  # seconds between checks that the reply queue is there and consumed
LOOK_TIMEOUT = 5.0  # seconds one check may take
ONE_ID_EACH = "give each enqueuer its own --instance-id, or none for a random one"


class ReplyWaiter:
    def __init__(
        self,
        instance_id: str,
        capacity: int,
        share: int,
        on_late_reply: Callable[[], None],
    ) -> None:
        self.queue_name = topology.reply_queue(instance_id)
        self.capacity = capacity
        self.share = share
        self._futures: dict[str, asyncio.Future[HttpResponse]] = {}
        self._by_service: dict[str, int] = {}  # services with replies awaited, and how many
        self._on_late_reply = on_late_reply
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractRobustQueue | None = None
        self._lease: AbstractRobustQueue | None = None
        self._consumer_tag: str | None = None
        self._watch: asyncio.Task[None] | None = None
        self._look_now = asyncio.Event()
        self._linger = 0.0  # seconds a consumer of a lost connection may still be counted
        self._reopened_at = 0.0
        self._taken: QueueInUse | None = None
        self._taken_seen = asyncio.Event()
        # The replies awaited when the connection came back; None once its first look is done.
        self._unsure: list[asyncio.Future[HttpResponse]] | None = None

    def __len__(self) -> int:
        return len(self._futures)

    async def start(self, connection: AbstractRobustConnection, linger: float) -> None:
        """Not exclusive and not auto-delete: a reply published while the connection is being
        restored waits in the queue instead of being dropped (aio-pika#679).

        So nothing but `claim` stops a second enqueuer with the same `--instance-id` from
        consuming it too: each then took about half of the other's replies, and every second
        caller got 504 with nothing in any log.

        Neither queue is restored by aio-pika: after a reconnect the watch looks whether the
        reply queue is still there before it declares it again (`_look`)."""
        channel = connection.channel()
        try:
            await channel
            await channel.set_qos(prefetch_count=0)
            queue = await channel.declare_queue(
                self.queue_name,
                durable=False,
                arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS},
                robust=False,
            )
            await topology.claim(queue, linger, ONE_ID_EACH)
            self._lease = await channel.declare_queue(
                topology.lease_queue(self.queue_name),
                durable=False,
                arguments={"x-expires": LEASE_EXPIRES_MS},
                robust=False,
            )
            self._consumer_tag = await queue.consume(self._on_reply)
            await topology.alone(queue, ONE_ID_EACH)
        except BaseException:  # closed, it is not restored with the connection: no 2nd consumer
            await closed_within(channel.close())
            raise
        channel.reopen_callbacks.add(self._reopened)
        self._connection, self._queue, self._linger = connection, queue, linger
        self._watch = asyncio.create_task(self._keep_consuming(), name="reply queue watch")

    def _reopened(self, *_: object) -> None:
        """The consumer went with the channel: a consumer of the queue now is another's."""
        self._unsure = list(self._futures.values())
        self._consumer_tag = None
        self._reopened_at = time.monotonic()
        self._look_now.set()

    async def held(self) -> None:
        """Raises `QueueInUse` once another process took the reply queue over (see `_look`),
        which ends the enqueuer (`wait_for_stop`); returns never."""
        await self._taken_seen.wait()
        assert self._taken is not None
        raise self._taken

    async def _keep_consuming(self) -> None:
        """Look at once after a reconnect, and every WATCH_INTERVAL, whether the reply queue
        is there and consumed; declare it and consume it again when not. A transient queue
        goes with its node, and when the cluster removed it only after the enqueuer had
        reconnected and restored it elsewhere, the broker cancelled the restored consumer and
        nothing declared the queue again: every reply after a node loss was returned to its
        dequeuer and dropped, for good."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_INTERVAL):
                    await self._look_now.wait()
            self._look_now.clear()
            try:  # a channel opened on a connection gone silent waits for good
                async with asyncio.timeout(LOOK_TIMEOUT):
                    await self._look()
            except QueueInUse as exc:
                self._taken = exc
                self._taken_seen.set()
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # aiormq fails what waits on a connection it gives up with CancelledError:
                # the watch went with it, and the queue was not consumed after the reconnect.
                log.debug("reply queue check failed: the connection was given up")
            except Exception as exc:  # a reconnect under way: the next turn looks again
                log.debug("reply queue check failed: %s", exc)

    async def _look(self) -> None:
        """Only right after a reconnect does it matter whether the queue was gone before it
        is declared again (`_lost`); the other looks need no passive declare, whose refusal
        closes its channel: a channel opened and closed every WATCH_INTERVAL for nothing.

        A consumer found on the queue while this enqueuer has none (since a reconnect) is
        another's, once the one of its lost connection would be gone: a second enqueuer with
        the same `--instance-id` started while this one was cut off. This one took it for its
        own consumer and served on, every call a 504."""
        assert self._queue is not None and self._lease is not None
        unsure = self._unsure
        if (
            unsure is not None
            and await self._passive_declare(self.queue_name) is None
            and await self._passive_declare(self._lease.name) is not None
        ):
            self._lost(unsure)
        await self._queue.declare()  # not passive: makes it again if it is gone
        self._unsure = None
        await self._lease.declare()  # renews its lease
        consumers = self._queue.declaration_result.consumer_count
        if consumers and self._consumer_tag is None:
            if time.monotonic() - self._reopened_at >= self._linger:
                raise topology.in_use(self.queue_name, consumers, ONE_ID_EACH)
            log.warning("%s has %d other consumer(s); waiting", self.queue_name, consumers)
        elif not consumers:
            if unsure is None:
                log.warning(
                    "reply queue %s was gone or not consumed: consuming it again", self.queue_name
                )
            if self._consumer_tag is not None:
                with contextlib.suppress(Exception):
                    await self._queue.cancel(self._consumer_tag)
            self._consumer_tag = await self._queue.consume(self._on_reply)

    async def _passive_declare(self, name: str) -> Queue.DeclareOk | None:
        """The queue's counts, or None when it does not exist (on a channel of its own)."""
        assert self._connection is not None
        channel = await topology.plain_channel(self._connection)
        try:
            return await channel.queue_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            await topology.close_plain(channel)

    def _lost(self, awaited: list[asyncio.Future[HttpResponse]]) -> None:
        """The reply queue expired while the enqueuer was cut off (`x-expires`: a minute
        without a consumer), with the replies in it. Its lease queue, which a broker restart
        or the loss of its node would have taken too, tells the expiry apart from those: then
        the queue went with the broker when the connection did, and the dequeuers held the
        replies meanwhile. Without this, a request without a deadline whose reply was lost
        stayed pending for good, and held its --max-in-flight slot."""
        waiting = [future for future in awaited if not future.done()]
        log.warning(
            "reply queue %s expired while the enqueuer was cut off from RabbitMQ: %d "
            "request(s) waiting for a reply end with 504",
            self.queue_name,
            len(waiting),
        )
        for future in waiting:
            future.set_exception(
                GatewayTimeout(
                    f"the enqueuer was cut off from RabbitMQ for over "
                    f"{REPLY_QUEUE_EXPIRES_MS // 1000} s and its reply queue expired: the reply "
                    "to this request may have been lost with it; the request may have been "
                    "processed, or may still be"
                )
            )

    def expect(self, request_id: str, service: str) -> asyncio.Future[HttpResponse]:
        """A slot for the reply, within `capacity` and the service's `share` of it: the calls of
        a service that does not answer, each held until its deadline, took every slot, and
        callers of every other service got 429 until they timed out."""
        if len(self._futures) >= self.capacity:
            raise Backpressure(
                f"{len(self._futures)} requests are already waiting for a reply", retry_after=1
            )
        held = self._by_service.get(service, 0)
        if held >= self.share:
            raise Backpressure(
                f"service {service!r} has {held} requests waiting for a reply already, its "
                "share of this enqueuer (--max-in-flight-per-service)",
            )
        self._by_service[service] = held + 1
        future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
        self._futures[request_id] = future
        future.add_done_callback(lambda _: self._release(request_id, service))
        return future

    def _release(self, request_id: str, service: str) -> None:
        self._futures.pop(request_id, None)
        held = self._by_service.pop(service) - 1
        if held:
            self._by_service[service] = held

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        """Acked once handled, the answer first. Consumed without acks, a reply the broker
        wrote into a connection gone silent (it sees that only after two heartbeats) counted as
        delivered, and was lost: its 202 stayed pending for good. Unacked, it comes again on
        the next connection (a reply handled before that is then one late reply more)."""
        try:
            self._handle(message)
        finally:
            with contextlib.suppress(*BROKER_ERRORS):
                await unless_closed(message.channel, message.ack())

    def _handle(self, message: AbstractIncomingMessage) -> None:
        future = self._futures.get(message.correlation_id or "")
        if future is None or future.done():
            self._on_late_reply()
            log.debug("dropped a reply nobody waits for: %s", message.correlation_id)
            return
        try:
            future.set_result(decode_response(message.headers, message.body))
        except MalformedMessage as exc:
            log.error(  # not in the request's task: its id is a field, as on its other lines
                "malformed reply: %s", exc, extra=logs.fields(correlation_id=message.correlation_id)
            )
            future.set_exception(ServiceFailed(f"the service's reply could not be read: {exc}"))

    async def stop(self, grace: float, error: Exception, unawaited: Container[str] = ()) -> None:
        """Give the replies awaited now `grace` seconds to come, then fail the rest with
        `error`. Not those of `unawaited` (pending asynchronous results): nobody waits for
        them, and they go with the process anyway; one made every stop `grace` longer.

        The lease queue is deleted last, on the reply queue's channel, which aiormq closes when
        the delete is given up: deleted first, a broker slower than a second to answer left the
        grace waiting for replies nobody consumed any more, and their callers got `error`."""
        if self._watch is not None:
            self._watch.cancel()
        awaited = [f for request_id, f in self._futures.items() if request_id not in unawaited]
        if awaited:
            await asyncio.wait(awaited, timeout=grace)
        for future in list(self._futures.values()):
            if not future.done():
                future.set_exception(error)
        if self._lease is not None:  # the reply queue goes a minute later, its lease with it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._lease.delete(if_unused=False, if_empty=False), 1)
