"""The request path: read -> partition key -> envelope -> publish -> await the reply -> answer."""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from functools import partial

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from opentelemetry.trace import SpanKind

from enqueuer.guard import CallerGuard
from enqueuer.idempotency import First, IdempotencyStore, fingerprint
from enqueuer.publisher import Publisher
from enqueuer.replies import ReplyWaiter
from enqueuer.responses import PassThroughResponse
from enqueuer.results import ResultStore
from enqueuer.settings import EnqueuerSettings
from shared import envelope, logs, partition_key, tracing
from shared.envelope import HttpRequest, HttpResponse, RequestEnvelope
from shared.errors import (
    BY_CODE,
    BodyTooLarge,
    BrokerUnavailable,
    GatewayTimeout,
    ProxyMQError,
    ServiceFailed,
    UnknownRequest,
    UnknownService,
    clipped,
    malformed,
)
from shared.metrics import EnqueuerMetrics, status_class
from shared.settings import MAX_SECONDS

log = logging.getLogger(__name__)
CALL = "call /{service}/{path}"
OWN_PATHS = "/_proxymq"
REQUESTS_PATH = OWN_PATHS + "/requests/"
REQUEST_ID = web.RequestKey("request_id", str)  # the id in X-Correlation-ID and the logs
SERVICE = web.RequestKey("service", str)  # the service called, once the path names one
ASYNCHRONOUS = web.RequestKey("asynchronous", bool)  # answered 202, timed as no call
# One preference: up to a comma outside a quoted string (an unclosed quote runs to the end).
_PREFERENCE = re.compile(r'(?:[^,"]|"(?:\\.|[^"\\])*(?:"|$))+')
NAN = float("nan")
# A blocked broker (memory alarm) must not hold a caller forever.
PUBLISH_TIMEOUT = 10.0


@dataclass
class Enqueuer:
    """What the handlers need, built once per process by the app factory."""

    settings: EnqueuerSettings
    sources: tuple[partition_key.KeySource, ...]
    publisher: Publisher
    replies: ReplyWaiter
    results: ResultStore
    idempotency: IdempotencyStore
    guard: CallerGuard
    metrics: EnqueuerMetrics
    # Publishes that outlive their callers (`outliving_its_caller`), held until they end.
    detached: set[asyncio.Task[None]] = field(default_factory=set)


def split_target(raw_path: str) -> tuple[str, str, str]:
    """`/svc/a%20b?x=1` -> (`svc`, `/a%20b`, `x=1`): path and query stay exactly as sent.

    A target in absolute form (`http://host/svc/a`, what a client sends to a server it takes
    for its HTTP proxy) counts by its path, as RFC 9112 3.2.2 asks of a server; it was taken
    for a service named `http:`."""
    if not raw_path.startswith("/"):
        _, scheme, rest = raw_path.partition("://")
        ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
        raw_path = "/" + rest[min(ends) :].removeprefix("/") if scheme and ends else "/"
    path, _, query = raw_path.partition("?")
    service, slash, rest = path.lstrip("/").partition("/")
    return service, "/" + rest if slash else "/", query


def deadline_of(request: web.Request, cap: float | None) -> float | None:
    """`X-Request-Timeout` capped by `cap`; None when neither applies (async without a timeout)."""
    asked = request.headers.get("X-Request-Timeout")
    seconds: float | None = cap
    if asked is not None:
        # Repeats folded into one line count as repeats: the first. Python's float() also
        # reads `1_0` and other scripts' digits, which no caller means as seconds.
        asked = asked.partition(",")[0]
        try:
            value = min(float(asked), MAX_SECONDS) if asked.isascii() and "_" not in asked else NAN
        except ValueError:
            value = NAN
        if value > 0:  # NaN, zero and negative values are ignored
            seconds = value if cap is None else min(value, cap)
    return None if seconds is None else time.time() + seconds


def preferences(value: str) -> list[str]:
    """The comma-separated preferences of a `Prefer` value. A value may be a quoted string
    (RFC 7240), whose commas separate nothing: `note="a, respond-async, b"` made a call
    asynchronous, and `note="a,b"` reached the microservice as `note="a, b"`."""
    return _PREFERENCE.findall(value) if '"' in value else value.split(",")


def preference_name(part: str) -> str:
    """`Wait = 5; x=1` -> `wait`: names are case-insensitive, and a value may have spaces
    around its `=` (RFC 7240)."""
    return part.split(";", 1)[0].partition("=")[0].strip().lower()


def wants_async(request: web.Request) -> bool:
    return any(
        preference_name(part) == "respond-async"
        for value in request.headers.getall("Prefer", ())
        for part in preferences(value)
    )


