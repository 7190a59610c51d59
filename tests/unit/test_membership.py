"""Membership's memory of its peers, without a broker: heartbeats are handed in directly."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from dequeuer import membership
from dequeuer.membership import Membership


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
