"""Publishing a request: durable, confirmed, mandatory, to a service that must exist.

Broker answers become contract errors here, at one boundary: a return (no partition bound) is
`unknown_service`, a nack (a full partition, `reject-publish`) is `backpressure`, a message over
RabbitMQ's `max_message_size` is `body_too_large` (and headers over its `frame_max`,
`headers_too_large`), a lost channel or connection is `broker_unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from shared import envelope, hash_ring, topology
from shared.breaker import ServiceBreaker
from shared.broker import BROKER_ERRORS, confirming_channel, refused_for_size
from shared.errors import (
    Backpressure,
    BodyTooLarge,
    BrokerUnavailable,
    HeadersTooLarge,
    UnknownService,
)

log = logging.getLogger(__name__)
KNOWN_FOR = 10.0  # seconds a service found on the broker is trusted without asking again
UNKNOWN_FOR = 1.0  # a flood of calls to a missing service costs one passive declare a second
MAX_REMEMBERED = 10_000  # services remembered, found or not; missing ones go first, oldest first
# Services found, each with a publishing channel: half of RabbitMQ's default channel_max (2,047),
# leaving room for lookups and replaced channels. The least recently looked up go first.
MAX_FOUND = 1_000
Verdict = tuple[float, "weakref.ref[object] | None"]  # until, and the connection it holds for
MAX_LOOKUPS = 100  # services waiting to be looked up, one at a time; more get 429
RENEW_AFTER_NACK = 1.0  # seconds between two replacements of a nacked publishing channel


class Publisher:
    def __init__(self, allowed: frozenset[str], breaker: ServiceBreaker) -> None:
        self.allowed = allowed
        self.breaker = breaker
        # A publishing channel per service found: a nack from one service's partitions replaces
        # its channel alone (`_renew_channel`).
        self._channels: dict[str, AbstractChannel] = {}
        self._connection: AbstractRobustConnection | None = None
        # service -> until, and the connection that found its hash ring in order (held
        # weakly: a verdict kept a lost connection, with its channels, until its service was
        # looked up again, which a name called once never is); oldest first. Names not found
        # apart: callers make them up, and theirs all last UNKNOWN_FOR, so the expired ones
        # are those at the front.
        self._found: dict[str, Verdict] = {}
        self._missing: dict[str, Verdict] = {}
        self._checks: dict[str, asyncio.Future[bool]] = {}
        self._lookup_turn = asyncio.Lock()
        self._renew_at: dict[str, float] = {}
        self._renewals: set[asyncio.Task[None]] = set()

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection

    def _renew_channel(self, service: str) -> None:
        """After a nack, publish the service's requests on a new channel (at most once every
        RENEW_AFTER_NACK).

        A nack usually means a full partition, but on RabbitMQ 3.10 a channel that published to
        a quorum queue while its leader was being re-elected (the leader's node died) goes on
        getting nacks from that queue for good, while a new channel is accepted at once: without
        this, every request to that partition got 429 until the enqueuer restarted.

        The old channel is closed at once, its unconfirmed publishes failing (503): left open,
        it sent a pending publish again once the new leader was known, after newer requests of
        the same key had gone through the new channel, and broke their order. With one channel
        for all services, that close failed other services' publishes too (503), so many at a
        time that they opened the breaker for every service."""
        now = time.monotonic()
        if self._connection is None or now < self._renew_at.get(service, 0.0):
            return
        self._renew_at[service] = now + RENEW_AFTER_NACK
        task = asyncio.ensure_future(self._replace_channel(self._connection, service))
        self._renewals.add(task)
        task.add_done_callback(self._renewals.discard)

    async def _replace_channel(self, connection: AbstractRobustConnection, service: str) -> None:
        try:
            channel = await confirming_channel(connection)
        except Exception as exc:  # the connection is down: the robust one is restored anyway
            log.debug("could not open a new publishing channel: %s", exc)
            return
        old = self._channels.get(service)
        if old is None:  # forgotten meanwhile
            await self._close(channel)
            return
        self._channels[service] = channel
        log.info("publishing on a new channel after a nack")
        await self._close(old)

    def _drop_channel(self, service: str) -> None:
        """Close the channel of a service forgotten or gone from the broker."""
        self._renew_at.pop(service, None)
        channel = self._channels.pop(service, None)
        if channel is not None:
            task = asyncio.ensure_future(self._close(channel))
            self._renewals.add(task)
            task.add_done_callback(self._renewals.discard)

    @staticmethod
    async def _close(channel: AbstractChannel) -> None:
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()

    async def check(self, service: str) -> None:
        """`UnknownService` unless the service's request exchange exists; concurrent first calls
        share one check.

        Each lookup is a passive declare on a channel of its own, and callers choose the names:
        lookups run one at a time, at most MAX_LOOKUPS wait, and MAX_REMEMBERED verdicts are
        kept. Without these bounds, callers naming 20,000 services that do not exist drove the
        enqueuer to 375 MB and its broker connection past channel_max, for good.

        A verdict holds for its connection only: on a new one, the lookup also makes sure the
        service's hash ring is in partition order (`hash_ring`) before anything is published."""
        if self.allowed and service not in self.allowed:
            raise UnknownService(f"service {service!r} is not in this enqueuer's --services")
        cached = self._found.get(service) or self._missing.get(service)
        if cached is not None and cached[0] > time.monotonic() and self._found_now(cached[1]):
            exists = service in self._found
        else:
            check = self._checks.get(service)
            if check is None:
                if len(self._checks) >= MAX_LOOKUPS:
                    raise Backpressure(
                        f"{len(self._checks)} services not known yet are being looked up on "
                        "the broker already",
                    )
                check = asyncio.ensure_future(self._lookup(service))
                self._checks[service] = check
                check.add_done_callback(lambda _: self._checks.pop(service, None))
            exists = await asyncio.shield(check)
        if not exists:
            try:
                topology.check_service_name(service)
            except ValueError as exc:  # no dequeuer could ever serve it: say so, not "start one"
                raise UnknownService(str(exc)) from None
            raise UnknownService(
                f"service {service!r} has no topology on the broker: start its dequeuer "
                f"(proxymq-dequeuer --service {service}) or declare it (proxymq topology "
                f"declare --service {service})"
            )

    def exists(self, service: str) -> bool:
        """Whether the service was found on the broker: only then may it name a metrics label,
        since callers choose the names."""
        return service in self._found

    async def _lookup(self, service: str) -> bool:
        try:
            topology.check_service_name(service)
        except ValueError:
            return False
        if self._connection is None:
            raise BrokerUnavailable("not connected to RabbitMQ yet")
        transport = self._transport()
        try:
            async with self._lookup_turn:
                exists = await topology.exchange_exists(self._connection, service)
            if exists:  # on every new connection: the broker may have started again
                # Outside the turn: it may wait for another sidecar's rebuild, and lookups of
                # other services must not wait with it.
                await hash_ring.ensure(self._connection, service)
                if service not in self._channels:
                    self._channels[service] = await confirming_channel(self._connection)
        except BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"RabbitMQ did not answer: {exc}") from exc
        now = time.monotonic()
        self._found.pop(service, None)  # the newest verdict goes last, evicted last
        self._missing.pop(service, None)
        if not exists:
            self._drop_channel(service)
        (self._found if exists else self._missing)[service] = (
            now + (KNOWN_FOR if exists else UNKNOWN_FOR),
            None if transport is None else weakref.ref(transport),
        )
        self._forget(now)
        return exists

    def _forget(self, now: float) -> None:
        """Expired verdicts on missing names go at once (callers calling made-up names left
        them until MAX_REMEMBERED, which then pushed out the services found); found ones
        stay, as `exists` labels their metrics, up to MAX_FOUND. Each holds a channel: kept
        for every service ever called, 2,047 of them reached RabbitMQ's channel_max, which
        closed the connection, and again at each reconnect (restoring them all), for good."""
        while self._missing and next(iter(self._missing.values()))[0] <= now:
            del self._missing[next(iter(self._missing))]
        while len(self._found) > MAX_FOUND or (
            len(self._found) + len(self._missing) > MAX_REMEMBERED
        ):
            oldest = self._missing if len(self._found) <= MAX_FOUND else self._found
            service = next(iter(oldest))
            del oldest[service]
            self._drop_channel(service)

    def _found_now(self, found_on: weakref.ref[object] | None) -> bool:
        """Whether a verdict was made on the connection there is now."""
        transport = self._transport()
        return transport is not None and found_on is not None and found_on() is transport

    def _transport(self) -> object:
        """The connection's current AMQP transport: a new one after every reconnect."""
        return None if self._connection is None else self._connection.transport

    async def publish(self, service: str, routing_key: str, message: envelope.Outgoing) -> None:
        """Publish to a service `check` has just found: the handler checks first, before the
        span it names after the service (checked again here, it was a second lookup per
        request for the same verdict)."""
        channel = self._channels.get(service)
        probe = self.breaker.admit_now()
        if probe is None:
            raise BrokerUnavailable(
                "RabbitMQ failed repeatedly; the enqueuer's breaker is open",
                retry_after=max(1.0, self.breaker.retry_after()),
            )
        failed: bool | None = True
        try:
            await self._publish(service, channel, routing_key, message)
            failed = False
        except (UnknownService, Backpressure, BodyTooLarge, HeadersTooLarge):
            failed = False  # the broker answered: it is up
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The caller hung up, or the request's publish deadline passed (the handler
                # reports that one with `record_timeout`): no verdict on the broker. Counted as
                # failures, five callers that hang up at once opened the breaker for everyone.
                failed = None
            raise
        finally:
            if failed is None:
                self.breaker.abandon_probe(probe)
            else:
                self.breaker.record(failed=failed, probe=probe)

    def record_timeout(self) -> None:
        """RabbitMQ did not confirm a publish in time (a blocked or silent broker)."""
        self.breaker.record(failed=True, probe=False)

    async def _publish(
        self,
        service: str,
        channel: AbstractChannel | None,
        routing_key: str,
        message: envelope.Outgoing,
    ) -> None:
        if channel is None:
            raise BrokerUnavailable("not connected to RabbitMQ yet")
        try:
            await envelope.publish(channel, message, service, routing_key, mandatory=True)
        except envelope.TooLargeForAFrame as exc:
            raise HeadersTooLarge(
                f"the request's headers, path and query do not fit in a message: {exc}; "
                "send fewer or smaller headers (non-ASCII text counts six times, as JSON escapes)"
            ) from None
        except aiormq.exceptions.PublishError as exc:
            raise UnknownService(
                f"service {service!r} has no partition queue bound to its exchange"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            self._renew_channel(service)
            # RabbitMQ's nack does not say why; a quorum queue electing a leader nacks too.
            raise Backpressure(
                f"the partition of service {service!r} for this key refused the request: it "
                "is full, or it is electing a new leader after a RabbitMQ node went down",
            ) from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            self._found.pop(service, None)
            self._drop_channel(service)
            raise UnknownService(f"service {service!r} was removed from the broker") from exc
        except BROKER_ERRORS as exc:
            if refused_for_size(exc, len(message.body)):
                raise BodyTooLarge(
                    f"RabbitMQ refused the {len(message.body)}-byte request as over its "
                    "max_message_size; the enqueuer's --max-body should not be above it"
                ) from exc
            log.warning("publish failed: %s", exc)
            raise BrokerUnavailable("RabbitMQ did not confirm the request") from exc
