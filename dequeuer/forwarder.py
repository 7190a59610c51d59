"""Calling the microservice. The consumer talks to a one-method `Transport`, so lanes, retries and
batching are unit-tested without sockets; `HttpTransport` is the real one (one ClientSession per
process, explicit timeout and connection limit)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from functools import partial
from typing import Any, Literal, Protocol

import aiohttp
from aiohttp.client_proto import ResponseHandler
from opentelemetry.trace import SpanKind
from yarl import URL

from shared import tracing
from shared.envelope import Headers, HttpRequest, HttpResponse, end_to_end
from shared.settings import masked

FRAME_MAX = 128 * 1024  # RabbitMQ's default frame_max
MAX_ANSWER_HEADERS = 1024
MAX_ANSWER_HEAD = FRAME_MAX  # bytes: the status line and the header lines
FailureKind = Literal["connect", "timeout", "too_large", "bad_answer"]
# aiohttp adds these unless told not to; a pass-through sends only what the caller sent.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS = re.compile(rb"HTTP/\d\.\d +(\d{3})")
_INTERIM = re.compile(rb"HTTP/\d\.\d +1(?!01)\d\d")  # aiohttp reads on past these to the answer
_ANNOUNCES_BODY = re.compile(
    rb"(?im)^(?:content-length[ \t]*:[ \t]*0*[1-9]|transfer-encoding[ \t]*:)"
)


def traced(request: HttpRequest) -> HttpRequest:
    """The microservice gets the trace context of this call, in place of the caller's."""
    if not tracing.enabled():
        return request
    carrier: dict[str, str] = {}
    tracing.inject(carrier)
    kept = [
        (n, v)
        for n, v in request.headers
        if n.lower() not in (tracing.TRACEPARENT, tracing.TRACESTATE)
    ]
    headers = tuple(kept + list(carrier.items()))
    return HttpRequest(request.method, request.path, request.query, headers, request.body)


def one_spelling(headers: Headers) -> list[tuple[str, str]]:
    """Repeats of a name go under its first spelling: aiohttp's client keeps only the last of
    a name spelled two ways (`X-Tag: a` then `x-tag: b` was sent as `x-tag: b` alone)."""
    first: dict[str, str] = {}
    return [(first.setdefault(name.lower(), name), value) for name, value in headers]


def answered(
    method: str, status: int, headers: Iterable[tuple[str, str]], body: bytes
) -> HttpResponse:
    """What a reply carries of the microservice's answer: its end-to-end headers, with the
    Content-Length of an answer to a HEAD or of a 304 (the size a GET would have), and no body
    for a HEAD, a 204 or a 304 (RFC 9112 6.3), whatever the microservice sent."""
    pairs = list(headers)
    kept = end_to_end(pairs)
    if method == "HEAD" or status == 304:
        kept += tuple((n, v) for n, v in pairs if n.lower() == "content-length")[:1]
    return HttpResponse(status, kept, b"" if method == "HEAD" or status in (204, 304) else body)


class HeadTooLarge(Exception):
    """The answer's head is larger than a reply can carry."""


