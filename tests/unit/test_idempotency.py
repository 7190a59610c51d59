"""Idempotency keys: same key, same first request, until the window or a timeout ends it."""

from __future__ import annotations

import asyncio

import pytest

from enqueuer.idempotency import IdempotencyStore
from shared.envelope import HttpResponse


async def test_repeat_gets_the_first() -> None:
    store = IdempotencyStore(window=60, capacity=10)
    future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
    store.remember("svc", "k", "id-1", future)
    first = store.get("svc", "k")
    assert first is not None
    assert first.request_id == "id-1"
    assert store.get("other", "k") is None  # per service


async def test_a_timed_out_first_is_forgotten() -> None:
    store = IdempotencyStore(window=60, capacity=10)
    future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
    store.remember("svc", "k", "id-1", future)
    future.cancel()
    assert store.get("svc", "k") is None


async def test_window_and_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("enqueuer.idempotency.time.monotonic", lambda: now[0])
    store = IdempotencyStore(window=10, capacity=2)
    loop = asyncio.get_running_loop()
    for key in ("a", "b", "c"):
        store.remember("svc", key, key, loop.create_future())
    assert store.get("svc", "a") is None  # over capacity: oldest out
    assert store.get("svc", "c") is not None
    now[0] += 11
    assert store.get("svc", "c") is None  # the window passed
    assert len(store) == 0
