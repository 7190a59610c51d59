"""Queue depth of the partitions this dequeuer owns, as a metric: summed over the dequeuers it is
the service's backlog, without the management plugin."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiormq
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import Gauge

from shared import topology
from shared.broker import BROKER_ERRORS, being_cancelled

log = logging.getLogger(__name__)


async def watch_depth(
    connection: AbstractRobustConnection,
    owned: Callable[[], list[str]],
    gauge: Gauge,
    service: str,
    interval: float = 5.0,
) -> None:
    """A passive declare per owned partition every `interval`, on a plain channel of its own
    (a missing queue closes the channel it was asked on; see `topology.plain_channel`)."""
    channel: aiormq.abc.AbstractChannel | None = None
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
                    channel = await topology.plain_channel(connection)
                declared = await channel.queue_declare(name, passive=True)
                gauge.labels(service, name).set(declared.message_count or 0)
                shown.add(name)
            except (*BROKER_ERRORS, asyncio.CancelledError) as exc:
                # A closed channel is replaced on the next turn. A connection given up fails
                # the declare with CancelledError, which used to end this task: the gauge then
                # stayed as it was for good, whatever the partitions' backlog.
                if being_cancelled():
                    raise
                log.debug("depth of %s unknown: %s", name, exc or "connection lost")
        await asyncio.sleep(interval)
