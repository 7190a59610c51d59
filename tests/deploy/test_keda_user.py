"""The RabbitMQ user docs/deploy.md gives KEDA can make the request KEDA's rabbitmq scaler
makes with the trigger `proxymq keda` prints, and the sum it reads is the service's backlog.

KEDA (protocol http, useRegex) asks the management API for one page of the vhost's queues:
`GET /api/queues/%2F?page=1&use_regex=true&pagination=false&name=REGEX&page_size=N`, with the
credentials of the TriggerAuthentication's `host` URL. The user is made for the test, exactly
as the docs' `rabbitmqctl` lines make it, and removed."""

from __future__ import annotations

import asyncio
import base64
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection

from shared import topology
from shared.cli import keda
from tests.deploy.support import ROOT, by_kind

pytestmark = pytest.mark.rabbit
DOCS = ROOT / "docs" / "deploy.md"
MANAGEMENT = "127.0.0.1:15672"


def documented_keda_user() -> list[list[str]]:
    """The `rabbitmqctl` lines of docs/deploy.md for user `proxymq-keda`, as argument lists."""
    lines = re.findall(r"(?m)^rabbitmqctl (\S+) (?:-p / )?proxymq-keda\b(.*)$", DOCS.read_text())
    assert any(verb == "add_user" for verb, _ in lines), f"no add_user proxymq-keda in {DOCS}"
    return [[verb, *words(rest)] for verb, rest in lines]


def words(rest: str) -> list[str]:
    """Shell words, as far as the docs' lines use them: plain, or in single quotes ('')."""
    return [quoted or plain for quoted, plain in re.findall(r"'([^']*)'|(\S+)", rest)]


async def ctl(*args: str) -> None:
    await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "-q", *args], check=True, capture_output=True
    )


@pytest.fixture
async def keda_user() -> AsyncIterator[Callable[[], Awaitable[tuple[str, str]]]]:
    made: list[str] = []

    async def make() -> tuple[str, str]:
        name, password = f"proxymq-keda-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        for verb, *rest in documented_keda_user():
            args = [password] if verb == "add_user" else rest
            vhost = ["-p", "/"] if verb == "set_permissions" else []
            await ctl(verb, *vhost, name, *args)
            made.append(name)
        return name, password

    yield make
    for name in set(made):
        await ctl("delete_user", name)


async def test_the_documented_keda_user_reads_the_summed_partition_depth(
    amqp: AbstractRobustConnection,
    service: str,
    keda_user: Callable[[], Awaitable[tuple[str, str]]],
) -> None:
    await topology.declare(amqp, topology.Topology(service, partitions=3))
    channel = await amqp.channel()
    for queue, count in ((f"{service}.p0", 2), (f"{service}.p2", 1), (f"{service}.dlq", 4)):
        for _ in range(count):
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue)
    await channel.close()

    name, password = await keda_user()
    # The TriggerAuthentication's host, as secrets.yaml writes it, for this broker and user.
    (auth,) = by_kind("TriggerAuthentication")
    (ref,) = auth["spec"]["secretTargetRef"]
    secret = next(s for s in by_kind("Secret") if s["metadata"]["name"] == ref["name"])
    host = urlsplit(secret["stringData"][ref["key"]])
    assert host.path == "/", "the final / is vhost /"
    meta = keda.trigger_metadata(keda.Scaling(service))
    url = (
        f"http://{MANAGEMENT}/api/queues/%2F?page=1&use_regex=true&pagination=false"
        f"&name={quote(str(meta['queueName']), safe='')}&page_size={meta['pageSize']}"
    )
    total = None
    basic = base64.b64encode(f"{name}:{password}".encode()).decode()
    async with aiohttp.ClientSession(headers={"Authorization": f"Basic {basic}"}) as http:
        for _ in range(40):  # the management API's numbers lag by up to 5 s
            async with http.get(url) as response:
                assert response.status == 200, f"KEDA's request: {await response.text()}"
                queues = (await response.json())["items"]
            total = sum(q.get("messages", 0) for q in queues)
            if total == 3:
                break
            await asyncio.sleep(0.5)
    assert sorted(q["name"] for q in queues) == [f"{service}.p{i}" for i in range(3)]
    assert total == 3, "ready + unacked over the partitions, never the dead letters"


