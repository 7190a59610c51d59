"""`POST /batch`: ProxyMQ's batch protocol, many HTTP requests in one call (docs/batching.md).

The body is a JSON array of request envelopes; the answer is 200 with a JSON array of response
envelopes in the same order. Each item is dispatched to this application's own routes, through
its router and middlewares, exactly as if it had come alone: one code path per route, so a
batched `/fetch` cannot drift from a plain one. Items never share a fate: a malformed item gets a
400, an unknown path a 404, a handler error its own status, and the others are unaffected.

Handlers reached from a batch must answer with a plain `web.Response` (every route of this
service does): one that streams (`prepare()` on its own) would write into the batch's connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial, update_wrapper

from aiohttp import StreamReader, hdrs, web
from aiohttp.compression_utils import (
    BrotliDecompressor,
    DecompressionBaseHandler,
    ZLibDecompressor,
    ZSTDDecompressor,
)
from aiohttp.http import HttpVersion11, RawRequestMessage
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from shared.envelope import HOP_BY_HOP
from shared.errors import error_body
from url_fetcher.budget import DEADLINE_HEADER, budget_of

log = logging.getLogger("url_fetcher")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_DEADLINE = DEADLINE_HEADER.lower()

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Control characters, and lone surrogates (JSON's `"\udce9"`), which no header can be written with.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
_NOT_IN_PATH = re.compile(r"[\x00-\x20\x7f?#]")
_NOT_IN_QUERY = re.compile(r"[\x00-\x20\x7f#]")


class BadItem(ValueError):
    """One envelope of the batch is malformed: that item alone is answered 400."""


@dataclass(frozen=True, slots=True)
class ItemRequest:
    """One request of a batch, validated."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """What one batch may ask for: at most `max_items` items in a body of at most `max_body`
    bytes, run `concurrency` at a time within `timeout` seconds, none of them for one of
    `batch_paths` (batches do not nest: each level would multiply the work)."""

    concurrency: int
    timeout: float
    max_items: int
    max_body: int
    batch_paths: frozenset[str]


def batch_handler(limits: BatchLimits) -> Handler:
    """The `POST /batch` handler."""

    async def handle(request: web.Request) -> web.Response:
        return await batch(request, limits)

    return handle


async def batch(request: web.Request, limits: BatchLimits) -> web.Response:
    """Answer every item of the batch, at most `concurrency` at a time, in the order given,
    within `timeout`: an item not answered by then (running or waiting for its turn) is 504
    `fetch_timeout` in its slot. Without it a batch took as long as its items, 70 s by default,
    past the dequeuer's 60 s call.

    Only a body that is not a JSON array at all, one longer than `max_items` (400) or larger than
    `max_body` (413) fails the whole batch: then there is no item to answer individually.
    """
    loop = asyncio.get_running_loop()
    received = loop.time()  # the items' time runs while their body arrives, too
    # A batch holds many requests' bodies: its own limit, not the one each of them has.
    raw = await request.clone(client_max_size=limits.max_body).read()
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return _error(400, "bad_request", f"the batch is not JSON: {exc}")
    if not isinstance(items, list):
        return _error(400, "bad_request", "a batch is a JSON array of request envelopes")
    if len(items) > limits.max_items:
        return _error(
            400,
            "bad_request",
            f"{len(items)} requests in one batch; at most {limits.max_items} are accepted "
            "(--max-batch)",
        )
    slots = asyncio.Semaphore(limits.concurrency)

    async def one(item: object) -> dict[str, object]:
        try:
            async with asyncio.timeout_at(received + limits.timeout), slots:
                return await answer_item(request, item, limits.batch_paths, loop.time() - received)
        except TimeoutError:
            line = _request_line(item)
            log.info("batch item %r cut at --batch-timeout (%g s)", line, limits.timeout)
            message = f"the batch reached its --batch-timeout of {limits.timeout:g} s before "
            return envelope_of(_error(504, "fetch_timeout", f"{message}{line} was answered"))

    answers = await asyncio.gather(*(one(item) for item in items))
    return web.json_response(answers)


async def answer_item(
    batch_request: web.Request, item: object, batch_paths: frozenset[str], waited: float
) -> dict[str, object]:
    """One item's response envelope, after `waited` seconds for its turn; nothing an item does
    can fail the batch."""
    try:
        parsed = decompressed(parse_item(item, batch_paths), batch_request.client_max_size)
        parsed = time_left(parsed, waited)
    except BadItem as exc:
        return envelope_of(_error(400, "bad_request", f"malformed batch item: {exc}"))
    try:
        response = await dispatch(batch_request, parsed)
    except web.HTTPException as exc:  # what no middleware turned into an answer
        return {
            "status": exc.status,
            "headers": _headers_of(exc),
            "body": _b64(exc.text.encode() if exc.text else b""),
        }
    except Exception:
        log.exception("batch item %s %s failed", parsed.method, parsed.path)
        return envelope_of(_error(500, "internal_error", "the item's handler failed"))
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes | None):
        return envelope_of(
            _error(500, "internal_error", f"{parsed.path} streams its answer: not batchable")
        )
    return envelope_of(response)


def _request_line(item: object) -> str:
    """`METHOD /path` of an envelope, to name it in a message."""
    if isinstance(item, dict):
        method, path = item.get("method"), item.get("path")
        if isinstance(method, str) and isinstance(path, str):
            return f"{method} {path}"[:200]
    return "the request"


def parse_item(item: object, batch_paths: frozenset[str]) -> ItemRequest:
    """A request envelope from untrusted JSON, or BadItem saying what is wrong with it."""
    if not isinstance(item, dict):
        raise BadItem(f"expected a JSON object, got {type(item).__name__}")
    method = item.get("method")
    if not isinstance(method, str) or len(method) > 32 or not _TOKEN.match(method):
        raise BadItem(f'"method" must be an HTTP method, not {method!r}'[:200])
    path = item.get("path")
    if not isinstance(path, str) or not path.startswith("/") or _NOT_IN_PATH.search(path):
        raise BadItem(f'"path" must start with "/" and hold no query, not {path!r}'[:200])
    # What the router matches: the path with percent-escapes decoded (`/%62atch` is `/batch`).
    if URL.build(path=path, encoded=True).path_safe in batch_paths:
        raise BadItem(f"{path!r} is a batch endpoint: batches do not nest"[:200])
    query = item.get("query", "")
    if not isinstance(query, str) or _NOT_IN_QUERY.search(query):
        raise BadItem('"query" must be a string without spaces or "#"')
    raw_headers = item.get("headers", [])
    if not isinstance(raw_headers, list):
        raise BadItem('"headers" must be a list of [name, value] pairs')
    headers = []
    for pair in raw_headers:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], str)
            and _TOKEN.match(pair[0])
            and not _CONTROL.search(pair[1])
        ):
            raise BadItem(f"invalid header {str(pair)[:60]}")
        if pair[0].lower() not in HOP_BY_HOP:
            headers.append((pair[0], pair[1]))
    raw_body = item.get("body", "")
    if not isinstance(raw_body, str):
        raise BadItem('"body" must be a base64 string')
    try:
        body = base64.b64decode(raw_body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadItem(f'"body" is not base64: {exc}') from None
    return ItemRequest(method, path, query, tuple(headers), body)


def time_left(item: ItemRequest, waited: float) -> ItemRequest:
    """`item` telling its handler the time its caller has now: its `X-Request-Timeout` was
    written when the batch was sent, and the `waited` seconds for the item's turn are spent (0
    when none is left). A value that is no duration is the handler's to ignore."""
    headers = tuple(
        (name, _less(value, waited)) if name.lower() == _DEADLINE else (name, value)
        for name, value in item.headers
    )
    return replace(item, headers=headers)


