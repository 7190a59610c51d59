"""HTTP request and response <-> AMQP message, as pure functions.

The HTTP body is the message body, bytes unchanged. Everything else travels in AMQP headers named
`x-proxymq-*` (documented in docs/message-format.md), so any AMQP client can publish a request or
read a reply. HTTP headers go as one JSON list of `[name, value]` pairs: order and repeated names
(`Set-Cookie`) survive, which an AMQP table keyed by name would lose.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import aiormq
from aio_pika.abc import AbstractChannel, HeadersType
from pamqp.commands import Basic
from pamqp.common import FieldTable

from shared.broker import unless_closed

VERSION = 1
H_VERSION = "x-proxymq-version"
H_SERVICE = "x-proxymq-service"
H_METHOD = "x-proxymq-method"
H_PATH = "x-proxymq-path"
H_QUERY = "x-proxymq-query"
H_HEADERS = "x-proxymq-headers"
H_KEY = "x-proxymq-partition-key"
H_DEADLINE = "x-proxymq-deadline"
H_SENT_AT = "x-proxymq-sent-at"
H_STATUS = "x-proxymq-status"
H_ERROR = "x-proxymq-error"
H_ERROR_MESSAGE = "x-proxymq-error-message"
# Added to a dead-letter copy by the dequeuer.
H_DEAD_REASON = "x-proxymq-dead-reason"
H_ATTEMPTS = "x-proxymq-attempts"
H_PARTITION = "x-proxymq-partition"
H_DEAD_AT = "x-proxymq-dead-at"

# RFC 9110 7.6.1 hop-by-hop headers, plus those the receiving side recomputes (Host, length),
# and `Expect`: the enqueuer answers a 100-continue itself and reads the whole body before it
# publishes. Carried on, it made the dequeuer's HTTP client hold the body back for a
# `100 Continue` that a server need not send, until the call timed out.
HOP_BY_HOP = frozenset(
    {
        "expect",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# A reply's Content-Length is kept: answering a HEAD, it is the size a GET would have.
_NOT_IN_A_REPLY = HOP_BY_HOP - {"content-length"}

Headers = tuple[tuple[str, str], ...]
PERSISTENT = 2  # AMQP delivery mode
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\x00]")
# A request target is visible ASCII (what the enqueuer's HTTP parser lets through): a space or
# a control character would end up inside the request line the dequeuer sends.
_NOT_IN_TARGET = re.compile(r"[^\x21-\x7e]")


class MalformedMessage(ValueError):
    """A message that no retry can fix: it is dead-lettered with this reason."""


class TooLargeForAFrame(ValueError):
    """A message whose properties (its headers) exceed the one frame AMQP allows them: sent
    anyway, RabbitMQ closes the whole connection (`FRAME_ERROR frame_too_large`), and with it
    every other request on it."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    query: str
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Headers
    body: bytes
    error: str | None = None  # a ProxyMQ error code when ProxyMQ answered, not the microservice
    error_message: str | None = None

    @property
    def size(self) -> int:
        """The bytes it holds where answers are kept: its body and its headers, which may
        fill an AMQP frame (128 KiB) whatever the body's size."""
        return len(self.body) + sum(len(name) + len(value) for name, value in self.headers)