async def test_a_service_differing_only_in_case_is_not_counted(
    amqp: AbstractRobustConnection,
    service: str,
    keda_user: Callable[[], Awaitable[tuple[str, str]]],
) -> None:
    """The management API matches `name` without regard to case (`re:run(.., [caseless])`):
    `^t\\-abc\\.p\\d+$` also matched `T-ABC.p0`, another service's partition, and KEDA
    scaled one service on the other's backlog."""
    other = service.upper()
    await topology.declare(amqp, topology.Topology(service, partitions=2))
    await topology.declare(amqp, topology.Topology(other, partitions=2))
    try:
        channel = await amqp.channel()
        for queue in (f"{service}.p1", f"{other}.p0", f"{other}.p1"):
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue)
        await channel.close()
        name, password = await keda_user()
        meta = keda.trigger_metadata(keda.Scaling(service))
        url = (
            f"http://{MANAGEMENT}/api/queues/%2F?page=1&use_regex=true&pagination=false"
            f"&name={quote(str(meta['queueName']), safe='')}&page_size={meta['pageSize']}"
        )
        basic = base64.b64encode(f"{name}:{password}".encode()).decode()
        async with aiohttp.ClientSession(headers={"Authorization": f"Basic {basic}"}) as http:
            for _ in range(40):  # the management API's numbers lag by up to 5 s
                async with http.get(url) as response:
                    queues = (await response.json())["items"]
                if sum(q.get("messages", 0) for q in queues) >= 1:
                    break
                await asyncio.sleep(0.5)
        assert sorted(q["name"] for q in queues) == [f"{service}.p0", f"{service}.p1"]
        assert sum(q.get("messages", 0) for q in queues) == 1
    finally:
        await topology.delete(amqp, topology.Topology(other, partitions=2))


def documented_host(password: str) -> str:
    """The TriggerAuthentication's `host`, built by the shell line docs/deploy.md gives."""
    (line,) = re.findall(r'(?m)^\$ (HOST=".*")$', DOCS.read_text())
    built = subprocess.run(
        ["bash", "-c", f'{line}; printf %s "$HOST"'],
        env={"PASSWORD": password, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return built.stdout


async def test_a_password_with_url_characters_reaches_the_management_api(
    amqp: AbstractRobustConnection, service: str
) -> None:
    """`http://proxymq-keda:p@ss:w/rd%@rabbitmq:15672/` is no URL of that user: the password's
    `@`, `:`, `/` and `%` end the user info or the host early. The docs' line percent-encodes
    it; KEDA (Go's net/url) decodes the user info before it logs in, as `unquote` does here."""
    await topology.declare(amqp, topology.Topology(service, partitions=1))
    name, password = f"proxymq-keda-{uuid.uuid4().hex[:8]}", f"p@ss:w/rd%{uuid.uuid4().hex[:6]}"
    await ctl("add_user", name, password)
    try:
        await ctl("set_user_tags", name, "monitoring")
        await ctl("set_permissions", "-p", "/", name, "", "", "")
        host = urlsplit(documented_host(password).replace("proxymq-keda", name, 1))
        assert (host.hostname, host.port, host.path) == ("rabbitmq", 15672, "/")
        assert host.username is not None and host.password is not None
        user, secret = unquote(host.username), unquote(host.password)
        assert (user, secret) == (name, password)
        basic = base64.b64encode(f"{user}:{secret}".encode()).decode()
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Basic {basic}"}) as http,
            http.get(f"http://{MANAGEMENT}/api/queues/%2F/{service}.p0") as response,
        ):
            assert response.status == 200, await response.text()
    finally:
        await ctl("delete_user", name)
