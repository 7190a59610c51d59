"""The HTTP API: /healthz, /fetch, /fetch/batch and /batch, every answer JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver

from shared.errors import error_body
from url_fetcher.batch_endpoint import BatchLimits, batch_handler
from url_fetcher.budget import CALLER_TIMEOUT, caller_deadline
from url_fetcher.fetch import (
    BAD_REQUEST,
    FETCH_TIMEOUT,
    Fetcher,
    FetchError,
    FetchLimits,
    create_session,
    log_failure,
)
from url_fetcher.guard import TargetGuard
from url_fetcher.settings import UrlFetcherSettings

log = logging.getLogger("url_fetcher")

SETTINGS = web.AppKey("settings", UrlFetcherSettings)
SESSION = web.AppKey("session", aiohttp.ClientSession)
FETCHER = web.AppKey("fetcher", Fetcher)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

INTERNAL_ERROR = "internal_error"
_FAILED = "url-fetcher failed to answer this request (its log has the details)"


def create_app(
    settings: UrlFetcherSettings,
    *,
    guard: TargetGuard | None = None,
    resolver: AbstractResolver | None = None,
) -> web.Application:
    """Build the application; `guard` and `resolver` are seams for tests (defaults: real ones)."""
    app = web.Application(middlewares=[json_errors], client_max_size=settings.max_body)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_client_session(guard, resolver))
    app.on_startup.append(_announce)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/fetch", fetch_one)
    app.router.add_post("/fetch/batch", fetch_batch)
    batch = BatchLimits(
        concurrency=settings.batch_concurrency,
        timeout=settings.batch_timeout,
        max_items=settings.max_batch,
        max_body=settings.max_batch_body,
        batch_paths=frozenset({"/batch"}),
    )
    app.router.add_post("/batch", batch_handler(batch))
    return app


def _client_session(
    guard: TargetGuard | None, resolver: AbstractResolver | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """One ClientSession per process: connection pooling and DNS cache shared by every fetch."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        limits = FetchLimits(
            max_bytes=settings.max_bytes,
            timeout=settings.fetch_timeout,
            max_redirects=settings.max_redirects,
        )
        target_guard = guard or TargetGuard(allow_private=settings.allow_private)
        async with create_session(
            target_guard, limits, resolver, connections=settings.max_connections
        ) as session:
            app[SESSION] = session
            app[FETCHER] = Fetcher(session, target_guard, limits)
            yield

    return context


async def _announce(app: web.Application) -> None:
    settings = app[SETTINGS]
    log.info(
        "url-fetcher starting on http://%s:%d (private targets %s)",
        settings.host,
        settings.port,
        "allowed" if settings.allow_private else "refused",
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer bad input, aiohttp's own errors (404, 405, 413) and a handler's failure in JSON,
    one format for all (aiohttp would answer a failure in plain text)."""
    try:
        return await handler(request)
    except BadInput as exc:
        return _bad_request(str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return web.json_response(
            error_body(code, f"{request.method} {request.path}: {exc.reason}"),
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k == "Allow"},
        )
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(error_body(INTERNAL_ERROR, _FAILED), status=500)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers; fetch targets are not probed."""
    return web.json_response({"status": "ok"})


async def fetch_one(request: web.Request) -> web.Response:
    """POST /fetch {"url": ...}: the fetch result, or an error with a status naming its kind.

    The fetch stops when its caller does (`X-Request-Timeout`), if before --fetch-timeout.
    """
    deadline = caller_deadline(request, request.app[SETTINGS].fetch_timeout)
    body = await _json_body(request)
    if not isinstance(body, dict) or "url" not in body:
        raise BadInput('expected a JSON object like {"url": "https://example.com/"}')
    url = body["url"]
    started = time.perf_counter()
    try:
        async with asyncio.timeout_at(deadline):
            result = await request.app[FETCHER].fetch(url)
    except FetchError as exc:
        return web.json_response(exc.to_json(url), status=exc.http_status)
    except TimeoutError:
        cut = cut_short(url, CALLER_TIMEOUT, started)
        return web.json_response(cut.to_json(url), status=cut.http_status)
    return web.json_response(result.to_json())


async def fetch_batch(request: web.Request) -> web.Response:
    """POST /fetch/batch: fetch many URLs concurrently; one result or error per URL, in order.

    Accepts {"urls": [...]} or a bare list; items are URL strings or {"url": ...} objects. A bad
    item only fails its own slot, so one typo does not cost the whole batch. The batch answers
    within --batch-timeout, or its caller's `X-Request-Timeout` if shorter: an item not fetched
    by then is `fetch_timeout` in its slot (a batch of slow URLs took 70 s by default, past a
    dequeuer's 60 s call, whose caller got nothing).
    """
    settings = request.app[SETTINGS]
    deadline = caller_deadline(request, settings.batch_timeout)
    reason = CALLER_TIMEOUT
    if deadline is None:
        deadline = asyncio.get_running_loop().time() + settings.batch_timeout
        reason = f"the batch reached its --batch-timeout of {settings.batch_timeout:g} s"
    body = await _json_body(request)
    items = body.get("urls") if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise BadInput('expected {"urls": ["https://...", ...]} or a JSON list of URLs')
    if len(items) > settings.max_batch:
        raise BadInput(
            f"{len(items)} URLs in one batch; at most {settings.max_batch} are accepted "
            "(see --max-batch)"
        )
    fetcher = request.app[FETCHER]
    slots = asyncio.Semaphore(settings.batch_concurrency)
    started = time.perf_counter()

    async def one(item: object) -> dict[str, object]:
        url = item.get("url") if isinstance(item, dict) else item
        try:
            async with asyncio.timeout_at(deadline), slots:
                return (await fetcher.fetch(url)).to_json()
        except FetchError as exc:
            return exc.to_json(url)
        except TimeoutError:
            return cut_short(url, reason, started).to_json(url)
        except Exception:
            log.exception("fetch url=%r failed", url)
            return {"url": url, **error_body(INTERNAL_ERROR, _FAILED)}

    results = await asyncio.gather(*(one(item) for item in items))
    return web.json_response({"results": results})


def cut_short(url: object, reason: str, started: float) -> FetchError:
    """The `fetch_timeout` of a fetch of `url` stopped for `reason`, logged as a fetch's failure
    is (the fetch itself was cancelled: it logs nothing)."""
    cut = FetchError(FETCH_TIMEOUT, f"{reason} before {url} was fetched")
    log_failure(url, cut, started)
    return cut


class BadInput(Exception):
    """The request itself is malformed; answered 400 bad_request by `json_errors`."""


async def _json_body(request: web.Request) -> object:
    """The parsed request body; BadInput if it is not JSON.

    Python's json reads NaN, Infinity and 1e999 (as inf), which are no JSON: echoed in an error,
    they would make the answer no JSON either.
    """
    raw = await request.read()
    try:
        return json.loads(raw, parse_constant=_not_a_number, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"the request body is not JSON: {exc}") from None


def _not_a_number(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text} is too large a number")
    return number


def _bad_request(message: str) -> web.Response:
    return web.json_response(error_body(BAD_REQUEST, message), status=400)
