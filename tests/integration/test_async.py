"""`Prefer: respond-async`: 202 at once, the result later at /_proxymq/requests/{id}."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection

from shared import topology
from tests.conftest import Stack, metric
from tests.reliability.support import rss_mib
from tests.target import Target

pytestmark = pytest.mark.rabbit


async def poll(
    http: aiohttp.ClientSession, url: str, timeout: float = 10
) -> aiohttp.ClientResponse:
    async with asyncio.timeout(timeout):
        while True:
            response = await http.get(url)
            await response.read()
            if response.status != 202:
                return response
            assert response.headers["Retry-After"]
            await asyncio.sleep(0.1)


async def test_accepted_now_answered_later(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """The request waits in its queue while no dequeuer runs, then its result is served."""
    await topology.declare(amqp, topology.Topology(service))
    _, url = await stack.enqueuer()
    async with http.post(
        f"{url}/{service}/echo/job", data=b"work", headers={"Prefer": "respond-async"}
    ) as response:
        assert response.status == 202
        location = response.headers["Location"]
        request_id = response.headers["X-Correlation-ID"]
        assert location == f"/_proxymq/requests/{request_id}"
        assert (await response.json())["status"] == "pending"
    async with http.get(url + location) as pending:
        assert pending.status == 202
    await stack.dequeuer(service, target.url)
    done = await poll(http, url + location)
    assert done.status == 200
    assert (await done.json())["method"] == "POST"
    assert target.seen[0].body == b"work"
    again = await http.get(url + location)
    assert again.status == 200  # kept for --result-ttl, not consumed by the first read


@pytest.mark.parametrize(
    ("prefer", "passed_on"),
    [
        (["respond-async"], []),
        (["respond-async, return=minimal"], ["return=minimal"]),
        (["return=minimal; x=1", "RESPOND-ASYNC; wait=5"], ["return=minimal; x=1"]),
        (['note="a,b", respond-async'], ['note="a,b"']),
    ],
)
async def test_the_microservice_is_not_asked_to_respond_async(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    prefer: list[str],
    passed_on: list[str],
) -> None:
    """The enqueuer honours `respond-async` (and says so); a microservice asked too could
    answer its own 202, which would become the polled result. Other preferences pass on."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    headers = [("Prefer", value) for value in prefer]
    async with http.get(f"{url}/{service}/echo", headers=headers) as response:
        assert response.status == 202
        assert response.headers["Preference-Applied"] == "respond-async"
        location = response.headers["Location"]
    assert (await poll(http, url + location)).status == 200
    seen = [v for n, v in target.seen[0].headers if n.lower() == "prefer"]
    assert seen == passed_on


