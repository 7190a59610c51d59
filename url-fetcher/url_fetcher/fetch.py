"""Fetch one URL: guarded redirects, a size cap, a time cap, and a report of what came back."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address

import aiohttp
from aiohttp import hdrs
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import AsyncResolver
from yarl import URL

from shared.errors import error_body
from url_fetcher.guard import (
    ALLOWED_SCHEMES,
    ForbiddenTarget,
    GuardedResolver,
    TargetGuard,
    parse_ip_literal,
)
from url_fetcher.title import HTML_TYPES, TitleScanner

log = logging.getLogger("url_fetcher")

USER_AGENT = "url-fetcher/0.1 (ProxyMQ example service)"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_URL_CHARS = 8192
MAX_REASON_CHARS = 300  # of a failed fetch's reason, which may quote the target
MAX_CONNECTIONS = 1000  # to fetch targets at once, unless --max-connections says otherwise
_CHUNK = 64 * 1024

# Error codes, each with the HTTP status /fetch answers it with.
BAD_REQUEST = "bad_request"
FORBIDDEN_TARGET = "forbidden_target"
FETCH_FAILED = "fetch_failed"
TOO_MANY_REDIRECTS = "too_many_redirects"
FETCH_TIMEOUT = "fetch_timeout"
HTTP_STATUS = {
    BAD_REQUEST: 400,
    FORBIDDEN_TARGET: 403,
    FETCH_FAILED: 502,
    TOO_MANY_REDIRECTS: 502,
    FETCH_TIMEOUT: 504,
}


class FetchError(Exception):
    """A fetch that produced no page; `code` is stable for programs, `message` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """The status /fetch answers with for this error."""
        return HTTP_STATUS[self.code]

    def to_json(self, url: object) -> dict[str, object]:
        """The error object of the API, echoing the URL as the caller gave it."""
        return {"url": url, **error_body(self.code, self.message)}


@dataclass(frozen=True, slots=True)
class FetchLimits:
    """What one fetch may cost: bytes read, seconds spent, redirects followed."""

    max_bytes: int = 5 * 1024 * 1024
    timeout: float = 10.0
    max_redirects: int = 5


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What a fetch found; `size` counts body bytes read (after content-encoding is undone)."""

    url: str
    final_url: str
    status: int
    content_type: str | None
    size: int
    elapsed_ms: float
    title: str | None
    redirects: int
    truncated: bool

    def to_json(self) -> dict[str, object]:
        """The result object of the API."""
        return {
            "url": self.url,
            "final_url": self.final_url,
            "status": self.status,
            "content_type": self.content_type,
            "size": self.size,
            "elapsed_ms": self.elapsed_ms,
            "title": self.title,
            "redirects": self.redirects,
            "truncated": self.truncated,
        }


def parse_target(value: object) -> URL:
    """The URL to fetch from untrusted input, or a `bad_request` FetchError saying what is wrong."""
    if not isinstance(value, str):
        raise FetchError(BAD_REQUEST, f'"url" must be a string, not {_json_type(value)}')
    if len(value) > MAX_URL_CHARS:
        raise FetchError(BAD_REQUEST, f"the URL is longer than {MAX_URL_CHARS} characters")
    try:
        url = _checked(URL(value.strip()))
    except (ValueError, TypeError) as exc:
        raise FetchError(BAD_REQUEST, f"{value!r} is not a valid URL: {exc}") from None
    if url.scheme not in ALLOWED_SCHEMES:
        raise FetchError(BAD_REQUEST, f"{value!r} is not an http:// or https:// URL")
    if not url.host:
        raise FetchError(BAD_REQUEST, f"{value!r} has no host")
    return url.with_fragment(None)


def _checked(url: URL) -> URL:
    """`url`, once its host is known to be one DNS can be asked about, an IPv4 address written
    as a dotted quad.

    yarl decodes a host's punycode only when `.host` is first read (`xn--a` fails then), and
    getaddrinfo() refuses an empty label or one over 63 characters (`a..b`): both raise
    UnicodeError, a ValueError, which must not wait until the fetch. aiohttp refuses to connect
    to the legacy spellings of IPv4 (`2130706433`, `127.1`, `0177.0.0.1`, `127.0.0.1.`), which
    browsers fetch as the address they stand for (the URL standard): so do we.
    """
    if url.host is not None and url.raw_host:
        url.raw_host.encode("idna")
        literal = parse_ip_literal(url.raw_host)
        if isinstance(literal, IPv4Address) and url.raw_host != str(literal):
            return url.with_host(str(literal))
    return url


def _json_type(value: object) -> str:
    """Name a JSON value's type the way the caller wrote it."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", list: "an array"}
    return names.get(type(value), "an object" if isinstance(value, dict) else type(value).__name__)


