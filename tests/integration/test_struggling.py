"""Backpressure, idempotency and long work, as callers see them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from yarl import URL

from enqueuer.publisher import RENEW_AFTER_NACK, Publisher
from shared import envelope, topology
from shared.breaker import CLOSED, ServiceBreaker
from shared.errors import Backpressure, BrokerUnavailable
from tests.conftest import Stack, metric
from tests.integration.test_async import poll
from tests.integration.test_errors import expect_error
from tests.reliability.proxy import FaultyProxy
from tests.reliability.support import rss_mib
from tests.target import Target

pytestmark = pytest.mark.rabbit


async def test_full_partition_is_backpressure_and_loses_nothing(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    await topology.declare(amqp, topology.Topology(service, partitions=1, max_length=5))
    enqueuer, url = await stack.enqueuer()
    accepted, refused = [], 0
    for i in range(10):
        async with http.post(
            f"{url}/{service}/echo/{i}",
            headers={"Prefer": "respond-async", "X-Partition-Key": "same"},
        ) as response:
            if response.status == 202:
                accepted.append(response.headers["Location"])
            else:
                message = await expect_error(response, 429, "backpressure")
                assert "is full, or it is electing a new leader" in message  # a nack says no why
                refused += 1
    assert 5 <= len(accepted) <= 6 and refused == 10 - len(accepted)  # may overshoot by one
    admin = enqueuer.admin_port  # type: ignore[attr-defined]
    assert (
        await metric(http, admin, "proxymq_enqueuer_requests_total", {"outcome": "backpressure"})
        == refused
    )
    await stack.dequeuer(service, target.url, "--partitions", "1", "--max-length", "5")
    for location in accepted:
        assert (await poll(http, url + location)).status == 200
    assert len(target.seen) == len(accepted)


async def test_a_full_service_fails_no_publish_of_another(
    service: str, amqp: AbstractRobustConnection
) -> None:
    """A nack (a full partition) replaced the one publishing channel, and closing the old one
    failed every publish still unconfirmed on it, other services' too: with a full service
    refusing, a healthy service's callers got 503 by the thousands (measured: 11,604 of 12,172
    calls in 10 s), as those failures opened the breaker for every service."""
    full = f"{service}-full"
    breaker = ServiceBreaker(5, 10)
    publisher = Publisher(frozenset(), breaker)
    try:
        await topology.declare(amqp, topology.Topology(service))
        await topology.declare(amqp, topology.Topology(full, partitions=1, max_length=1))
        await publisher.start(amqp)
        for name in (full, service):  # as the handler does before each publish
            await publisher.check(name)

        def message(name: str, i: int) -> envelope.Outgoing:
            http = envelope.HttpRequest("POST", "/x", "", (), b"x" * 100)
            return envelope.encode_request(
                envelope.RequestEnvelope(f"r-{i}", name, http, str(i), None, None)
            )

        async def fill() -> None:
            for i in range(10):
                await publisher.publish(full, "k", message(full, i))

        with pytest.raises(Backpressure):  # till the partition is full
            await fill()
        await asyncio.sleep(RENEW_AFTER_NACK)
        for _ in range(3):
            healthy = [publisher.publish(service, str(i), message(service, i)) for i in range(300)]
            refused = [publisher.publish(full, "k", message(full, i)) for i in range(50)]
            outcomes = await asyncio.gather(*refused, *healthy, return_exceptions=True)
            assert all(isinstance(o, Backpressure | BrokerUnavailable) for o in outcomes[:50])
            assert outcomes[50:] == [None] * 300
            assert breaker.state == CLOSED
            await asyncio.sleep(RENEW_AFTER_NACK)
    finally:
        await topology.delete(amqp, topology.Topology(full))


async def test_in_flight_cap_is_backpressure(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    await topology.declare(amqp, topology.Topology(service))
    _, url = await stack.enqueuer("--max-in-flight", "3", "--services", service)
    statuses = []
    for _ in range(5):
        async with http.post(f"{url}/{service}/x", headers={"Prefer": "respond-async"}) as r:
            statuses.append(r.status)
            if r.status == 429:
                assert "already waiting for a reply" in await expect_error(r, 429, "backpressure")
    assert statuses == [202, 202, 202, 429, 429]


async def test_a_stuck_service_leaves_in_flight_slots_to_the_others(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    """Requests of a service that does not answer held every --max-in-flight slot (measured:
    400 calls to a hung service, `--max-in-flight 300`: every call to a healthy one got 429
    until they timed out); a service may now hold half of them."""
    stuck = f"{service}-stuck"
    try:
        for name in (service, stuck):
            await topology.declare(amqp, topology.Topology(name))
        enqueuer, url = await stack.enqueuer("--max-in-flight", "4")

        async def statuses(name: str, count: int) -> list[int]:
            got = []
            for _ in range(count):
                async with http.post(f"{url}/{name}/x", headers={"Prefer": "respond-async"}) as r:
                    got.append(r.status)
                    if r.status == 429 and name == stuck:
                        message = await expect_error(r, 429, "backpressure")
                        assert f"service {name!r} has 2 requests waiting" in message
            return got

        assert await statuses(stuck, 3) == [202, 202, 429]
        assert await statuses(service, 3) == [202, 202, 429]  # the enqueuer's 4 are taken
        admin = enqueuer.admin_port  # type: ignore[attr-defined]
        for name in (service, stuck):
            labels = {"service": name}
            assert await metric(http, admin, "proxymq_enqueuer_in_flight_requests", labels) == 2
    finally:
        await topology.delete(amqp, topology.Topology(stuck))


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_idempotency_key(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession, asynchronous: bool
) -> None:
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    headers = {"Idempotency-Key": "order-42"}
    if asynchronous:
        headers["Prefer"] = "respond-async"
    ids, bodies = set(), []
    for _ in range(3):
        async with http.post(f"{url}/{service}/echo/pay", data=b"once", headers=headers) as r:
            ids.add(r.headers["X-Correlation-ID"])
            if asynchronous:
                assert r.status == 202
                done = await poll(http, url + r.headers["Location"])
                bodies.append(await done.read())
            else:
                assert r.status == 200
                bodies.append(await r.read())
    assert len(ids) == 1
    assert len(set(bodies)) == 1
    assert len(target.seen) == 1
    async with http.post(
        f"{url}/{service}/echo/pay", data=b"x", headers={"Idempotency-Key": "order-43"}
    ) as r:
        assert r.headers["X-Correlation-ID"] not in ids
    assert len(target.seen) == 2


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/echo/pay", b"once"), ("POST", "/echo/refund", b"once"), ("POST", "/echo/pay", b"x")],
)
async def test_a_key_reused_for_another_request_is_refused(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: bytes,
) -> None:
    """A key sent again with another method, path, query or body is a caller's mistake
    (draft-ietf-httpapi-idempotency-key-header: 422): it got the first request's answer, a
    payment's for a refund, and the refund was never sent."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    headers = {"Idempotency-Key": "order-44"}
    async with http.post(f"{url}/{service}/echo/pay", data=b"once", headers=headers) as r:
        assert r.status == 200
        first_id = r.headers["X-Correlation-ID"]
    async with http.request(method, f"{url}/{service}{path}", data=body, headers=headers) as r:
        message = await expect_error(r, 422, "idempotency_key_reused")
        assert r.headers["X-Correlation-ID"] != first_id
    assert "another request" in message
    async with http.post(f"{url}/{service}/echo/pay", data=b"once", headers=headers) as r:
        assert r.status == 200 and r.headers["X-Correlation-ID"] == first_id
    assert len(target.seen) == 1


