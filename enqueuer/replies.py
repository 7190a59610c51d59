"""The reply waiter: one reply queue per enqueuer instance and a map correlation id -> future.

Modelled on aio-pika's RPC pattern: the future's done callback removes the entry, so a reply, a
deadline and a cancelled caller all clean up the same way; the map has a cap; replies nobody waits
for are counted and dropped. Never a queue per request (4x slower, see docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Container

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection, AbstractRobustQueue

from shared import logs, topology
from shared.broker import BROKER_ERRORS, closed_within, unless_closed
from shared.envelope import HttpResponse, MalformedMessage, decode_response
from shared.errors import Backpressure, ServiceFailed

log = logging.getLogger(__name__)
REPLY_QUEUE_EXPIRES_MS = 60_000  # survives a reconnect, gone a minute after its enqueuer
WATCH_INTERVAL = 2.0  # seconds between checks that the reply queue is there and consumed


class ReplyWaiter:
    def __init__(self, instance_id: str, capacity: int, on_late_reply: Callable[[], None]) -> None:
        self.queue_name = f"proxymq.replies.{instance_id}"
        self.capacity = capacity
        self._futures: dict[str, asyncio.Future[HttpResponse]] = {}
        self._on_late_reply = on_late_reply
        self._queue: AbstractRobustQueue | None = None
        self._consumer_tag: str | None = None
        self._watch: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._futures)

    async def start(self, connection: AbstractRobustConnection, linger: float) -> None:
        """Not exclusive and not auto-delete: a reply published while the connection is being
        restored waits in the queue instead of being dropped (aio-pika#679).

        So nothing but `claim` stops a second enqueuer with the same `--instance-id` from
        consuming it too: each then took about half of the other's replies, and every second
        caller got 504 with nothing in any log."""
        channel = connection.channel()
        try:
            await channel
            await channel.set_qos(prefetch_count=0)
            queue = await channel.declare_queue(
                self.queue_name, durable=False, arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS}
            )
            await topology.claim(
                queue, linger, "give each enqueuer its own --instance-id, or none for a random one"
            )
            self._consumer_tag = await queue.consume(self._on_reply)
        except BaseException:  # closed, it is not restored with the connection: no 2nd consumer
            await closed_within(channel.close())
            raise
        self._queue = queue
        self._watch = asyncio.create_task(self._keep_consuming(), name="reply queue watch")

    async def _keep_consuming(self) -> None:
        """Declare the reply queue again, and consume it again, whenever it is gone. A
        transient queue goes with its node, and when the cluster removed it only after the
        enqueuer had reconnected and restored it elsewhere, the broker cancelled the restored
        consumer and nothing declared the queue again: every reply after a node loss was
        returned to its dequeuer and dropped, for good."""
        assert self._queue is not None
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self._queue.declare()  # not passive: makes it again if it is gone
                if not self._queue.declaration_result.consumer_count:
                    log.warning(
                        "reply queue %s had no consumer: consuming it again", self.queue_name
                    )
                    if self._consumer_tag is not None:  # out of aio-pika's restore list too
                        with contextlib.suppress(Exception):
                            await self._queue.cancel(self._consumer_tag)
                    self._consumer_tag = await self._queue.consume(self._on_reply)
            except Exception as exc:  # a reconnect under way: the next turn looks again
                log.debug("reply queue check failed: %s", exc)

    def expect(self, request_id: str) -> asyncio.Future[HttpResponse]:
        if len(self._futures) >= self.capacity:
            raise Backpressure(
                f"{len(self._futures)} requests are already waiting for a reply", retry_after=1
            )
        future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
        self._futures[request_id] = future
        future.add_done_callback(lambda _: self._futures.pop(request_id, None))
        return future

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
        them, and they go with the process anyway; one made every stop `grace` longer."""
        if self._watch is not None:
            self._watch.cancel()
        awaited = [f for request_id, f in self._futures.items() if request_id not in unawaited]
        if awaited:
            await asyncio.wait(awaited, timeout=grace)
        for future in list(self._futures.values()):
            if not future.done():
                future.set_exception(error)