@asynccontextmanager
async def create_session(
    guard: TargetGuard,
    limits: FetchLimits,
    resolver: AbstractResolver | None = None,
    *,
    connections: int = MAX_CONNECTIONS,
    nameservers: Sequence[str] = (),
) -> AsyncIterator[aiohttp.ClientSession]:
    """The process's client session, connecting only where `guard` allows, with at most
    `connections` open at once (--max-connections; aiohttp's default of 100 made the 101st
    concurrent fetch wait behind slow targets until it timed out).

    Every fetch has connections of its own, closed after it (`force_close`): a target could
    send a response unasked, and a pooled connection handed it to the next fetch of that host,
    any caller's, as its answer.

    Names are resolved by c-ares (aiodns), many at once on the event loop: getaddrinfo() took
    a thread of the loop's small default pool for each, so a few dozen names whose DNS never
    answered held up every other name. Environment proxies are ignored (a proxy would connect
    on our behalf, past the guard) and cookies are not kept, so one caller's fetch cannot leak
    into another's. `nameservers` (`host[:port]`) replace /etc/resolv.conf's.
    """
    dns = resolver or AsyncResolver(nameservers=list(nameservers) or None)
    guarded = GuardedResolver(dns, guard)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, resolver=guarded, force_close=True),
        timeout=aiohttp.ClientTimeout(total=limits.timeout),
        headers={hdrs.USER_AGENT: USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
    try:
        async with session:
            yield session
    finally:
        await guarded.close()  # a resolver passed in is not closed by the connector


class Fetcher:
    """Fetches URLs through one shared session, enforcing the guard and the limits."""

    def __init__(
        self, session: aiohttp.ClientSession, guard: TargetGuard, limits: FetchLimits
    ) -> None:
        self.session = session
        self.guard = guard
        self.limits = limits

    async def fetch(self, raw_url: object) -> FetchResult:
        """Fetch `raw_url` (as the caller sent it) and log one line about the outcome."""
        started = time.perf_counter()
        try:
            result = await self._fetch(raw_url, started)
        except FetchError as exc:
            log_failure(raw_url, exc, started)
            raise
        log.info(
            "fetch url=%s status=%d elapsed_ms=%.1f size=%d redirects=%d%s",
            _redacted(repr(raw_url)),
            result.status,
            result.elapsed_ms,
            result.size,
            result.redirects,
            " truncated" if result.truncated else "",
        )
        return result

    async def _fetch(self, raw_url: object, started: float) -> FetchResult:
        current = parse_target(raw_url)
        raw = str(raw_url)
        try:
            # ClientTimeout caps each request; this caps the whole chain of redirects.
            async with asyncio.timeout(self.limits.timeout):
                for redirects in range(self.limits.max_redirects + 1):
                    location = await self._request(raw, current, redirects, started)
                    if isinstance(location, FetchResult):
                        return location
                    current = location
        except TimeoutError:
            raise FetchError(
                FETCH_TIMEOUT,
                f"fetching {current} took longer than {self.limits.timeout:g} s",
            ) from None
        raise FetchError(
            TOO_MANY_REDIRECTS,
            f"{raw} redirected more than {self.limits.max_redirects} times "
            f"(the limit is --max-redirects)",
        )

    async def _request(
        self, raw_url: str, url: URL, redirects: int, started: float
    ) -> FetchResult | URL:
        """One hop: the result if it is the final answer, else the URL it redirects to."""
        try:
            self.guard.check_url(url)
            async with self.session.get(url, allow_redirects=False) as response:
                location = response.headers.get(hdrs.LOCATION)
                if response.status in REDIRECT_STATUSES and location:
                    return _next_hop(url, location)
                return await self._read(raw_url, response, redirects, started)
        except ForbiddenTarget as exc:
            message = exc.message_for(str(url), raw_url if redirects else None)
            raise FetchError(FORBIDDEN_TARGET, message) from None
        except TimeoutError:
            raise  # aiohttp's timeouts are ClientErrors too; they belong to the caller's 504
        except aiohttp.ClientError as exc:
            raise FetchError(FETCH_FAILED, f"fetching {url} failed: {_describe(exc)}") from None

    async def _read(
        self, raw_url: str, response: aiohttp.ClientResponse, redirects: int, started: float
    ) -> FetchResult:
        """Stream the body up to --max-bytes, looking for a title on the way."""
        content_type = response.headers.get(hdrs.CONTENT_TYPE)
        scanner = None
        if content_type and response.content_type in HTML_TYPES:
            scanner = TitleScanner(response.charset)
        size = 0
        truncated = False
        async for chunk in response.content.iter_chunked(_CHUNK):
            room = self.limits.max_bytes - size
            if len(chunk) > room:
                chunk = chunk[:room]
                truncated = True
            size += len(chunk)
            if scanner is not None and not scanner.done:
                scanner.feed(chunk)
            if truncated:
                response.close()  # the rest stays unread; the connection cannot be reused
                break
        title = scanner.title() if scanner is not None else None  # timed with the rest
        return FetchResult(
            url=raw_url,
            final_url=str(response.url),
            status=response.status,
            content_type=content_type,
            size=size,
            elapsed_ms=_elapsed_ms(started),
            title=title,
            redirects=redirects,
            truncated=truncated,
        )


def log_failure(raw_url: object, exc: FetchError, started: float) -> None:
    """The log line of a fetch that produced no page, `started` at `time.perf_counter()`."""
    log.info(
        "fetch url=%s status=%d error=%s elapsed_ms=%.1f message=%s",
        _redacted(repr(raw_url)),
        exc.http_status,
        exc.code,
        _elapsed_ms(started),
        _redacted(_one_line(exc.message)),
    )


def _next_hop(url: URL, location: str) -> URL:
    """Resolve a Location header against the URL that sent it."""
    try:
        target = URL(location)
        hop = _checked(url.join(target).with_fragment(None))
    except (ValueError, TypeError) as exc:
        raise FetchError(
            FETCH_FAILED, f"{url} redirected to an invalid location {location!r}: {exc}"
        ) from None
    if hop.scheme in ALLOWED_SCHEMES and _AUTHORITY.match(location) and not target.raw_host:
        # yarl reads `http://` as no authority at all, and joins it into `url` itself: the
        # same page again, until --max-redirects. (Other schemes are the guard's to refuse.)
        raise FetchError(FETCH_FAILED, f"{url} redirected to {location!r}, a URL with no host")
    return hop


# A reference naming an authority (`http://...`, `//...`), which then needs a host.
_AUTHORITY = re.compile(r"^\s*(?:[a-z][a-z0-9+.\-]*:)?//", re.IGNORECASE)


def _describe(exc: aiohttp.ClientError) -> str:
    """A short reason for a failed request, naming DNS failures as such.

    At most `MAX_REASON_CHARS`: aiohttp's parse errors quote what the target sent, up to a
    whole read (128 KiB), which would be answered and logged for every such fetch.
    """
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        reason = exc.os_error.strerror or str(exc.os_error) or "no address found"
        return f"cannot resolve {exc.host}: {reason}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    reason = str(exc) or type(exc).__name__
    return reason if len(reason) <= MAX_REASON_CHARS else f"{reason[:MAX_REASON_CHARS]}..."


# The userinfo runs to the authority's last `@` (an `@` in it is the password's or the user's).
_PASSWORD = re.compile(r"(//[^/?#:\s]*:)[^/?#\s]*@")


def _redacted(text: str) -> str:
    """Without the password of any URL in it (`//user:***@host`): a caller's credentials for
    the page stay out of the log. Text, not parsed URLs: what is logged may be no URL at all."""
    return _PASSWORD.sub(r"\1***@", text)


def _one_line(text: str) -> str:
    """Caller-supplied text cannot forge extra log lines."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