def wait_of(request: web.Request) -> float:
    """The seconds of `Prefer: wait=N` (RFC 7240: digits; the first of repeats), 0 if none."""
    for value in request.headers.getall("Prefer", ()):
        for part in preferences(value):
            if preference_name(part) == "wait":
                seconds = part.split(";", 1)[0].partition("=")[2].strip().strip('"')
                return float(seconds) if seconds.isascii() and seconds.isdigit() else 0.0
    return 0.0


async def replied_within(future: asyncio.Future[HttpResponse], seconds: float) -> bool:
    """Whether the reply came within `seconds`. The wait never cancels the future: when it
    ends, or its caller hangs up, the reply is still the 202's result (or a repeat's)."""
    if seconds > 0:
        await asyncio.wait((future,), timeout=seconds)
    return seconds > 0 and future.done()


def without_respond_async(headers: envelope.Headers) -> envelope.Headers:
    """The enqueuer honours `respond-async` and its `wait` itself; passed on, a microservice
    that honours them too answered 202 with a `Location` of its own, and that 202 became the
    polled result. The other preferences (`return=minimal`, say) are the microservice's."""
    kept = []
    for name, value in headers:
        if name.lower() == "prefer":
            value = ", ".join(
                part.strip()
                for part in preferences(value)
                if preference_name(part) not in ("respond-async", "wait", "")
            )
            if not value:
                continue
        kept.append((name, value))
    return tuple(kept)


