"""Batching without a broker: `BatchingTransport` over a fake inner transport (and once over the
real `HttpTransport` and a local server), the dequeuer's batch settings, and url-fetcher's
`POST /batch` dispatching items to its own routes."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dequeuer.batching import BatchingTransport, answer_limit, decode_batch, encode_batch
from dequeuer.consumer import Consumer
from dequeuer.forwarder import CallFailed, HttpTransport
from dequeuer.settings import DequeuerSettings
from shared.breaker import CLOSED, ServiceBreaker
from shared.cli import bench_batch
from shared.envelope import HttpRequest, HttpResponse, RequestEnvelope
from shared.metrics import DequeuerMetrics
from shared.processes import free_port
from shared.settings import load
from tests.conftest import serving
from tests.url_fetcher.support import PAGE, base_url, start_target
from url_fetcher.app import create_app
from url_fetcher.settings import UrlFetcherSettings

Answer = Callable[[list[dict[str, object]]], Awaitable[HttpResponse]]


def req(path: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> HttpRequest:
    return HttpRequest("POST", path, "a=1", headers, body)


def item_answer(status: int = 200, body: bytes = b"", headers: list[list[str]] | None = None):
    return {"status": status, "headers": headers or [], "body": base64.b64encode(body).decode()}


def ok_json(items: list[object]) -> HttpResponse:
    return HttpResponse(200, (("Content-Type", "application/json"),), json.dumps(items).encode())


async def echo_paths(items: list[dict[str, object]]) -> HttpResponse:
    """Each item answered with its own path as body: shows which caller got which answer."""
    return ok_json([item_answer(200, str(item["path"]).encode()) for item in items])


@dataclass
class FakeInner:
    """Records each batch call (its items, its timeout) and answers with `answer`."""

    answer: Answer = echo_paths
    calls: list[tuple[list[dict[str, object]], float]] = field(default_factory=list)
    requests: list[HttpRequest] = field(default_factory=list)
    closed: bool = False
    cancelled: int = 0

    async def send(self, request: HttpRequest, timeout: float) -> HttpResponse:
        items = json.loads(request.body)
        self.requests.append(request)
        self.calls.append((items, timeout))
        try:
            return await self.answer(items)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def close(self) -> None:
        self.closed = True

    @property
    def sizes(self) -> list[int]:
        return [len(items) for items, _ in self.calls]


@pytest.fixture
async def inner() -> FakeInner:
    return FakeInner()


def batcher(inner: FakeInner, size: int = 4, wait: float = 10.0, **kw) -> BatchingTransport:
    return BatchingTransport(inner, size=size, wait=wait, path="/batch", **kw)


async def test_flushes_when_the_batch_is_full(inner: FakeInner) -> None:
    transport = batcher(inner, size=3, wait=10.0)  # the timer would never fire in time
    async with asyncio.timeout(2):
        answers = await asyncio.gather(*(transport.send(req(f"/p{i}"), 5) for i in range(6)))
    assert inner.sizes == [3, 3]
    assert [a.body for a in answers] == [f"/p{i}".encode() for i in range(6)]
    assert transport.pending == 0


async def test_flushes_after_the_wait(inner: FakeInner) -> None:
    transport = batcher(inner, size=10, wait=0.05)
    started = time.monotonic()
    answers = await asyncio.gather(transport.send(req("/a"), 5), transport.send(req("/b"), 5))
    assert time.monotonic() - started >= 0.045
    assert inner.sizes == [2]
    assert [a.body for a in answers] == [b"/a", b"/b"]


async def test_the_wait_starts_with_the_first_item(inner: FakeInner) -> None:
    """A trickle of requests does not keep postponing the flush. Judged by the batches, not the
    clock: postponed by each arrival (0.03 s apart), all seven would go in one batch."""
    transport = batcher(inner, size=100, wait=0.1)
    first = asyncio.ensure_future(transport.send(req("/first"), 5))
    late = []
    for i in range(6):
        await asyncio.sleep(0.03)
        late.append(asyncio.ensure_future(transport.send(req(f"/late{i}"), 5)))
    await asyncio.gather(first, *late)
    assert len(inner.calls) >= 2, inner.sizes
    assert sum(inner.sizes) == 7


async def test_wait_zero_batches_what_arrives_in_one_loop_turn(inner: FakeInner) -> None:
    transport = batcher(inner, size=100, wait=0)
    await asyncio.gather(*(transport.send(req(f"/p{i}"), 5) for i in range(5)))
    assert inner.sizes == [5]


async def test_each_caller_gets_its_own_answer_in_order(inner: FakeInner) -> None:
    """The answer array is matched to callers by position, whatever order callers finish in."""

    async def reversed_work(items: list[dict[str, object]]) -> HttpResponse:
        await asyncio.sleep(0.01)
        return ok_json(
            [
                item_answer(200 + i, base64.b64decode(str(item["body"])), [["X-Item", str(i)]])
                for i, item in enumerate(items)
            ]
        )

    inner.answer = reversed_work
    transport = batcher(inner, size=4)
    answers = await asyncio.gather(
        *(transport.send(req(f"/p{i}", f"body {i}".encode()), 5) for i in range(4))
    )
    for i, answer in enumerate(answers):
        assert answer.status == 200 + i
        assert answer.body == f"body {i}".encode()
        assert answer.headers == (("X-Item", str(i)),)


async def test_the_wire_format(inner: FakeInner) -> None:
    transport = batcher(inner, size=1)
    await transport.send(
        HttpRequest("PUT", "/x/y", "q=1&r=%20", (("X-A", "1"), ("X-A", "2")), b"\x00\xffbin"), 5
    )
    (call,) = inner.requests
    assert (call.method, call.path, call.query) == ("POST", "/batch", "")
    assert ("Content-Type", "application/json") in call.headers
    assert json.loads(call.body) == [
        {
            "method": "PUT",
            "path": "/x/y",
            "query": "q=1&r=%20",
            "headers": [["X-A", "1"], ["X-A", "2"]],
            "body": base64.b64encode(b"\x00\xffbin").decode(),
        }
    ]


async def test_one_failing_item_fails_alone(inner: FakeInner) -> None:
    async def one_busy(items: list[dict[str, object]]) -> HttpResponse:
        return ok_json(
            [item_answer(503 if item["path"] == "/bad" else 200, b"x") for item in items]
        )

    inner.answer = one_busy
    transport = batcher(inner, size=3)
    answers = await asyncio.gather(
        *(transport.send(req(p), 5) for p in ("/good1", "/bad", "/good2"))
    )
    assert [a.status for a in answers] == [200, 503, 200]


@pytest.mark.parametrize(
    ("failure", "kind"),
    [(CallFailed("connect", "refused"), "connect"), (CallFailed("timeout", "slow"), "timeout")],
)
async def test_no_answer_fails_every_item_the_same_way(
    inner: FakeInner, failure: CallFailed, kind: str
) -> None:
    async def fail(items: list[dict[str, object]]) -> HttpResponse:
        raise failure

    inner.answer = fail
    transport = batcher(inner, size=3)
    outcomes = await asyncio.gather(
        *(transport.send(req(f"/p{i}"), 5) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, CallFailed) and o.kind == kind for o in outcomes)
    assert len({id(o) for o in outcomes}) == 3  # one exception object per caller
    assert "batch of 3" in str(outcomes[0])


@pytest.mark.parametrize(
    ("status", "retry_after"), [(503, (("Retry-After", "1"),)), (500, ())], ids=["503", "500"]
)
async def test_a_5xx_batch_answer_gives_each_item_its_status_alone(
    inner: FakeInner,
    status: int,
    retry_after: tuple[tuple[str, str], ...],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each item gets the status (and a `Retry-After`, which its retry waits for), not the
    batch answer's body and headers: a framework's debug page repeats the batch request, so
    each caller read the others' requests, headers included, and every caller got its
    `Set-Cookie`. The operator has the status in the log; the body is not logged either."""
    secret = b"<pre>X-Api-Key: secret of /a</pre>"

    async def failed(items: list[dict[str, object]]) -> HttpResponse:
        headers = (("Content-Type", "text/html"), ("Set-Cookie", "session=1"), *retry_after)
        return HttpResponse(status, headers, secret)

    inner.answer = failed
    transport = batcher(inner, size=2)
    answers = await asyncio.gather(transport.send(req("/a"), 5), transport.send(req("/b"), 5))
    assert list(answers) == [HttpResponse(status, retry_after, b"")] * 2
    assert f"answered {status}" in caplog.text
    assert secret.decode() not in caplog.text


