"""Slow starts and a failing microservice: requests wait in RabbitMQ instead of failing."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Stack, metric, serving
from tests.integration.test_async import poll
from tests.target import Target

pytestmark = pytest.mark.rabbit


async def test_requests_wait_for_a_booting_microservice(
    stack: Stack, service: str, http: aiohttp.ClientSession
) -> None:
    booting = Target()
    dequeuer = await stack.dequeuer(service, booting.url, "--ready-path", "/status/200", wait=False)
    _, url = await stack.enqueuer()
    admin = dequeuer.admin_port  # type: ignore[attr-defined]
    async with asyncio.timeout(20):
        while True:  # the topology exists once the dequeuer is connected, ready or not
            async with http.post(
                f"{url}/{service}/echo/early", headers={"Prefer": "respond-async"}
            ) as response:
                if response.status == 202:
                    location = response.headers["Location"]
                    break
            await asyncio.sleep(0.1)
    async with http.get(f"http://127.0.0.1:{admin}/readyz") as ready:
        assert ready.status == 503
        assert (await ready.json())["checks"]["microservice_ready"] is False
    await asyncio.sleep(1)
    assert booting.seen == []
    # Said once, with the reason: the log said nothing, and a wrong --target looked like this.
    waiting = f"waiting for the microservice at {booting.url}/status/200 (cannot connect: "
    assert stack.log_text().count(waiting) == 1, stack.log_text()
    await booting.start()
    try:
        result = await poll(http, url + location, timeout=20)
        assert result.status == 200
        assert [s.path for s in booting.seen] == ["/echo/early"]
    finally:
        await booting.stop()


async def test_breaker_opens_and_requests_wait(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """After repeated failures the breaker opens: later requests are not burnt into the
    dead-letter queue; one probe after the reset closes it again and they are served."""
    dequeuer = await stack.dequeuer(
        service,
        target.url,
        "--breaker-failures",
        "2",
        "--breaker-reset",
        "1",
        "--max-attempts",
        "1",
    )
    _, url = await stack.enqueuer()
    admin = dequeuer.admin_port  # type: ignore[attr-defined]
    for _ in range(2):
        async with http.get(f"{url}/{service}/status/503") as response:
            assert response.status == 502
    assert await metric(http, admin, "proxymq_dequeuer_breaker_open") == 1
    async with http.get(f"http://127.0.0.1:{admin}/readyz") as ready:
        assert (await ready.json())["checks"]["breaker_closed"] is False
    async with http.get(
        f"{url}/{service}/echo/after", headers={"X-Request-Timeout": "10"}
    ) as response:
        assert response.status == 200  # waited for the half-open probe, then served
    assert await metric(http, admin, "proxymq_dequeuer_breaker_open") == 0


async def test_a_busy_microservice_is_not_taken_for_a_dead_one(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """Readiness probes have a connection of their own. In the calls' pool a probe waited
    behind --concurrency long calls until it timed out: three in a row paused the dequeuer,
    and its calls in flight were delivered again and ran twice."""
    await stack.dequeuer(
        service,
        target.url,
        "--concurrency",
        "2",
        "--ready-interval",
        "0.2",
        "--ready-timeout",
        "0.2",
        "--shutdown-grace",
        "1",
    )
    _, url = await stack.enqueuer()
    calls = [
        http.get(f"{url}/{service}/delay/2.5", headers={"X-Partition-Key": key})
        for key in ("a", "b")
    ]
    responses = await asyncio.gather(*calls)
    assert [r.status for r in responses] == [200, 200]
    await asyncio.sleep(0.5)
    assert [s.path for s in target.seen if s.path.startswith("/delay")] == ["/delay/2.5"] * 2
    assert "stopped answering" not in stack.log_text()


async def test_callers_short_deadlines_do_not_open_the_breaker(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A call cut short by its caller's own deadline says nothing about the microservice. It
    was counted as a timeout of the microservice: five callers with `X-Request-Timeout: 0.3`
    to a call that takes a second opened the breaker, and every caller's request waited
    --breaker-reset (10 s) in RabbitMQ."""
    dequeuer = await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    admin = dequeuer.admin_port  # type: ignore[attr-defined]
    hurried = [
        http.get(
            f"{url}/{service}/delay/1",
            headers={"X-Partition-Key": f"k{i}", "X-Request-Timeout": "0.3"},
        )
        for i in range(5)
    ]
    assert [r.status for r in await asyncio.gather(*hurried)] == [504] * 5
    labels = {"outcome": "dead_lettered"}
    async with asyncio.timeout(10):
        while await metric(http, admin, "proxymq_dequeuer_messages_total", labels) < 5:
            await asyncio.sleep(0.1)
    assert await metric(http, admin, "proxymq_dequeuer_breaker_open") == 0
    async with http.get(f"{url}/{service}/echo/after", headers={"X-Request-Timeout": "5"}) as r:
        assert r.status == 200