@dataclass(frozen=True, slots=True)
class RequestEnvelope:
    request_id: str
    service: str
    request: HttpRequest
    partition_key: str | None
    deadline: float | None  # seconds since the epoch; None waits as long as it takes
    reply_to: str | None
    sent_at: float | None = None

    def remaining(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - (time.time() if now is None else now)


class Outgoing(NamedTuple):
    """A message ready for aiormq, built straight as AMQP properties: aio-pika's `Message`,
    built and then converted to the same properties, cost a few per cent of each sidecar."""

    body: bytes
    properties: Basic.Properties

    @property
    def headers(self) -> FieldTable:
        """Always set: a ProxyMQ message carries its `x-proxymq-*` headers."""
        assert self.properties.headers is not None
        return self.properties.headers


async def publish(
    channel: AbstractChannel, message: Outgoing, exchange: str, routing_key: str, *, mandatory: bool
) -> None:
    """Publish and wait for the broker's confirm (when the channel has confirms on).

    aio-pika's `Exchange.publish` also waits until the frame is written, holding the channel's
    lock meanwhile: concurrent publishes on one channel then take one turn of the event loop
    each. Here the lock covers the enqueueing only, and the confirm is what callers wait for.
    A return (`mandatory`) or a nack raises, as with aio-pika's `on_return_raises`."""
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    _check_frame(message.properties, underlay.max_content_size)
    publishing = underlay.basic_publish(
        message.body,
        exchange=exchange,
        routing_key=routing_key,
        properties=message.properties,
        mandatory=mandatory,
        wait=False,
    )
    await unless_closed(underlay, publishing)


def _check_frame(properties: Basic.Properties, limit: int) -> None:
    """`TooLargeForAFrame` unless the content header frame fits in `limit` bytes. Counted
    exactly (by encoding the properties once more) only when its strings come near it."""
    headers = properties.headers or {}
    if sum(len(value) for value in headers.values() if isinstance(value, str)) < limit // 8:
        return
    size = 12 + len(properties.marshal())  # class, weight, body size; then flags and fields
    if size > limit:
        raise TooLargeForAFrame(
            f"its headers take {size} bytes in one AMQP frame; RabbitMQ's frame_max allows {limit}"
        )


def end_to_end(
    headers: Iterable[tuple[str, str]], hop_by_hop: frozenset[str] = HOP_BY_HOP
) -> Headers:
    """Drop hop-by-hop headers, including any that `Connection` names."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return tuple((n, v) for n, v in pairs if n.lower() not in hop_by_hop and n.lower() not in named)


def encode_request(envelope: RequestEnvelope) -> Outgoing:
    request = envelope.request
    headers: HeadersType = {
        H_VERSION: VERSION,
        H_SERVICE: envelope.service,
        H_METHOD: request.method,
        H_PATH: request.path,
        H_QUERY: request.query,
        H_HEADERS: json.dumps(request.headers),
        H_SENT_AT: int(time.time() * 1000),
    }
    if envelope.partition_key is not None:
        headers[H_KEY] = envelope.partition_key
    if envelope.deadline is not None:
        headers[H_DEADLINE] = int(envelope.deadline * 1000)
    return Outgoing(
        request.body,
        Basic.Properties(
            headers=headers,
            delivery_mode=PERSISTENT,
            correlation_id=envelope.request_id,
            message_id=envelope.request_id,
            reply_to=envelope.reply_to,
            app_id="proxymq",
        ),
    )


def decode_request(
    headers: Mapping[str, object],
    body: bytes,
    correlation_id: str | None,
    reply_to: str | None,
    routing_key: str | None = None,
    *,
    expiration: float | None = None,
) -> RequestEnvelope:
    """Validate everything a dequeuer relies on; a message from any AMQP client may be wrong.

    The partition key is `x-proxymq-partition-key`, else the routing key: the format makes the
    routing key the key, so a client that sends no such header still has its keys' order kept.

    The deadline is `x-proxymq-deadline`, else the AMQP `expiration` (in seconds) counted from
    `x-proxymq-sent-at`, or from now when the message does not say when it was sent.

    Its hop-by-hop headers are dropped here too: sent on, a `Content-Length: 999` on a 2-byte
    body, or `Transfer-Encoding` beside the length the client computes, breaks the framing of
    a keep-alive connection that the dequeuer's later requests share."""
    version = headers.get(H_VERSION, VERSION)
    if version != VERSION:
        raise MalformedMessage(
            f"unsupported {H_VERSION} {version!r} (this dequeuer reads {VERSION})"
        )
    if not correlation_id:
        raise MalformedMessage("message has no correlation_id")
    if _FORBIDDEN_IN_VALUE.search(correlation_id):
        # It goes to the microservice as X-Correlation-ID, which no HTTP header can carry.
        raise MalformedMessage(f"correlation_id holds a line break or NUL: {correlation_id[:60]!r}")
    method = _text(headers, H_METHOD, "POST")
    if not _TOKEN.match(method) or len(method) > 32:
        raise MalformedMessage(f"{H_METHOD} {method!r} is not an HTTP method")
    if method == "CONNECT":
        raise MalformedMessage(f"{H_METHOD} CONNECT asks for a tunnel, which no service can serve")
    path = _text(headers, H_PATH, "/")
    if not path.startswith("/"):
        raise MalformedMessage(f"{H_PATH} {path!r} does not start with '/'")
    query = _text(headers, H_QUERY, "")
    if _NOT_IN_TARGET.search(path) or _NOT_IN_TARGET.search(query):
        raise MalformedMessage(
            f"{H_PATH} and {H_QUERY} must be visible ASCII, the rest percent-encoded: "
            f"{(path + '?' + query)[:80]!r}"
        )
    deadline = headers.get(H_DEADLINE)
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int)):
        raise MalformedMessage(f"{H_DEADLINE} must be milliseconds since the epoch")
    key = _str_or_none(headers.get(H_KEY))  # not UTF-8, it is `bytes`: no reason to refuse
    sent_at = headers.get(H_SENT_AT)
    sent = sent_at / 1000 if isinstance(sent_at, int) else None
    if deadline is not None:
        deadline /= 1000
    elif expiration is not None:
        deadline = (time.time() if sent is None else sent) + expiration
    return RequestEnvelope(
        request_id=correlation_id,
        service=_text(headers, H_SERVICE, ""),
        request=HttpRequest(
            method=method,
            path=path,
            query=query,
            headers=end_to_end(_pairs(headers.get(H_HEADERS))),
            body=body,
        ),
        partition_key=routing_key if key is None else key,
        deadline=deadline,
        reply_to=reply_to,
        sent_at=sent,
    )