@pytest.mark.parametrize(
    "answer",
    [
        HttpResponse(404, (), b'{"error": "no batch endpoint"}'),
        HttpResponse(400, (), b"too many"),
        HttpResponse(200, (), b"not json"),
        HttpResponse(200, (), b'{"not": "an array"}'),
        HttpResponse(200, (), json.dumps([item_answer()]).encode()),  # one answer for two
        HttpResponse(200, (), json.dumps([item_answer()] * 3).encode()),  # three for two
    ],
    ids=["404", "400", "not-json", "not-array", "too-short", "too-long"],
)
async def test_a_broken_batch_answer_fails_every_item(
    inner: FakeInner, answer: HttpResponse, caplog: pytest.LogCaptureFixture
) -> None:
    """And its body is not logged: it may echo the callers' requests (the first 200 bytes of a
    non-200 answer were)."""

    async def broken(items: list[dict[str, object]]) -> HttpResponse:
        return answer

    inner.answer = broken
    transport = batcher(inner, size=2)
    outcomes = await asyncio.gather(
        transport.send(req("/a"), 5), transport.send(req("/b"), 5), return_exceptions=True
    )
    assert all(isinstance(o, CallFailed) and o.kind == "connect" for o in outcomes), outcomes
    assert caplog.records and answer.body.decode() not in caplog.text


