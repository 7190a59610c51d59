"""Processing a partition's messages: decode -> order -> forward (with retries) -> reply -> ack.

A message's fate is decided in one place, `settle`: acked after its reply is confirmed
(at-least-once), acked without a call when its deadline passed, or copied to `S.dlq` with the
reason and then acked. Retries are held by this consumer with the message unacked: on a quorum
queue a requeue goes to the back and would break per-key order, while an unacked message comes
back first if this process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from opentelemetry.trace import Span, SpanKind
from pamqp.commands import Basic

from dequeuer.forwarder import CallFailed, Transport
from dequeuer.lanes import Lanes
from dequeuer.partitions import Subscription
from dequeuer.settings import DequeuerSettings
from shared import envelope, logs, topology, tracing
from shared.breaker import ServiceBreaker
from shared.broker import (
    BROKER_ERRORS,
    closed_within,
    confirming_channel,
    refused_for_size,
    unless_closed,
)
from shared.envelope import HttpResponse, MalformedMessage, RequestEnvelope
from shared.errors import GatewayTimeout, ProxyMQError, ServiceFailed
from shared.metrics import DequeuerMetrics, status_class

log = logging.getLogger(__name__)
MAX_BACKOFF = 10.0
DEADLINE_HEADER = "X-Request-Timeout"
# The header's resolution: a request with less time left is dropped as expired, not called with
# `X-Request-Timeout: 0.000` (no time at all, which a microservice may read as no limit).
MIN_BUDGET = 0.001
CORRELATION_HEADER = "X-Correlation-ID"
ATTEMPT_HEADER = "X-ProxyMQ-Attempt"
DELIVERIES_HEADER = "X-ProxyMQ-Earlier-Deliveries"
CONTEXT_HEADERS = frozenset(
    h.lower() for h in (DEADLINE_HEADER, CORRELATION_HEADER, ATTEMPT_HEADER, DELIVERIES_HEADER)
)
REPLY_QUEUE_WAIT = 15.0  # seconds a missing reply queue is waited for (its enqueuer reconnecting)
REPLY_QUEUE_GONE_FOR = 60.0  # then replies to it are dropped at once for a while (its x-expires)
MAX_GONE_REPLY_QUEUES = 1000
SETTLE_RETRY_FOR = 15.0  # seconds a reply is published again while its request is held
RECENT_ANSWERS = 64  # answers whose durations tell a slow microservice from a hurried caller


class ReplyRefused(Exception):
    """A reply too large for RabbitMQ (its body, or its headers for a frame): publishing it
    again would fail the same way."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff: float
    retry_on: frozenset[str]

    def retryable(self, outcome: HttpResponse | CallFailed) -> bool:
        kind = outcome.kind if isinstance(outcome, CallFailed) else str(outcome.status)
        return kind in self.retry_on

    def delay(self, attempt: int, outcome: HttpResponse | CallFailed | None = None) -> float:
        """Exponential with full jitter in its upper half, so retries of many keys spread out;
        at least what the answer's `Retry-After` asks (RFC 9110 10.2.3), up to the same cap."""
        backoff = min(MAX_BACKOFF, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        asked = retry_after(outcome) if isinstance(outcome, HttpResponse) else None
        return float(backoff if asked is None else max(backoff, min(MAX_BACKOFF, asked)))


def retry_after(response: HttpResponse) -> float | None:
    """The seconds a `Retry-After` header asks for: delay-seconds (ASCII digits: `isdigit` also
    takes a "²", which `float` refuses) or an HTTP date, in any of its three formats. Every
    HTTP date is GMT: the asctime format says so by saying nothing (RFC 9110 5.6.7)."""
    value = next((v for n, v in response.headers if n.lower() == "retry-after"), "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


class Consumer:
    def __init__(
        self,
        settings: DequeuerSettings,
        transport: Transport,
        metrics: DequeuerMetrics,
        breaker: ServiceBreaker,
        ready: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.topology = topology.Topology(
            settings.service, settings.partitions, settings.delivery_limit, settings.max_length
        )
        self.transport = transport
        self.metrics = metrics
        self.breaker = breaker
        self.ready = ready
        self.policy = RetryPolicy(
            settings.max_attempts, settings.retry_backoff_ms / 1000, frozenset(settings.retry_on)
        )
        self.lanes = Lanes()
        self.slots = asyncio.Semaphore(settings.concurrency)  # calls to the microservice at once
        self._reply_channel: AbstractChannel | None = None
        self._gone_reply_queues: dict[str, float] = {}  # reply queue -> given up on at
        self._answered_in: deque[float] = deque(maxlen=RECENT_ANSWERS)  # seconds, per answer

    @property
    def prefetch(self) -> int:
        """Enough held messages to find `concurrency` distinct keys, and no more: every held
        message returned on a close costs one delivery against the delivery limit. A partition
        that is its own lane runs one request at a time, batched or not: one running, one next."""
        if self.settings.ordering == "partition":
            return 2
        return max(1, self.settings.concurrency)

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._reply_channel = await confirming_channel(connection)

    async def on_message(self, sub: Subscription, message: AbstractIncomingMessage) -> None:
        if sub.releasing.is_set():
            return  # held unacked: closing the channel returns it first and in order
        partition = sub.queue
        try:
            request = envelope.decode_request(
                message.headers,
                message.body,
                message.correlation_id,
                message.reply_to,
                message.routing_key,
                # aio-pika reads an incoming message's expiration as seconds, always a float
                expiration=cast(float | None, message.expiration),
            )
        except MalformedMessage as exc:
            logs.bind(
                correlation_id=message.correlation_id,
                service=self.settings.service,
                partition=partition,
            )
            with self.process_span(partition, message.headers, message.correlation_id):
                if await self.dead_letter(
                    partition, message, reason=f"malformed: {exc}", outcome="malformed"
                ):
                    await self.tell_malformed(message, exc)
            return
        self.metrics.in_flight.labels(self.settings.service, partition).inc()
        sub.job_added()
        self.lanes.submit(
            self.lane_of(partition, request), partial(self.settle, sub, message, request)
        )

    async def tell_malformed(self, message: AbstractIncomingMessage, error: Exception) -> None:
        """Answer 502 at once the caller of a request that could not be read, when its
        correlation_id and reply_to can carry the answer: it waited for its deadline (504), a
        request of a newer enqueuer that an older dequeuer refuses in a rolling upgrade too.
        Best effort: the request is already in `S.dlq`."""
        if not message.correlation_id:
            return
        failed = ServiceFailed(
            f"the dequeuer could not read the request, malformed: {error}; it is in "
            f"{self.topology.dead_letters}"
        )
        try:
            await self.publish_reply(message.reply_to, message.correlation_id, _answer(failed))
        except BROKER_ERRORS as exc:
            log.warning("could not tell the caller its request was malformed: %s", exc)

    def lane_of(self, partition: str, request: RequestEnvelope) -> Hashable:
        if self.settings.ordering == "partition":
            return partition
        if self.settings.ordering == "key" and request.partition_key is not None:
            return (partition, request.partition_key)
        return request.request_id

    async def settle(
        self, sub: Subscription, message: AbstractIncomingMessage, request: RequestEnvelope
    ) -> None:
        """Decide the message's fate: the one place that acks, or leaves it for redelivery."""
        partition = sub.queue
        logs.bind(
            correlation_id=request.request_id, service=self.settings.service, partition=partition
        )
        if not tracing.enabled():
            await self._settle(sub, partition, message, request)
            return
        carrier: Mapping[str, object] = message.headers
        if tracing.TRACEPARENT not in carrier:
            # No context in the message (an enqueuer that does not trace, another client):
            # the caller's, as sent. A new trace here cut the caller's off at the queue.
            carrier = dict(request.request.headers)
        with self.process_span(partition, carrier, request.request_id):
            await self._settle(sub, partition, message, request)

    def process_span(
        self, partition: str, carrier: Mapping[str, object], request_id: str | None
    ) -> contextlib.AbstractContextManager[Span | None]:
        attributes = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.destination.name": partition,
            "messaging.message.conversation_id": request_id or "",
        }
        return tracing.span(
            f"process {self.settings.service}", SpanKind.CONSUMER, carrier, attributes
        )

    async def _settle(
        self,
        sub: Subscription,
        partition: str,
        message: AbstractIncomingMessage,
        request: RequestEnvelope,
    ) -> None:
        started = time.perf_counter()
        try:
            if sub.releasing.is_set():
                return  # not started: it goes back to its queue, first and in order
            deliveries = message.headers.get("x-delivery-count", 0)
            earlier = deliveries if isinstance(deliveries, int) else 0
            held = partial(_held, message)
            outcome, attempts = await self.call(request, sub.releasing, earlier, held)
            if isinstance(outcome, _Abandoned):
                log.info("left unfinished; the broker delivers it again")
            elif outcome is None:
                self.metrics.messages.labels(self.settings.service, partition, "expired").inc()
                log.info("dropped: deadline passed before the call")
                tracing.fail("expired", "deadline passed before the call")
                await _ack(message)
            elif isinstance(outcome, HttpResponse) and not self.policy.retryable(outcome):
                response = outcome
                try:
                    await self._while_held(message, lambda: self.reply(request, response))
                except ReplyRefused as exc:
                    refused = CallFailed("too_large", str(exc))
                    await self.give_up(partition, message, request, refused, attempts)
                    return
                await _ack(message)
                self.metrics.messages.labels(self.settings.service, partition, "replied").inc()
                log.info(
                    "replied",
                    extra=logs.fields(
                        status=outcome.status,
                        attempts=attempts,
                        duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    ),
                )
            else:
                await self.give_up(partition, message, request, outcome, attempts)
        except BROKER_ERRORS as exc:
            log.warning("could not settle, the broker will deliver it again: %s", exc)
            tracing.fail(type(exc).__name__, f"could not settle: {exc}")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # aiormq fails a pending confirm or ack with CancelledError when it gives up a
            # silent connection; letting it out would end this key's lane and drop its queue.
            log.warning("could not settle, the broker will deliver it again: connection lost")
            tracing.fail("connection_lost", "could not settle: connection lost")
        except Exception as exc:
            # A defect of ours. Left unsettled, the request stayed held on its live channel
            # for good and its caller waited for the deadline; rejected, the broker
            # dead-letters it to S.dlq, and S.notify answers its caller 502.
            log.exception("could not handle the request: it goes to the dead letters")
            tracing.fail(type(exc).__name__, "could not handle the request")
            if not message.processed:
                with contextlib.suppress(*BROKER_ERRORS):
                    await message.reject(requeue=False)
        finally:
            sub.job_done()
            self.metrics.in_flight.labels(self.settings.service, partition).dec()

    async def _while_held(
        self, message: AbstractIncomingMessage, step: Callable[[], Awaitable[object]]
    ) -> None:
        """Run `step` (publishing the reply or a dead letter) again while it fails and the
        message's own channel is still open. A message left unacked on a live channel is never
        delivered again and its caller never answered: right after a cluster failover a reply
        failed ("channel closed") while the restored partition channel was open (a lost 202
        result in the cluster test). Once the message's channel is closed the broker delivers it
        again, and this gives up."""
        delay, give_up_at = 0.1, time.monotonic() + SETTLE_RETRY_FOR
        while True:
            try:
                await step()
                return
            except BROKER_ERRORS as exc:
                if not _held(message) or time.monotonic() + delay > give_up_at:
                    raise
                log.info("settling failed (%s); again in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    async def give_up(
        self,
        partition: str,
        message: AbstractIncomingMessage,
        request: RequestEnvelope,
        outcome: HttpResponse | CallFailed,
        attempts: int,
    ) -> None:
        """Dead-letter after the last retryable failure and tell the caller at once (502)."""
        last = str(outcome) if isinstance(outcome, CallFailed) else str(outcome.status)
        told = outcome.for_caller() if isinstance(outcome, CallFailed) else last
        failed = f"failed {attempts} time(s)" if attempts else "was never reached in time"
        error = ServiceFailed(
            f"service {self.settings.service!r} {failed}, last: {told}; "
            f"the request is in {self.topology.dead_letters}"
        )
        if not await self.dead_letter(
            partition, message, reason=last, attempts=attempts, outcome="dead_lettered"
        ):
            return  # the broker dead-letters it, and S.notify answers its caller
        answer = _answer(error)
        await self._while_held(message, lambda: self.reply(request, answer))

    async def call(
        self,
        request: RequestEnvelope,
        abandon: asyncio.Event,
        earlier: int = 0,
        held: Callable[[], bool] = lambda: True,
    ) -> tuple[Outcome, int]:
        """Call until an answer that is not retryable, the last attempt, or the deadline.

        A call holds one of the --concurrency slots only while it runs: a request waiting for
        its retry, the breaker or a paused microservice leaves the slot to others, so failing
        keys cannot keep healthy ones waiting. None means the deadline passed before a call;
        ABANDONED that the partition was given up while waiting, so its next owner goes on
        from there, or that the message is no longer `held`: its channel was lost, and the
        broker delivers it again (a call now, waiting behind its key when the connection
        dropped, made the microservice run it twice).

        A call that was never sent (refused: a microservice restarting) is retried after the
        backoff but is none of --max-attempts and no `X-ProxyMQ-Attempt`: counted, requests
        the microservice never got were dead-lettered when it was down for a second. The
        deadline, the breaker (which counts it) and the readiness probe bound those retries."""
        outcome: Outcome = None
        attempt = tries = 0
        while attempt < self.policy.max_attempts:
            if not await _wait_for(self.ready, abandon):
                return ABANDONED, attempt
            probe = await self.breaker.wait_turn(abandon)
            if probe is None:
                return ABANDONED, attempt
            try:
                async with self.slots:
                    remaining = request.remaining()
                    if abandon.is_set() or not held():
                        self.breaker.abandon_probe(probe)
                        return ABANDONED, attempt
                    if remaining is not None and remaining < MIN_BUDGET:
                        self.breaker.abandon_probe(probe)
                        return outcome, attempt
                    attempt, tries = attempt + 1, tries + 1
                    if tries > 1:  # counted once made: a retry given up before is no call
                        self.metrics.retries.labels(self.settings.service).inc()
                    elif request.sent_at is not None:
                        self.metrics.queue_wait.labels(self.settings.service).observe(
                            max(0.0, time.time() - request.sent_at)
                        )
                    answer = await self.send(request, remaining, attempt, earlier)
                    if isinstance(answer, CallFailed) and answer.expired:
                        left = request.remaining()
                        if left is not None and left < MIN_BUDGET:
                            # Its deadline passed before the call left (waiting for its
                            # batch): as above, no attempt, nothing the breaker should count.
                            self.breaker.abandon_probe(probe)
                            return outcome, attempt - 1
                        # Its --call-timeout ran out there, not its caller's time (a stall):
                        # dropped as expired, it got no reply and no dead letter.
                        answer = CallFailed(
                            "timeout", "--call-timeout ran out before its batch left"
                        )
                    outcome = answer
            except BaseException:
                self.breaker.abandon_probe(probe)
                raise
            retryable = self.policy.retryable(outcome)
            if retryable and self._hurried(outcome, remaining):
                self.breaker.abandon_probe(probe)
            else:
                self.breaker.record(failed=retryable, probe=probe)
            if retryable and isinstance(outcome, CallFailed) and not outcome.sent:
                attempt -= 1
            if not retryable or attempt == self.policy.max_attempts:
                break
            delay = self.policy.delay(tries, outcome)
            left = request.remaining()
            if left is not None and left <= delay:
                return outcome, attempt
            log.info("retrying in %.2f s after %s", delay, _describe(outcome))
            if await _wait_for(abandon, None, timeout=delay):
                return ABANDONED, attempt
        return outcome, attempt

    def _hurried(self, outcome: HttpResponse | CallFailed, remaining: float | None) -> bool:
        """A timeout of a call that its caller's deadline cut below --call-timeout, and to less
        than twice the microservice's slowest recent answer, says how patient that caller was,
        not that the microservice failed: counted, five callers with `X-Request-Timeout: 0.3`
        opened the breaker and every request waited --breaker-reset. Given more than that, the
        microservice had time and did not answer: not counted, one that hung never opened the
        breaker for synchronous callers with the defaults (their 30 s is below --call-timeout's
        60 s). Before any answer, nothing tells the two apart: not counted."""
        if not isinstance(outcome, CallFailed) or outcome.kind != "timeout" or remaining is None:
            return False
        if remaining >= self.settings.call_timeout:
            return False
        return not self._answered_in or remaining < 2 * max(self._answered_in)

    async def send(
        self, request: RequestEnvelope, remaining: float | None, attempt: int, earlier: int
    ) -> HttpResponse | CallFailed:
        """One call, within the caller's time left and --call-timeout."""
        timeout = (
            self.settings.call_timeout
            if remaining is None
            else min(remaining, self.settings.call_timeout)
        )
        started = time.perf_counter()
        outcome: HttpResponse | CallFailed
        try:
            outcome = await self.transport.send(
                self.with_context(request, timeout, attempt, earlier), timeout
            )
            label = status_class(outcome.status)
        except CallFailed as failure:
            outcome, label = failure, failure.kind
        took = time.perf_counter() - started
        if isinstance(outcome, CallFailed) and outcome.expired:
            return outcome  # no call was made: nothing to time
        if isinstance(outcome, HttpResponse):
            self._answered_in.append(took)
        self.metrics.forward_duration.labels(self.settings.service, label).observe(took)
        return outcome

    def with_context(
        self, request: RequestEnvelope, budget: float, attempt: int = 1, earlier: int = 0
    ) -> envelope.HttpRequest:
        """Tell the microservice the request id, how long this call may take (the caller's time
        left, cut to --call-timeout), which attempt this is, and how often RabbitMQ delivered
        the request before (after a crash or a handover it may have been processed already: an
        idempotent service can check)."""
        http = request.request
        headers = [(n, v) for n, v in http.headers if n.lower() not in CONTEXT_HEADERS]
        headers.append((CORRELATION_HEADER, request.request_id))
        headers.append((ATTEMPT_HEADER, str(attempt)))
        if earlier:
            headers.append((DELIVERIES_HEADER, str(earlier)))
        headers.append((DEADLINE_HEADER, f"{budget:.3f}"))
        return envelope.HttpRequest(http.method, http.path, http.query, tuple(headers), http.body)

    async def reply(self, request: RequestEnvelope, response: HttpResponse) -> None:
        await self.publish_reply(
            request.reply_to, request.request_id, response, deadline=request.deadline
        )

    async def publish_reply(
        self,
        reply_to: str | None,
        request_id: str,
        response: HttpResponse,
        *,
        deadline: float | None = None,
    ) -> None:
        """Confirmed before the request is acked: a reply is never lost for an acked request.

        Mandatory, because the reply queue can be missing for a while: it is transient, so a
        broker restart (or the loss of its node) deletes it, and its enqueuer declares it again
        only once it has reconnected, maybe after this dequeuer. A returned reply is published
        again until the queue is back, for at most REPLY_QUEUE_WAIT (and not past the caller's
        deadline); a queue missing longer belongs to an enqueuer that is gone, and for
        REPLY_QUEUE_GONE_FOR its replies are dropped at once instead of holding their keys'
        lanes. Only a wait that ran out marks a queue gone: a wait cut short by a lost
        connection leaves nothing behind (a stale mark once dropped a reply after a later,
        short restart). A nacked reply (a `reject-publish` queue that is full) is waited for
        the same way: given up by the publish retries around it, it left its request held on a
        live channel for good.

        A `reply_to` naming a service's queue (`topology.SERVICE_QUEUE`) gets no reply: the
        dequeuer may write to every queue, and a client allowed to publish to one service's
        exchange alone had its reply put into another service's partition, taken for a request,
        or into a dequeuer's heartbeat queue, taken for a member."""
        if not reply_to:
            return
        if topology.SERVICE_QUEUE.match(reply_to):
            log.warning("reply dropped: reply_to %s names a queue of a service's", reply_to)
            return
        assert self._reply_channel is not None
        message = envelope.encode_response(response, request_id)
        delay, first_refused = 0.05, None
        while True:
            try:
                await envelope.publish(self._reply_channel, message, "", reply_to, mandatory=True)
                self._gone_reply_queues.pop(reply_to, None)
                return
            except aiormq.exceptions.DeliveryError:
                pass  # returned (no such queue) or nacked (a full one): again, for a while
            except envelope.TooLargeForAFrame as exc:
                raise ReplyRefused(f"the response does not fit in a reply: {exc}") from None
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                if not refused_for_size(exc, len(response.body)):
                    raise
                raise ReplyRefused(
                    f"RabbitMQ refused the {len(response.body)}-byte response as over its "
                    f"max_message_size ({exc}): lower --max-response to fit"
                ) from exc
            now = time.monotonic()
            first_refused = now if first_refused is None else first_refused
            gone_at = self._gone_reply_queues.get(reply_to)
            if gone_at is not None and now - gone_at < REPLY_QUEUE_GONE_FOR:
                log.warning("reply dropped: reply queue %s is gone", reply_to)
                return
            if deadline is not None and time.time() + delay >= deadline:
                log.warning("reply dropped: reply queue %s refused it past the deadline", reply_to)
                return
            if now - first_refused + delay > REPLY_QUEUE_WAIT:
                log.warning("reply dropped: reply queue %s missing or full for long", reply_to)
                self._gone(reply_to, now)
                return
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)

    def _gone(self, reply_to: str, now: float) -> None:
        self._gone_reply_queues[reply_to] = now
        while len(self._gone_reply_queues) > MAX_GONE_REPLY_QUEUES:
            del self._gone_reply_queues[next(iter(self._gone_reply_queues))]

    async def on_dead_letter_notice(self, message: AbstractIncomingMessage) -> None:
        """RabbitMQ dead-lettered a request itself (it exceeded the delivery limit: it may be
        crashing its dequeuer): its caller gets 502 now rather than a timeout later. One whose
        `expiration` passed in its queue (another AMQP client's) gets 504, as its deadline
        passed. Its reply waits for a missing reply queue no longer than the caller does: each
        such wait took one of the 16 notices handled at once for 15 s, and a caller still
        waiting got its notice after them."""
        # The partition it died in, as for the dequeuer's own dead letters (a name of ours
        # only: the header is the publisher's to write, and each value is a new series).
        queue = message.headers.get("x-first-death-queue")
        partition = str(queue) if queue in self.topology.queues else ""
        # Every line about it names it, the reply's fate too, as in `settle`.
        logs.bind(
            correlation_id=message.correlation_id,
            service=self.settings.service,
            partition=partition,
        )
        async with message.process(requeue=True, ignore_processed=True):
            reason = message.headers.get("x-first-death-reason", "rejected")
            reason = reason.decode() if isinstance(reason, bytes) else str(reason)
            error, outcome = self._broker_dead_letter(reason)
            log.warning("caller told of a broker dead letter: %s", reason)
            self.metrics.messages.labels(self.settings.service, partition, outcome).inc()
            deadline = message.headers.get(envelope.H_DEADLINE)
            await self.publish_reply(
                message.reply_to,
                message.correlation_id or "",
                _answer(error),
                deadline=deadline / 1000 if type(deadline) is int else None,
            )

    def _broker_dead_letter(self, reason: str) -> tuple[ProxyMQError, str]:
        """What the caller of a request RabbitMQ dead-lettered is told, and its outcome."""
        where = f"it is in {self.topology.dead_letters}"
        if reason == "expired":
            return GatewayTimeout(
                "the request's expiration passed while it waited in its queue, before any "
                f"call (RabbitMQ dead-lettered it, expired); {where}"
            ), "expired"
        if reason == "rejected":
            text = f"a dequeuer could not handle the request (its log says why); {where}"
        elif reason == "delivery_limit":
            # Deliveries past the partitions' limit; x-death's count is how often the
            # message was dead-lettered (1), which this once named as its deliveries.
            text = (
                f"RabbitMQ dead-lettered the request ({reason}) after "
                f"{self.topology.delivery_limit + 1} deliveries: it may crash the "
                f"microservice or its dequeuer; {where}"
            )
        else:
            text = f"RabbitMQ dead-lettered the request ({reason}); {where}"
        return ServiceFailed(text), "dead_lettered"

    async def consume_notices(self, connection: AbstractRobustConnection) -> None:
        channel = connection.channel()
        try:
            await channel
            await channel.set_qos(prefetch_count=16)
            queue = await channel.declare_queue(
                topology.notify_queue(self.settings.service),
                durable=True,
                arguments=topology.NOTIFY_ARGS,
            )
            await queue.consume(self.on_dead_letter_notice)
        except BaseException:  # closed, it is not restored with the connection
            await closed_within(channel.close())
            raise

    async def dead_letter(
        self,
        partition: str,
        message: AbstractIncomingMessage,
        *,
        reason: str,
        outcome: str,
        attempts: int = 0,
    ) -> bool:
        """Copy the request to `S.dlq` with why it failed, then ack the original: a broker-side
        reject could not carry the reason.

        False when `S.dlq` refused the copy for as long as `_while_held` tries (full under a
        `reject-publish` cap, or deleted): the request is then rejected, and the broker
        dead-letters it itself, to `S.dlq` once it takes it (at-least-once) and to `S.notify`,
        which answers its caller. Left held on its live channel, it was never delivered again:
        its caller waited for the deadline, the key's next request went first, and it kept one
        of its partition's prefetch until RabbitMQ's consumer_timeout."""
        assert self._reply_channel is not None
        tracing.fail(outcome, reason)
        headers: dict[str, Any] = envelope.writable(dict(message.headers))
        headers.update(
            {
                envelope.H_DEAD_REASON: reason[:1000],
                envelope.H_ATTEMPTS: attempts,
                envelope.H_PARTITION: partition,
                envelope.H_DEAD_AT: int(time.time() * 1000),
            }
        )
        copy = envelope.Outgoing(
            message.body,
            Basic.Properties(
                headers=headers,
                delivery_mode=envelope.PERSISTENT,
                correlation_id=message.correlation_id,
                message_id=message.message_id,
                reply_to=message.reply_to,
                content_type=message.content_type,
            ),
        )
        channel, queue = self._reply_channel, self.topology.dead_letters
        try:
            await self._while_held(
                message, lambda: envelope.publish(channel, copy, "", queue, mandatory=True)
            )
        except aiormq.exceptions.DeliveryError as exc:
            if not _held(message):
                raise
            await unless_closed(message.channel, message.reject(requeue=False))
            log.warning(
                "the dead letter queue refused the request (%s); rejected for the broker to "
                "dead-letter: %s",
                exc,
                reason,
                extra=logs.fields(correlation_id=message.correlation_id, attempts=attempts),
            )
            return False
        await _ack(message)
        self.metrics.messages.labels(self.settings.service, partition, outcome).inc()
        log.warning(
            "dead-lettered: %s",
            reason,
            extra=logs.fields(correlation_id=message.correlation_id, attempts=attempts),
        )
        return True

    async def stop(self) -> None:
        await self.lanes.cancel()


class _Abandoned:
    """The partition was given up before the request could finish: leave it unacked."""


ABANDONED = _Abandoned()
Outcome = HttpResponse | CallFailed | _Abandoned | None


async def _wait_for(
    event: asyncio.Event, abandon: asyncio.Event | None, timeout: float | None = None
) -> bool:
    """True once `event` is set; False when `abandon` is set first or `timeout` passes."""
    if event.is_set():
        return True
    waiters = [asyncio.ensure_future(event.wait())]
    if abandon is not None:
        waiters.append(asyncio.ensure_future(abandon.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return event.is_set() and not (abandon is not None and abandon.is_set())


async def _ack(message: AbstractIncomingMessage) -> None:
    """An ack that a connection dying under it cannot leave waiting for ever (`unless_closed`):
    the broker delivers the message again."""
    await unless_closed(message.channel, message.ack())


def _held(message: AbstractIncomingMessage) -> bool:
    """Whether the message's channel is still open, so that only an ack or a reject frees it."""
    try:
        return not message.channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:
        return False


def _answer(error: ProxyMQError) -> HttpResponse:
    """The reply that tells a caller of ProxyMQ's own error, as the enqueuer renders it."""
    return HttpResponse(
        error.status, (), error.body(), error=error.code, error_message=error.message
    )


def _describe(outcome: HttpResponse | CallFailed) -> str:
    return str(outcome) if isinstance(outcome, CallFailed) else f"status {outcome.status}"
