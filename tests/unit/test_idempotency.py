"""Idempotency keys: same key, same first request, until the window or a timeout ends it."""

from __future__ import annotations

import asyncio

import pytest

from enqueuer.idempotency import IdempotencyStore, fingerprint
from shared.envelope import HttpResponse
from shared.errors import Backpressure, BrokerUnavailable, GatewayTimeout, IdempotencyKeyReused

SAME = fingerprint("POST", "/svc/pay", "", b"{}")  # one request, repeated


async def test_repeat_gets_the_first() -> None:
    store = IdempotencyStore(window=60, capacity=10, max_bytes=1 << 20)
    future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
    store.remember("svc", "k", "id-1", future, SAME)
    first = store.get("svc", "k", SAME)
    assert first is not None
    assert first.request_id == "id-1"
    assert store.get("other", "k", SAME) is None  # per service


@pytest.mark.parametrize("ended", ["deadline", "reply lost"])
async def test_a_timed_out_first_is_forgotten(ended: str) -> None:
    """A retry after a 504 really tries again: at the deadline (the future is cancelled), and
    when the reply queue expired with the reply (the future fails with 504)."""
    store = IdempotencyStore(window=60, capacity=10, max_bytes=1 << 20)
    future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
    store.remember("svc", "k", "id-1", future, SAME)
    if ended == "deadline":
        future.cancel()
    else:
        future.set_exception(GatewayTimeout("the reply queue expired"))
    await asyncio.sleep(0)  # the done callback
    assert store.get("svc", "k", SAME) is None


async def test_window_and_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("enqueuer.idempotency.time.monotonic", lambda: now[0])
    store = IdempotencyStore(window=10, capacity=2, max_bytes=1 << 20)
    loop = asyncio.get_running_loop()
    for key in ("a", "b", "c"):
        future: asyncio.Future[HttpResponse] = loop.create_future()
        store.remember("svc", key, key, future, SAME)
        future.set_result(answer(1))
        await asyncio.sleep(0)  # the done callback
    assert store.get("svc", "a", SAME) is None  # over capacity: oldest out
    assert store.get("svc", "c", SAME) is not None
    now[0] += 11
    assert store.get("svc", "c", SAME) is None  # the window passed
    assert len(store) == 0


def answer(size: int) -> HttpResponse:
    return HttpResponse(200, (), b"x" * size)


async def test_running_firsts_are_not_dropped_for_the_answers_of_others() -> None:
    """They hold no answer: dropped, their repeat would be a second message."""
    store = IdempotencyStore(window=60, capacity=1, max_bytes=1000)
    loop = asyncio.get_running_loop()
    running: asyncio.Future[HttpResponse] = loop.create_future()
    store.remember("svc", "running", "id-0", running, SAME)
    for key in ("a", "b"):
        future: asyncio.Future[HttpResponse] = loop.create_future()
        store.remember("svc", key, key, future, SAME)
        future.set_result(answer(800))
        await asyncio.sleep(0)
    assert store.get("svc", "a", SAME) is None and store.get("svc", "b", SAME) is not None
    first = store.get("svc", "running", SAME)
    assert first is not None and first.request_id == "id-0"
    running.set_result(answer(300))
    await asyncio.sleep(0)
    assert store.get("svc", "b", SAME) is None  # now the oldest answer
    assert store.get("svc", "running", SAME) is not None and store.bytes == 300


async def test_answers_beyond_max_bytes_evict_the_oldest() -> None:
    store = IdempotencyStore(window=60, capacity=100, max_bytes=1000)
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[HttpResponse]] = []
    for key in ("a", "b", "c"):
        future: asyncio.Future[HttpResponse] = loop.create_future()
        store.remember("svc", key, key, future, SAME)
        futures.append(future)
    assert store.bytes == 0  # nothing answered yet: nothing held
    for future in futures:
        future.set_result(answer(400))
    await asyncio.sleep(0)  # the done callbacks
    assert store.get("svc", "a", SAME) is None  # 1200 bytes: the oldest went
    assert store.get("svc", "b", SAME) is not None and store.get("svc", "c", SAME) is not None
    assert store.bytes == 800


async def test_the_newest_answer_is_kept_whatever_its_size() -> None:
    store = IdempotencyStore(window=60, capacity=100, max_bytes=1000)
    future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
    store.remember("svc", "big", "id-1", future, SAME)
    future.set_result(answer(5000))
    await asyncio.sleep(0)
    first = store.get("svc", "big", SAME)
    assert first is not None and first.request_id == "id-1"
    assert store.bytes == 5000