@pytest.mark.parametrize(
    "bad",
    [
        {"status": "200", "body": ""},
        {"status": 99},
        {"status": 101},
        {"status": True},
        {"status": 200, "body": "not base64!"},
        {"status": 200, "body": 12},
        {"status": 200, "headers": [["Bad Name", "v"]]},
        {"status": 200, "headers": [["X-Split", "a\r\nInjected: 1"]]},
        {"status": 200, "headers": {"X-A": "1"}},
        "a string",
    ],
)
async def test_a_malformed_item_fails_alone(inner: FakeInner, bad: object) -> None:
    async def one_bad(items: list[dict[str, object]]) -> HttpResponse:
        return ok_json([item_answer(200, b"a"), bad, item_answer(201, b"c")])

    inner.answer = one_bad
    transport = batcher(inner, size=3)
    a, b, c = await asyncio.gather(
        *(transport.send(req(f"/p{i}"), 5) for i in range(3)), return_exceptions=True
    )
    assert isinstance(a, HttpResponse) and a.body == b"a"
    assert isinstance(b, CallFailed) and b.kind == "connect" and "item 1" in str(b)
    assert isinstance(c, HttpResponse) and c.status == 201


def test_decoding_is_lenient_only_where_documented() -> None:
    """`headers` and `body` may be left out; hop-by-hop headers are dropped like a plain call's."""
    (answer,) = decode_batch(
        json.dumps([{"status": 204, "headers": [["Connection", "close"], ["X-A", "1"]]}]).encode(),
        1,
    )
    assert answer == HttpResponse(204, (("X-A", "1"),), b"")
    (only,) = json.loads(encode_batch([HttpRequest("GET", "/", "", (), b"")]))
    assert only == {"method": "GET", "path": "/", "query": "", "headers": [], "body": ""}


def test_a_header_byte_that_is_no_utf8_is_left_out() -> None:
    """aiohttp keeps such a byte (a latin-1 `é`) as a lone surrogate and leaves it out of a plain
    call; in a batch's JSON it was a `\\udce9` escape, which strict JSON readers refuse and
    url-fetcher answered 500."""
    body = encode_batch([HttpRequest("GET", "/", "", (("X-Note", "caf\udce9"),), b"")])
    assert b"\\ud" not in body
    (only,) = json.loads(body)
    assert only["headers"] == [["X-Note", "caf"]]


async def test_the_batch_timeout_is_the_largest_remaining(inner: FakeInner) -> None:
    transport = batcher(inner, size=3)
    await asyncio.gather(
        transport.send(req("/a"), 5.0), transport.send(req("/b"), 2.0), transport.send(req("/c"), 9)
    )
    ((_, timeout),) = inner.calls
    assert 8.9 < timeout <= 9.0


async def test_each_item_times_out_alone(inner: FakeInner) -> None:
    """An impatient caller gives up at its own timeout; the others of its batch get their
    answers from the same call, not a timeout (and a retry, running them twice)."""
    release = asyncio.Event()

    async def slow(items: list[dict[str, object]]) -> HttpResponse:
        await release.wait()
        return await echo_paths(items)

    inner.answer = slow
    transport = batcher(inner, size=3)
    short = asyncio.ensure_future(transport.send(req("/short"), 0.05))
    others = asyncio.gather(transport.send(req("/a"), 5), transport.send(req("/b"), 5))
    with pytest.raises(CallFailed) as caught:
        async with asyncio.timeout(2):  # the fake ignores the call's timeout
            await short
    assert caught.value.kind == "timeout"
    release.set()
    assert [answer.body for answer in await others] == [b"/a", b"/b"]
    assert inner.sizes == [3]
    assert inner.cancelled == 0


async def test_a_batch_whose_items_all_timed_out_is_cancelled(inner: FakeInner) -> None:
    async def never(items: list[dict[str, object]]) -> HttpResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    inner.answer = never  # the fake ignores the call's timeout: only the items' own end it
    transport = batcher(inner, size=2)
    calls = [transport.send(req("/a"), 0.05), transport.send(req("/b"), 0.1)]
    async with asyncio.timeout(2):
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert [o.kind for o in outcomes if isinstance(o, CallFailed)] == ["timeout", "timeout"]
    await asyncio.sleep(0)
    assert inner.cancelled == 1
    assert transport.in_flight == 0


