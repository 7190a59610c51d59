"""The enqueuer's aiohttp application: state under typed AppKeys, resources in cleanup contexts,
errors rendered by one middleware."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

from aiohttp import HttpVersion11, hdrs, web
from opentelemetry.trace import SpanKind

from enqueuer.guard import CallerGuard, read_token
from enqueuer.handlers import (
    ASYNCHRONOUS,
    CALL,
    OWN_PATHS,
    REQUEST_ID,
    REQUESTS_PATH,
    SERVICE,
    Enqueuer,
    new_request_id,
    proxy,
    request_status,
)
from enqueuer.idempotency import IdempotencyStore
from enqueuer.publisher import Publisher
from enqueuer.replies import ReplyWaiter
from enqueuer.results import ResultStore
from enqueuer.settings import EnqueuerSettings
from shared import logs, partition_key, tracing
from shared.breaker import OPEN, ServiceBreaker
from shared.broker import Broker, for_sidecar, set_up
from shared.errors import (
    ERROR_HEADER,
    BadRequest,
    BodyTooLarge,
    BrokerUnavailable,
    InternalError,
    MethodNotAllowed,
    ProxyMQError,
    Unauthorized,
    UnknownRequest,
    UnknownService,
    clipped,
)
from shared.metrics import OWN_PATHS_LABEL, UNKNOWN_SERVICE, EnqueuerMetrics, status_class

log = logging.getLogger(__name__)
ENQUEUER = web.AppKey("enqueuer", Enqueuer)
BROKER = web.AppKey("broker", Broker)
CORRELATION_HEADER = "X-Correlation-ID"
DISCONNECTED = "disconnected"  # the outcome of a request whose caller hung up
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: ProxyMQError) -> web.Response:
    headers = {ERROR_HEADER: error.code}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="proxymq"'
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = error.allow

    response = web.Response(
        status=error.status, body=error.body(), headers=headers, content_type="application/json"
    )
    if isinstance(error, (BadRequest, BodyTooLarge)):
        # What follows cannot be read as the next request: a head the parser refused, or a
        # body refused unread (a caller told to wait by `Expect: 100-continue` never sends it).
        response.force_close()
    return response


@web.middleware
async def correlate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id (errors refused before publishing too), render ProxyMQ errors,
    count the outcome and log it: one line per request, never a body or a header value."""
    enqueuer = request.app[ENQUEUER]
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    logs.request_context.set({"correlation_id": request_id})
    started = time.perf_counter()
    message = "answered"
    try:
        enqueuer.guard.check(request)
        response = await handler(request)
        outcome = status_class(response.status)
    except ProxyMQError as error:
        response, outcome, message = error_response(error), error.code, error.message
        # The error may be a kept one (an Idempotency-Key's first answer, an async result),
        # raised again at each repeat: its traceback held this handler's frames, the
        # request's body among them, for as long as it was kept.
        error.__traceback__ = error.__context__ = None
    except web.HTTPNotFound:  # no route: a target that is no path (`CONNECT host:443`, `OPTIONS *`)
        missing = UnknownService(f"{request.method} {request.raw_path!r} names no service: {CALL}")
        response, outcome, message = error_response(missing), missing.code, missing.message
    except asyncio.CancelledError:  # the caller hung up: its handler was cancelled
        _record(request, started, None, DISCONNECTED, "the caller hung up before the answer")
        raise
    except Exception:  # a defect: aiohttp's answer was plain text without the request's id
        log.exception(
            "could not handle the request",
            extra=logs.fields(correlation_id=request[REQUEST_ID]),
        )
        crashed = InternalError(
            "the enqueuer failed unexpectedly; its log has the details under this request's "
            "X-Correlation-ID"
        )
        response, outcome, message = error_response(crashed), crashed.code, crashed.message
    response.headers[CORRELATION_HEADER] = _record(request, started, response, outcome, message)
    return response


def _record(
    request: web.Request,
    started: float,
    response: web.StreamResponse | None,
    outcome: str,
    message: str,
) -> str:
    """Count and log one request's outcome; its id, which a repeated Idempotency-Key or a
    poll may have changed to the request it names."""
    enqueuer = request.app[ENQUEUER]
    metrics = enqueuer.metrics
    elapsed = time.perf_counter() - started
    service = request.get(SERVICE)
    if service is None and request.path.startswith(OWN_PATHS):
        label = OWN_PATHS_LABEL  # polls: never another count of the service's outcomes
    elif service and outcome != "unknown_service" and enqueuer.publisher.exists(service):
        label = service
    else:  # a name refused before it was looked up (400, 413, 429) may be made up
        label = UNKNOWN_SERVICE
    metrics.requests.labels(label, outcome).inc()
    # Calls answered as calls only: a microservice's own 202 is one's answer, not respond-async's.
    if service and response is not None and not request.get(ASYNCHRONOUS):
        metrics.duration.labels(label).observe(elapsed)
    request_id: str = request[REQUEST_ID]
    log.info(
        message,
        extra=logs.fields(
            correlation_id=request_id,
            method=request.method,
            status=response.status if response is not None else None,
            outcome=outcome,
            duration_ms=round(elapsed * 1000, 2),
        ),
    )
    return request_id