async def test_a_microservice_that_stops_answering_its_callers_in_time_opens_the_breaker(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A call its caller's deadline cut short counts when the microservice had twice as long
    as its slowest recent answer: it had time and did not answer. Not counted at all, a
    microservice that hung never opened the breaker for synchronous callers with the
    defaults (their deadline, 30 s, is below --call-timeout, 60 s): every request was called
    and timed out in turn."""
    dequeuer = await stack.dequeuer(service, target.url, "--breaker-failures", "2")
    _, url = await stack.enqueuer()
    admin = dequeuer.admin_port  # type: ignore[attr-defined]
    for i in range(3):
        async with http.get(f"{url}/{service}/echo/{i}") as response:
            assert response.status == 200
    for _ in range(2):
        async with http.get(
            f"{url}/{service}/delay/10", headers={"X-Request-Timeout": "1.5"}
        ) as response:
            assert response.status == 504
    async with asyncio.timeout(10):
        while await metric(http, admin, "proxymq_dequeuer_breaker_open") != 1:
            await asyncio.sleep(0.1)


async def test_a_flapping_microservice_costs_its_held_requests_no_deliveries(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A pause with no other dequeuer available keeps the partitions: giving them up only
    returned the held requests to their queues, each return counted against their delivery
    limit, with nobody to take them. A microservice failing its readiness probe now and then
    (CPU throttling, a long GC) got requests it had never been called for dead-lettered by
    the broker (`delivery_limit`), and their callers 502."""
    dequeuer = await stack.dequeuer(
        service,
        target.url,
        *("--ready-path", "/ready", "--ready-interval", "0.2", "--ready-timeout", "0.5"),
        *("--delivery-limit", "2", "--max-attempts", "1"),
        *("--breaker-failures", "1", "--breaker-reset", "600"),
    )
    _, url = await stack.enqueuer()
    admin = dequeuer.admin_port  # type: ignore[attr-defined]
    async with http.get(f"{url}/{service}/status/503") as response:
        assert response.status == 502  # and the breaker is open: requests wait, held
    async with http.post(
        f"{url}/{service}/echo/held", headers={"Prefer": "respond-async"}
    ) as response:
        assert response.status == 202
        location = url + response.headers["Location"]

    async def ready_and_holding(ready: bool) -> None:
        async with asyncio.timeout(20):
            while True:
                async with http.get(f"http://127.0.0.1:{admin}/readyz") as probe:
                    checks = (await probe.json())["checks"]
                held = await metric(http, admin, "proxymq_dequeuer_in_flight_requests")
                if checks["microservice_ready"] is ready and (held == 1 or not ready):
                    return
                async with http.get(location) as result:
                    if result.status != 202:
                        return  # no longer held: the assertion below says what it became
                await asyncio.sleep(0.1)

    for _ in range(4):
        await ready_and_holding(True)
        target.ready = False
        await ready_and_holding(False)
        target.ready = True
    await ready_and_holding(True)
    async with http.get(location) as result:
        assert result.status == 202  # still waiting for the breaker, not dead-lettered
    assert [s.path for s in target.seen] == ["/status/503"]


async def test_a_microservice_whose_root_streams_is_ready(
    stack: Stack, service: str, http: aiohttp.ClientSession
) -> None:
    """Without --ready-path, the probe's verdict is the status of `GET /`; its body is not
    waited for. A microservice whose `/` is an event stream (or any answer longer than
    --ready-timeout) was never ready: the probe read the body until it timed out, and nothing
    was ever consumed. (A large `/` was read into memory at every probe, too.)"""

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while True:
            await response.write(b"data: tick\n\n")
            await asyncio.sleep(0.1)

    async def work(request: web.Request) -> web.Response:
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/", events)
    app.router.add_post("/work", work)
    async with serving(app, handler_cancellation=True) as microservice:
        await stack.dequeuer(service, microservice, "--ready-timeout", "1")
        _, url = await stack.enqueuer()
        async with http.post(f"{url}/{service}/work", headers={"X-Request-Timeout": "10"}) as r:
            assert r.status == 200 and await r.text() == "done"
