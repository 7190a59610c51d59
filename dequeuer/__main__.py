"""`proxymq-dequeuer`: consume the service's partitions and call the microservice until SIGTERM."""

from __future__ import annotations

import logging
import socket
import uuid

from dequeuer.consumer import Consumer
from dequeuer.forwarder import HttpTransport
from dequeuer.settings import DequeuerSettings
from shared import logs, service
from shared.admin import admin_app
from shared.broker import Broker, tls_context
from shared.metrics import DequeuerMetrics
from shared.settings import load

log = logging.getLogger("dequeuer")
SHUTDOWN_GRACE = 25.0  # fits Kubernetes' default 30 s termination grace period


async def serve(settings: DequeuerSettings) -> int:
    instance = settings.instance_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    metrics = DequeuerMetrics()
    transport = HttpTransport(settings.target, settings.concurrency)
    consumer = Consumer(settings, transport, metrics)
    ssl_context = (
        tls_context(settings.amqp_ca_file, settings.amqp_cert_file, settings.amqp_key_file)
        if settings.amqp_url.startswith("amqps://")
        else None
    )
    broker = Broker(
        settings.amqp_url,
        f"proxymq-dequeuer {settings.service} {instance}",
        ssl_context=ssl_context,
    )
    metrics.connected.set_function(lambda: float(broker.connected))

    async def on_connect(connection: object) -> None:
        from aio_pika.abc import AbstractRobustConnection

        assert isinstance(connection, AbstractRobustConnection)
        await consumer.start(connection)
        connection.reconnect_callbacks.add(lambda *_: metrics.reconnects.inc())

    broker.on_connect(on_connect)
    admin = await service.start_site(
        admin_app(
            lambda: {"broker_connected": broker.connected, "consuming": consumer.consuming},
            metrics.registry,
        ),
        settings.admin_host,
        settings.admin_port,
    )
    broker.start()
    code = 0
    try:
        await service.wait_for_stop(broker.task)
    except Exception as exc:
        log.error("cannot serve %s: %s", settings.service, exc)
        code = 1
    finally:
        await consumer.stop(SHUTDOWN_GRACE)
        await broker.close()
        await transport.close()
        await admin.cleanup()
    return code


def main() -> None:
    settings = load(DequeuerSettings)
    logs.setup(settings.log_level, settings.json_logs)
    service.run(serve(settings))


if __name__ == "__main__":
    main()
