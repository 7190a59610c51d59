"""Queue depth of the partitions this dequeuer owns, as a metric: summed over the dequeuers it is
the service's backlog, without the management plugin."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from prometheus_client import Gauge

from shared.broker import BROKER_ERRORS

log = logging.getLogger(__name__)


async def watch_depth(
    connection: AbstractRobustConnection,
    owned: Callable[[], list[str]],
    gauge: Gauge,
    service: str,
    interval: float = 5.0,
) -> None:
    """A passive declare per owned partition every `interval`, on a channel of its own (a
    missing queue closes the channel it was asked on)."""
    channel: AbstractChannel | None = None
    shown: set[str] = set()
    while True:
        queues = owned()
        for name in shown - set(queues):
            with contextlib.suppress(KeyError):
                gauge.remove(service, name)
        shown &= set(queues)
        for name in queues:
            try:
                if channel is None or channel.is_closed:
                    channel = await connection.channel()
                declared = await channel.declare_queue(name, passive=True)
                gauge.labels(service, name).set(declared.declaration_result.message_count or 0)
                shown.add(name)
            except BROKER_ERRORS as exc:
                log.debug("depth of %s unknown: %s", name, exc)
                channel = None
        await asyncio.sleep(interval)