class AnswerHeads(ResponseHandler):
    """The client's connection protocol, watching each answer's head as it arrives.

    It reads at most `MAX_ANSWER_HEAD` bytes of it: a reply's headers travel in one AMQP frame,
    so more could never be carried back, and aiohttp's limits alone (1,024 lines of 128 KiB)
    let an answer's head take 128 MiB before the reply's frame check refused it.

    It ends a HEAD's, 204's or 304's answer at its head. Such an answer has no body (RFC 9112
    6.3), yet many servers write one (Python's http.server with `do_HEAD = do_GET`, a 304 with
    its page): aiohttp's parser read those bytes as the next answer and failed ('Bad status
    line'), so the call was dead-lettered, or, the bytes coming a moment later, the next call
    on that connection failed. The bytes after such a head are dropped, and a connection whose
    bodyless answer says a body follows (a Content-Length, a Transfer-Encoding) or sent one is
    closed, never used again: those bytes may still come.

    An interim answer (a 103 Early Hints, a 100 Continue) is no answer's head: aiohttp reads on
    to the answer after it, and so does this watch. Taken for the head, a HEAD's answer after a
    103 was cut off and the call failed, and the answer's own head went unwatched."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._head: bytearray | None = None  # the answer's head while it arrives
        self._dropping = False
        self._head_only = False

    def set_response_params(self, **params: Any) -> None:
        """Called before each request's answer is read."""
        self._head, self._dropping = bytearray(), False
        self._head_only = bool(params.get("skip_payload"))
        super().set_response_params(**params)

    def data_received(self, data: bytes) -> None:
        if self._dropping:
            return
        if self._head is not None:
            start = max(0, len(self._head) - 3)
            self._head += data
            while self._head is not None:
                end = _HEAD_END.search(self._head, start)
                if (end.end() if end else len(self._head)) > MAX_ANSWER_HEAD:
                    self._head, self._dropping = None, True
                    if self.transport is not None:
                        self.transport.close()
                    self.set_exception(
                        HeadTooLarge(
                            f"the answer's head is over {MAX_ANSWER_HEAD} bytes, more than a "
                            "reply carries (one AMQP frame: RabbitMQ's frame_max)"
                        )
                    )
                    return
                if end is None:
                    break
                head, after = self._head[: end.end()], len(self._head) - end.end()
                if _INTERIM.match(head):
                    self._head, start = self._head[end.end() :], 0
                    continue
                self._head = None
                if self._bodyless(head) and (after or _ANNOUNCES_BODY.search(head)):
                    self._dropping = True
                    self.force_close()
                    data = data[: len(data) - after]
        super().data_received(data)

    def _bodyless(self, head: bytes | bytearray) -> bool:
        status = _STATUS.match(head)
        return self._head_only or (status is not None and status[1] in (b"204", b"304"))


class CallFailed(Exception):
    """No usable HTTP answer: the connection failed, the call ran out of time, or the answer
    was larger than the dequeuer carries back or not HTTP it can read (those two are never
    retried: the next answer would be the same). `sent` is False only for a request that
    never left (no connection could be made, or its time ran out first, waiting for its
    batch): the microservice cannot have processed it."""

    def __init__(self, kind: FailureKind, detail: str, *, sent: bool = True) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.sent = sent

    @property
    def expired(self) -> bool:
        """The request's time ran out before it could be sent: no call was made."""
        return self.kind == "timeout" and not self.sent

    def for_caller(self) -> str:
        """The failure as the caller's 502 tells it: a connection's detail names the
        microservice's host and port ("Cannot connect to host 10.0.3.7:8000"), which the
        caller has no use for; the dequeuer's log and the dead letter keep it."""
        if self.kind != "connect":
            return str(self)
        failed = (
            "the connection to the microservice failed before its answer"
            if self.sent
            else "could not connect to the microservice"
        )
        return f"connect: {failed} (the dequeuer's log says why)"


class Transport(Protocol):
    async def send(self, request: HttpRequest, timeout: float) -> HttpResponse: ...


class ClosableTransport(Transport, Protocol):
    """A transport that owns connections: whoever holds it closes it."""

    async def close(self) -> None: ...