async def read_body(request: web.Request, limit: int, within: float) -> bytes:
    """The body, which must arrive within `within` seconds: a body that stalled held its
    handler, its connection and what had come of it (up to --max-body) for good, since no
    deadline ran before the body was read. A body already received is read without a timer."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"the body is {request.content_length} bytes; at most {limit} are allowed"
        )
    try:
        if request.content.is_eof():
            return await request.read()
        async with asyncio.timeout(within):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"the body is larger than {limit} bytes") from None
    except (web.RequestPayloadError, HttpProcessingError) as error:
        # The parser refused the body (a bad chunk, say); aiohttp's Python parser raises its
        # own error unwrapped, which only the connection's `handle_error` answered (400).
        request.content.feed_eof()  # nothing more will come: aiohttp must not wait to drain it
        raise malformed(error) from None
    except TimeoutError:
        raise GatewayTimeout(
            f"the request's body did not arrive within {within:.3g} s (its deadline, at most "
            "--timeout); nothing was published"
        ) from None


async def proxy(request: web.Request, enqueuer: Enqueuer) -> web.StreamResponse:
    service, path, query = split_target(request.raw_path)
    if not service:
        raise UnknownService(f"no service in the path: {CALL}")
    request[SERVICE] = service
    logs.bind(service=service)
    request[ASYNCHRONOUS] = asynchronous = wants_async(request)
    deadline = deadline_of(request, None if asynchronous else enqueuer.settings.timeout)
    timeout = enqueuer.settings.timeout
    body = await read_body(
        request, enqueuer.settings.max_body, min(_remaining(deadline, timeout), timeout)
    )
    key = partition_key.extract(
        enqueuer.sources,
        request.headers,
        query,
        body,
        request.headers.get("Content-Type", ""),
        required=enqueuer.settings.require_partition_key,
    )
    idempotency_key = request.headers.get("Idempotency-Key")
    same = fingerprint(request.method, path, query, body) if idempotency_key else b""
    first = enqueuer.idempotency.get(service, idempotency_key, same) if idempotency_key else None
    entry = first
    if first is not None:
        try:  # the first's publish may take PUBLISH_TIMEOUT: this caller's deadline comes first
            async with asyncio.timeout(_remaining(deadline, PUBLISH_TIMEOUT)):
                await first.wait_published()
        except TimeoutError:
            raise GatewayTimeout(
                "the deadline passed while RabbitMQ had not yet confirmed the first request "
                "with this Idempotency-Key"
            ) from None
        request[REQUEST_ID] = request_id = first.request_id
        future = first.future
    else:
        request_id = request[REQUEST_ID]
        headers = enqueuer.guard.forwarded(envelope.end_to_end(request.headers.items()))
        if asynchronous:
            headers = without_respond_async(headers)
        http = HttpRequest(request.method, path, query, headers, body)
        future = enqueuer.replies.expect(request_id, service)
        message = RequestEnvelope(
            request_id, service, http, key, deadline, enqueuer.replies.queue_name
        )
        if idempotency_key:  # before publishing, so that concurrent repeats find it and wait
            entry = enqueuer.idempotency.remember(
                service, idempotency_key, request_id, future, same
            )
            await outliving_its_caller(enqueuer, publish_first(enqueuer, message, future, entry))
        else:
            await publish(enqueuer, message, future)
            if asynchronous:
                expire_at(future, deadline)  # its lifetime is the message's, not the caller's
    # `Prefer: respond-async, wait=N` (RFC 7240): a reply within N s is answered as to a call.
    wait = min(wait_of(request), _remaining(deadline, timeout), timeout) if asynchronous else 0
    if asynchronous:
        if not await replied_within(future, wait):
            return accept(request_id, service, future, enqueuer, entry, repeat=first is not None)
        request[ASYNCHRONOUS] = False  # answered as a call: timed as one
    try:
        async with asyncio.timeout(_remaining(deadline, enqueuer.settings.timeout)):
            reply = await (asyncio.shield(future) if idempotency_key else future)
    except TimeoutError:
        raise GatewayTimeout(
            f"no reply from service {service!r} within the deadline; the request may still be "
            "processed, its late reply will be dropped"
        ) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if future.cancelled() and task is not None and not task.cancelling():
            raise GatewayTimeout(f"no reply from service {service!r} within the deadline") from None
        raise
    return answer(reply, request.method)


async def publish(
    enqueuer: Enqueuer, request: RequestEnvelope, future: asyncio.Future[HttpResponse]
) -> None:
    """Publish the request whose reply `future` awaits; when the publish fails the future is
    cancelled, so nothing is left waiting."""
    # No key: a random routing key spreads the request (the hash of "" would pick one queue).
    routing_key = request.partition_key if request.partition_key is not None else request.request_id
    wait = _remaining(request.deadline, PUBLISH_TIMEOUT)
    try:
        async with asyncio.timeout(min(wait, PUBLISH_TIMEOUT)):
            # The request's one lookup, before its span, which is named after the service: not
            # after any name a caller made up. `Publisher.publish` relies on it.
            await enqueuer.publisher.check(request.service)
            message = envelope.encode_request(request)
            with tracing.span(
                f"publish {request.service}",
                SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "publish",
                    "messaging.destination.name": request.service,
                    "messaging.message.conversation_id": request.request_id,
                },
            ):
                tracing.inject(message.headers)
                await enqueuer.publisher.publish(request.service, routing_key, message)
    except TimeoutError:
        future.cancel()
        if wait < PUBLISH_TIMEOUT:
            # The caller's own deadline, however short it asked for: no verdict on the broker
            # (counted, a caller's tiny timeouts opened the breaker for everyone).
            raise GatewayTimeout(
                "the request's deadline passed before RabbitMQ confirmed it; if it still "
                "arrives, it is dropped there unprocessed"
            ) from None
        enqueuer.publisher.record_timeout()
        raise BrokerUnavailable(
            "RabbitMQ did not confirm the request in time", retry_after=1
        ) from None
    except asyncio.CancelledError:
        future.cancel()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the caller hung up
        # aiormq fails what waits on a connection it gives up (missed heartbeats) with
        # CancelledError: the broker is gone, the caller is not, and gets a 503 rather than a
        # dropped HTTP connection.
        log.warning("publish failed: the connection to RabbitMQ was given up")
        raise BrokerUnavailable("RabbitMQ did not confirm the request") from None
    except BaseException:
        future.cancel()
        raise
    in_flight = enqueuer.metrics.in_flight.labels(request.service)
    in_flight.inc()
    future.add_done_callback(lambda _: in_flight.dec())


async def publish_first(
    enqueuer: Enqueuer, request: RequestEnvelope, future: asyncio.Future[HttpResponse], first: First
) -> None:
    """Publish the first request with an Idempotency-Key and settle its entry, which its
    repeats wait for."""
    try:
        await publish(enqueuer, request, future)
    except BaseException as exc:
        first.settle(exc)
        raise
    first.settle(None)
    expire_at(future, request.deadline)  # its lifetime is the message's, not one caller's


async def outliving_its_caller(enqueuer: Enqueuer, work: Coroutine[None, None, None]) -> None:
    """Await `work`, which goes on when the caller hangs up (as long as a publish may take,
    PUBLISH_TIMEOUT): cancelled with its caller, a first's publish left its message perhaps
    queued, its repeats a 503, and a retry sent it twice."""
    task = asyncio.ensure_future(work)
    enqueuer.detached.add(task)
    task.add_done_callback(partial(_detached_done, enqueuer.detached))
    await asyncio.shield(task)


def _detached_done(detached: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    detached.discard(task)
    if not task.cancelled():
        task.exception()  # its caller's handler raises it; with the caller gone, nobody does


def expire_at(future: asyncio.Future[HttpResponse], deadline: float | None) -> None:
    """Cancel the future at the deadline. The timer goes once it is done: left, it held the
    answer (its body) until the deadline, up to 30 days, past --max-result-bytes."""
    if deadline is not None:
        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + max(0.0, deadline - time.time()), future.cancel)
        future.add_done_callback(lambda _: timer.cancel())


def accept(
    request_id: str,
    service: str,
    future: asyncio.Future[HttpResponse],
    enqueuer: Enqueuer,
    entry: First | None,
    *,
    repeat: bool,
) -> web.Response:
    """Answer 202 now; the reply lands in the result store whenever it comes. A repeated
    Idempotency-Key finds it there, or keeps it again (its first was synchronous, or its result
    was dropped), but counts as accepted, and its result, only once: `entry.accepted`.

    A repeat shares its first's message, and so its deadline, even when the first was
    synchronous and the repeat has none: the dequeuer drops the message past it."""
    if enqueuer.results.get(request_id) is None:
        enqueuer.results.add(request_id)
        count = entry is None or not entry.accepted
        if count:
            enqueuer.metrics.accepted_async.labels(service).inc()
        if entry is not None:
            entry.accepted = True
        deadline = (
            "the deadline of the first request with this Idempotency-Key (its "
            "X-Request-Timeout, or --timeout if it was synchronous), which its repeats share"
            if repeat
            else "the request's X-Request-Timeout"
        )
        future.add_done_callback(partial(_store, enqueuer, request_id, service, count, deadline))
    accepted = pending(request_id)
    accepted.headers["Preference-Applied"] = "respond-async"  # RFC 7240
    return accepted


def _store(
    enqueuer: Enqueuer,
    request_id: str,
    service: str,
    count: bool,
    deadline: str,
    done: asyncio.Future[HttpResponse],
) -> None:
    """Keep the result for polls, and count its outcome (once: `count`); `deadline` names the
    deadline that cancelled `done`."""
    if done.cancelled() or done.exception() is not None:
        exception = None if done.cancelled() else done.exception()
        error = (
            _as_proxymq_error(exception)
            if exception is not None
            else GatewayTimeout(f"no reply from service {service!r} within {deadline}")
        )
        enqueuer.results.finish(request_id, None, error)
        outcome = error.code
    else:
        response = done.result()
        enqueuer.results.finish(request_id, response, None)
        outcome = outcome_of(response)
    if count:
        enqueuer.metrics.async_results.labels(service, outcome).inc()


def pending(request_id: str) -> web.Response:
    location = REQUESTS_PATH + request_id
    return web.json_response(
        {"id": request_id, "status": "pending", "location": location},
        status=202,
        headers={"Location": location, "Retry-After": "1"},
    )


async def request_status(request: web.Request, enqueuer: Enqueuer) -> web.StreamResponse:
    request_id = request.match_info["request_id"]
    outcome = enqueuer.results.get(request_id)
    if outcome is None:
        raise UnknownRequest(
            f"no request {clipped(request_id)!r} here: it is unknown, was sent to another "
            f"enqueuer, or its result expired ({enqueuer.settings.result_ttl:g} s after it "
            "finished, or sooner to stay within --max-results and --max-result-bytes)"
        )
    request[REQUEST_ID] = request_id  # the request's own id, as in its logs
    if outcome.pending:
        return pending(request_id)
    if outcome.error is not None:
        # A copy: each raise of the stored error chained that poll's frames (its request, its
        # response) onto the error's traceback, kept as long as the result: 5 KiB a poll.
        raise copy.copy(outcome.error)
    assert outcome.response is not None
    return answer(outcome.response, request.method)


def answer(reply: HttpResponse, method: str) -> web.StreamResponse:
    if reply.error is not None:
        error_class = BY_CODE.get(reply.error, ServiceFailed)
        raise error_class(reply.error_message or f"the dequeuer answered {reply.error}")
    return PassThroughResponse(reply, head=method == "HEAD")


def outcome_of(reply: HttpResponse) -> str:
    """The outcome `answer` gives the reply, as a metrics label. Any AMQP client may reply
    with any `x-proxymq-error`: counted as it was, each string a replier chose was a series."""
    if reply.error is not None:
        return BY_CODE.get(reply.error, ServiceFailed).code
    return status_class(reply.status)


def _remaining(deadline: float | None, default: float) -> float:
    return default if deadline is None else max(0.0, deadline - time.time())


def _as_proxymq_error(error: BaseException) -> ProxyMQError:
    if isinstance(error, ProxyMQError):
        return error
    return ServiceFailed(f"the reply could not be read: {error}")


def new_request_id() -> str:
    return uuid.uuid4().hex
