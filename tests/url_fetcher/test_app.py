"""The HTTP API in process: every answer JSON, one bad item failing only its own entry."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shared.settings import load
from url_fetcher.__main__ import longest_request
from url_fetcher.app import SESSION, create_app
from url_fetcher.fetch import Fetcher, FetchResult
from url_fetcher.settings import UrlFetcherSettings

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Client]:
    """url-fetcher with default limits, allowed to fetch the local site."""
    async with serve(monkeypatch) as test_client:
        yield test_client


@asynccontextmanager
async def serve(monkeypatch: pytest.MonkeyPatch, *flags: str) -> AsyncIterator[Client]:
    """url-fetcher with `flags`, allowed to fetch the local site; the runner's PROXYMQ_* are
    kept out."""
    settings = settings_of(monkeypatch, "--allow-private", "--fetch-timeout", "2", *flags)
    async with TestClient(TestServer(create_app(settings))) as test_client:
        yield test_client


def settings_of(monkeypatch: pytest.MonkeyPatch, *flags: str) -> UrlFetcherSettings:
    """Settings from `flags` alone: the runner's PROXYMQ_* are kept out."""
    for name in list(os.environ):
        if name.startswith("PROXYMQ_"):
            monkeypatch.delenv(name)
    return load(UrlFetcherSettings, list(flags))


async def post(
    client: Client, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, object]:
    """Status and JSON answer; the answer must be strict JSON (no NaN, no Infinity)."""
    async with client.post(path, data=body, headers=headers) as response:
        assert response.content_type == "application/json"
        text = await response.text()
    return response.status, json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> object:
    raise AssertionError(f"{name} is not JSON")


def _code(answer: object) -> object:
    assert isinstance(answer, dict)
    return answer["error"]["code"]


def _error(answer: object) -> object:
    assert isinstance(answer, dict)
    return answer["error"]


BAD_HOSTS = ["http://a..b/", "http://xn--a/", "http://xn--/", f"http://{'a' * 64}.example/"]


@pytest.mark.parametrize("url", BAD_HOSTS)
async def test_a_host_dns_cannot_take_is_a_bad_request(client: Client, url: str) -> None:
    status, answer = await post(client, "/fetch", json.dumps({"url": url}).encode())
    assert (status, _code(answer)) == (400, "bad_request")


async def test_a_bad_host_fails_only_its_own_batch_entry(client: Client, site: str) -> None:
    urls = [*BAD_HOSTS, f"{site}/redirect-to?location=http://a..b/", f"{site}/page"]
    status, answer = await post(client, "/fetch/batch", json.dumps(urls).encode())
    assert status == 200
    assert isinstance(answer, dict)
    results = answer["results"]
    assert [r.get("error", {}).get("code") for r in results] == [
        *["bad_request"] * len(BAD_HOSTS),
        "fetch_failed",
        None,
    ]
    assert results[-1]["title"] == "Caf\u00e9 au lait"


async def test_a_failing_handler_answers_json(
    client: Client, site: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails unforeseen is a JSON 500, and in a batch that entry's error alone."""
    fetch = Fetcher.fetch

    async def broken(fetcher: Fetcher, url: object) -> FetchResult:
        if url == "http://broken.test/":
            raise RuntimeError("unforeseen")
        return await fetch(fetcher, url)

    monkeypatch.setattr(Fetcher, "fetch", broken)
    status, answer = await post(client, "/fetch", b'{"url": "http://broken.test/"}')
    assert (status, _code(answer)) == (500, "internal_error")
    body = json.dumps(["http://broken.test/", f"{site}/page"]).encode()
    status, answer = await post(client, "/fetch/batch", body)
    assert status == 200
    assert isinstance(answer, dict)
    assert [r.get("error", {}).get("code") for r in answer["results"]] == ["internal_error", None]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/fetch", b'{"url": NaN}'),
        ("/fetch", b'{"url": Infinity}'),
        ("/fetch", b'{"url": -Infinity}'),
        ("/fetch", b'{"url": 1e999}'),
        ("/fetch/batch", b'["http://x/", -1e999]'),
    ],
)
async def test_nan_and_infinity_are_refused_not_echoed(
    client: Client, path: str, body: bytes
) -> None:
    status, answer = await post(client, path, body)
    assert (status, _code(answer)) == (400, "bad_request")
    assert "not JSON" in answer["error"]["message"]  # type: ignore[index]


