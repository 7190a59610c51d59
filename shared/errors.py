"""ProxyMQ's own errors: one class per code, each with its HTTP status. The contract's codes
are bad_partition_key, unknown_service, body_too_large, backpressure, service_failed,
broker_unavailable and timeout; the others are ProxyMQ's extensions (the README's table).

    ProxyMQError
     +-- BadRequest           400 bad_request         (aiohttp's parser refused it)
     +-- BadPartitionKey      400 bad_partition_key
     +-- Unauthorized         401 unauthorized        (--auth-token-file is set)
     +-- UnknownService       404 unknown_service
     +-- UnknownRequest       404 unknown_request
     +-- MethodNotAllowed     405 method_not_allowed  (Allow)
     +-- BodyTooLarge         413 body_too_large
     +-- IdempotencyKeyReused 422 idempotency_key_reused
     +-- HeadersTooLarge      431 headers_too_large
     +-- Backpressure         429 backpressure        (Retry-After)
     +-- ServiceFailed        502 service_failed
     +-- BrokerUnavailable    503 broker_unavailable  (Retry-After)
     +-- GatewayTimeout       504 timeout
     +-- InternalError        500 internal_error      (a defect of ours; logged with its traceback)

They are raised anywhere and rendered in one place (the enqueuer's error middleware), so every
answer carries the same JSON body and `X-ProxyMQ-Error` header. `TopologyMismatch` is a startup
error, never an HTTP answer.
"""

from __future__ import annotations

import json
import re
from typing import ClassVar

from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError

ERROR_HEADER = "X-ProxyMQ-Error"
_QUOTED = re.compile(r":\s*(?:bytearray\()?b['\"].*", re.S)  # the request's bytes a message quotes


def clipped(text: str, limit: int = 100) -> str:
    """A name a caller chose (a request id, a path, a service), as an error repeats it: it may
    be as long as a request line (8 KiB), and each 404 and its log line held all of it."""
    return text if len(text) <= limit else f"{text[:limit]}..."


def error_body(code: str, message: str) -> dict[str, object]:
    """The JSON error object of every answer ProxyMQ makes itself: both sidecars' API and
    admin ports, and url-fetcher's."""
    return {"error": {"code": code, "message": message}}


class ProxyMQError(Exception):
    """Base of the errors a caller can receive from ProxyMQ itself."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # The codes the contract answers with Retry-After have one, wherever they come from (a
    # reply's `x-proxymq-error` too).
    default_retry_after: ClassVar[float | None] = None

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = self.default_retry_after if retry_after is None else retry_after

    def body(self) -> bytes:
        return json.dumps(error_body(self.code, self.message)).encode()


class BadRequest(ProxyMQError):
    status = 400
    code = "bad_request"


def malformed(error: BaseException) -> BadRequest:
    """What aiohttp's parser refused, in its words without what it quotes of the request
    ("Invalid method encountered:\n\n  b'FOO / HTTP/1.1'\n     ^", "Got more than 8190 bytes
    when reading: b'session=...'", a target it cannot read): header values and targets, a
    cookie's or a token's, which the answer's warning line would hold. A body's error wraps
    the parser's."""
    if isinstance(error.__cause__, HttpProcessingError):
        error = error.__cause__
    text = error.message if isinstance(error, HttpProcessingError) else str(error)
    if isinstance(error, InvalidURLError) and "\n\n" not in text:
        text = "Invalid URL"  # the message is the target alone
    words = " ".join(_QUOTED.sub("", text.split("\n\n", 1)[0]).split()).rstrip(":")[:200]
    return BadRequest(f"malformed HTTP request: {words}")


class BadPartitionKey(ProxyMQError):
    status = 400
    code = "bad_partition_key"


class Unauthorized(ProxyMQError):
    status = 401
    code = "unauthorized"


class HeadersTooLarge(ProxyMQError):
    status = 431
    code = "headers_too_large"


class UnknownService(ProxyMQError):
    status = 404
    code = "unknown_service"


class UnknownRequest(ProxyMQError):
    status = 404
    code = "unknown_request"


class MethodNotAllowed(ProxyMQError):
    """A method the enqueuer's own resource does not serve; `allow` names those it does."""

    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow


class BodyTooLarge(ProxyMQError):
    status = 413
    code = "body_too_large"


class IdempotencyKeyReused(ProxyMQError):
    """draft-ietf-httpapi-idempotency-key-header: a key reused with another payload is 422."""

    status = 422
    code = "idempotency_key_reused"


class Backpressure(ProxyMQError):
    status = 429
    code = "backpressure"
    default_retry_after = 1.0


class ServiceFailed(ProxyMQError):
    status = 502
    code = "service_failed"


class BrokerUnavailable(ProxyMQError):
    status = 503
    code = "broker_unavailable"
    default_retry_after = 1.0


class GatewayTimeout(ProxyMQError):
    status = 504
    code = "timeout"


class InternalError(ProxyMQError):
    """An exception nothing else caught: a defect. Never from a reply (not in BY_CODE)."""

    status = 500
    code = "internal_error"


# The codes a reply may carry (`x-proxymq-error`), as the enqueuer raises them again: not 405,
# which its own path alone answers, nor 500, a defect of the enqueuer's own.
BY_CODE: dict[str, type[ProxyMQError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        BadPartitionKey,
        Unauthorized,
        HeadersTooLarge,
        UnknownService,
        UnknownRequest,
        BodyTooLarge,
        IdempotencyKeyReused,
        Backpressure,
        ServiceFailed,
        BrokerUnavailable,
        GatewayTimeout,
    )
}


class TopologyMismatch(Exception):
    """The broker already holds another layout for the service; declaring ours would split it."""


class QueueInUse(Exception):
    """Another process consumes a queue that is this instance's alone: a startup error."""
