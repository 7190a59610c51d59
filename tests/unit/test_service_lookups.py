"""The enqueuer's service lookups: what it remembers of names that callers choose."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from enqueuer.publisher import Publisher
from shared.breaker import ServiceBreaker
from shared.errors import UnknownService


class Transport:
    """Stands for the connection's transport, which a verdict holds weakly."""


async def test_verdicts_on_made_up_names_go_once_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller naming services that do not exist left one verdict per name, expired a second
    later, until MAX_REMEMBERED of them pushed out the services that do exist."""
    now = [1000.0]
    monkeypatch.setattr("enqueuer.publisher.time.monotonic", lambda: now[0])

    async def exchange_exists(connection: Any, service: str) -> bool:
        return service == "real"

    async def ensure(connection: Any, service: str) -> None:
        pass

    monkeypatch.setattr("enqueuer.publisher.topology.exchange_exists", exchange_exists)
    monkeypatch.setattr("enqueuer.publisher.hash_ring.ensure", ensure)
    publisher = Publisher(frozenset(), ServiceBreaker(5, 10))
    publisher._connection = SimpleNamespace(transport=Transport())  # type: ignore[assignment]
    publisher._channels["real"] = SimpleNamespace()  # type: ignore[assignment]

    await publisher.check("real")
    for i in range(50):
        now[0] += 0.1
        with pytest.raises(UnknownService):
            await publisher.check(f"made-up-{i}")
    assert publisher.exists("real")
    remembered = len(publisher._found) + len(publisher._missing)
    assert remembered <= 12, f"{remembered} verdicts kept, most of them expired"


class Channel:
    """Stands for a publishing channel: open until closed."""

    def __init__(self, opened: set[Channel]) -> None:
        self.is_closed = False
        self.opened = opened
        opened.add(self)

    async def close(self) -> None:
        self.is_closed = True
        self.opened.discard(self)


async def test_services_called_long_ago_hold_no_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each service found kept its publishing channel for the enqueuer's life (up to 10,000):
    past 2,047 services called, RabbitMQ closed the connection (channel_max), and each
    reconnect, restoring every channel, was closed again: 503s for every service, for good."""

    async def exchange_exists(connection: Any, service: str) -> bool:
        return True

    async def ensure(connection: Any, service: str) -> None:
        pass

    opened: set[Channel] = set()

    async def confirming_channel(connection: Any) -> Channel:
        return Channel(opened)

    monkeypatch.setattr("enqueuer.publisher.topology.exchange_exists", exchange_exists)
    monkeypatch.setattr("enqueuer.publisher.hash_ring.ensure", ensure)
    monkeypatch.setattr("enqueuer.publisher.confirming_channel", confirming_channel)
    publisher = Publisher(frozenset(), ServiceBreaker(5, 10))
    publisher._connection = SimpleNamespace(transport=Transport())  # type: ignore[assignment]

    for i in range(3_000):
        await publisher.check(f"service-{i}")
    await asyncio.gather(*publisher._renewals)  # the closes under way
    assert len(opened) <= 1_000, f"{len(opened)} publishing channels open"
    assert publisher.exists("service-2999")
    await publisher.check("service-0")  # looked up again, with a channel of its own
    assert len(opened) <= 1_000
    assert "service-0" in publisher._channels