async def test_a_batched_nan_is_refused_in_its_slot(client: Client) -> None:
    item = {"method": "POST", "path": "/fetch", "body": base64.b64encode(b'{"url": NaN}').decode()}
    status, answers = await post(client, "/batch", json.dumps([item]).encode())
    assert status == 200
    assert isinstance(answers, list)
    assert answers[0]["status"] == 400
    inner = json.loads(base64.b64decode(answers[0]["body"]), parse_constant=_no_constant)
    assert _code(inner) == "bad_request"


@pytest.mark.parametrize(
    "path",
    [
        "/batch",
        "/%62atch",
        "/%62%61tch",
        "/%62%61%74%63%68",
        "//batch",
        "/batch/",
        "/./batch",
        "/x/../batch",
        "/%2Fbatch",
        "/fetch%2Fbatch",
        "/BATCH",
    ],
)
async def test_no_spelling_of_a_batch_endpoint_runs_as_a_batch_item(
    client: Client, path: str
) -> None:
    """A nested batch would multiply the work by --max-batch at each level; the router matches
    the path with percent-escapes decoded, so every spelling it would match is refused, and
    the others are not found."""
    item = {"method": "POST", "path": path, "body": base64.b64encode(b"[]").decode()}
    status, answers = await post(client, "/batch", json.dumps([item]).encode())
    assert status == 200
    assert isinstance(answers, list)
    answer = json.loads(base64.b64decode(answers[0]["body"]))
    assert (answers[0]["status"], _code(answer)) in {(400, "bad_request"), (404, "not_found")}
    if answers[0]["status"] == 400:
        assert "batches do not nest" in answer["error"]["message"]


def padded(url: str, size: int) -> str:
    """A /fetch item whose body is `size` bytes: the URL and padding."""
    body = json.dumps({"url": url, "pad": ""}).encode()
    body = json.dumps({"url": url, "pad": "x" * (size - len(body))}).encode()
    return base64.b64encode(body).decode()


async def test_a_batch_holds_bodies_each_of_which_passes_alone(client: Client, site: str) -> None:
    """Four 400 KB requests, each fine alone, came to 2.1 MB as a batch: over aiohttp's default
    1 MiB for any body, all four were refused (413) and dead-lettered by the dequeuer."""
    item = {"method": "POST", "path": "/fetch", "body": padded(f"{site}/page", 400_000)}
    status, _ = await post(client, "/fetch", base64.b64decode(item["body"]))
    assert status == 200
    items = [item] * 4
    status, answers = await post(client, "/batch", json.dumps(items).encode())
    assert status == 200
    assert isinstance(answers, list)
    assert [a["status"] for a in answers] == [200] * 4
    assert json.loads(base64.b64decode(answers[0]["body"]))["title"] == "Caf\u00e9 au lait"


