"""`proxymq-dequeuer`: serve the service's partitions until SIGTERM (or `POST /drain`), then hand
them over."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import uuid
from functools import partial

from aio_pika.abc import AbstractRobustConnection

from dequeuer.batching import BatchingTransport, answer_limit
from dequeuer.consumer import Consumer
from dequeuer.coordinator import Coordinator
from dequeuer.depth import watch_depth
from dequeuer.forwarder import HttpTransport
from dequeuer.membership import Membership
from dequeuer.partitions import Partitions
from dequeuer.readiness import Readiness
from dequeuer.settings import DequeuerSettings
from shared import hash_ring, logs, service, topology, tracing
from shared.admin import admin_app
from shared.breaker import OPEN, ServiceBreaker
from shared.broker import for_sidecar, set_up, warn_above_max_message_size
from shared.metrics import DequeuerMetrics
from shared.settings import load

log = logging.getLogger("dequeuer")


def instance_name(settings: DequeuerSettings) -> str:
    """The host name, made fit to name a queue (`S.members.ID`), is only the default's start:
    the random suffix keeps two alike apart. A given id is never altered (its settings check
    it): two ids made alike were taken for one."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:100]
    return settings.instance_id or f"{host}-{uuid.uuid4().hex[:6]}"


def warn_long_calls(settings: DequeuerSettings) -> None:
    """RabbitMQ closes the channel of a consumer that holds a delivery longer than its
    consumer_timeout; the partition's held messages are then delivered again."""
    worst = settings.call_timeout * settings.max_attempts + 10 * (settings.max_attempts - 1)
    if worst >= settings.broker_consumer_timeout:
        log.warning(
            "a request may be held %.0f s (--call-timeout %.0f x --max-attempts %d, with "
            "backoff), longer than RabbitMQ's consumer_timeout of %.0f s: raise consumer_timeout "
            "in rabbitmq.conf (and --broker-consumer-timeout) or lower --call-timeout",
            worst,
            settings.call_timeout,
            settings.max_attempts,
            settings.broker_consumer_timeout,
        )


async def serve(settings: DequeuerSettings) -> int:
    warn_long_calls(settings)
    warn_above_max_message_size("--max-response", settings.max_response)
    instance = instance_name(settings)
    metrics = DequeuerMetrics()
    batching = settings.batch_size > 1
    limit = answer_limit(settings.batch_size, settings.max_response) if batching else None
    http = HttpTransport(settings.target, settings.concurrency, limit or settings.max_response)
    transport: HttpTransport | BatchingTransport = http
    if batching:  # the batcher owns `http` and closes it
        transport = BatchingTransport(
            http,
            size=settings.batch_size,
            wait=settings.batch_wait_ms / 1000,
            path=settings.batch_path,
            on_batch=metrics.batch_size.labels(settings.service).observe,
            max_response=settings.max_response,
        )
    readiness = Readiness(
        settings.target,
        settings.ready_path,
        timeout=settings.ready_timeout,
        interval=settings.ready_interval,
    )
    breaker = ServiceBreaker(settings.breaker_failures, settings.breaker_reset)
    consumer = Consumer(settings, transport, metrics, breaker, readiness.ready)
    partitions = Partitions(
        consumer.topology,
        consumer.prefetch,
        consumer.on_message,
        grace=settings.shutdown_grace,
        on_handover=metrics.handovers.labels(settings.service).inc,
    )
    membership = Membership(
        settings.service,
        instance,
        interval=settings.heartbeat_interval,
        expiry=settings.member_expiry,
    )
    coordinator = Coordinator(
        membership,
        partitions,
        settings.partitions,
        on_rebalance=metrics.rebalances.labels(settings.service).inc,
        breaker_reset=settings.breaker_reset,
    )
    readiness.on_change = coordinator.set_available

    def breaker_changed(state: str) -> None:
        metrics.breaker_open.set(state == OPEN)
        coordinator.breaker_changed(state)

    breaker.on_state = breaker_changed
    metrics.partitions_owned.labels(settings.service).set_function(lambda: len(partitions.owned))
    broker = for_sidecar(settings, f"proxymq-dequeuer {settings.service} {instance}")
    metrics.connected.set_function(lambda: float(broker.connected))

    async def on_connect(connection: AbstractRobustConnection) -> None:
        linger = 2.0 * settings.amqp_heartbeat
        for step, what in [
            (partial(topology.declare, connection, consumer.topology), "declaring the topology"),
            (partial(membership.start, connection, linger), "joining the members"),
            (partial(consumer.start, connection), "opening the reply channel"),
            (partial(consumer.consume_notices, connection), "consuming the notices"),
        ]:
            await set_up(connection, step, what)
        partitions.start(connection)
        background.append(
            asyncio.create_task(
                watch_depth(
                    connection,
                    lambda: [partitions.topology.queues[i] for i in sorted(partitions.owned)],
                    metrics.queue_depth,
                    settings.service,
                )
            )
        )
        # After a reconnect the broker may have started again with the ring in an order of its
        # own: put it back at once for other clients (our enqueuers check before publishing).
        background.append(
            asyncio.create_task(
                hash_ring.keep(connection, settings.service, consumer.topology.queues, ring_wake)
            )
        )
        readiness.start()
        connection.reconnect_callbacks.add(lambda *_: reconnected())

    def reconnected() -> None:
        metrics.reconnects.inc()
        ring_wake.set()

    ring_wake = asyncio.Event()
    background: list[asyncio.Task[None]] = []
    stopping = asyncio.Event()

    def drain() -> float:
        """`POST /drain` from the pod's preStop hook: the stop SIGTERM starts, asked for over
        loopback, so the microservice's container needs no view of this process (a shared
        process namespace also showed it this one's environment and files, the AMQP
        credentials among them)."""
        stopping.set()
        return settings.shutdown_grace

    broker.on_connect(on_connect)
    try:
        admin = await service.start_site(
            admin_app(
                lambda: {
                    "broker_connected": broker.connected,
                    "microservice_ready": readiness.ready.is_set(),
                    "breaker_closed": breaker.state != OPEN,
                    "member": membership.available,
                    # From SIGTERM (or POST /drain) on it finishes what it holds and takes
                    # nothing new.
                    "not_stopping": not membership.leaving,
                },
                metrics.registry,
                drain,
            ),
            settings.admin_host,
            settings.admin_port,
        )
    except BaseException:
        await transport.close()
        raise
    broker.start()
    code = 0
    try:
        await service.wait_for_stop(broker.task, stop=stopping)
    except Exception as exc:
        log.error("cannot serve %s: %s", settings.service, exc)
        code = 1
    finally:
        for task in background:
            task.cancel()
        await graceful_stop(membership, partitions)
        await readiness.stop()
        await consumer.stop()
        await membership.stop()
        await broker.close()
        await transport.close()
        await admin.cleanup()
        tracing.shutdown()
    return code


async def graceful_stop(membership: Membership, partitions: Partitions) -> None:
    """Leave first (the others subscribe to our partitions and wait), then finish what is in
    flight; the connection's close, last, returns what is held: the next consumer starts where
    we stopped."""
    try:
        await membership.leave()
        await partitions.release_all()
    except Exception as exc:
        log.warning("graceful stop incomplete: %s", exc)
    await asyncio.sleep(0)


def main() -> None:
    settings = load(DequeuerSettings)
    logs.setup(settings.log_level, settings.json_logs)
    tracing.setup("proxymq-dequeuer")
    service.run(serve(settings))


if __name__ == "__main__":
    main()