def _less(value: str, waited: float) -> str:
    budget = budget_of(value)
    return value if budget is None else f"{max(budget - waited, 0):.3f}"


def decompressed(item: ItemRequest, limit: int) -> ItemRequest:
    """`item` with its body decompressed as aiohttp's parser decompresses a plain request's (by
    `Content-Encoding`, which stays): the dequeuer forwards a body as the caller sent it, and a
    gzip body that a plain `/fetch` read was answered 400 "not JSON" in a batch. At most `limit`
    + 1 bytes are decompressed: more is the plain request's 413 when the handler reads it."""
    encoding = next((v.lower() for n, v in item.headers if n.lower() == "content-encoding"), "")
    if encoding not in {"gzip", "deflate", "br", "zstd"} or not item.body:
        return item
    try:
        decompressor: DecompressionBaseHandler
        if encoding == "br":
            decompressor = BrotliDecompressor()
        elif encoding == "zstd":
            decompressor = ZSTDDecompressor()
        else:  # a deflate body without its zlib header is read raw, as aiohttp does
            raw = encoding == "deflate" and item.body[0] & 0xF != 8
            decompressor = ZLibDecompressor(encoding=encoding, suppress_deflate_header=raw)
        body = decompressor.decompress_sync(item.body, max_length=limit + 1)
    except Exception as exc:  # a corrupt body, or a codec this process lacks
        raise BadItem(f"cannot decode the body's content-encoding {encoding}: {exc}") from None
    return replace(item, body=body)


