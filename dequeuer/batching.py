"""Many requests in one HTTP call: a `Transport` that gathers the consumer's calls into batches.

The consumer does not know batching exists. Each `send()` joins the current batch and waits for
its own answer; the batch goes out as one `POST {target}{batch_path}` when it holds `size`
requests or `wait` seconds after its first one, whichever comes first. The microservice answers
one response per request, in order (wire format: docs/batching.md), and each caller gets its own
`HttpResponse`, so the consumer's per-request retries and dead-lettering apply to one item alone.

Why per-key order survives: the consumer's lanes keep at most one request of a key in flight, so
two requests of one key are never in the same batch, and the second is only sent once the first
was answered (or retried and settled).

How a failed batch call reaches each caller, as if each had made a single call:

    no connection, answer cut short     -> CallFailed("connect", ...)     retried by default
    no answer within the item's timeout -> CallFailed("timeout", ...)     retried by default
    answer too large, or not valid HTTP -> CallFailed("too_large" or      never retried
      (over `answer_limit`)                "bad_answer", ...)
    batch answered 5xx                  -> its status (and Retry-After),  503 retried, 500 not
                                           no body, per item
    batch answered another non-200,     -> CallFailed("connect", ...)     the batch endpoint is
      or 200 with a malformed array                                       broken: retried, then
                                                                          dead-lettered (reason)
    one malformed item in a good array  -> CallFailed("connect", ...) for that item only

A batch of one still goes to the batch endpoint: the microservice sees one kind of traffic and
`proxymq_dequeuer_batch_size` counts every call, so its count is the number of calls made.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

from opentelemetry.trace import SpanContext, SpanKind

from dequeuer.consumer import DEADLINE_HEADER, MIN_BUDGET
from dequeuer.forwarder import (
    FRAME_MAX,
    CallFailed,
    ClosableTransport,
    FailureKind,
    answered,
    traced,
)
from shared import logs, tracing
from shared.envelope import HOP_BY_HOP, HttpRequest, HttpResponse, end_to_end, valid_header

log = logging.getLogger(__name__)

# The batch answer is read as it comes (the client does not decompress: a plain call's answer
# passes through as sent), and a server may compress for a request that names no coding.
BATCH_HEADERS = (("Content-Type", "application/json"), ("Accept-Encoding", "identity"))
_DEADLINE = DEADLINE_HEADER.lower()


class MalformedBatch(ValueError):
    """The batch endpoint's answer is not the promised array: no item's answer can be trusted."""


@dataclass(eq=False, slots=True)
class _Item:
    """One caller's request, the moment its own timeout ends (loop time) and its answer."""

    request: HttpRequest
    deadline: float
    future: asyncio.Future[HttpResponse]
    log_context: Mapping[str, str]  # its caller's log fields: its id, its service
    batch: _Batch | None = None
    expiry: asyncio.TimerHandle | None = None
    span: SpanContext | None = None  # its call span, which the batch call's span links to
    sent: bool = False  # taken into its batch call, so the microservice may have run it


@dataclass(eq=False, slots=True)
class _Batch:
    """A batch call in flight and the items it answers."""

    items: list[_Item]
    task: asyncio.Task[None] | None = None