async def test_time_spent_waiting_for_the_batch_counts(inner: FakeInner) -> None:
    """An item whose own timeout ran out while its batch filled is not sent at all."""
    transport = batcher(inner, size=10, wait=0.1)
    short = asyncio.ensure_future(transport.send(req("/short"), 0.05))
    long = asyncio.ensure_future(transport.send(req("/long"), 5))
    with pytest.raises(CallFailed) as caught:
        await short
    assert caught.value.kind == "timeout"
    assert (await long).body == b"/long"
    ((items, timeout),) = inner.calls
    assert [i["path"] for i in items] == ["/long"]
    assert timeout <= 4.95


async def test_a_request_whose_time_ran_out_in_its_batch_is_expired_unsent() -> None:
    """A request whose caller's deadline passed while its batch filled was never sent, yet it
    was reported as a call that timed out: counted against the breaker (here it opened it),
    as an attempt, and dead-lettered as the microservice's timeout. A plain request whose
    deadline passes before its call is dropped as expired, and so is this one."""
    inner = FakeInner()
    transport = batcher(inner, size=2, wait=5.0)
    flags = ["--service", "hunt-batching-expiry", "--batch-size", "2", "--concurrency", "2"]
    breaker = ServiceBreaker(1, 60.0)
    ready = asyncio.Event()
    ready.set()
    consumer = Consumer(load(DequeuerSettings, flags), transport, DequeuerMetrics(), breaker, ready)

    def envelope(path: str, deadline: float | None = None) -> RequestEnvelope:
        http = HttpRequest("GET", path, "", (), b"")
        return RequestEnvelope(path, "s", http, None, deadline, None)

    # A full batch, answered at once: the microservice is known to be quick.
    answered = await asyncio.gather(
        consumer.call(envelope("/a"), asyncio.Event()),
        consumer.call(envelope("/b"), asyncio.Event()),
    )
    assert [outcome.status for outcome, _ in answered] == [200, 200]  # type: ignore[union-attr]
    async with asyncio.timeout(2):
        late = await consumer.call(envelope("/late", time.time() + 0.05), asyncio.Event())
    assert late == (None, 0)
    assert breaker.state == CLOSED
    assert inner.sizes == [2]


async def test_a_request_with_time_left_is_not_dropped_when_its_call_ran_out_in_its_batch() -> None:
    """Only the caller's deadline makes an unsent request expired. A request without one (or
    with time left) whose --call-timeout ran out while its batch filled (an event loop stall,
    a --call-timeout a hair above --batch-wait-ms) was acked and dropped as expired: no reply,
    no dead letter. It is a timeout of its call, retried and dead-lettered as such."""
    inner = FakeInner()
    transport = batcher(inner, size=2, wait=5.0)  # longer than --call-timeout: it never fills
    flags = ["--service", "s", "--batch-size", "2", "--concurrency", "2"]
    settings = load(DequeuerSettings, [*flags, "--max-attempts", "1", "--call-timeout", "0.2"])
    ready = asyncio.Event()
    ready.set()
    consumer = Consumer(settings, transport, DequeuerMetrics(), ServiceBreaker(5, 60.0), ready)
    request = RequestEnvelope("r", "s", HttpRequest("GET", "/r", "", (), b""), None, None, None)
    async with asyncio.timeout(2):
        outcome, attempts = await consumer.call(request, asyncio.Event())
    assert isinstance(outcome, CallFailed) and outcome.kind == "timeout"
    assert attempts == 1
    assert inner.calls == []


async def test_an_item_with_less_than_a_millisecond_left_is_not_sent(inner: FakeInner) -> None:
    """It was sent with `X-Request-Timeout: 0.000`, which a microservice may read as no limit:
    the plain call's rule (`MIN_BUDGET`) holds for the time left when the batch is sent."""
    transport = batcher(inner, size=1)
    with pytest.raises(CallFailed) as caught:
        await transport.send(req("/due"), 0.0004)
    assert (caught.value.kind, caught.value.sent) == ("timeout", False)
    assert inner.calls == []


async def test_the_time_left_an_item_tells_is_what_is_left_when_its_batch_is_sent(
    inner: FakeInner,
) -> None:
    """X-Request-Timeout was the time left when the request joined its batch: after a
    --batch-wait-ms of 300 ms, the microservice was told 5 s where 4.7 were left."""
    transport = batcher(inner, size=10, wait=0.3)
    told = (("X-Request-Timeout", "5.000"), ("X-Other", "1"))
    await transport.send(req("/a", headers=told), 5)
    ((items, timeout),) = inner.calls
    headers = items[0]["headers"]
    assert isinstance(headers, list)
    assert [name for name, _ in headers] == ["X-Request-Timeout", "X-Other"]
    left = float(headers[0][1])
    assert 3 < left <= 4.75
    assert abs(left - timeout) < 0.01