async def test_respond_async_in_a_quoted_preference_value_is_data(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A preference's value may be a quoted string (RFC 7240), in which a comma separates
    nothing: `note="a, respond-async, b"` asked for no asynchronous answer, yet got a 202."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    prefer = 'note="a, respond-async, b", return=minimal'
    async with http.get(f"{url}/{service}/echo", headers={"Prefer": prefer}) as response:
        assert response.status == 200
        assert "Preference-Applied" not in response.headers
    assert [v for n, v in target.seen[0].headers if n.lower() == "prefer"] == [prefer]


async def test_async_deadline(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    await topology.declare(amqp, topology.Topology(service))
    _, url = await stack.enqueuer()
    async with http.post(
        f"{url}/{service}/x", headers={"Prefer": "respond-async", "X-Request-Timeout": "0.3"}
    ) as response:
        location = response.headers["Location"]
    result = await poll(http, url + location)
    assert result.status == 504
    assert result.headers["X-ProxyMQ-Error"] == "timeout"


async def test_without_a_timeout_it_waits_past_the_enqueuers_timeout(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """Without X-Request-Timeout an asynchronous request has no deadline: it waits in its queue
    as long as it takes, past `--timeout` (which a synchronous call's deadline is)."""
    await topology.declare(amqp, topology.Topology(service))
    _, url = await stack.enqueuer("--timeout", "1")
    async with http.post(f"{url}/{service}/echo/later", headers={"Prefer": "respond-async"}) as r:
        assert r.status == 202
        location = r.headers["Location"]
    async with http.post(f"{url}/{service}/echo/now") as r:
        assert r.status == 504 and r.headers["X-ProxyMQ-Error"] == "timeout"
    await asyncio.sleep(1.5)
    await stack.dequeuer(service, target.url)
    result = await poll(http, url + location, timeout=20)
    assert result.status == 200
    assert [seen.path for seen in target.seen] == ["/echo/later"]


async def test_polls_carry_the_request_id_and_count_once(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A poll answers with the request's own X-Correlation-ID (the one in the dequeuer's and
    the microservice's logs), and polls are counted apart: each poll of a timed-out result
    was one more `timeout` in the requests' metrics, and the result's outcome was never
    counted under its service."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer()
    admin = enqueuer.admin_port  # type: ignore[attr-defined]
    locations = {}
    for path, wait in (("echo/fine", "30"), ("delay/2", "0.3")):
        headers = {"Prefer": "respond-async", "X-Request-Timeout": wait}
        async with http.post(f"{url}/{service}/{path}", headers=headers) as response:
            locations[path] = (response.headers["Location"], response.headers["X-Correlation-ID"])
    for path, (location, request_id) in locations.items():
        for _ in range(3):
            result = await poll(http, url + location)
            assert result.headers["X-Correlation-ID"] == request_id
        assert result.status == (200 if path == "echo/fine" else 504)

    async def count(name: str, labels: dict[str, str]) -> float:
        return await metric(http, admin, f"proxymq_enqueuer_{name}_total", labels)

    assert await count("async_results", {"service": service, "outcome": "2xx"}) == 1
    assert await count("async_results", {"service": service, "outcome": "timeout"}) == 1
    assert await count("requests", {"service": service, "outcome": "timeout"}) == 0
    assert await count("requests", {"service": "_proxymq", "outcome": "timeout"}) >= 3
    assert await count("requests", {"service": "_unknown"}) == 0


async def test_async_error_is_kept(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url, "--retry-backoff-ms", "1")
    _, url = await stack.enqueuer()
    async with http.post(f"{url}/{service}/drop", headers={"Prefer": "respond-async"}) as response:
        location = response.headers["Location"]
    result = await poll(http, url + location)
    assert result.status == 502
    assert result.headers["X-ProxyMQ-Error"] == "service_failed"


async def test_unknown_request(stack: Stack, http: aiohttp.ClientSession) -> None:
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/_proxymq/requests/nope") as response:
        assert response.status == 404
        assert response.headers["X-ProxyMQ-Error"] == "unknown_request"


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/_proxymq/requests/" + "a" * 8000, "no request 'aaaa"),
        ("/_proxymq/other/" + "a" * 8000, "GET /_proxymq/other/aaaa"),
        ("/" + "a" * 8000 + "/x", "'aaaa"),
    ],
)
async def test_a_long_unknown_name_is_not_repeated_whole(
    stack: Stack, http: aiohttp.ClientSession, path: str, said: str
) -> None:
    """A poll's id, an own path or a service name is the caller's to choose, up to the 8,190
    bytes of a request line: its 404 and its log line repeated all of it (8 KiB each, for a
    typo or a scan)."""
    _, url = await stack.enqueuer()
    async with http.get(url + path) as response:
        assert response.status == 404
        message = (await response.json())["error"]["message"]
    assert message.startswith(said) and len(message) < 500, message[:300]
    assert "a" * 200 not in stack.log_text()


async def test_result_expires(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--result-ttl", "0.5")
    async with http.post(f"{url}/{service}/echo", headers={"Prefer": "respond-async"}) as resp:
        location = resp.headers["Location"]
    assert (await poll(http, url + location)).status == 200
    await asyncio.sleep(0.7)
    async with http.get(url + location) as response:
        assert response.status == 404


async def test_results_beyond_max_result_bytes_go_oldest_first(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """Finished results are kept within --max-result-bytes (bodies and headers): the oldest
    is dropped (404 unknown_request that says why), the newest served."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--max-result-bytes", "1KiB")
    locations = []
    for _ in range(2):
        async with http.get(
            f"{url}/{service}/bytes/600", headers={"Prefer": "respond-async"}
        ) as response:
            assert response.status == 202
            locations.append(url + response.headers["Location"])
        newest = await poll(http, locations[-1])
        assert newest.status == 200 and await newest.read() == b"x" * 600
    async with http.get(locations[0]) as dropped:
        assert dropped.status == 404
        assert dropped.headers["X-ProxyMQ-Error"] == "unknown_request"
        assert "--max-result-bytes" in (await dropped.json())["error"]["message"]


async def test_answers_past_max_result_bytes_are_not_held_until_their_deadline(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """An asynchronous request with a long X-Request-Timeout kept its answer's body in memory
    until that deadline (a day here, up to 30 days), whatever --max-result-bytes dropped: 24
    answers of 4 MB grew the enqueuer by about 100 MiB under a 1 MiB limit."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer("--max-result-bytes", "1MiB")
    headers = {"Prefer": "respond-async", "X-Request-Timeout": "86400"}

    async def one() -> None:
        async with http.get(f"{url}/{service}/bytes/4000000", headers=headers) as accepted:
            assert accepted.status == 202
            location = url + accepted.headers["Location"]
        assert (await poll(http, location)).status == 200

    await one()
    before = rss_mib(enqueuer.pid)
    for _ in range(24):
        await one()
    assert rss_mib(enqueuer.pid) - before < 40


async def test_polling_a_failed_result_holds_no_memory(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    """Each poll of a failed result raised the one stored error again, and Python chains every
    raise onto the error's traceback: each poll's frames (its request, its response) stayed
    in memory with the result, about 5 KiB a poll, 25 MiB for 5,000 polls (1.5 s of a
    caller polling in a loop), until the result expired."""
    await topology.declare(amqp, topology.Topology(service))
    enqueuer, url = await stack.enqueuer()
    headers = {"Prefer": "respond-async", "X-Request-Timeout": "0.2"}
    async with http.post(f"{url}/{service}/x", headers=headers) as response:
        location = url + response.headers["Location"]
    assert (await poll(http, location)).status == 504
    before = rss_mib(enqueuer.pid)
    for _ in range(5000):
        async with http.get(location) as response:
            assert response.headers["X-ProxyMQ-Error"] == "timeout"
    assert rss_mib(enqueuer.pid) - before < 8


async def test_stopping_does_not_wait_for_results_nobody_waits_for(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    """On SIGTERM the enqueuer gives the replies its callers wait for a few seconds to come
    (--shutdown-grace, 5 s); it gave them to pending asynchronous results too, which nobody waits
    for and which go with the process anyway: one pending 202 made every stop 5 s longer."""
    await topology.declare(amqp, topology.Topology(service))
    enqueuer, url = await stack.enqueuer()
    async with http.post(f"{url}/{service}/x", headers={"Prefer": "respond-async"}) as response:
        assert response.status == 202
    started = time.monotonic()
    enqueuer.stop(grace=15)
    assert time.monotonic() - started < 3  # not the 5 s grace


async def test_a_repeat_whose_result_was_dropped_is_counted_once(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """An `Idempotency-Key` repeat of an asynchronous request whose result was dropped (here
    for --max-results) keeps the result again for its poll, but is no second 202 and no second
    result: it counted as both."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer("--max-results", "1")
    admin = enqueuer.admin_port  # type: ignore[attr-defined]
    keyed = {"Prefer": "respond-async", "Idempotency-Key": "order-1"}
    async with http.get(f"{url}/{service}/echo/a", headers=keyed) as response:
        location = url + response.headers["Location"]
    assert (await poll(http, location)).status == 200
    async with http.get(f"{url}/{service}/echo/b", headers={"Prefer": "respond-async"}) as resp:
        assert (await poll(http, url + resp.headers["Location"])).status == 200
    async with http.get(location) as response:
        assert response.status == 404  # dropped for --max-results
    async with http.get(f"{url}/{service}/echo/a", headers=keyed) as response:
        assert response.status == 202
        assert url + response.headers["Location"] == location
    assert (await poll(http, location)).status == 200
    labels = {"service": service}
    assert await metric(http, admin, "proxymq_enqueuer_async_accepted_total", labels) == 2
    results = await metric(http, admin, "proxymq_enqueuer_async_results_total", labels)
    assert results == 2
    assert [seen.path for seen in target.seen].count("/echo/a") == 1


async def test_an_asynchronous_repeat_of_a_synchronous_first_says_whose_deadline_passed(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A repeat shares its first request's message, and so its deadline: an asynchronous
    repeat, without a deadline of its own, of a synchronous first that runs out of time gets
    504 as its result. It said "no reply ... within the request's X-Request-Timeout", a header
    the repeat never sent."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    key = {"Idempotency-Key": "order-2"}

    async def first() -> int:
        headers = {**key, "X-Request-Timeout": "1"}
        async with http.get(f"{url}/{service}/delay/3", headers=headers) as response:
            return response.status

    running = asyncio.create_task(first())
    async with asyncio.timeout(10):
        while "/delay/3" not in {seen.path for seen in target.seen}:
            await asyncio.sleep(0.05)
    async with http.get(
        f"{url}/{service}/delay/3", headers={**key, "Prefer": "respond-async"}
    ) as response:
        assert response.status == 202
        location = url + response.headers["Location"]
    assert await running == 504
    result = await poll(http, location)
    assert result.status == 504
    message = (await result.json())["error"]["message"]
    assert "the first request with this Idempotency-Key" in message
    assert [seen.path for seen in target.seen].count("/delay/3") == 1


async def test_respond_async_with_wait_answers_a_quick_reply_at_once(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """`Prefer: respond-async, wait=N` (RFC 7240): a reply within N seconds is the answer, a
    slower one a 202 at N. Every caller got a 202 at once, and polled for an answer that had
    come in milliseconds. `wait` is the enqueuer's to apply: the microservice is not told."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer()
    headers = {"Prefer": "respond-async, wait=5"}
    async with http.post(f"{url}/{service}/echo", data=b"quick", headers=headers) as response:
        assert response.status == 200
        assert "Preference-Applied" not in response.headers
        assert (await response.json())["body"] == "cXVpY2s="
    assert [v for n, v in target.seen[0].headers if n.lower() == "prefer"] == []
    started = time.monotonic()
    async with http.get(
        f"{url}/{service}/delay/3", headers={"Prefer": "respond-async, wait=1"}
    ) as response:
        assert response.status == 202
        assert 0.9 < time.monotonic() - started < 2.5
        location = url + response.headers["Location"]
    assert (await poll(http, location)).status == 200
    admin = enqueuer.admin_port  # type: ignore[attr-defined]
    labels = {"service": service}
    assert await metric(http, admin, "proxymq_enqueuer_async_accepted_total", labels) == 1


async def test_results_dropped_for_space_are_counted(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A result dropped before --result-ttl to stay within --max-results (or
    --max-result-bytes) left its poller a 404 and the operator no sign that the bound was too
    small; one that expired is not counted."""
    await stack.dequeuer(service, target.url)
    enqueuer, url = await stack.enqueuer("--max-results", "1", "--result-ttl", "1")
    admin = enqueuer.admin_port  # type: ignore[attr-defined]
    locations = []
    for _ in range(3):
        async with http.get(f"{url}/{service}/echo", headers={"Prefer": "respond-async"}) as r:
            locations.append(url + r.headers["Location"])
        assert (await poll(http, locations[-1])).status == 200
    await asyncio.sleep(1.2)
    for location in locations:
        async with http.get(location) as response:
            assert response.status == 404
    name = "proxymq_enqueuer_async_results_dropped_total"
    assert await metric(http, admin, name, {}) == 2


async def test_the_result_of_a_head_request(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A HEAD's result has no body: a GET poll frames what it sends (`Content-Length: 0`), a
    HEAD poll keeps the microservice's length (what a GET would send, RFC 9110 9.3.2)."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    async with http.head(
        f"{url}/{service}/bytes/1234", headers={"Prefer": "respond-async"}
    ) as response:
        assert response.status == 202
        location = url + response.headers["Location"]
    polled = await poll(http, location)
    assert polled.status == 200 and polled.headers["Content-Length"] == "0"
    assert polled.headers["Content-Type"] == "application/octet-stream"
    async with http.head(location) as head:
        assert head.status == 200 and head.headers["Content-Length"] == "1234"