async def test_an_idempotency_key_past_its_window_is_a_new_request(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The contract's "within the dedup window": after --idempotency-window, the same key is
    a second message with an id of its own."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--idempotency-window", "1")
    ids = []
    for pause in (0, 0, 1.5):
        await asyncio.sleep(pause)
        async with http.post(
            f"{url}/{service}/echo/pay", data=b"once", headers={"Idempotency-Key": "order-7"}
        ) as r:
            assert r.status == 200
            ids.append(r.headers["X-Correlation-ID"])
    assert ids[0] == ids[1] != ids[2]
    assert len(target.seen) == 2


async def test_idempotency_keys_within_max_result_bytes(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The answers kept for repeats stay within --max-result-bytes: past it, the oldest key is
    forgotten (its repeat is a new request), the newest still answered from memory."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--max-result-bytes", "1KiB")
    ids: dict[str, list[str]] = {}
    for key in ("first", "second", "second", "first"):
        async with http.get(
            f"{url}/{service}/bytes/600", headers={"Idempotency-Key": key}
        ) as response:
            assert response.status == 200 and await response.read() == b"x" * 600
            ids.setdefault(key, []).append(response.headers["X-Correlation-ID"])
    assert ids["second"][0] == ids["second"][1]  # the newest: answered from memory
    assert ids["first"][0] != ids["first"][1]  # forgotten for space: sent again
    assert len(target.seen) == 3