async def test_on_batch_sees_each_batch_size(inner: FakeInner) -> None:
    sizes: list[int] = []
    transport = batcher(inner, size=4, wait=0.02, on_batch=sizes.append)
    await asyncio.gather(*(transport.send(req(f"/p{i}"), 5) for i in range(6)))
    assert sizes == [4, 2] == inner.sizes


async def test_a_caller_that_gives_up_leaves_its_batch(inner: FakeInner) -> None:
    transport = batcher(inner, size=10, wait=0.05)
    quitter = asyncio.ensure_future(transport.send(req("/quitter"), 5))
    stayer = asyncio.ensure_future(transport.send(req("/stayer"), 5))
    await asyncio.sleep(0)
    quitter.cancel()
    assert (await stayer).body == b"/stayer"
    ((items, _),) = inner.calls
    assert [i["path"] for i in items] == ["/stayer"]


async def test_a_caller_that_gives_up_before_its_batch_call_starts_is_not_sent(
    inner: FakeInner,
) -> None:
    """Between the flush and the first step of the batch call, a caller that gave up (its lane
    cancelled as the dequeuer stops) was still sent: its message goes back to the queue, and
    the microservice ran it twice."""
    transport = batcher(inner, size=2)
    quitter = asyncio.ensure_future(transport.send(req("/quitter"), 5))
    stayer = asyncio.ensure_future(transport.send(req("/stayer"), 5))
    await asyncio.sleep(0)  # both joined and the batch was flushed; its call has not started
    assert (transport.pending, transport.in_flight) == (0, 1)
    quitter.cancel()
    assert (await stayer).body == b"/stayer"
    ((items, _),) = inner.calls
    assert [i["path"] for i in items] == ["/stayer"]


