"""`--concurrency` bounds the calls to the microservice, not the requests waiting to make one.

A fake transport stands in for HTTP: each call records itself and waits for the test to answer
it, so what runs at once is observed after yielding to the loop, never by measuring time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from dequeuer.consumer import ABANDONED, Consumer, Outcome
from dequeuer.forwarder import CallFailed
from dequeuer.settings import DequeuerSettings
from shared.breaker import ServiceBreaker
from shared.envelope import HttpRequest, HttpResponse, RequestEnvelope
from shared.metrics import DequeuerMetrics
from shared.settings import load


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class Answering:
    """Calls wait until the test answers them with a status; `running` are those unanswered."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running: dict[str, asyncio.Future[int]] = {}
        self.peak = 0

    async def send(self, request: HttpRequest, timeout: float) -> HttpResponse:
        self.calls.append(request.path)
        answer = self.running[request.path] = asyncio.get_running_loop().create_future()
        self.peak = max(self.peak, len(self.running))
        try:
            return HttpResponse(await answer, (), b"")
        finally:
            del self.running[request.path]

    def answer(self, path: str, status: int = 200) -> None:
        self.running[path].set_result(status)


def make_consumer(transport: Answering, concurrency: int) -> Consumer:
    flags = ["--service", "slots", "--concurrency", str(concurrency), "--max-attempts", "2"]
    settings = load(DequeuerSettings, [*flags, "--retry-backoff-ms", "60000"])
    ready = asyncio.Event()
    ready.set()
    return Consumer(settings, transport, DequeuerMetrics(), ServiceBreaker(100, 10.0), ready)


def envelope(path: str, deadline: float | None = None) -> RequestEnvelope:
    http = HttpRequest("GET", path, "", (), b"")
    return RequestEnvelope(path, "slots", http, None, deadline, None)


@pytest.fixture
async def calls() -> AsyncIterator[list[asyncio.Task[tuple[Outcome, int]]]]:
    started: list[asyncio.Task[tuple[Outcome, int]]] = []
    yield started
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)


def start(
    consumer: Consumer,
    request: RequestEnvelope,
    calls: list[asyncio.Task[tuple[Outcome, int]]],
    abandon: asyncio.Event | None = None,
) -> asyncio.Task[tuple[Outcome, int]]:
    task = asyncio.create_task(consumer.call(request, abandon or asyncio.Event()))
    calls.append(task)
    return task


async def test_no_more_calls_at_once_than_concurrency(
    calls: list[asyncio.Task[tuple[Outcome, int]]],
) -> None:
    transport = Answering()
    consumer = make_consumer(transport, concurrency=2)
    for name in ("/a", "/b", "/c", "/d"):
        start(consumer, envelope(name), calls)
    await settle()
    assert transport.calls == ["/a", "/b"]
    transport.answer("/a")
    await settle()
    assert transport.calls == ["/a", "/b", "/c"]
    for name in ("/b", "/c"):
        transport.answer(name)
        await settle()
    transport.answer("/d")
    results = await asyncio.gather(*calls)
    assert [outcome.status for outcome, _ in results] == [200] * 4  # type: ignore[union-attr]
    assert transport.peak == 2


async def test_a_request_waiting_for_its_retry_leaves_its_slot(
    calls: list[asyncio.Task[tuple[Outcome, int]]],
) -> None:
    """Before, the failing request kept the only slot through its backoff (here 30-60 s), and
    the healthy one waited for it."""
    transport = Answering()
    consumer = make_consumer(transport, concurrency=1)
    give_up = asyncio.Event()
    failing = start(consumer, envelope("/failing"), calls, abandon=give_up)
    await settle()
    healthy = start(consumer, envelope("/healthy"), calls)
    await settle()
    assert transport.calls == ["/failing"]
    transport.answer("/failing", 503)
    await settle()
    assert transport.calls == ["/failing", "/healthy"]
    transport.answer("/healthy")
    outcome, _ = await healthy
    assert isinstance(outcome, HttpResponse) and outcome.status == 200
    assert not failing.done()  # still waiting for its second attempt
    give_up.set()
    assert await failing == (ABANDONED, 1)


async def test_given_up_while_waiting_for_a_slot_is_not_called(
    calls: list[asyncio.Task[tuple[Outcome, int]]],
) -> None:
    transport = Answering()
    consumer = make_consumer(transport, concurrency=1)
    start(consumer, envelope("/busy"), calls)
    give_up = asyncio.Event()
    waiting = start(consumer, envelope("/handed-over"), calls, abandon=give_up)
    await settle()
    give_up.set()
    transport.answer("/busy")
    assert await waiting == (ABANDONED, 0)
    assert transport.calls == ["/busy"]


async def test_deadline_passed_while_waiting_for_a_slot_is_not_called(
    calls: list[asyncio.Task[tuple[Outcome, int]]],
) -> None:
    transport = Answering()
    consumer = make_consumer(transport, concurrency=1)
    start(consumer, envelope("/busy"), calls)
    soon = time.time() + 0.05
    waiting = start(consumer, envelope("/late", deadline=soon), calls)
    await settle()
    while time.time() <= soon:
        await asyncio.sleep(0.01)
    transport.answer("/busy")
    assert await waiting == (None, 0)
    assert transport.calls == ["/busy"]


class Refusing:
    """Every call fails as `connect`; `sent` says whether it left (a reset) or not (refused)."""

    def __init__(self, sent: bool) -> None:
        self.sent = sent
        self.calls = 0

    async def send(self, request: HttpRequest, timeout: float) -> HttpResponse:
        self.calls += 1
        raise CallFailed("connect", "refused", sent=self.sent)


@pytest.mark.parametrize("sent", [True, False])
async def test_only_calls_that_were_sent_are_attempts(sent: bool) -> None:
    """A refused call is retried within the deadline, none of --max-attempts (2 here)."""
    transport = Refusing(sent)
    flags = ["--service", "slots", "--max-attempts", "2", "--retry-backoff-ms", "10"]
    consumer = Consumer(
        load(DequeuerSettings, flags),
        transport,
        DequeuerMetrics(),
        ServiceBreaker(100, 10.0),
        asyncio.Event(),
    )
    consumer.ready.set()
    outcome, attempts = await consumer.call(envelope("/x", time.time() + 0.5), asyncio.Event())
    assert isinstance(outcome, CallFailed) and outcome.sent is sent
    if sent:
        assert (attempts, transport.calls) == (2, 2)
    else:
        assert attempts == 0 and transport.calls > 2


class AlmostDue(RequestEnvelope):
    """Less than a millisecond left, whenever asked."""

    def remaining(self, now: float | None = None) -> float | None:
        return 0.0004


async def test_a_deadline_less_than_a_millisecond_away_is_not_called(
    calls: list[asyncio.Task[tuple[Outcome, int]]],
) -> None:
    """The microservice was called with `X-Request-Timeout: 0.000`: no time at all, which it
    may read as no limit, or refuse. Such a request is dropped as expired, as at 0."""
    transport = Answering()
    consumer = make_consumer(transport, concurrency=1)
    http = HttpRequest("GET", "/due", "", (), b"")
    request = AlmostDue("/due", "slots", http, None, time.time(), None)
    async with asyncio.timeout(5):
        assert await start(consumer, request, calls) == (None, 0)
    assert transport.calls == []