async def test_a_first_still_running_is_kept_past_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An asynchronous request waits in its queue as long as it takes (a backlog, a service
    scaled to zero): its key was forgotten at the end of the window, and a repeat then was a
    second message. Answered past the window, it is forgotten at once, and never counted."""
    now = [1000.0]
    monkeypatch.setattr("enqueuer.idempotency.time.monotonic", lambda: now[0])
    store = IdempotencyStore(window=10, capacity=100, max_bytes=1000)
    future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
    store.remember("svc", "k", "id-1", future, SAME)
    now[0] += 600
    first = store.get("svc", "k", SAME)
    assert first is not None and first.request_id == "id-1"
    future.set_result(answer(600))
    await asyncio.sleep(0)  # the done callback
    assert store.get("svc", "k", SAME) is None
    assert (len(store), store.bytes) == (0, 0)


async def test_answers_of_one_loop_pass_are_counted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two answers set in one loop pass, the younger first, while the older is past its
    window: the older was taken off the total without ever being counted, and the total went
    negative, so --max-result-bytes no longer bounded what was kept."""
    now = [1000.0]
    monkeypatch.setattr("enqueuer.idempotency.time.monotonic", lambda: now[0])
    store = IdempotencyStore(window=10, capacity=100, max_bytes=1000)
    loop = asyncio.get_running_loop()
    older: asyncio.Future[HttpResponse] = loop.create_future()
    younger: asyncio.Future[HttpResponse] = loop.create_future()
    store.remember("svc", "older", "id-1", older, SAME)
    now[0] += 5
    store.remember("svc", "younger", "id-2", younger, SAME)
    now[0] += 6  # the older's window is over, the younger's is not
    younger.set_result(answer(10))
    older.set_result(answer(500))
    await asyncio.sleep(0)
    assert store.bytes == 10 and len(store) == 1
    for i in range(20):
        future: asyncio.Future[HttpResponse] = loop.create_future()
        store.remember("svc", f"k{i}", f"id-k{i}", future, SAME)
        future.set_result(answer(100))
        await asyncio.sleep(0)
    assert store.bytes == 1000 and len(store) == 10


async def test_a_repeat_fails_as_its_first_did() -> None:
    store = IdempotencyStore(window=60, capacity=10, max_bytes=1 << 20)
    future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
    first = store.remember("svc", "k", "id-1", future, SAME)
    waiting = asyncio.create_task(first.wait_published())
    await asyncio.sleep(0)
    assert not waiting.done()  # still publishing
    first.settle(Backpressure("partition full", retry_after=1))
    with pytest.raises(Backpressure):
        await waiting
    other = store.remember("svc", "j", "id-2", future, SAME)
    other.settle(ConnectionResetError())
    with pytest.raises(BrokerUnavailable):
        await other.wait_published()


async def test_headers_count_against_max_bytes() -> None:
    """An answer's headers may take a whole AMQP frame (128 KiB) with no body."""
    store = IdempotencyStore(window=60, capacity=100, max_bytes=1000)
    loop = asyncio.get_running_loop()
    for key in ("a", "b", "c"):
        future: asyncio.Future[HttpResponse] = loop.create_future()
        store.remember("svc", key, key, future, SAME)
        future.set_result(HttpResponse(204, (("X-Big", "v" * 395),), b""))
    await asyncio.sleep(0)  # the done callbacks
    assert store.get("svc", "a", SAME) is None
    assert store.bytes == 800


async def test_a_key_reused_for_another_request_is_refused() -> None:
    store = IdempotencyStore(window=60, capacity=10, max_bytes=1 << 20)
    future: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
    pay = fingerprint("POST", "/pay", "", b"1")
    store.remember("svc", "k", "id-1", future, pay)
    first = store.get("svc", "k", fingerprint("POST", "/pay", "", b"1"))
    assert first is not None and first.request_id == "id-1"
    for other in (
        ("PUT", "/pay", "", b"1"),
        ("POST", "/pay", "a", b"1"),
        ("POST", "/pay", "", b""),
    ):
        with pytest.raises(IdempotencyKeyReused):
            store.get("svc", "k", fingerprint(*other))
    assert fingerprint("POST", "/pa", "y", b"") != fingerprint("POST", "/pay", "", b"")
