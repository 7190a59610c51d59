"""A poison message: one that keeps coming back (it crashes whoever takes it) is dead-lettered by
RabbitMQ at the delivery limit, and its caller gets 502 service_failed at once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from functools import partial

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from shared import topology
from tests.conftest import Stack, metric
from tests.target import Target

pytestmark = pytest.mark.rabbit


async def test_delivery_limit_answers_the_caller(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    await topology.declare(amqp, topology.Topology(service, delivery_limit=2))
    _, url = await stack.enqueuer()
    # A "dequeuer" that crashes on every delivery: its message comes back until the limit.
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=1)
    queues = [
        await channel.declare_queue(name, passive=True)
        for name in topology.Topology(service).queues
    ]
    deliveries: list[int] = []
    crashed_in: set[str] = set()

    async def crash(queue: str, message: AbstractIncomingMessage) -> None:
        deliveries.append(int(message.headers.get("x-delivery-count", 0) or 0))  # type: ignore[arg-type]
        crashed_in.add(queue)
        await message.nack(requeue=True)

    for queue in queues:
        await queue.consume(partial(crash, queue.name))
    # The real dequeuer's microservice never gets ready: it only answers dead-letter notices.
    dequeuer = await stack.dequeuer(
        service, "http://127.0.0.1:1", "--delivery-limit", "2", wait=False
    )
    started = time.monotonic()
    async with http.get(
        f"{url}/{service}/poison", headers={"X-Partition-Key": "p", "X-Request-Timeout": "20"}
    ) as resp:
        assert resp.status == 502
        assert resp.headers["X-ProxyMQ-Error"] == "service_failed"
        message = (await resp.json())["error"]["message"]
        assert "delivery_limit" in message
        assert "after 3 deliveries" in message  # it said 1: x-death counts dead-letterings
    assert time.monotonic() - started < 10
    assert len(deliveries) == 3
    [partition] = crashed_in  # counted against the partition it died in, as the others are
    admin = dequeuer.admin_port  # type: ignore[attr-defined]
    counted = {"outcome": "dead_lettered", "partition": partition}
    assert await metric(http, admin, "proxymq_dequeuer_messages_total", counted) == 1
    dlq = await channel.declare_queue(topology.dead_letter_queue(service), passive=True)
    for _ in range(20):
        dead = await dlq.get(fail=False)
        if dead is not None:
            break
        await asyncio.sleep(0.1)
    assert dead is not None
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    await dead.ack()


@contextlib.asynccontextmanager
async def dead_letter_queue_refusing(
    service: str, amqp: AbstractRobustConnection
) -> AsyncIterator[None]:
    """S.dlq full: a policy of this service's alone caps it at 1 message, `reject-publish`
    (an operator's cap on dead-letter queues), and it holds 2."""
    api = "http://127.0.0.1:15672/api"
    policy = f"{api}/policies/%2F/{service}-dlq-cap"
    definition = {
        "pattern": f"^{service}\\.dlq$",
        "definition": {"max-length": 1, "overflow": "reject-publish"},
        "apply-to": "queues",
        "priority": 999,
    }
    auth = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
    async with aiohttp.ClientSession(headers=auth) as management:
        async with management.put(policy, json=definition) as response:
            assert response.status in (201, 204)
        try:
            async with asyncio.timeout(10):
                while True:
                    async with management.get(f"{api}/queues/%2F/{service}.dlq") as response:
                        if (await response.json()).get("effective_policy_definition"):
                            break
                    await asyncio.sleep(0.2)
            channel = await amqp.channel()  # with confirms: a refused publish raises
            for _ in range(2):
                with contextlib.suppress(aio_pika.exceptions.DeliveryError):
                    await channel.default_exchange.publish(
                        aio_pika.Message(b"filler"), f"{service}.dlq"
                    )
            await channel.close()
            yield
        finally:
            async with management.delete(policy):
                pass


async def test_a_dead_letter_the_dead_letter_queue_refuses_is_handed_to_the_broker(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    """When S.dlq refuses the dequeuer's copy (full under a `reject-publish` cap), the request
    is rejected and the broker dead-letters it itself: its caller gets 502 at once through
    S.notify, and the key's next request comes after it. The request stayed held on its live
    channel: its caller waited for the deadline (504), the key's next request went first, and
    each such request took one of its partition's prefetch for good (until consumer_timeout)."""
    await stack.dequeuer(service, target.url, "--max-attempts", "1")
    _, url = await stack.enqueuer()
    key = {"X-Partition-Key": "k", "X-Request-Timeout": "40"}
    async with dead_letter_queue_refusing(service, amqp):
        first = asyncio.ensure_future(http.get(f"{url}/{service}/status/503", headers=key))
        while not target.seen:
            await asyncio.sleep(0.05)
        async with http.get(f"{url}/{service}/echo/second", headers=key) as second:
            assert second.status == 200
        async with await first as response:
            assert response.status == 502
            assert response.headers["X-ProxyMQ-Error"] == "service_failed"
    assert [s.path for s in target.seen] == ["/status/503", "/echo/second"]
    assert "the dead letter queue refused the request" in stack.log_text()


async def test_notices_whose_callers_are_gone_do_not_hold_the_others(
    stack: Stack, service: str, target: Target, amqp: AbstractRobustConnection
) -> None:
    """S.notify's 16 notices at a time: ones whose reply queue is missing and whose caller's
    deadline has passed are dropped at once. Each was tried again for 15 s, and the notice of a
    caller still waiting came only after them. A reply queue missing within the deadline (an
    enqueuer reconnecting after a broker restart) is still waited for."""
    await stack.dequeuer(service, target.url, "--partitions", "1")
    channel = await amqp.channel(publisher_confirms=True)
    prefix = f"proxymq.replies.{service}"
    waiting = await channel.declare_queue(f"{prefix}-live", exclusive=True)
    late = f"{prefix}-reconnecting"
    now = int(time.time() * 1000)

    async def notice(correlation_id: str, reply_to: str, deadline: int | None) -> None:
        headers: dict[str, aio_pika.abc.FieldValue] = {
            "x-first-death-reason": "delivery_limit",
            "x-first-death-queue": f"{service}.p0",
        }
        if deadline is not None:
            headers["x-proxymq-deadline"] = deadline
        message = aio_pika.Message(
            b"",
            headers=headers,
            correlation_id=correlation_id,
            reply_to=reply_to,
        )
        await channel.default_exchange.publish(message, topology.notify_queue(service))

    for i in range(16):
        await notice(f"past-{i}", f"{prefix}-stopped{i}", now - 1000)
    await notice("reconnecting", late, now + 60_000)
    started = time.monotonic()
    await notice("waiting", waiting.name, now + 60_000)
    async with asyncio.timeout(20):
        while (reply := await waiting.get(fail=False)) is None:
            await asyncio.sleep(0.05)
    took = time.monotonic() - started
    assert reply.correlation_id == "waiting"
    await reply.ack()
    back = await channel.declare_queue(late, exclusive=True)
    async with asyncio.timeout(15):
        while (reply := await back.get(fail=False)) is None:
            await asyncio.sleep(0.05)
    assert reply.correlation_id == "reconnecting"
    assert took < 3, f"the waiting caller's notice took {took:.1f} s"
    await channel.close()