async def test_a_running_first_is_not_forgotten_for_the_answers_of_others(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """Past --max-result-bytes the oldest key went first, also one whose request was still
    running and held no answer: its repeat was a second message. Only answers are dropped for
    space; a running first holds a reply slot, bounded by --max-in-flight."""
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer("--max-result-bytes", "1KiB")
    running = {"Idempotency-Key": "running", "Prefer": "respond-async"}
    async with http.get(f"{url}/{service}/delay/2", headers=running) as response:
        first_id = response.headers["X-Correlation-ID"]
    for key in ("b", "c"):
        async with http.get(
            f"{url}/{service}/bytes/600", headers={"Idempotency-Key": key}
        ) as response:
            assert response.status == 200
    async with http.get(f"{url}/{service}/delay/2", headers=running) as response:
        assert response.headers["X-Correlation-ID"] == first_id
        assert (await poll(http, url + response.headers["Location"])).status == 200
    assert [seen.path for seen in target.seen].count("/delay/2") == 1


async def test_concurrent_repeats_share_one_request(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    responses = await asyncio.gather(
        *(
            http.get(f"{url}/{service}/delay/0.5", headers={"Idempotency-Key": "k"})
            for _ in range(5)
        )
    )
    assert {r.status for r in responses} == {200}
    assert len({r.headers["X-Correlation-ID"] for r in responses}) == 1
    assert len(target.seen) == 1


async def test_repeats_of_a_refused_first_are_refused_too(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """Repeats that arrive while the first request is being published wait for its verdict:
    when the full partition refuses it, they get its 429 as well. An asynchronous repeat was
    answered 202 for a request never queued (polled: a made-up 504), a synchronous one 504 at
    once. A later retry with the key, once there is room, goes through."""
    await topology.declare(amqp, topology.Topology(service, partitions=1, max_length=1))
    _, url = await stack.enqueuer()
    fill = {"Prefer": "respond-async"}
    filled = []
    for _ in range(3):  # a quorum queue may take one beyond its max-length
        async with http.post(f"{url}/{service}/echo/fill", headers=fill) as response:
            filled.append(response.status)
    assert filled in ([202, 429, 429], [202, 202, 429])
    key = {"Idempotency-Key": "order-7"}

    async def call(extra: dict[str, str]) -> tuple[int, str]:
        async with http.post(f"{url}/{service}/echo/pay", headers=key | extra) as response:
            return response.status, response.headers.get("X-ProxyMQ-Error", "")

    answers = await asyncio.gather(call({}), call({"Prefer": "respond-async"}), call({}))
    assert list(answers) == [(429, "backpressure")] * 3
    await stack.dequeuer(service, target.url, "--partitions", "1", "--max-length", "1")
    for _ in range(100):  # until the dequeuer has made room
        if (retried := await call({})) != (429, "backpressure"):
            break
        await asyncio.sleep(0.1)
    assert retried == (200, "")
    paths = ["/echo/fill"] * filled.count(202) + ["/echo/pay"]
    assert [seen.path for seen in target.seen] == paths


async def test_refused_firsts_are_not_kept(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    """A key whose request was refused (429 here) stayed in the store for its whole window
    with the refusal, whose traceback held the request and its body: 100 refused requests of
    1 MB with keys of their own grew the enqueuer by 195 MiB, for 300 s, up to --max-results
    of them (10,000 by default)."""
    await topology.declare(amqp, topology.Topology(service, partitions=1, max_length=1))
    enqueuer, url = await stack.enqueuer()
    for _ in range(3):  # a quorum queue may take one beyond its max-length
        async with http.post(f"{url}/{service}/fill", headers={"Prefer": "respond-async"}):
            pass
    before = rss_mib(enqueuer.pid)
    for i in range(100):
        async with http.post(
            f"{url}/{service}/pay", data=b"x" * 1_000_000, headers={"Idempotency-Key": f"k{i}"}
        ) as response:
            assert response.status == 429
    assert rss_mib(enqueuer.pid) - before < 80


async def test_a_repeat_waits_for_its_first_no_longer_than_its_own_deadline(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """While RabbitMQ does not confirm the first request with a key (a silent broker), a
    repeat with `X-Request-Timeout: 1` waited for the first's publish to give up, 10 s, and
    got its 503: it now gets its 504 at its own deadline, as a request without the key does."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        await stack.dequeuer(service, target.url)
        _, url = await stack.enqueuer(env={"PROXYMQ_AMQP_URL": proxy.url})
        async with http.get(f"{url}/{service}/echo/warm") as warm:
            assert warm.status == 200
        assert proxy.blackhole() >= 1
        key = {"Idempotency-Key": "stuck"}
        first = asyncio.create_task(http.get(f"{url}/{service}/echo/first", headers=key))
        await asyncio.sleep(1)  # the first is publishing (for up to 10 s)
        repeat = await http.get(
            f"{url}/{service}/echo/first", headers=key | {"X-Request-Timeout": "1"}
        )
        assert (repeat.status, repeat.headers["X-ProxyMQ-Error"]) == (504, "timeout")
        assert (await first).status == 503
    finally:
        await proxy.stop()


async def publish_held(
    proxy: FaultyProxy,
    http: aiohttp.ClientSession,
    url: str,
    target: Target,
    headers: dict[str, str],
) -> asyncio.Task[aiohttp.ClientResponse]:
    """Hold the broker's confirms and call `url`: the call, once its request is queued (the
    microservice saw it) and the enqueuer still waits for the confirm."""
    proxy.hold()
    seen = len(target.seen)
    call = asyncio.create_task(http.post(url, headers=headers))
    async with asyncio.timeout(10):
        while len(target.seen) == seen:
            await asyncio.sleep(0.05)
    return call


async def hang_up(
    call: asyncio.Task[aiohttp.ClientResponse], http: aiohttp.ClientSession, admin: int
) -> None:
    """Cancel the call, and wait until the enqueuer counted its caller gone."""
    call.cancel()
    async with asyncio.timeout(10):
        while (
            await metric(
                http, admin, "proxymq_enqueuer_requests_total", {"outcome": "disconnected"}
            )
            < 1
        ):
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_repeats_get_the_answer_of_a_first_whose_caller_hung_up_while_publishing(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession, asynchronous: bool
) -> None:
    """The first request with a key is queued, RabbitMQ's confirm is late, and its caller
    hangs up: the publish and the key's entry went with the caller, so a repeat waiting for
    it got 503 and the key was forgotten, though the message was queued: a retry sent it
    twice. The publish and the entry now outlive the caller, and the repeats get its answer."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    calls: list[asyncio.Task[aiohttp.ClientResponse]] = []
    try:
        await stack.dequeuer(service, target.url)
        enqueuer, url = await stack.enqueuer(env={"PROXYMQ_AMQP_URL": proxy.url})
        admin = enqueuer.admin_port  # type: ignore[attr-defined]
        async with http.get(f"{url}/{service}/echo/warm") as warm:
            assert warm.status == 200
        key = {"Idempotency-Key": "order-9"}
        if asynchronous:
            key["Prefer"] = "respond-async"
        target_url = f"{url}/{service}/echo/first"
        first = await publish_held(proxy, http, target_url, target, key)
        calls.append(asyncio.create_task(http.post(target_url, headers=key)))
        await asyncio.sleep(0.5)  # this repeat waits for the first's publish
        await hang_up(first, http, admin)
        calls.append(asyncio.create_task(http.post(target_url, headers=key)))
        await asyncio.sleep(0.5)  # and so does this one, which came after the caller left
        proxy.release()
        ids = set()
        for repeat in calls:
            response = await repeat
            ids.add(response.headers["X-Correlation-ID"])
            if asynchronous:
                assert response.status == 202, await response.text()
                response = await poll(http, url + response.headers["Location"])
            assert response.status == 200, await response.text()
            assert (await response.json())["path"] == "/echo/first"
        assert len(ids) == 1
    finally:
        for call in calls:
            call.cancel()
        proxy.release()
        await proxy.stop()
    assert [seen.path for seen in target.seen] == ["/echo/warm", "/echo/first"]
    assert "Traceback" not in stack.log_text()


async def test_a_caller_who_hangs_up_while_publishing_leaves_nothing_behind(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """Without a key, a caller who hangs up before RabbitMQ confirmed its request frees its
    waiter at once; the request may still be processed (at least once), its reply dropped."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        await stack.dequeuer(service, target.url)
        enqueuer, url = await stack.enqueuer(env={"PROXYMQ_AMQP_URL": proxy.url})
        admin = enqueuer.admin_port  # type: ignore[attr-defined]
        async with http.get(f"{url}/{service}/echo/warm") as warm:
            assert warm.status == 200
        plain = await publish_held(proxy, http, f"{url}/{service}/echo/plain", target, {})
        await hang_up(plain, http, admin)
        assert await metric(http, admin, "proxymq_enqueuer_in_flight_requests") == 0
        proxy.release()
        async with asyncio.timeout(10):
            while await metric(http, admin, "proxymq_enqueuer_late_replies_total") < 1:
                await asyncio.sleep(0.05)
        async with http.get(f"{url}/{service}/echo/after") as after:
            assert after.status == 200
        assert await metric(http, admin, "proxymq_enqueuer_in_flight_requests") == 0
    finally:
        proxy.release()
        await proxy.stop()
    assert [seen.path for seen in target.seen] == ["/echo/warm", "/echo/plain", "/echo/after"]
    logged = stack.log_text()
    assert "Traceback" not in logged and "never retrieved" not in logged


async def test_retry_after_timeout_sends_again(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    headers = {"Idempotency-Key": "slow", "X-Request-Timeout": "0.3"}
    async with http.get(f"{url}/{service}/delay/1", headers=headers) as r:
        assert r.status == 504
    await asyncio.sleep(0.1)
    async with http.get(f"{url}/{service}/echo/again", headers={"Idempotency-Key": "slow"}) as r:
        assert r.status == 200
        assert (await r.json())["path"] == "/echo/again"


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_long_work(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession, asynchronous: bool
) -> None:
    """A call longer than the default timeouts works when the service is configured for it."""
    await stack.dequeuer(service, target.url, "--call-timeout", "10")
    _, url = await stack.enqueuer("--timeout", "10")
    headers = {"X-Request-Timeout": "10"}
    if asynchronous:
        headers = {"Prefer": "respond-async"}
    async with http.get(f"{url}/{service}/delay/3", headers=headers) as r:
        if asynchronous:
            assert r.status == 202
            r = await poll(http, url + r.headers["Location"], timeout=15)
        assert r.status == 200
        assert await r.text() == "late"


async def test_warns_when_calls_outlast_the_consumer_timeout(
    stack: Stack, service: str, target: Target
) -> None:
    await stack.dequeuer(service, target.url, "--call-timeout", "3600")
    assert "longer than RabbitMQ's consumer_timeout" in stack.log_text()


async def test_queue_depth_is_a_metric(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    dequeuer = await stack.dequeuer(
        service, target.url, "--ordering", "partition", "--concurrency", "1", "--partitions", "1"
    )
    _, url = await stack.enqueuer()
    for _ in range(12):
        async with http.get(f"{url}/{service}/delay/1", headers={"Prefer": "respond-async"}) as r:
            assert r.status == 202
    admin = dequeuer.admin_port  # type: ignore[attr-defined]
    depth = 0.0
    async with asyncio.timeout(12):
        while depth == 0:
            depth = await metric(
                http, admin, "proxymq_dequeuer_queue_depth", {"partition": f"{service}.p0"}
            )
            await asyncio.sleep(0.5)
    assert 1 <= depth <= 12


async def partitions_of(
    amqp: AbstractRobustConnection, layout: topology.Topology, keys: list[str]
) -> dict[str, int]:
    """Where RabbitMQ's consistent hash puts each key: a probe message each, read back."""
    channel = await amqp.channel()
    exchange = await channel.get_exchange(layout.service)
    for key in keys:
        await exchange.publish(aio_pika.Message(key.encode()), routing_key=key)
    placed: dict[str, int] = {}
    all_read = asyncio.Event()

    def reader(index: int) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def read(probe: AbstractIncomingMessage) -> None:
            placed[probe.body.decode()] = index
            if len(placed) == len(keys):
                all_read.set()

        return read

    for index, name in enumerate(layout.queues):
        await (await channel.get_queue(name)).consume(reader(index), no_ack=True)
    await asyncio.wait_for(all_read.wait(), 10)
    await channel.close()
    assert sorted(placed) == sorted(keys)
    return placed


async def test_failing_keys_do_not_hold_up_healthy_ones(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """Two keys that fail, each retried after 1-4 s, and --concurrency 2: the healthy key's
    request is answered while they wait for their retries, not after they were dead-lettered
    (the waits used to keep both calling slots)."""
    layout = topology.Topology(service, partitions=2)
    await topology.declare(amqp, layout)
    placed = await partitions_of(amqp, layout, [f"key-{i}" for i in range(40)])
    failing = [next(k for k, p in placed.items() if p == index) for index in (0, 1)]
    await stack.dequeuer(
        service, target.url, "--partitions", "2", "--concurrency", "2",
        "--max-attempts", "3", "--retry-backoff-ms", "2000",
    )  # fmt: skip
    _, url = await stack.enqueuer()

    async def call(path: str, key: str) -> int:
        async with http.get(f"{url}/{service}{path}", headers={"X-Partition-Key": key}) as r:
            return r.status

    failures = [asyncio.create_task(call("/status/503", key)) for key in failing]
    while len(target.seen) < 2:  # both failing keys made their first call
        await asyncio.sleep(0.05)
    assert await call("/echo/healthy", "healthy") == 200
    assert not any(task.done() for task in failures)
    assert await asyncio.gather(*failures) == [502, 502]
    assert sorted(seen.path for seen in target.seen) == ["/echo/healthy"] + ["/status/503"] * 6
