"""Publishing a request: durable, confirmed, mandatory, to a service that must exist.

Broker answers become contract errors here, at one boundary: a return (no partition bound) is
`unknown_service`, a nack (a full partition, `reject-publish`) is `backpressure`, a lost channel or
connection is `broker_unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from shared import topology
from shared.breaker import ServiceBreaker
from shared.errors import Backpressure, BrokerUnavailable, UnknownService

log = logging.getLogger(__name__)
KNOWN_FOR = 10.0  # seconds a service found on the broker is trusted without asking again
UNKNOWN_FOR = 1.0  # a flood of calls to a missing service costs one passive declare a second


class Publisher:
    def __init__(self, allowed: frozenset[str], breaker: ServiceBreaker) -> None:
        self.allowed = allowed
        self.breaker = breaker
        self._channel: AbstractChannel | None = None
        self._connection: AbstractRobustConnection | None = None
        self._exchanges: dict[str, tuple[AbstractExchange | None, float]] = {}
        self._checks: dict[str, asyncio.Future[AbstractExchange | None]] = {}

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)

    async def exchange(self, service: str) -> AbstractExchange:
        """The service's request exchange, or `UnknownService`; concurrent first calls share one
        check."""
        if self.allowed and service not in self.allowed:
            raise UnknownService(f"service {service!r} is not in this enqueuer's --services")
        cached = self._exchanges.get(service)
        if cached is not None and cached[1] > time.monotonic():
            exchange = cached[0]
        else:
            check = self._checks.get(service)
            if check is None:
                check = asyncio.ensure_future(self._lookup(service))
                self._checks[service] = check
                check.add_done_callback(lambda _: self._checks.pop(service, None))
            exchange = await asyncio.shield(check)
        if exchange is None:
            raise UnknownService(
                f"service {service!r} has no topology on the broker: start its dequeuer "
                "(proxymq-dequeuer --service NAME) or declare it (proxymq topology declare)"
            )
        return exchange

    async def _lookup(self, service: str) -> AbstractExchange | None:
        try:
            topology.check_service_name(service)
        except ValueError:
            return None
        if self._connection is None or self._channel is None:
            raise BrokerUnavailable("not connected to RabbitMQ yet", retry_after=1)
        try:
            exists = await topology.exchange_exists(self._connection, service)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise BrokerUnavailable(f"RabbitMQ did not answer: {exc}", retry_after=1) from exc
        exchange = await self._channel.get_exchange(service, ensure=False) if exists else None
        self._exchanges[service] = (
            exchange,
            time.monotonic() + (KNOWN_FOR if exists else UNKNOWN_FOR),
        )
        return exchange

    async def publish(self, service: str, routing_key: str, message: aio_pika.Message) -> None:
        exchange = await self.exchange(service)
        probe = self.breaker.admit_now()
        if probe is None:
            raise BrokerUnavailable(
                "RabbitMQ failed repeatedly; the enqueuer's breaker is open",
                retry_after=max(1.0, self.breaker.retry_after()),
            )
        failed = True
        try:
            await self._publish(exchange, service, routing_key, message)
            failed = False
        except (UnknownService, Backpressure):
            failed = False  # the broker answered: it is up
            raise
        finally:
            self.breaker.record(failed=failed, probe=probe)

    async def _publish(
        self, exchange: AbstractExchange, service: str, routing_key: str, message: aio_pika.Message
    ) -> None:
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=True)
        except aiormq.exceptions.PublishError as exc:
            raise UnknownService(
                f"service {service!r} has no partition queue bound to its exchange"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise Backpressure(
                f"the partition of service {service!r} for this key is full", retry_after=1
            ) from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            self._exchanges.pop(service, None)
            raise UnknownService(f"service {service!r} was removed from the broker") from exc
        except (
            aiormq.exceptions.AMQPError,
            aiormq.exceptions.ChannelInvalidStateError,
            ConnectionError,
            RuntimeError,
        ) as exc:
            log.warning("publish failed: %s", exc)
            raise BrokerUnavailable("RabbitMQ did not confirm the request", retry_after=1) from exc