async def test_a_body_over_max_body_is_413_alone_and_in_its_batch_slot(
    monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    async with serve(monkeypatch, "--max-body", "16KiB", "--max-batch-body", "64KiB") as client:
        large = padded(f"{site}/page", 16 * 1024 + 1)
        status, answer = await post(client, "/fetch", base64.b64decode(large))
        assert (status, _code(answer)) == (413, "request_entity_too_large")
        items = [
            {"method": "POST", "path": "/fetch", "body": large},
            {"method": "POST", "path": "/fetch", "body": padded(f"{site}/page", 16 * 1024)},
        ]
        status, answers = await post(client, "/batch", json.dumps(items).encode())
        assert status == 200
        assert isinstance(answers, list)
        assert [a["status"] for a in answers] == [413, 200]
        status, answer = await post(client, "/batch", json.dumps(items * 2).encode())
        assert (status, _code(answer)) == (413, "request_entity_too_large")


@pytest.mark.parametrize("path", ["/fetch/batch", "/fetch/%62atch", "/%66etch/batch"])
async def test_a_fetch_batch_item_runs(client: Client, path: str) -> None:
    """A caller's `/fetch/batch` through a batching dequeuer is answered as it would be alone."""
    item = {"method": "POST", "path": path, "body": base64.b64encode(b"[]").decode()}
    status, answers = await post(client, "/batch", json.dumps([item]).encode())
    assert status == 200 and isinstance(answers, list)
    answer = json.loads(base64.b64decode(answers[0]["body"]))
    assert (answers[0]["status"], answer) == (200, {"results": []})


async def test_max_connections_sizes_the_fetch_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(monkeypatch) as client:
        assert client.app is not None
        assert client.app[SESSION].connector.limit == 1000  # type: ignore[union-attr]
    async with serve(monkeypatch, "--max-connections", "7") as client:
        assert client.app is not None
        assert client.app[SESSION].connector.limit == 7  # type: ignore[union-attr]


async def test_a_batch_answers_within_batch_timeout(
    monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    """A batch took as long as its fetches, --batch-concurrency at a time: 100 URLs that never
    answered took 70 s by default, past the dequeuer's 60 s --call-timeout, and its caller got
    nothing at all. What is fetched by --batch-timeout is answered; the rest is fetch_timeout."""
    flags = ["--fetch-timeout", "5", "--batch-concurrency", "1", "--batch-timeout", "1"]
    urls = [f"{site}/page", f"{site}/slow", f"{site}/slow", f"{site}/page"]
    async with serve(monkeypatch, *flags) as client:
        status, answer = await post(client, "/fetch/batch", json.dumps(urls).encode())
    assert status == 200 and isinstance(answer, dict)
    first, *late = answer["results"]
    assert first["status"] == 200
    assert [entry["error"]["code"] for entry in late] == ["fetch_timeout"] * 3
    assert {entry["error"]["message"] for entry in late} == {
        f"the batch reached its --batch-timeout of 1 s before {url} was fetched" for url in urls[1:]
    }


def fetch_item(url: str, timeout: str | None = None) -> dict[str, object]:
    """A /batch envelope of `POST /fetch {"url": url}`, with `X-Request-Timeout: timeout`."""
    body = base64.b64encode(json.dumps({"url": url}).encode()).decode()
    headers = [] if timeout is None else [["X-Request-Timeout", timeout]]
    return {"method": "POST", "path": "/fetch", "headers": headers, "body": body}


def unpacked(answers: object) -> list[tuple[int, dict[str, object]]]:
    """Status and JSON body of each response envelope of a /batch answer."""
    assert isinstance(answers, list)
    return [(a["status"], json.loads(base64.b64decode(a["body"]))) for a in answers]


def ran_out(url: str) -> str:
    return f"the caller's time ran out (X-Request-Timeout) before {url} was fetched"


async def test_fetches_stop_when_the_callers_time_runs_out(client: Client, site: str) -> None:
    """The dequeuer tells each call the time its caller has left (`X-Request-Timeout`); the
    fetches went on to --fetch-timeout (--batch-timeout for a batch) after nobody waited."""
    slow = f"{site}/slow"
    hurry = {"X-Request-Timeout": "0.2"}
    status, answer = await post(client, "/fetch", json.dumps({"url": slow}).encode(), hurry)
    assert (status, answer) == (
        504,
        {"url": slow, "error": {"code": "fetch_timeout", "message": ran_out(slow)}},
    )
    body = json.dumps([f"{site}/page", slow]).encode()
    status, answer = await post(client, "/fetch/batch", body, hurry)
    assert status == 200 and isinstance(answer, dict)
    page, late = answer["results"]
    assert page["status"] == 200
    assert late["error"] == {"code": "fetch_timeout", "message": ran_out(slow)}


async def test_each_batch_item_has_its_own_time(monkeypatch: pytest.MonkeyPatch, site: str) -> None:
    """An item's time counts from the batch's arrival: waiting for its turn spends it."""
    slow, page = f"{site}/slow", f"{site}/page"
    items = [fetch_item(slow, "0.3"), fetch_item(page, "0.1"), fetch_item(page, "30")]
    async with serve(monkeypatch, "--batch-concurrency", "1") as client:
        status, answers = await post(client, "/batch", json.dumps(items).encode())
    assert status == 200
    (first, cut), (second, spent), (third, fetched) = unpacked(answers)
    assert (first, cut["error"]) == (504, {"code": "fetch_timeout", "message": ran_out(slow)})
    assert (second, spent["error"]) == (504, {"code": "fetch_timeout", "message": ran_out(page)})
    assert (third, fetched["status"]) == (200, 200)


@pytest.mark.parametrize(
    "value", ["soon", "-1", "nan", "inf", "1e999", "1e300", "1_0", "\u0663", ""]
)
async def test_an_x_request_timeout_that_is_no_duration_is_ignored(
    monkeypatch: pytest.MonkeyPatch, site: str, value: str
) -> None:
    """Not a number, negative or huge: the own caps apply, no 400, no 500, no wait past them."""
    slow = f"{site}/slow"
    own = f"fetching {slow} took longer than 0.3 s"
    headers = {"X-Request-Timeout": value}
    async with serve(monkeypatch, "--fetch-timeout", "0.3") as client:
        status, answer = await post(
            client, "/fetch", json.dumps({"url": f"{site}/page"}).encode(), headers
        )
        assert status == 200
        status, answer = await post(client, "/fetch", json.dumps({"url": slow}).encode(), headers)
        assert (status, _error(answer)) == (504, {"code": "fetch_timeout", "message": own})
        status, answers = await post(
            client, "/batch", json.dumps([fetch_item(slow, value)]).encode()
        )
        assert status == 200
        [(status, answer)] = unpacked(answers)
        assert (status, _error(answer)) == (504, {"code": "fetch_timeout", "message": own})


async def test_a_batch_of_requests_answers_within_batch_timeout(
    monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    """A /batch took as long as its items, --batch-concurrency at a time: up to 70 s by
    default, past the dequeuer's 60 s --call-timeout. What is answered by --batch-timeout is
    in its slot; an item still running or waiting for its turn is fetch_timeout."""
    flags = ["--fetch-timeout", "3", "--batch-concurrency", "1", "--batch-timeout", "1"]
    page, slow = f"{site}/page", f"{site}/slow"
    items = [
        fetch_item(page),
        fetch_item(slow),
        fetch_item(slow),
        {"method": "GET", "path": "/healthz"},
    ]
    async with serve(monkeypatch, *flags) as client:
        status, answers = await post(client, "/batch", json.dumps(items).encode())
    assert status == 200
    (first, fetched), *late = unpacked(answers)
    assert (first, fetched["title"]) == (200, "Caf\u00e9 au lait")
    cut = "the batch reached its --batch-timeout of 1 s before {} was answered"
    assert late == [
        (504, {"error": {"code": "fetch_timeout", "message": cut.format(line)}})
        for line in ["POST /fetch", "POST /fetch", "GET /healthz"]
    ]


@pytest.mark.parametrize(
    ("flags", "seconds"),
    [([], 30), (["--batch-timeout", "5"], 10), (["--fetch-timeout", "40"], 40)],
)
def test_a_stop_waits_as_long_as_a_request_may_take(
    monkeypatch: pytest.MonkeyPatch, flags: list[str], seconds: float
) -> None:
    """A batch of either kind is done within --batch-timeout, a fetch within --fetch-timeout:
    a stop needs to wait no longer (it waited for ceil(--max-batch / --batch-concurrency)
    fetches, 70 s by default, yet a /fetch/batch in a /batch could take longer still)."""
    assert longest_request(settings_of(monkeypatch, *flags)) == seconds
