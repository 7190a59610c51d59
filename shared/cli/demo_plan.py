"""What `proxymq demo` sends through the enqueuer, and what each answer must be.

Each call shows one behaviour of the contract: a page fetched through the queue, a redirect
followed by the microservice (never by ProxyMQ), a page's own 404 reported as data, the
microservice's own 400 passed back unchanged, a retryable failure retried and dead-lettered
(502 service_failed), an asynchronous request polled to its end, an unknown service refused
(404 unknown_service) and a batch. The checks are exact, so the demo is also a smoke test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from shared.cli import demo_site

ERROR_HEADER = "X-ProxyMQ-Error"
CORRELATION_HEADER = "X-Correlation-ID"
ASYNC_POLL_TIMEOUT = 20.0
CALL_TIMEOUT = 40.0
START_SPACING = 0.01


@dataclass
class Answer:
    """What came back for one call, as the table shows it."""

    status: str
    latency_ms: float
    correlation_id: str
    summary: str
    problem: str | None  # None: the expected answer


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: Any  # the parsed JSON body, None when it is not JSON

    def error_code(self) -> str | None:
        code = self.headers.get(ERROR_HEADER)
        if code:
            return code
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("code"))
        return None


# A check returns (what came back, None) when the answer is the expected one, else a problem.
Check = Callable[[Response], tuple[str, str | None]]


@dataclass
class Call:
    method: str
    path: str  # under the enqueuer: /{service}/...
    key: str | None
    body: Any
    check: Check
    asynchronous: bool = False
    note: str = ""  # what the call shows, added to the answer when it is the expected one
    headers: dict[str, str] = field(default_factory=dict)


def expect_title(title: str, *, page_status: int = 200, redirects: int = 0) -> Check:
    def check(response: Response) -> tuple[str, str | None]:
        body = response.body if isinstance(response.body, dict) else {}
        got = body.get("title")
        followed = f", {body['redirects']} redirect" if body.get("redirects") else ""
        page = f"(page {body.get('status', '?')}{followed})"
        summary = f"{got!r} {page}" if got else describe(response)
        if response.status != 200:
            return summary, f"expected HTTP 200, got {response.status}"
        if body.get("status") != page_status:
            return summary, f"expected the page's status {page_status}, got {body.get('status')}"
        if got != title:
            return summary, f"expected title {title!r}, got {got!r}"
        if body.get("redirects", 0) != redirects:
            return summary, f"expected {redirects} redirects, got {body.get('redirects')}"
        return summary, None

    return check


def expect_error(status: int, code: str, *, from_proxymq: bool) -> Check:
    """`from_proxymq`: the error must carry X-ProxyMQ-Error (ours), or must not (the service's)."""

    def check(response: Response) -> tuple[str, str | None]:
        summary = describe(response)
        ours = ERROR_HEADER in response.headers
        if response.status != status or response.error_code() != code:
            return summary, f"expected {status} {code}, got {response.status} {summary}"
        if ours != from_proxymq:
            whose = "ProxyMQ's" if from_proxymq else "the microservice's"
            return summary, f"expected {whose} error"
        return summary, None

    return check


def expect_batch(titles: list[str]) -> Check:
    def check(response: Response) -> tuple[str, str | None]:
        results = response.body.get("results") if isinstance(response.body, dict) else None
        if response.status != 200 or not isinstance(results, list):
            return describe(response), f"expected 200 with results, got {response.status}"
        got = [item.get("title") if isinstance(item, dict) else None for item in results]
        summary = f"{len(got)} pages: " + ", ".join(repr(title) for title in got)
        if got != titles:
            return summary, f"expected titles {titles}"
        return summary, None

    return check


def describe(response: Response) -> str:
    code = response.error_code()
    if code:
        whose = "ProxyMQ" if ERROR_HEADER in response.headers else "url-fetcher"
        return f"{code} from {whose}"
    return json.dumps(response.body)[:60] if response.body is not None else "(no JSON)"


def plan(service: str, site: str, dead_port: int) -> list[Call]:
    """The calls, keyed per user: calls with one key are served in order, others in parallel."""
    fetch = f"/{service}/fetch"

    def page(
        path: str, key: str, check: Check, *, note: str = "", asynchronous: bool = False
    ) -> Call:
        return Call("POST", fetch, key, {"url": site + path}, check, asynchronous, note)

    home = demo_site.HOME_TITLE
    return [
        page("/", "alice", expect_title(home)),
        page("/products/1", "alice", expect_title(demo_site.product_title(1))),
        page("/products/2", "bob", expect_title(demo_site.product_title(2))),
        page("/about", "bob", expect_title(demo_site.ABOUT_TITLE)),
        page(
            "/old-home",
            "carol",
            expect_title(home, redirects=1),
            note="url-fetcher followed it",
        ),
        page(
            "/no-such-page",
            "carol",
            expect_title(demo_site.NOT_FOUND_TITLE, page_status=404),
            note="a fetched 404 is data",
        ),
        page("/slow", "dave", expect_title(demo_site.SLOW_TITLE), note="slow page"),
        Call(
            "POST",
            fetch,
            "dave",
            {"url": "ftp://127.0.0.1/file"},
            expect_error(400, "bad_request", from_proxymq=False),
            note="its own answer, passed back as is, not retried",
        ),
        Call(
            "POST",
            fetch,
            "erin",
            {"url": f"http://127.0.0.1:{dead_port}/"},
            expect_error(502, "service_failed", from_proxymq=True),
            note="url-fetcher's 502 retried, then dead-lettered",
        ),
        page(
            "/products/3",
            "erin",
            expect_title(demo_site.product_title(3)),
            note="polled",
            asynchronous=True,
        ),
        Call(
            "POST",
            "/no-such-service/fetch",
            "frank",
            {"url": site + "/"},
            expect_error(404, "unknown_service", from_proxymq=True),
        ),
        Call(
            "POST",
            f"/{service}/fetch/batch",
            "frank",
            {"urls": [site + "/", site + "/about", site + "/products/4"]},
            expect_batch([home, demo_site.ABOUT_TITLE, demo_site.product_title(4)]),
        ),
    ]


async def send(session: aiohttp.ClientSession, enqueuer: str, call: Call) -> Answer:
    headers = dict(call.headers)
    if call.key is not None:
        headers["X-Partition-Key"] = call.key
    if call.asynchronous:
        headers["Prefer"] = "respond-async"
    started = time.perf_counter()
    try:
        first = await request(session, call.method, enqueuer + call.path, call.body, headers)
        correlation_id = first.headers.get(CORRELATION_HEADER, "")
        response, status = first, str(first.status)
        if call.asynchronous:
            if first.status != 202 or "Location" not in first.headers:
                summary = describe(first)
                return Answer(
                    status, ms(started), correlation_id, summary, "expected 202 with a Location"
                )
            response = await poll(session, enqueuer + first.headers["Location"])
            status = f"202 -> {response.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Answer("-", ms(started), "", "no answer", f"{type(exc).__name__}: {exc}")
    summary, problem = call.check(response)
    if problem is None and call.note:
        summary = f"{summary}: {call.note}"
    return Answer(status, ms(started), correlation_id, summary, problem)


async def request(
    session: aiohttp.ClientSession, method: str, url: str, body: Any, headers: dict[str, str]
) -> Response:
    async with session.request(method, url, json=body, headers=headers) as response:
        raw = await response.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return Response(response.status, dict(response.headers), parsed)


async def poll(session: aiohttp.ClientSession, url: str) -> Response:
    """`GET /_proxymq/requests/{id}` until it stops answering 202 (pending), bounded."""
    async with asyncio.timeout(ASYNC_POLL_TIMEOUT):
        while True:
            response = await request(session, "GET", url, None, {})
            if response.status != 202:
                return response
            await asyncio.sleep(0.1)


async def send_all(enqueuer: str, calls: list[Call]) -> list[Answer]:
    """Concurrently, like many users; the per-key order is the dequeuer's job. Starts are spaced
    a little so that calls with one key usually arrive in the table's order."""
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def spaced(index: int, call: Call) -> Answer:
            await asyncio.sleep(index * START_SPACING)
            return await send(session, enqueuer, call)

        return list(await asyncio.gather(*(spaced(i, call) for i, call in enumerate(calls))))


def ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
