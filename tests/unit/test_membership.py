"""Membership's memory of its peers, without a broker: heartbeats are handed in directly."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from dequeuer import coordinator as coordinator_module
from dequeuer import membership
from dequeuer.coordinator import Coordinator
from dequeuer.membership import Membership
from shared.breaker import CLOSED, HALF_OPEN, OPEN


@dataclass
class Beat:
    body: bytes


def beat(member: str) -> Beat:
    return Beat(json.dumps({"id": member, "available": True, "leaving": False}).encode())


async def test_members_killed_without_a_word_are_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr("dequeuer.membership.time.monotonic", lambda: now[0])
    members = Membership("svc", "me", expiry=2.5)
    for i in range(100):  # dequeuers killed one after another, each under a random id
        await members._on_heartbeat(beat(f"gone-{i}"))  # type: ignore[arg-type]
    await members._on_heartbeat(beat("alive"))  # type: ignore[arg-type]
    assert len(members._peers) == 101
    now[0] += membership.FORGET_AFTER + 1
    await members._on_heartbeat(beat("alive"))  # type: ignore[arg-type]
    assert members.view() == frozenset({"alive"})
    assert set(members._peers) == {"alive"}


class Wants:
    """Stands in for `Partitions`: records what the coordinator asks for."""

    def __init__(self) -> None:
        self.asked: list[frozenset[int]] = []

    def want(self, indexes: frozenset[int]) -> None:
        self.asked.append(indexes)


async def test_the_log_tells_a_paused_dequeuer_from_a_standby_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    members = Membership("svc", "me", expiry=2.5)
    wants = Wants()
    coordinator = Coordinator(members, wants, 2)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="dequeuer.coordinator"):
        coordinator.set_available(True)  # alone: partitions 0 and 1
        await members._on_heartbeat(beat("bbb"))  # type: ignore[arg-type]  # takes 0
        coordinator.set_available(False)  # bbb takes 1 as well
        paused = caplog.records[-1].getMessage()
        coordinator.set_available(True)  # 1 back
        await members._on_heartbeat(beat("ccc"))  # type: ignore[arg-type]  # takes 1
        standby = caplog.records[-1].getMessage()
    assert wants.asked == [
        frozenset({0, 1}),
        frozenset({1}),
        frozenset(),
        frozenset({1}),
        frozenset(),
    ]
    assert "none (paused: the microservice is not ready)" in paused
    assert "none (standby: the other dequeuers hold every partition)" in standby


async def test_a_pause_keeps_the_partitions_while_nobody_can_take_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given up, they went back to their queues for nobody, each held request's return
    counted against its delivery limit; past PAUSE_HOLD, or when leaving, they go."""
    now = [1000.0]
    monkeypatch.setattr("dequeuer.coordinator.time.monotonic", lambda: now[0])
    members = Membership("svc", "me", expiry=2.5)
    wants = Wants()
    coordinator = Coordinator(members, wants, 2)  # type: ignore[arg-type]
    coordinator.set_available(True)
    coordinator.set_available(False)
    coordinator.set_available(True)
    coordinator.set_available(False)
    assert wants.asked == [frozenset({0, 1})]  # kept through both pauses
    now[0] += coordinator_module.PAUSE_HOLD
    coordinator.rebalance()  # what the pause's timer does
    assert wants.asked == [frozenset({0, 1}), frozenset()]
    coordinator.set_available(True)
    coordinator.set_available(False)
    await members.leave()  # no broker: its heartbeat is not sent
    coordinator.rebalance()  # at a stop, `release_all` gives them up in any case
    assert wants.asked == [frozenset({0, 1}), frozenset(), frozenset({0, 1}), frozenset()]


async def test_an_open_breaker_pauses_the_dequeuer_until_its_probe_is_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its partitions go to a peer, as for a microservice that is not ready; it comes back
    after --breaker-reset for a request to probe, and after each probe that failed stays away
    twice as long. Alone, it keeps them (the breaker's waits are what they were)."""
    later: list[float] = []
    loop = asyncio.get_running_loop()

    def call_later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        later.append(delay)
        return asyncio.TimerHandle(loop.time() + delay, callback, (), loop)

    monkeypatch.setattr(loop, "call_later", call_later)
    members = Membership("svc", "me", expiry=2.5)
    wants = Wants()
    coordinator = Coordinator(members, wants, 2, breaker_reset=10)  # type: ignore[arg-type]
    coordinator.set_available(True)
    coordinator.breaker_changed(OPEN)  # alone: kept
    assert wants.asked == [frozenset({0, 1})]
    coordinator.breaker_changed(CLOSED)
    await members._on_heartbeat(beat("bbb"))  # type: ignore[arg-type]
    mine = wants.asked[-1]
    coordinator.breaker_changed(OPEN)
    assert wants.asked[-1] == frozenset()
    assert coordinator._back is not None
    coordinator._come_back()  # the timer: back for a probe
    assert wants.asked[-1] == mine
    coordinator.breaker_changed(HALF_OPEN)
    coordinator.breaker_changed(OPEN)  # the probe failed
    assert wants.asked[-1] == frozenset()
    coordinator.breaker_changed(CLOSED)  # a probe of its own succeeded meanwhile
    assert wants.asked[-1] == mine
    assert [d for d in later if d != coordinator_module.PAUSE_HOLD] == [10, 10, 20]
