"""The least RabbitMQ permissions each sidecar needs, as docs/deploy.md gives them, suffice:
a dequeuer allowed only its service's objects, an enqueuer allowed only its reply queue, the
services' exchanges and the hash ring's objects. Users are made for the test and removed."""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection

from shared import topology
from tests.conftest import Stack
from tests.target import Target

pytestmark = pytest.mark.rabbit
DOCS = "docs/deploy.md"


def documented(sidecar: str) -> tuple[str, str, str]:
    """The configure, write and read patterns of the `set_permissions` line the docs give
    for `sidecar`, with `S` standing for the service."""
    with open(DOCS, encoding="utf-8") as docs:
        text = docs.read()
    pattern = rf"set_permissions -p / proxymq-{sidecar}\S* ('[^']+') ('[^']+') ('[^']+')"
    line = re.search(pattern, text)
    assert line, f"no set_permissions line for proxymq-{sidecar} in {DOCS}"
    configure, write, read = (part.strip("'") for part in line.groups())
    return configure, write, read


async def ctl(*args: str) -> None:
    await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", *args], check=True)


@pytest.fixture
async def user() -> AsyncIterator[Callable[[str, tuple[str, str, str]], Awaitable[str]]]:
    """`await user(name, (configure, write, read))` gives the AMQP URL of a new user."""
    made: list[str] = []

    async def make(name: str, patterns: tuple[str, str, str]) -> str:
        password = uuid.uuid4().hex
        await ctl("add_user", name, password)
        made.append(name)
        await ctl("set_permissions", "-p", "/", name, *patterns)
        return f"amqp://{name}:{password}@127.0.0.1:5672/"

    yield make
    for name in made:
        await ctl("delete_user", name)


async def test_the_documented_permissions_are_enough(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
    user: Callable[[str, tuple[str, str, str]], Awaitable[str]],
) -> None:
    configure, write, read = (p.replace("S", re.escape(service)) for p in documented("dequeuer"))
    dequeuer_url = await user(f"proxymq-dequeuer-{service}", (configure, write, read))
    enqueuer_url = await user(f"proxymq-enqueuer-{service}", documented("enqueuer"))
    await stack.dequeuer(
        service,
        target.url,
        *("--partitions", "4", "--max-attempts", "2", "--retry-backoff-ms", "10"),
        env={"PROXYMQ_AMQP_URL": dequeuer_url},
    )
    _, url = await stack.enqueuer(env={"PROXYMQ_AMQP_URL": enqueuer_url})
    key = {"X-Partition-Key": "k"}
    async with http.post(f"{url}/{service}/a", data=b"one", headers=key) as response:
        assert response.status == 200, await response.text()
    async with http.get(f"{url}/{service}/status/503") as response:  # retried, dead-lettered
        assert response.status == 502, await response.text()

    channel = await amqp.channel()  # a broker restart's effect on the ring, by hand
    await channel.exchange_delete(topology.ring_marker(service))
    _, again = await stack.enqueuer(env={"PROXYMQ_AMQP_URL": enqueuer_url})
    async with http.post(f"{again}/{service}/b", data=b"two") as response:
        assert response.status == 200, await response.text()
    logs = stack.log_text()
    assert "ACCESS_REFUSED" not in logs, logs[-3000:]
    assert f"bound the 4 partitions of service {service}" in logs
    assert await topology.exchange_exists(amqp, topology.ring_marker(service))