class HttpTransport:
    def __init__(self, target: str, connections: int, max_body: int) -> None:
        self.target = target.rstrip("/")
        self._base = URL(self.target)
        # A target's own user and password (Basic auth) are what the microservice checks: a
        # caller's `Authorization` beside them made aiohttp refuse the call, and the request
        # was dead-lettered as a defect of the dequeuer's.
        self._own_credentials = aiohttp.BasicAuth.from_url(self._base) is not None
        self.max_body = max_body
        connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
        # No option of aiohttp's chooses the protocol: its private factory is replaced.
        factory = partial(AnswerHeads, loop=asyncio.get_running_loop())
        connector._factory = factory  # type: ignore[assignment]
        # No cookie jar: a session's jar sent one caller's cookies (a `Set-Cookie` answered to
        # them) with every later caller's request. Headers pass through; nothing is kept.
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            # A reply's headers travel in one AMQP frame (RabbitMQ's frame_max, 128 KiB): a
            # header line up to that is carried, where aiohttp's 8 KiB default refused a
            # large cookie or policy header as no HTTP at all.
            max_line_size=FRAME_MAX,
            max_field_size=FRAME_MAX,
            # And up to 1,024 of them: past aiohttp's 128, an answer clearing 150 cookies was
            # no HTTP, and its caller got 502. Together at most MAX_ANSWER_HEAD (`AnswerHeads`).
            max_headers=MAX_ANSWER_HEADERS,
        )
        # Every call is an attempt of the consumer's, counted, backed off and within
        # --max-attempts and --retry-on. aiohttp sends a GET, PUT or DELETE again at once when
        # the connection closes without an answer, which is also how a worker killed mid-request
        # looks: each attempt ran twice, as the same `X-ProxyMQ-Attempt`.
        self.session._retry_connection = False

    async def send(self, request: HttpRequest, timeout: float) -> HttpResponse:
        url = self.url(request.path, request.query)
        if not tracing.enabled():
            return await self._send(url, request, timeout)
        method, attributes = tracing.http_method(request.method)
        attributes["url.full"] = masked(str(url))  # never a password of the target's
        attributes["server.address"] = url.host or ""
        attributes["server.port"] = url.port or 80
        with tracing.span(method, SpanKind.CLIENT, attributes=attributes) as current:
            response = await self._send(url, traced(request), timeout)
            tracing.record_status(current, response.status)
            return response

    def url(self, path: str, query: str) -> URL:
        """The target's URL with the path and query as sent. A `#` in them is no fragment (a
        request target has none): parsed from a string, `/a#b?c=1` was sent as `/a`, its query
        dropped, where a direct call sends it whole."""
        if "#" not in path and "#" not in query:
            return URL(self.target + path + (f"?{query}" if query else ""), encoded=True)
        base = self._base
        return URL.build(
            scheme=base.scheme,
            authority=base.raw_authority,
            path=base.raw_path.rstrip("/") + path,
            query_string=query,
            encoded=True,
        )

    async def _send(self, url: URL, request: HttpRequest, timeout: float) -> HttpResponse:
        headers = one_spelling(request.headers)
        if self._own_credentials:
            headers = [(n, v) for n, v in headers if n.lower() != "authorization"]
        try:
            async with self.session.request(
                request.method,
                url,
                headers=headers,
                data=request.body or None,
                allow_redirects=False,
                skip_auto_headers=_SKIP_AUTO,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                if not 200 <= response.status <= 599:
                    # aiohttp takes any three digits, and a 101 as the answer; the caller's
                    # side could only refuse such a reply, and the request would be in no DLQ.
                    response.close()
                    raise CallFailed(
                        "bad_answer", f"status {response.status} is no final HTTP status"
                    )
                body = await self._read(response)
                return answered(request.method, response.status, response.headers.items(), body)
        except TimeoutError as exc:
            raise CallFailed("timeout", f"no answer within {timeout:.1f} s") from exc
        except HeadTooLarge as exc:
            raise CallFailed("too_large", str(exc)) from exc
        except aiohttp.ClientResponseError as exc:
            # Not HTTP that the client can read (a NUL in a header, a broken status line): it
            # escaped as an unknown error and left the request held for good.
            raise CallFailed("bad_answer", f"the answer is not valid HTTP: {exc.message}") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            if isinstance(exc, aiohttp.ServerTimeoutError):
                raise CallFailed("timeout", str(exc)) from exc
            # Refused, unreachable, a failed TLS handshake: nothing was written. A connection
            # lost later (a reset, a close without an answer) may have been processed.
            sent = not isinstance(exc, aiohttp.ClientConnectorError)
            raise CallFailed("connect", str(exc) or type(exc).__name__, sent=sent) from exc

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The body, up to `max_body`: a larger one is refused before it is all in memory (a
        reply must fit in one RabbitMQ message, and RabbitMQ refuses those over its
        max_message_size)."""
        length = response.content_length
        if length is not None and length <= self.max_body:
            return await response.read()
        body = bytearray()
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > self.max_body:
                raise CallFailed(
                    "too_large",
                    f"the response is over --max-response ({self.max_body} bytes)"
                    + ("" if length is None else f": Content-Length {length}"),
                )
        return bytes(body)

    async def close(self) -> None:
        await self.session.close()
        await asyncio.sleep(0)