def create_app(settings: EnqueuerSettings) -> web.Application:
    sources = partition_key.parse_sources(settings.partition_key)
    instance = settings.instance_id or uuid.uuid4().hex[:12]
    metrics = EnqueuerMetrics()
    enqueuer = Enqueuer(
        settings=settings,
        sources=sources,
        publisher=Publisher(
            frozenset(settings.services),
            ServiceBreaker(
                settings.breaker_failures,
                settings.breaker_reset,
                on_state=lambda state: metrics.breaker_open.set(state == OPEN),
            ),
        ),
        replies=ReplyWaiter(
            instance,
            settings.max_in_flight,
            settings.in_flight_share(),
            metrics.late_replies.inc,
        ),
        results=ResultStore(
            settings.result_ttl,
            settings.max_results,
            settings.max_result_bytes,
            metrics.dropped_results.inc,
        ),
        idempotency=IdempotencyStore(
            settings.idempotency_window, settings.max_results, settings.max_result_bytes
        ),
        guard=CallerGuard(
            read_token(settings.auth_token_file), settings.max_headers, settings.max_header_bytes
        ),
        metrics=metrics,
    )
    broker = for_sidecar(settings, f"proxymq-enqueuer {instance}")
    metrics.connected.set_function(lambda: float(broker.connected))

    app = web.Application(middlewares=[correlate], client_max_size=settings.max_body)
    app[ENQUEUER] = enqueuer
    app[BROKER] = broker

    async def handle_proxy(request: web.Request) -> web.StreamResponse:
        if not tracing.enabled():
            return await proxy(request, enqueuer)
        method, attributes = tracing.http_method(request.method)
        attributes["url.path"] = request.path
        attributes["messaging.message.conversation_id"] = request[REQUEST_ID]
        with tracing.span(
            f"{method} /{{service}}", SpanKind.SERVER, request.headers, attributes
        ) as current:
            try:
                response = await proxy(request, enqueuer)
            finally:  # a repeated Idempotency-Key is answered under the first request's id
                if current is not None:
                    current.set_attribute("messaging.message.conversation_id", request[REQUEST_ID])
            tracing.record_status(current, response.status)
            return response

    async def handle_status(request: web.Request) -> web.StreamResponse:
        return await request_status(request, enqueuer)

    app.router.add_get(REQUESTS_PATH + "{request_id}", handle_status)
    app.router.add_route("*", REQUESTS_PATH + "{request_id}", status_method_not_allowed)
    app.router.add_route("*", OWN_PATHS + "{tail:(/.*)?}", own_path_unknown)
    app.router.add_route(
        "*", "/{tail:.*}", handle_proxy, expect_handler=partial(expect_continue, settings.max_body)
    )
    app.cleanup_ctx.append(_broker_context)
    app.on_shutdown.append(_answer_waiting_callers)
    return app


async def expect_continue(max_body: int, request: web.Request) -> None:
    """`100 Continue` only for a body that may come: over --max-body the handler answers 413
    before the caller uploads it (aiohttp's default invited the whole body first). Any other
    expectation is ignored, as RFC 9110 allows, rather than refused with aiohttp's plain 417."""
    expect = request.headers.get(hdrs.EXPECT, "").lower()
    too_large = request.content_length is not None and request.content_length > max_body
    if expect == "100-continue" and request.version >= HttpVersion11 and not too_large:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer has not started yet


async def status_method_not_allowed(request: web.Request) -> web.StreamResponse:
    """A request's status is read, never changed (RFC 9110: 405 with `Allow`)."""
    raise MethodNotAllowed(
        f"{request.method} {REQUESTS_PATH}{{id}} is not served: a request's result is read "
        "with GET (or HEAD), and can be neither changed nor cancelled",
        allow="GET, HEAD",
    )


async def own_path_unknown(request: web.Request) -> web.StreamResponse:
    """Paths under /_proxymq/ are the enqueuer's own, never a service's (the contract)."""
    raise UnknownRequest(
        f"{request.method} {clipped(request.path)} is none of the enqueuer's own paths: it serves "
        f"GET {REQUESTS_PATH}{{id}} (the result of a Prefer: respond-async request)"
    )


async def _broker_context(app: web.Application) -> AsyncIterator[None]:
    broker, enqueuer = app[BROKER], app[ENQUEUER]
    settings = enqueuer.settings

    async def on_connect(connection: object) -> None:
        from aio_pika.abc import AbstractRobustConnection

        assert isinstance(connection, AbstractRobustConnection)
        linger = 2.0 * settings.amqp_heartbeat
        await set_up(
            connection,
            partial(enqueuer.replies.start, connection, linger),
            "declaring the reply queue",
        )
        await set_up(connection, partial(enqueuer.publisher.start, connection), "opening a channel")
        connection.reconnect_callbacks.add(lambda *_: _reconnected(enqueuer))

    broker.on_connect(on_connect)
    broker.start()
    yield
    await broker.close()


async def _answer_waiting_callers(app: web.Application) -> None:
    """On SIGTERM, once the port is closed: replies still awaited get --shutdown-grace seconds
    to come, then their callers a 503 they can act on. They got a dropped connection. Pending
    asynchronous results get no grace: nobody waits for them, and they go with the process."""
    enqueuer = app[ENQUEUER]
    await enqueuer.replies.stop(
        enqueuer.settings.shutdown_grace,
        BrokerUnavailable(
            "the enqueuer is stopping: the request was published and may still be processed, "
            "but its reply will not come here",
        ),
        unawaited=enqueuer.results.pending_ids(),
    )


def _reconnected(enqueuer: Enqueuer) -> None:
    """The broker is back: its breaker closes at once instead of refusing callers (503) until
    `--breaker-reset` has passed since the failures that opened it."""
    enqueuer.metrics.reconnects.inc()
    enqueuer.publisher.breaker.reset()
