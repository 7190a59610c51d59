"""OpenTelemetry: one trace from the API's `traceparent` through the enqueuer, the queue (context
in AMQP headers), the dequeuer and the call to the microservice.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, and off
with `OTEL_SDK_DISABLED=true`: then every helper here returns at once and no span object is
made, so tracing costs nothing when nobody collects it. Span names and attributes follow
OpenTelemetry's messaging and HTTP semantic conventions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode

from shared.errors import ProxyMQError

log = logging.getLogger(__name__)
_enabled = False
FLUSH_WITHIN = 2.0  # seconds a stop waits for the last spans to be exported
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# HTTP's methods (RFC 9110, PATCH's RFC 5789): spans name no other, since callers choose them.
METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)


def setup(service_name: str) -> bool:
    """Export spans over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` or
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, unless `OTEL_SDK_DISABLED=true` (the standard
    OTEL_* variables configure the rest); returns whether tracing is on."""
    global _enabled
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if disabled or not any(map(os.environ.get, endpoints)):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME, else OTEL_RESOURCE_ATTRIBUTES' service.name
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))  # neither is set
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


def shutdown() -> None:
    """Flush the spans still buffered, so the last requests before a stop are not lost, for at
    most FLUSH_WITHIN seconds. The SDK's own shutdown waited for a collector that accepted the
    connection and never answered (10 s, the export timeout; up to 30 s): added to the
    dequeuer's 25 s grace, the stop ran past Kubernetes' 30 s and the pod was killed."""
    provider = trace.get_tracer_provider()
    if _enabled and hasattr(provider, "shutdown"):
        flush = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
        flush.start()
        flush.join(FLUSH_WITHIN)
        if flush.is_alive():
            log.warning("the last spans were not exported within %.0f s: dropped", FLUSH_WITHIN)


def enabled() -> bool:
    return _enabled


def _tracer() -> trace.Tracer:
    return trace.get_tracer("proxymq")


@contextlib.contextmanager
def span(
    name: str,
    kind: SpanKind,
    carrier: Mapping[str, object] | None = None,
    attributes: Mapping[str, str | int] | None = None,
    links: Sequence[SpanContext] = (),
) -> Iterator[Span | None]:
    """A span, child of the context in `carrier` (HTTP or AMQP headers) when given, else of the
    current one. Yields None when tracing is off.

    A ProxyMQ error raised through a SERVER span is an HTTP answer like any other
    (`record_status`): left to OpenTelemetry, a caller's 404 or 429 made a failed span with no
    status code."""
    if not _enabled:
        yield None
        return
    parent = None
    if carrier is not None:
        parent = propagate.extract(
            {
                k.lower(): _text(v)
                for k, v in carrier.items()
                if k.lower() in (TRACEPARENT, TRACESTATE)
            }
        )
    with _tracer().start_as_current_span(
        name,
        context=parent,
        kind=kind,
        attributes=dict(attributes or {}),
        links=[Link(link) for link in links],
    ) as current:
        try:
            yield current
        except ProxyMQError as error:
            if kind is not SpanKind.SERVER:
                raise  # a refused publish is that operation's failure
            answered = error
            record_status(current, error.status)
        else:
            return
    raise answered


def http_method(method: str) -> tuple[str, dict[str, str | int]]:
    """The method as a span name's first word, and its attributes: `HTTP` and `_OTHER` (the
    method itself in `http.request.method_original`) for one that is none of HTTP's, as
    OpenTelemetry's HTTP conventions say. Each method a caller made up (any token, from another
    AMQP client) was a span name of its own."""
    if method in METHODS:
        return method, {"http.request.method": method}
    return "HTTP", {"http.request.method": "_OTHER", "http.request.method_original": method}


def inject(carrier: MutableMapping[str, Any]) -> None:
    """Write the current span's `traceparent` (and `tracestate`) into headers."""
    if _enabled:
        propagate.inject(carrier, context=context.get_current())


def record_status(current: Span | None, status: int) -> None:
    if current is None:
        return
    current.set_attribute("http.response.status_code", status)
    if status >= 500:
        current.set_status(Status(StatusCode.ERROR))


def fail(error_type: str, description: str) -> None:
    """Mark the current span failed: a request dead-lettered, dropped or left unsettled is its
    processing's failure, though no exception reached the span (which then had no status)."""
    if _enabled:
        current = trace.get_current_span()
        current.set_attribute("error.type", error_type)
        current.set_status(Status(StatusCode.ERROR, description))


def _text(value: object) -> str:
    """An AMQP string that is no UTF-8 comes as `bytes`: no valid trace context, so ignored.
    Decoded strictly it raised before the request was handled, which then stayed unacked."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