async def dispatch(batch_request: web.Request, item: ItemRequest) -> web.StreamResponse:
    """Run `item` through the application's router and middlewares, the steps aiohttp's own
    `Application._handle` takes for a request off the wire (an unknown path meets the same 404
    handler, a wrong method the same 405)."""
    request = sub_request(batch_request, item)
    app = batch_request.app
    match_info = await app.router.resolve(request)
    match_info.add_app(app)
    match_info.freeze()
    request._match_info = match_info  # what aiohttp's Application._handle sets, too
    handler: Handler = match_info.handler
    for middleware in reversed(app.middlewares):
        handler = update_wrapper(partial(middleware, handler=handler), handler)
    return await handler(request)


def sub_request(batch_request: web.Request, item: ItemRequest) -> web.Request:
    """A `web.Request` for one item, sharing the batch's connection (peer address, TLS) but with
    its own method, URL, headers and a body stream of its own."""
    headers = CIMultiDict(item.headers)
    headers[hdrs.CONTENT_LENGTH] = str(len(item.body))
    if hdrs.HOST in batch_request.headers:
        headers[hdrs.HOST] = batch_request.headers[hdrs.HOST]
    url = URL.build(path=item.path, query_string=item.query, encoded=True)
    message = RawRequestMessage(
        item.method,
        str(url),
        HttpVersion11,
        CIMultiDictProxy(headers),
        tuple((k.encode(), v.encode()) for k, v in headers.items()),
        False,  # should_close
        None,  # compression
        False,  # upgrade
        False,  # chunked
        url,
    )
    loop = asyncio.get_running_loop()
    # A limit above the body's size: feeding it must not pause reading on the batch's socket.
    payload = StreamReader(batch_request.protocol, max(2**16, len(item.body)), loop=loop)
    if item.body:
        payload.feed_data(item.body)
    payload.feed_eof()
    return web.Request(
        message,
        payload,
        batch_request.protocol,
        batch_request.writer,
        batch_request.task,
        loop,
        client_max_size=batch_request.client_max_size,
    )


def envelope_of(response: web.Response) -> dict[str, object]:
    """A response envelope: status, end-to-end headers, body in base64."""
    body = response.body
    return {
        "status": response.status,
        "headers": _headers_of(response),
        "body": _b64(body if isinstance(body, bytes) else b""),
    }


def _headers_of(response: web.StreamResponse) -> list[list[str]]:
    return [
        [name, value] for name, value in response.headers.items() if name.lower() not in HOP_BY_HOP
    ]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(error_body(code, message), status=status)