class BatchingTransport:
    """Gathers `send()` calls into batches of up to `size`, flushed on size or after `wait` s.

    Every item's future is settled exactly once, whatever happens to its batch (an answer, a
    failure, a cancellation, `close()`, its own timeout): a caller waits at most its own
    timeout, and the timeout of another caller of its batch never cuts that short.
    """

    def __init__(
        self,
        inner: ClosableTransport,
        *,
        size: int,
        wait: float,
        path: str,
        on_batch: Callable[[int], None] | None = None,
        max_response: int | None = None,
    ) -> None:
        """`max_response`: the largest answer of one request (--max-response), checked item by
        item; the inner transport's own limit bounds the batch answer (`answer_limit`)."""
        if size < 1:
            raise ValueError(f"batch size must be at least 1, not {size}")
        if wait < 0:
            raise ValueError(f"batch wait must not be negative, not {wait}")
        if not path.startswith("/"):
            raise ValueError(f"batch path {path!r} does not start with '/'")
        self.inner = inner
        self.size = size
        self.wait = wait
        self.path = path
        self.on_batch = on_batch
        self.max_response = max_response
        self._pending: list[_Item] = []
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def pending(self) -> int:
        """Requests waiting for their batch to be sent."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Batch calls sent and not finished yet."""
        return len(self._calls)

    async def send(self, request: HttpRequest, timeout: float) -> HttpResponse:
        """With tracing, each request has a call span of its own, whose context it carries to
        the microservice in its envelope, as a plain call does: the items carried the caller's
        `traceparent` as sent, and the microservice's work hung under no span of ours."""
        if not tracing.enabled():
            return await self._send(request, timeout, None)
        method, attributes = tracing.http_method(request.method)
        attributes["url.path"] = request.path
        with tracing.span(method, SpanKind.CLIENT, attributes=attributes) as current:
            assert current is not None
            response = await self._send(traced(request), timeout, current.get_span_context())
            tracing.record_status(current, response.status)
            return response

    async def _send(
        self, request: HttpRequest, timeout: float, span: SpanContext | None
    ) -> HttpResponse:
        if self._closed:
            raise CallFailed("connect", "the dequeuer is stopping: no more batch calls")
        loop = asyncio.get_running_loop()
        context = logs.request_context.get()
        item = _Item(request, loop.time() + timeout, loop.create_future(), context, span=span)
        item.expiry = loop.call_at(item.deadline, self._expire, item)
        item.future.add_done_callback(lambda _: self._forget(item))
        self._pending.append(item)
        if len(self._pending) >= self.size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.wait, self._flush)
        return await item.future

    def _expire(self, item: _Item) -> None:
        """The item's own timeout ends its wait, not its batch: the batch call goes on for the
        others. (With the batch's timeout the smallest of its items', one caller's
        `X-Request-Timeout: 1` timed out every item of its batch: they were retried and run
        twice, and their timeouts counted against the breaker.)"""
        if item.sent:
            failure = CallFailed("timeout", f"no answer from {self.path} within its timeout")
        else:
            failure = _ran_out()
        _settle(item, failure)
        self._cancel_if_unwanted(item.batch)

    def _forget(self, item: _Item) -> None:
        """A caller that gave up (cancelled or expired) leaves its batch; a batch in flight that
        nobody waits for any more is cancelled, so no call outlives all of its callers."""
        if item.expiry is not None:
            item.expiry.cancel()
        if item in self._pending:  # cancelled or expired before its batch was sent
            self._pending.remove(item)
            if not self._pending and self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if item.future.cancelled():
            self._cancel_if_unwanted(item.batch)

    @staticmethod
    def _cancel_if_unwanted(batch: _Batch | None) -> None:
        """Cancel a batch call in flight once none of its callers waits for it."""
        if (
            batch is not None
            and batch.task is not None
            and all(other.future.done() for other in batch.items)
        ):
            batch.task.cancel()

    def _flush(self) -> None:
        """Send what is pending as one call; runs from `send()` (size) or the timer (wait)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items = [item for item in self._pending if not item.future.done()]
        self._pending = []
        if not items:
            return
        batch = _Batch(items)
        for item in items:
            item.batch = batch
        batch.task = asyncio.get_running_loop().create_task(
            self._call(items), context=_batch_context(items)
        )
        self._calls.add(batch.task)
        batch.task.add_done_callback(partial(self._call_done, items))

    def _call_done(self, items: list[_Item], task: asyncio.Task[None]) -> None:
        """Settles what the call left unsettled, even when it was cancelled before it ran (a
        coroutine that never started runs none of its own except or finally blocks)."""
        self._calls.discard(task)
        reason = "the batch call was cancelled" if task.cancelled() else "the batch call ended"
        _fail_all(items, "connect", reason)

    async def _call(self, items: list[_Item]) -> None:
        try:
            await self._call_and_settle(items)
        except Exception as exc:  # a bug below must not leave callers waiting forever
            log.exception("batch call to %s failed unexpectedly", self.path, extra=_ids(items))
            _fail_all(items, "connect", f"batch call failed: {exc!r}")

    async def _call_and_settle(self, items: list[_Item]) -> None:
        now = asyncio.get_running_loop().time()
        live = []
        for item in items:
            if item.future.done():
                continue  # its caller gave up since the flush: its message goes back unsent
            if item.deadline - now >= MIN_BUDGET:  # never `X-Request-Timeout: 0.000`
                item.sent = True
                live.append(item)
            else:
                _settle(item, _ran_out())
        if not live:
            return
        # Each item stops waiting at its own deadline (`_expire`); the call serves the last one.
        timeout = max(item.deadline for item in live) - now
        if self.on_batch is not None:
            self.on_batch(len(live))
        requests = [_time_left(item.request, item.deadline - now) for item in live]
        batch = HttpRequest("POST", self.path, "", BATCH_HEADERS, encode_batch(requests))
        links = [item.span for item in live if item.span is not None]
        try:
            with tracing.span(f"POST {self.path}", SpanKind.INTERNAL, links=links):
                answer = await self.inner.send(batch, timeout)
        except CallFailed as failure:
            detail = f"batch of {len(live)} to {self.path}: {failure}"
            if failure.kind == "too_large" and self.max_response is not None:
                limit = answer_limit(self.size, self.max_response)
                detail = (
                    f"batch of {len(live)} to {self.path}: the batch answer is over {limit} bytes, "
                    f"what {self.size} answers of --max-response ({self.max_response}) may take"
                )
            for item in live:
                _settle(item, CallFailed(failure.kind, detail, sent=failure.sent))
            return
        for item, outcome in zip(live, self.outcomes(answer, live), strict=True):
            _settle(item, self.own(item.request.method, outcome))

    def own(self, method: str, outcome: HttpResponse | CallFailed) -> HttpResponse | CallFailed:
        """An item's answer as a plain call with its method would have it, within
        --max-response on its own: the whole batch's answer counted, so that a batch of answers
        each well within it was refused whole."""
        if isinstance(outcome, CallFailed):
            return outcome
        answer = answered(method, outcome.status, outcome.headers, outcome.body)
        if self.max_response is not None and len(answer.body) > self.max_response:
            return CallFailed(
                "too_large", f"the response is over --max-response ({self.max_response} bytes)"
            )
        return answer

    def outcomes(
        self, answer: HttpResponse, items: Sequence[_Item]
    ) -> list[HttpResponse | CallFailed]:
        """Each item's outcome from the batch call's answer (see the table in the docstring)."""
        count = len(items)
        if answer.status != 200:
            # Not its body: it may echo the callers' requests, and bodies are never logged.
            log.warning(
                "batch endpoint %s answered %d, not 200 (%d bytes)",
                self.path,
                answer.status,
                len(answer.body),
                extra=_ids(items),
            )
        if answer.status >= 500:
            return [_status_alone(answer)] * count
        if answer.status != 200:
            reason = f"batch endpoint {self.path} answered {answer.status}, not 200"
            return [CallFailed("connect", reason) for _ in range(count)]
        try:
            return decode_batch(answer.body, count)
        except MalformedBatch as exc:
            reason = f"malformed answer from batch endpoint {self.path}: {exc}"
            log.warning("%s", reason, extra=_ids(items))
            return [CallFailed("connect", reason) for _ in range(count)]

    async def close(self) -> None:
        """Fail what was not sent, cancel calls in flight, close the inner transport.

        By the time the dequeuer closes its transport the consumer has stopped, so nobody can
        publish a reply any more: the messages stay unacked and go back to their queue, and a
        call finished now would be wasted work. Failing is immediate, flushing would not be.
        """
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        _fail_all(pending, "connect", "the dequeuer stopped before the batch was sent")
        calls = list(self._calls)
        for call in calls:
            call.cancel()
        for call in calls:
            with contextlib.suppress(asyncio.CancelledError):
                await call
        await self.inner.close()


def _batch_context(items: Sequence[_Item]) -> contextvars.Context:
    """The batch call's own context, no one request's (its span was the child of the request
    whose turn sent it, its log lines had that request's id), with the service of them all."""
    context = contextvars.Context()
    context.run(logs.bind, service=items[0].log_context.get("service"))
    return context


def _ids(items: Sequence[_Item]) -> dict[str, dict[str, object]]:
    """A line about a whole batch names its requests, so a search by one's id finds it."""
    return logs.fields(correlation_ids=[item.log_context.get("correlation_id") for item in items])


def _time_left(request: HttpRequest, left: float) -> HttpRequest:
    """`request` telling the microservice the time it has now: its `X-Request-Timeout` was
    written when it joined its batch, and the wait for the batch to fill is spent."""
    headers = tuple(
        (name, f"{left:.3f}") if name.lower() == _DEADLINE else (name, value)
        for name, value in request.headers
    )
    return replace(request, headers=headers)


def _status_alone(answer: HttpResponse) -> HttpResponse:
    """A whole batch's error answer as each item's: its status and `Retry-After` (which the
    item's retry waits for), not its body or other headers. Those are the whole batch's: a
    framework's debug page repeats the batch request, every caller's headers included, and a
    `Set-Cookie` is meant for no caller in particular."""
    retry_after = tuple((n, v) for n, v in answer.headers if n.lower() == "retry-after")
    return HttpResponse(answer.status, retry_after[:1], b"")


def answer_limit(size: int, max_response: int) -> int:
    """The largest batch answer read: `size` answers of up to `max_response` bytes, in base64,
    each with room for its status and headers (a reply's headers fit in one AMQP frame)."""
    return size * (4 * -(-max_response // 3) + FRAME_MAX)


def _ran_out() -> CallFailed:
    """An item whose time ran out before its batch call took it: the microservice never got
    it, so, like a plain request whose deadline passed before its call, it is no attempt and
    no failure of the microservice's (the consumer drops it as expired)."""
    return CallFailed("timeout", "its time ran out before its batch was sent", sent=False)


def _settle(item: _Item, outcome: HttpResponse | CallFailed) -> None:
    if item.future.done():
        return  # its caller gave up; the answer has nobody to go to
    if isinstance(outcome, CallFailed):
        item.future.set_exception(outcome)
    else:
        item.future.set_result(outcome)


def _fail_all(items: Sequence[_Item], kind: FailureKind, detail: str) -> None:
    """One exception object per future: a raised exception's traceback is its own."""
    for item in items:
        _settle(item, CallFailed(kind, detail))


def encode_batch(requests: Sequence[HttpRequest]) -> bytes:
    """The batch call's body: a JSON array of request envelopes, bodies in base64."""
    return json.dumps(
        [
            {
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "headers": [[name, _utf8(value)] for name, value in request.headers],
                "body": base64.b64encode(request.body).decode("ascii"),
            }
            for request in requests
        ],
        separators=(",", ":"),
    ).encode()


def _utf8(value: str) -> str:
    """`value` without the lone surrogates aiohttp keeps for header bytes that are no UTF-8 (a
    latin-1 `é`): a plain call leaves them out, and in JSON they are `\\udce9` escapes that
    strict readers refuse (url-fetcher answered such a request 500)."""
    return value if value.isascii() else value.encode("utf-8", "ignore").decode("utf-8")


def decode_batch(body: bytes, count: int) -> list[HttpResponse | CallFailed]:
    """The answer's array, one outcome per request; a malformed item fails only itself."""
    try:
        answers = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedBatch(f"not JSON ({exc})") from None
    if not isinstance(answers, list):
        raise MalformedBatch(f"expected a JSON array, got {type(answers).__name__}")
    if len(answers) != count:
        raise MalformedBatch(f"{len(answers)} responses for {count} requests")
    outcomes: list[HttpResponse | CallFailed] = []
    for index, answer in enumerate(answers):
        try:
            outcomes.append(decode_response(answer))
        except ValueError as exc:
            outcomes.append(CallFailed("connect", f"batch answer item {index}: {exc}"))
    return outcomes


def decode_response(answer: object) -> HttpResponse:
    """One response object; anything that would break the reply to the caller is refused here,
    where the reason can still be logged and the item retried."""
    if not isinstance(answer, dict):
        raise ValueError(f"expected a JSON object, got {type(answer).__name__}")
    status = answer.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError(f"no valid final status (200-599): {status!r}")
    raw_headers = answer.get("headers", [])
    if not isinstance(raw_headers, list):
        raise ValueError("headers must be a list of [name, value] pairs")
    headers: list[tuple[str, str]] = []
    for pair in raw_headers:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], str)
            and valid_header(pair[0], pair[1])
        ):
            raise ValueError(f"invalid header {str(pair)[:60]}")
        headers.append((pair[0], pair[1]))
    raw_body = answer.get("body", "")
    if not isinstance(raw_body, str):
        raise ValueError("body must be a base64 string")
    try:
        body = base64.b64decode(raw_body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"body is not base64: {exc}") from None
    # The Content-Length is kept for `answered`: a HEAD's or a 304's is carried back.
    return HttpResponse(status, end_to_end(headers, HOP_BY_HOP - {"content-length"}), body)
