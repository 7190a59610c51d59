"""The enqueuer's service lookups: what it remembers of names that callers choose."""

from __future__ import annotations

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