def encode_response(response: HttpResponse, correlation_id: str) -> Outgoing:
    headers: HeadersType = {H_STATUS: response.status, H_HEADERS: json.dumps(response.headers)}
    if response.error is not None:
        headers[H_ERROR] = response.error
        headers[H_ERROR_MESSAGE] = response.error_message or ""
    return Outgoing(
        response.body,
        Basic.Properties(headers=headers, correlation_id=correlation_id, app_id="proxymq"),
    )


def decode_response(headers: Mapping[str, object], body: bytes) -> HttpResponse:
    """A reply from any AMQP client becomes an answer that keeps the caller's HTTP framing: a
    final status (a 1xx would leave the caller waiting for the answer after it) and no
    hop-by-hop headers (`Transfer-Encoding` beside the length the enqueuer sets)."""
    status = headers.get(H_STATUS)
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise MalformedMessage(f"reply has no valid {H_STATUS} (200-599): {status!r}")
    error = headers.get(H_ERROR)
    message = headers.get(H_ERROR_MESSAGE)
    return HttpResponse(
        status=status,
        headers=end_to_end(_pairs(headers.get(H_HEADERS)), _NOT_IN_A_REPLY),
        body=body,
        error=_str_or_none(error),
        error_message=_str_or_none(message),
    )


def writable(value: Any) -> Any:
    """A header string that is not UTF-8 arrives as `bytes`, which pamqp cannot write: sent back
    (a dead letter's copy, a replay) as a byte array (`x`), it keeps every byte."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: writable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [writable(v) for v in value]
    return value


def valid_header(name: str, value: str) -> bool:
    """A header that an HTTP client can send and a server can answer: a token name, and no
    CR, LF or NUL in the value (which would split or end the header block)."""
    return bool(_TOKEN.match(name)) and not _FORBIDDEN_IN_VALUE.search(value)


def _text(headers: Mapping[str, object], name: str, default: str) -> str:
    value = headers.get(name, default)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise MalformedMessage(f"{name} must be a string, not {type(value).__name__}")
    return value


def _str_or_none(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _pairs(raw: object) -> Headers:
    if raw is None:
        return ()
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        pairs = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):  # deep nesting ("[[[[...") exhausts the parser's stack
        pairs = None
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
    ):
        raise MalformedMessage(f"{H_HEADERS} must be a JSON list of [name, value] string pairs")
    for name, value in pairs:
        if not valid_header(name, value):
            raise MalformedMessage(f"{H_HEADERS} holds an invalid HTTP header {name[:40]!r}")
    return tuple((name, value) for name, value in pairs)
