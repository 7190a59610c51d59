"""Consuming a service's partitions: decode -> order -> forward (with retries) -> reply -> ack.

A message's fate is decided in one place, `settle`: acked after its reply is confirmed
(at-least-once), acked without a call when its deadline passed, or copied to `S.dlq` with the
reason and then acked. Retries are held by this consumer with the message unacked: on a quorum
queue a requeue goes to the back and would break per-key order, while an unacked message comes
back first if this process dies.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Hashable
from dataclasses import dataclass
from functools import partial

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from dequeuer.forwarder import CallFailed, Transport
from dequeuer.lanes import Lanes
from dequeuer.settings import DequeuerSettings
from shared import envelope, logs, topology
from shared.envelope import HttpResponse, MalformedMessage, RequestEnvelope
from shared.errors import ServiceFailed
from shared.metrics import DequeuerMetrics, status_class

log = logging.getLogger(__name__)
MAX_BACKOFF = 10.0
DEADLINE_HEADER = "X-Request-Timeout"
CORRELATION_HEADER = "X-Correlation-ID"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff: float
    retry_on: frozenset[str]

    def retryable(self, outcome: HttpResponse | CallFailed) -> bool:
        kind = outcome.kind if isinstance(outcome, CallFailed) else str(outcome.status)
        return kind in self.retry_on

    def delay(self, attempt: int) -> float:
        """Exponential with full jitter in its upper half, so retries of many keys spread out."""
        return float(min(MAX_BACKOFF, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))


class Consumer:
    def __init__(
        self, settings: DequeuerSettings, transport: Transport, metrics: DequeuerMetrics
    ) -> None:
        self.settings = settings
        self.topology = topology.Topology(
            settings.service, settings.partitions, settings.delivery_limit, settings.max_length
        )
        self.transport = transport
        self.metrics = metrics
        self.policy = RetryPolicy(
            settings.max_attempts, settings.retry_backoff_ms / 1000, frozenset(settings.retry_on)
        )
        self.lanes = Lanes(settings.concurrency)
        self.consuming = False
        self.stopping = False
        self._reply_channel: AbstractChannel | None = None
        self._partition_channels: list[AbstractChannel] = []

    @property
    def prefetch(self) -> int:
        """Enough held messages to find `concurrency` distinct keys, and no more: every held
        message returned on a close costs one delivery against the delivery limit."""
        if self.settings.ordering == "partition":
            return 2 * self.settings.batch_size
        return max(1, self.settings.concurrency)

    async def start(self, connection: AbstractRobustConnection) -> None:
        await topology.declare(connection, self.topology)
        self._reply_channel = await connection.channel(publisher_confirms=True)
        for name in self.topology.queues:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await topology.declare_partition(channel, self.topology, name)
            await queue.consume(partial(self.on_message, name))
            self._partition_channels.append(channel)
        self.consuming = True
        log.info(
            "consuming %d partitions of %s (ordering %s, concurrency %d)",
            self.topology.partitions,
            self.settings.service,
            self.settings.ordering,
            self.settings.concurrency,
        )

    async def on_message(self, partition: str, message: AbstractIncomingMessage) -> None:
        if self.stopping:
            return  # held unacked: closing the channel returns it first and in order
        try:
            request = envelope.decode_request(
                message.headers, message.body, message.correlation_id, message.reply_to
            )
        except MalformedMessage as exc:
            await self.dead_letter(
                partition, message, reason=f"malformed: {exc}", outcome="malformed"
            )
            return
        self.metrics.in_flight.labels(self.settings.service, partition).inc()
        self.lanes.submit(
            self.lane_of(partition, request), partial(self.settle, partition, message, request)
        )

    def lane_of(self, partition: str, request: RequestEnvelope) -> Hashable:
        if self.settings.ordering == "partition":
            return partition
        if self.settings.ordering == "key" and request.partition_key is not None:
            return (partition, request.partition_key)
        return request.request_id

    async def settle(
        self, partition: str, message: AbstractIncomingMessage, request: RequestEnvelope
    ) -> None:
        logs.bind(
            correlation_id=request.request_id, service=self.settings.service, partition=partition
        )
        try:
            if request.sent_at is not None:
                self.metrics.queue_wait.labels(self.settings.service).observe(
                    max(0.0, time.time() - request.sent_at)
                )
            outcome, attempts = await self.call(request)
            if outcome is None:
                self.metrics.messages.labels(self.settings.service, partition, "expired").inc()
                log.info("dropped: deadline passed before the call")
                await message.ack()
            elif isinstance(outcome, HttpResponse) and not self.policy.retryable(outcome):
                await self.reply(request, outcome)
                await message.ack()
                self.metrics.messages.labels(self.settings.service, partition, "replied").inc()
                log.info("replied", extra=logs.fields(status=outcome.status, attempts=attempts))
            else:
                last = str(outcome) if isinstance(outcome, CallFailed) else str(outcome.status)
                error = ServiceFailed(
                    f"service {self.settings.service!r} failed {attempts} time(s), last: {last}; "
                    f"the request is in {self.topology.dead_letters}"
                )
                await self.dead_letter(
                    partition, message, reason=last, attempts=attempts, outcome="dead_lettered"
                )
                await self.reply(
                    request,
                    HttpResponse(
                        error.status,
                        (),
                        error.body(),
                        error=error.code,
                        error_message=error.message,
                    ),
                )
        except (
            aiormq.exceptions.AMQPError,
            aiormq.exceptions.ChannelInvalidStateError,
            ConnectionError,
            RuntimeError,
        ) as exc:
            log.warning("could not settle, the broker will deliver it again: %s", exc)
        finally:
            self.metrics.in_flight.labels(self.settings.service, partition).dec()

    async def call(self, request: RequestEnvelope) -> tuple[HttpResponse | CallFailed | None, int]:
        """Call until an answer that is not retryable, the last attempt, or the deadline.
        None means the deadline passed before a call could be made."""
        outcome: HttpResponse | CallFailed | None = None
        attempt = 0
        while attempt < self.policy.max_attempts:
            remaining = request.remaining()
            if remaining is not None and remaining <= 0:
                return outcome, attempt
            attempt += 1
            timeout = (
                self.settings.call_timeout
                if remaining is None
                else min(remaining, self.settings.call_timeout)
            )
            started = time.perf_counter()
            try:
                outcome = await self.transport.send(self.with_context(request, remaining), timeout)
                label = status_class(outcome.status)
            except CallFailed as failure:
                outcome, label = failure, failure.kind
            self.metrics.forward_duration.labels(self.settings.service, label).observe(
                time.perf_counter() - started
            )
            if not self.policy.retryable(outcome) or attempt == self.policy.max_attempts:
                break
            self.metrics.retries.labels(self.settings.service).inc()
            delay = self.policy.delay(attempt)
            log.info("retrying in %.2f s after %s", delay, _describe(outcome))
            left = request.remaining()
            if left is not None and left <= delay:
                return outcome, attempt
            await asyncio.sleep(delay)
        return outcome, attempt

    def with_context(
        self, request: RequestEnvelope, remaining: float | None
    ) -> envelope.HttpRequest:
        """Tell the microservice the request id and how long the caller still waits."""
        http = request.request
        headers = [
            (n, v)
            for n, v in http.headers
            if n.lower() not in ("x-request-timeout", "x-correlation-id")
        ]
        headers.append((CORRELATION_HEADER, request.request_id))
        if remaining is not None:
            headers.append((DEADLINE_HEADER, f"{remaining:.3f}"))
        return envelope.HttpRequest(http.method, http.path, http.query, tuple(headers), http.body)

    async def reply(self, request: RequestEnvelope, response: HttpResponse) -> None:
        if not request.reply_to:
            return
        assert self._reply_channel is not None
        await self._reply_channel.default_exchange.publish(
            envelope.encode_response(response, request.request_id), routing_key=request.reply_to
        )

    async def dead_letter(
        self,
        partition: str,
        message: AbstractIncomingMessage,
        *,
        reason: str,
        outcome: str,
        attempts: int = 0,
    ) -> None:
        """Copy the request to `S.dlq` with why it failed, then ack the original: a broker-side
        reject could not carry the reason."""
        assert self._reply_channel is not None
        headers = dict(message.headers)
        headers.update(
            {
                "x-proxymq-dead-reason": reason[:1000],
                "x-proxymq-attempts": attempts,
                "x-proxymq-partition": partition,
                "x-proxymq-dead-at": int(time.time() * 1000),
            }
        )
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=message.correlation_id,
            message_id=message.message_id,
            reply_to=message.reply_to,
            content_type=message.content_type,
        )
        await self._reply_channel.default_exchange.publish(
            copy, routing_key=self.topology.dead_letters
        )
        await message.ack()
        self.metrics.messages.labels(self.settings.service, partition, outcome).inc()
        log.warning(
            "dead-lettered: %s",
            reason,
            extra=logs.fields(correlation_id=message.correlation_id, attempts=attempts),
        )

    async def stop(self, grace: float) -> None:
        """Take nothing new, finish what is in flight (bounded by `grace`), then close the
        partition channels: what was held but not started returns to the head of its queue."""
        self.stopping = True
        self.consuming = False
        if not await self.lanes.drain(grace):
            log.warning(
                "grace period over with %d requests unfinished; they will be delivered again",
                self.lanes.busy,
            )
            await self.lanes.cancel()
        for channel in self._partition_channels:
            if not channel.is_closed:
                await channel.close()


def _describe(outcome: HttpResponse | CallFailed) -> str:
    return str(outcome) if isinstance(outcome, CallFailed) else f"status {outcome.status}"