async def test_a_batch_nobody_waits_for_is_cancelled(inner: FakeInner) -> None:
    release = asyncio.Event()

    async def slow(items: list[dict[str, object]]) -> HttpResponse:
        await release.wait()
        return await echo_paths(items)

    inner.answer = slow
    transport = batcher(inner, size=2)
    callers = [asyncio.ensure_future(transport.send(req(f"/p{i}"), 5)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert transport.in_flight == 1
    callers[0].cancel()
    await asyncio.sleep(0.01)
    assert transport.in_flight == 1  # one caller still waits
    callers[1].cancel()
    await asyncio.sleep(0.01)
    assert transport.in_flight == 0
    assert inner.cancelled == 1


async def test_close_fails_pending_and_in_flight_items(inner: FakeInner) -> None:
    never = asyncio.Event()

    async def hang(items: list[dict[str, object]]) -> HttpResponse:
        await never.wait()
        raise AssertionError("unreachable")

    inner.answer = hang
    transport = batcher(inner, size=2, wait=10.0)
    in_flight = [asyncio.ensure_future(transport.send(req(f"/f{i}"), 30)) for i in range(2)]
    pending = asyncio.ensure_future(transport.send(req("/pending"), 30))
    await asyncio.sleep(0.01)
    assert (transport.in_flight, transport.pending) == (1, 1)
    async with asyncio.timeout(1):
        await transport.close()
        outcomes = await asyncio.gather(*in_flight, pending, return_exceptions=True)
    assert all(isinstance(o, CallFailed) and o.kind == "connect" for o in outcomes), outcomes
    assert inner.closed
    assert (transport.in_flight, transport.pending) == (0, 0)
    with pytest.raises(CallFailed):
        await transport.send(req("/after"), 5)


async def test_close_settles_a_batch_cancelled_before_it_ran(inner: FakeInner) -> None:
    """A task cancelled before its first step runs none of its code: its items are still
    settled (by the task's done callback), so no caller waits forever."""
    transport = batcher(inner, size=1)
    caller = asyncio.ensure_future(transport.send(req("/x"), 5))
    await asyncio.sleep(0)  # send() ran and flushed; the batch task has not started
    await transport.close()
    with pytest.raises(CallFailed):
        await asyncio.wait_for(caller, 1)
    assert inner.calls == []


async def test_an_unexpected_error_is_every_items_failure(inner: FakeInner) -> None:
    async def bug(items: list[dict[str, object]]) -> HttpResponse:
        raise KeyError("oops")

    inner.answer = bug
    transport = batcher(inner, size=2)
    outcomes = await asyncio.gather(
        transport.send(req("/a"), 5), transport.send(req("/b"), 5), return_exceptions=True
    )
    assert all(isinstance(o, CallFailed) and "KeyError" in str(o) for o in outcomes)


def test_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="start with"):
        BatchingTransport(FakeInner(), size=2, wait=0, path="batch")
    with pytest.raises(ValueError, match="at least 1"):
        BatchingTransport(FakeInner(), size=0, wait=0, path="/batch")


# --- over real HTTP ------------------------------------------------------------------------


@pytest.fixture
async def batch_server() -> AsyncIterator[tuple[str, list[web.Request]]]:
    """A microservice implementing the batch protocol the simplest way: echo each item."""
    seen: list[web.Request] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request)
        items = await request.json()
        return web.json_response(
            [
                {
                    "status": 200,
                    "headers": [["X-Path", item["path"]], ["Transfer-Encoding", "chunked"]],
                    "body": item["body"],
                }
                for item in items
            ]
        )

    app = web.Application()
    app.router.add_post("/batch", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_over_http(batch_server: tuple[str, list[web.Request]]) -> None:
    url, seen = batch_server
    transport = BatchingTransport(HttpTransport(url, 4, 1 << 20), size=3, wait=0.01, path="/batch")
    try:
        answers = await asyncio.gather(
            *(transport.send(req(f"/p{i}", f"b{i}".encode()), 5) for i in range(3))
        )
    finally:
        await transport.close()
    assert [a.body for a in answers] == [b"b0", b"b1", b"b2"]
    assert answers[1].headers == (("X-Path", "/p1"),)  # hop-by-hop dropped
    assert len(seen) == 1 and seen[0].content_type == "application/json"


async def test_over_http_answer_over_max_response(
    batch_server: tuple[str, list[web.Request]],
) -> None:
    """A batch answer over the inner transport's limit (the dequeuer's is `answer_limit`): each
    item fails `too_large`, which no --retry-on can make retryable."""
    url, seen = batch_server
    transport = BatchingTransport(
        HttpTransport(url, 4, 100), size=3, wait=0.01, path="/batch", max_response=10
    )
    try:
        outcomes = await asyncio.gather(
            *(transport.send(req(f"/p{i}", b"x" * 20), 5) for i in range(3)),
            return_exceptions=True,
        )
    finally:
        await transport.close()
    assert all(isinstance(o, CallFailed) and o.kind == "too_large" for o in outcomes)
    assert f"the batch answer is over {answer_limit(3, 10)} bytes" in str(outcomes[0])
    assert len(seen) == 1


async def test_over_http_the_batch_answer_comes_uncompressed() -> None:
    """A server may compress an answer to a request without `Accept-Encoding` (RFC 9110 12.5.3),
    and the dequeuer reads the batch answer as it comes: each item was malformed ("not JSON"),
    retried and dead-lettered. Batch calls ask for `identity`."""
    asked: list[str | None] = []

    async def compressing(request: web.Request) -> web.Response:
        accepted = request.headers.get("Accept-Encoding")
        asked.append(accepted)
        body = json.dumps([item_answer(200, b"ok") for _ in await request.json()]).encode()
        if accepted is None or "gzip" in accepted:
            return web.Response(body=gzip.compress(body), headers={"Content-Encoding": "gzip"})
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/batch", compressing)
    async with serving(app) as url:
        transport = BatchingTransport(
            HttpTransport(url, 4, 1 << 20), size=2, wait=0.01, path="/batch"
        )
        try:
            answers = await asyncio.gather(
                transport.send(req("/a"), 5), transport.send(req("/b"), 5)
            )
        finally:
            await transport.close()
    assert [a.body for a in answers] == [b"ok", b"ok"]
    assert asked == ["identity"]


def test_the_batch_answer_limit_holds_each_answer_at_max_response() -> None:
    """Room for `size` bodies of --max-response in base64, and for each one's headers."""
    assert answer_limit(4, 3 * 1024) == 4 * (4 * 1024 + 128 * 1024)
    assert answer_limit(1, 1) == 4 + 128 * 1024


async def test_over_http_nobody_listening() -> None:
    transport = BatchingTransport(
        HttpTransport(f"http://127.0.0.1:{free_port()}", 4, 1 << 20),
        size=2,
        wait=0.01,
        path="/batch",
    )
    try:
        outcomes = await asyncio.gather(
            transport.send(req("/a"), 5), transport.send(req("/b"), 5), return_exceptions=True
        )
    finally:
        await transport.close()
    # Refused: never sent, so none of --max-attempts, as for a plain call.
    assert all(isinstance(o, CallFailed) and o.kind == "connect" and not o.sent for o in outcomes)


# --- the dequeuer's settings ---------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PROXYMQ_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_environment")
def test_batch_wait_must_be_shorter_than_a_call(capsys: pytest.CaptureFixture[str]) -> None:
    """A batch that waits --call-timeout to fill sent a lone request never: it timed out while
    it waited, was retried and dead-lettered, uncalled, and its timeouts opened the breaker."""
    batching = ["--service", "s", "--batch-size", "4"]
    with pytest.raises(SystemExit) as caught:
        load(DequeuerSettings, [*batching, "--batch-wait-ms", "5000", "--call-timeout", "5"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--call-timeout" in err and "--batch-wait-ms 5000" in err
    settings = load(DequeuerSettings, [*batching, "--batch-wait-ms", "4999", "--call-timeout", "5"])
    assert settings.batch_wait_ms == 4999
    plain = ["--service", "s", "--batch-wait-ms", "5000", "--call-timeout", "5"]
    assert load(DequeuerSettings, plain).batch_size == 1  # no batches: the wait is unused


@pytest.mark.usefixtures("clean_environment")
def test_batch_size_must_fit_concurrency(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load(DequeuerSettings, ["--service", "s", "--batch-size", "16", "--concurrency", "8"])
    assert caught.value.code == 2
    assert "--batch-size" in capsys.readouterr().err
    settings = load(DequeuerSettings, ["--service", "s", "--batch-size", "8", "--concurrency", "8"])
    assert settings.batch_size == 8


@pytest.mark.usefixtures("clean_environment")
def test_batch_path_must_be_a_path() -> None:
    with pytest.raises(SystemExit):
        load(DequeuerSettings, ["--service", "s", "--batch-path", "batch"])


# --- url-fetcher's POST /batch -------------------------------------------------------------


@pytest.fixture
async def fetcher(
    clean_environment: None,
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], str]]:
    """url-fetcher in process, allowed to fetch the local site; small limits to test them."""
    site = await start_target()
    settings = load(
        UrlFetcherSettings,
        ["--allow-private", "--max-batch", "5", "--batch-concurrency", "4", "--fetch-timeout=0.3"],
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client, base_url(site)
    await site.cleanup()


def envelope(method: str, path: str, body: object = b"", **extra: object) -> dict[str, object]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return {"method": method, "path": path, "query": "", "headers": [], **extra,
            "body": base64.b64encode(raw).decode()}  # fmt: skip


def payload(answer: dict[str, object]) -> object:
    return json.loads(base64.b64decode(str(answer["body"])))


async def test_url_fetcher_batch_dispatches_to_its_own_routes(
    fetcher: tuple[TestClient[web.Request, web.Application], str],
) -> None:
    client, site = fetcher
    async with client.post("/fetch", json={"url": f"{site}/page"}) as plain:
        alone = await plain.json()
    items = [
        envelope("POST", "/fetch", {"url": f"{site}/page"}),
        envelope("POST", "/nowhere"),
        envelope("GET", "/fetch"),
        envelope("POST", "/fetch", b"{not json"),
        {"method": "POST", "path": "/fetch", "body": "%%%"},
        envelope("GET", "/healthz"),
    ]
    items.pop()  # max_batch is 5 here
    async with client.post("/batch", json=items) as response:
        assert response.status == 200
        answers = await response.json()
    assert [a["status"] for a in answers] == [200, 404, 405, 400, 400]
    fetched = payload(answers[0])
    assert isinstance(fetched, dict)
    assert fetched["title"] == alone["title"] == "Café au lait"
    assert fetched["size"] == len(PAGE)
    assert ["Content-Type", "application/json; charset=utf-8"] in answers[0]["headers"]
    assert payload(answers[1]) == {
        "error": {"code": "not_found", "message": "POST /nowhere: Not Found"}
    }
    assert payload(answers[2])["error"]["code"] == "method_not_allowed"  # type: ignore[index]
    assert payload(answers[3])["error"]["code"] == "bad_request"  # type: ignore[index]
    assert "base64" in payload(answers[4])["error"]["message"]  # type: ignore[index]


COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
}


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
async def test_url_fetcher_decompresses_an_item_as_a_plain_request(
    fetcher: tuple[TestClient[web.Request, web.Application], str], encoding: str
) -> None:
    """The dequeuer forwards a body as the caller sent it, compressed or not: a plain request's
    body aiohttp decompresses, and a batched one's must be too (it was answered 400 not JSON).
    Past --max-body once decompressed, both are 413."""
    client, site = fetcher
    compress = COMPRESS[encoding]
    body = compress(json.dumps({"url": f"{site}/page"}).encode())
    bomb = compress(b" " * (2 * 1024 * 1024))
    headers = {"Content-Encoding": encoding}
    plain = []
    for data in (body, bomb):
        async with client.post("/fetch", data=data, headers=headers) as response:
            plain.append((response.status, await response.json()))
    items = [
        envelope("POST", "/fetch", data, headers=[["Content-Encoding", encoding]])
        for data in (body, bomb, b"not compressed")
    ]
    async with client.post("/batch", json=items) as response:
        answers = await response.json()
    batched = [(a["status"], payload(a)) for a in answers]
    assert plain[0][0] == 200
    assert batched[0][0] == 200, batched[0]
    assert batched[0][1]["title"] == plain[0][1]["title"] == "Café au lait"  # type: ignore[index]
    assert batched[1] == plain[1] == (413, plain[1][1])
    assert batched[2][0] == 400
    assert encoding in payload(answers[2])["error"]["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    "item",
    [
        "not an object",
        {"method": "GE T", "path": "/healthz"},
        {"method": "GET", "path": "healthz"},
        {"method": "GET", "path": "/healthz?x=1"},
        {"method": "GET", "path": "/batch"},
        {"method": "GET", "path": "/healthz", "headers": [["X", "a\nb"]]},
        {"method": "GET", "path": "/healthz", "headers": [["X", "caf\udce9"]]},  # was a 500
        {"method": "GET", "path": "/healthz", "headers": [["X"]]},
        {"method": "GET", "path": "/healthz", "query": 3},
    ],
)
async def test_url_fetcher_answers_a_malformed_item_400_alone(
    fetcher: tuple[TestClient[web.Request, web.Application], str], item: object
) -> None:
    client, _ = fetcher
    good = envelope("GET", "/healthz")
    async with client.post("/batch", json=[good, item, good]) as response:
        answers = await response.json()
    assert [a["status"] for a in answers] == [200, 400, 200]
    assert payload(answers[1])["error"]["code"] == "bad_request"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{oops", "not JSON"),
        (b'{"a": 1}', "JSON array"),
        (json.dumps([{}] * 6).encode(), "at most"),
    ],
)
async def test_url_fetcher_refuses_a_malformed_batch_whole(
    fetcher: tuple[TestClient[web.Request, web.Application], str], body: bytes, why: str
) -> None:
    client, _ = fetcher
    async with client.post("/batch", data=body) as response:
        assert response.status == 400
        assert why in (await response.json())["error"]["message"]


@pytest.mark.usefixtures("clean_environment")
async def test_url_fetcher_runs_items_side_by_side() -> None:
    """Four fetches in one batch (--batch-concurrency 4) are at the target all at once: each
    is held there until the four are in. Judged by the target, not the clock (a bound on the
    batch's duration failed on a busy machine); one after another, three would wait alone."""
    wanted, arrived, alone = 4, 0, 0
    everyone = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        nonlocal arrived, alone
        arrived += 1
        if arrived == wanted:
            everyone.set()
        try:
            await asyncio.wait_for(everyone.wait(), 2)
        except TimeoutError:
            alone += 1
        return web.Response(text="<title>together</title>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/held", held)
    flags = ["--allow-private", "--batch-concurrency", str(wanted), "--fetch-timeout", "10"]
    settings = load(UrlFetcherSettings, flags)
    async with serving(app) as site, TestClient(TestServer(create_app(settings))) as client:
        items = [envelope("POST", "/fetch", {"url": f"{site}/held"}) for _ in range(wanted)]
        async with client.post("/batch", json=items) as response:
            answers = await response.json()
    assert [a["status"] for a in answers] == [200] * wanted
    assert alone == 0


# --- the benchmark's microservice ----------------------------------------------------------


async def test_bench_microservice_serialises_calls_and_speaks_the_protocol() -> None:
    async with TestClient(TestServer(bench_batch.create_app())) as client:
        items = json.loads(encode_batch([req(f"/work/{i}") for i in range(4)]))
        started = time.monotonic()
        calls = [client.post("/batch", json=items), client.post("/work", data=b"{}")]
        batch, plain = await asyncio.gather(*calls)
        elapsed = time.monotonic() - started
        answers = decode_batch(await batch.read(), 4)
        assert plain.status == 200
        plain.release()
        assert all(isinstance(a, HttpResponse) and a.status == 200 for a in answers)
        async with client.get("/stats") as response:
            stats = await response.json()
    assert (stats["calls"], stats["items"], stats["largest"]) == (2, 5, 4)
    assert elapsed >= 0.010 + 0.002 + 0.0105  # one after the other, not side by side


@pytest.mark.parametrize("size", [1, 16])
def test_a_partition_ordered_dequeuer_holds_two_requests_per_partition(size: int) -> None:
    """With `--ordering partition` a partition runs one request at a time, batched or not, yet
    it held 2 x --batch-size: 32 held messages per partition did nothing but wait, and each
    handover (a rebalance, the breaker's) returned all of them, counting one delivery against
    each one's --delivery-limit (RabbitMQ counts a return on a channel close)."""
    flags = ["--service", "hunt-batching-prefetch", "--ordering", "partition"]
    settings = load(DequeuerSettings, [*flags, "--batch-size", str(size), "--concurrency", "64"])
    consumer = Consumer(
        settings, FakeInner(), DequeuerMetrics(), ServiceBreaker(5, 10.0), asyncio.Event()
    )
    assert consumer.prefetch == 2
