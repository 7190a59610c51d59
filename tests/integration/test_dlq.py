"""`proxymq dlq`: dead letters made for real (a dequeuer whose microservice does not answer, a
message the broker drops at its delivery limit), then listed, shown, replayed and purged by the
console script an operator runs. What matters most: the requests chosen reach the microservice
with their partition key, and the others stay in `S.dlq` in their order."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiohttp
import pamqp.encode
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection, HeadersType
from aiohttp import web
from rich.console import Console

from shared import envelope, topology
from shared.cli import dlq as dlq_command
from shared.cli.dlq_letters import (
    DeadLetter,
    Selection,
    kept_copy,
    parse_duration,
    read,
    replay_of,
)
from shared.cli.dlq_pass import DeadLetterQueue, Fate
from shared.cli.dlq_render import letter_table, render_letter
from shared.cli.main import build_parser
from shared.cli.status import passive
from shared.processes import script
from tests.conftest import Stack, serving
from tests.target import Seen, Target
from tests.test_cli import interruptible


@pytest.fixture
async def crashing() -> AsyncIterator[str]:
    """A microservice that answers the dequeuer's readiness probe (`GET /`) but drops the
    connection on every real request, so each call fails with `connect: ...`. A target where
    nothing listens would not do: the dequeuer consumes nothing until its microservice answers."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/":
            return web.Response(text="up")
        assert request.transport is not None
        request.transport.close()
        raise asyncio.CancelledError

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with serving(app) as microservice:
        yield microservice


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def dlq(amqp_url: str, *args: str) -> Run:
    """The real console script, configured the way an operator's shell would be."""
    env = {**os.environ, "PROXYMQ_AMQP_URL": amqp_url, "COLUMNS": "250"}
    process = await asyncio.create_subprocess_exec(
        script("proxymq"),
        "dlq",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def depth(amqp: AbstractRobustConnection, queue: str) -> int:
    found = await passive(amqp, queue)
    return 0 if found is None else found[0]


async def wait_depth(amqp: AbstractRobustConnection, queue: str, count: int) -> None:
    async with asyncio.timeout(10):
        while await depth(amqp, queue) < count:
            await asyncio.sleep(0.02)


async def listed(amqp_url: str, service: str) -> list[dict[str, Any]]:
    run = await dlq(amqp_url, "list", "--service", service, "--json")
    assert run.code == 0, run.err
    rows: list[dict[str, Any]] = run.json()["dead_letters"]
    return rows


def orders(target: Target) -> list[Seen]:
    """The requests the test sent, without the dequeuer's readiness probes (`GET /`)."""
    return [seen for seen in target.seen if seen.path.startswith("/orders/")]


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["request_id"] for row in rows]


@pytest.mark.rabbit
async def test_list_show_replay_and_purge(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
    amqp_url: str,
    crashing: str,
) -> None:
    # The breaker would pause consumption after 5 failed calls in a row; here every call fails.
    failing = await stack.dequeuer(
        service, crashing, "--retry-backoff-ms", "1", "--breaker-failures", "1000"
    )
    _, url = await stack.enqueuer()
    dead_letters = topology.dead_letter_queue(service)
    sent: list[tuple[str, str | None, str]] = []  # (request id, key, path)
    requests = [
        ("k1", "/orders/1", {}),
        ("k2", "/orders/2", {}),
        ("k1", "/orders/3", {"X-Request-Timeout": "1"}),  # its deadline passes before replay
        ("k3", "/orders/4", {}),
        (None, "/orders/5", {}),
        ("k1", "/orders/6?tag=x", {}),
        ("k2", "/orders/7", {}),
    ]
    for index, (key, path, extra) in enumerate(requests):
        headers = {"Prefer": "respond-async", "Content-Type": "text/plain", **extra}
        if key is not None:
            headers["X-Partition-Key"] = key
        async with http.post(
            f"{url}/{service}{path}", data=f"body {index}".encode(), headers=headers
        ) as response:
            assert response.status == 202
            sent.append((response.headers["X-Correlation-ID"], key, path))
        # One at a time, so the order in S.dlq is the order sent.
        await wait_depth(amqp, dead_letters, index + 1)
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(service)
    await exchange.publish(
        aio_pika.Message(
            b"?", headers={envelope.H_PATH: "no-slash", envelope.H_KEY: "km"}, correlation_id="bad"
        ),
        routing_key="km",
    )
    await wait_depth(amqp, dead_letters, len(requests) + 1)
    all_ids = [request_id for request_id, _, _ in sent] + ["bad"]

    rows = await listed(amqp_url, service)
    assert ids(rows) == all_ids
    assert [row["partition_key"] for row in rows] == [key for _, key, _ in sent] + ["km"]
    assert [row["reason"].split(":")[0] for row in rows] == ["connect"] * 7 + ["malformed"]
    first = rows[0]
    assert (first["method"], first["path"], first["attempts"]) == ("POST", "/orders/1", 3)
    assert first["partition"].startswith(f"{service}.p")
    assert first["body_size"] == len(b"body 0")
    assert abs(first["dead_at_ms"] / 1000 - time.time()) < 60
    assert rows[5]["query"] == "tag=x"
    assert rows[2]["deadline"] is not None

    table = await dlq(amqp_url, "list", "--service", service)
    assert table.code == 0, table.err
    assert f"{dead_letters}: 8 dead letters" in table.out
    assert all(request_id in table.out for request_id in all_ids)
    assert "connect:" in table.out
    assert "POST /orders/6?tag=x" in table.out

    shown = await dlq(amqp_url, "show", "--service", service, sent[0][0])
    assert shown.code == 0, shown.err
    for expected in ("POST /orders/1", "X-Partition-Key: k1", "body 0", "x-proxymq-dead-reason"):
        assert expected in shown.out
    as_json = (await dlq(amqp_url, "show", "--service", service, sent[0][0], "--json")).json()
    assert as_json["body_text"] == "body 0"
    assert ["X-Partition-Key", "k1"] in as_json["http_headers"]
    missing = await dlq(amqp_url, "show", "--service", service, "nope")
    assert missing.code == 1
    assert "no dead letter" in missing.err

    dry = await dlq(amqp_url, "replay", "--service", service, "--key", "k1", "--dry-run")
    assert dry.code == 0, dry.err
    assert "would replay 3 of 8" in dry.out
    assert await listed(amqp_url, service) == rows  # nothing changed, order included

    await asyncio.to_thread(failing.stop, 15)
    await stack.dequeuer(service, target.url)
    replay = await dlq(amqp_url, "replay", "--service", service, "--key", "k1", "--yes")
    assert replay.code == 0, replay.err
    assert "replayed 3 dead letters" in replay.out
    async with asyncio.timeout(10):
        while len(orders(target)) < 3:
            await asyncio.sleep(0.02)
    k1 = [(request_id, path) for request_id, key, path in sent if key == "k1"]
    # One key, one partition, one lane: they arrive in their original order.
    assert [seen.path + (f"?{seen.query}" if seen.query else "") for seen in orders(target)] == [
        path for _, path in k1
    ]
    for seen, (request_id, _) in zip(orders(target), k1, strict=True):
        headers = dict(seen.headers)
        assert headers["X-Partition-Key"] == "k1"
        assert headers["X-Correlation-ID"] == request_id
        assert headers["X-Request-Timeout"] == "60.000"  # no deadline now: --call-timeout
    assert orders(target)[0].body == b"body 0"
    remaining = await listed(amqp_url, service)
    assert ids(remaining) == [i for i in all_ids if i not in {r for r, _ in k1}]

    refused = await dlq(amqp_url, "purge", "--service", service, "--reason", "malformed")
    assert refused.code == 1
    assert "pass --yes" in refused.err
    assert ids(await listed(amqp_url, service)) == ids(remaining)
    purge = await dlq(amqp_url, "purge", "--service", service, "--reason", "MALFORMED", "--yes")
    assert purge.code == 0, purge.err
    assert ids(await listed(amqp_url, service)) == [i for i in ids(remaining) if i != "bad"]
    await asyncio.sleep(0.3)
    assert len(orders(target)) == 3  # nothing but the replayed requests reached the microservice


@pytest.mark.rabbit
async def test_broker_dead_letter_is_listed_and_replayed_clean(
    service: str, amqp: AbstractRobustConnection, amqp_url: str
) -> None:
    """A real delivery-limit drop: the broker's x-death headers give reason, partition and time;
    a replay carries none of them back into the partition."""
    layout = topology.Topology(service, partitions=1, delivery_limit=1)
    await topology.declare(amqp, layout)
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(service)
    await exchange.publish(
        aio_pika.Message(b"poison", headers={envelope.H_KEY: "kp"}, correlation_id="p1"),
        routing_key="kp",
    )
    consumer = await amqp.channel()
    await consumer.set_qos(prefetch_count=1)
    partition = await consumer.declare_queue(layout.queues[0], passive=True)
    deliveries: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    tag = await partition.consume(deliveries.put)
    for _ in range(2):  # the second return goes over the limit of 1
        message = await asyncio.wait_for(deliveries.get(), 5)
        await message.nack(requeue=True)
    await wait_depth(amqp, layout.dead_letters, 1)

    (row,) = await listed(amqp_url, service)
    assert (row["request_id"], row["reason"], row["source"]) == ("p1", "delivery_limit", "broker")
    assert row["partition"] == layout.queues[0]
    assert row["partition_key"] == "kp"
    assert row["dead_at"] is not None
    table = await dlq(amqp_url, "list", "--service", service)
    assert "delivery_limit (broker)" in table.out

    replay = await dlq(amqp_url, "replay", "--service", service, "--yes")
    assert replay.code == 0, replay.err
    message = await asyncio.wait_for(deliveries.get(), 5)
    await message.ack()
    await partition.cancel(tag)
    assert message.body == b"poison"
    assert message.correlation_id == "p1"
    assert message.headers[envelope.H_KEY] == "kp"
    assert not {"x-death", "x-first-death-reason", "x-first-death-queue"} & set(message.headers)
    assert await depth(amqp, layout.dead_letters) == 0


@pytest.mark.rabbit
async def test_order_is_kept_past_32_messages(
    service: str, amqp: AbstractRobustConnection, amqp_url: str
) -> None:
    """RabbitMQ 3.10 returns more than 32 messages taken by basic.get in hash order (nack or
    channel close): the copy-to-tail pass must not depend on that."""
    await topology.declare(amqp, topology.Topology(service, partitions=1))
    channel = await amqp.channel(publisher_confirms=True)
    for index in range(80):
        await channel.default_exchange.publish(
            aio_pika.Message(
                b"",
                headers={"x-proxymq-dead-reason": "odd" if index % 2 else "even"},
                correlation_id=f"m{index:02d}",
            ),
            routing_key=topology.dead_letter_queue(service),
        )
    purge = await dlq(amqp_url, "purge", "--service", service, "--reason", "odd", "--yes")
    assert purge.code == 0, purge.err
    assert ids(await listed(amqp_url, service)) == [f"m{i:02d}" for i in range(0, 80, 2)]
    everything = await dlq(amqp_url, "purge", "--service", service, "--yes", "--json")
    assert len(everything.json()["purged"]) == 40
    assert await depth(amqp, topology.dead_letter_queue(service)) == 0


@pytest.mark.rabbit
async def test_unknown_service_and_broker_down(service: str, amqp_url: str) -> None:
    unknown = await dlq(amqp_url, "list", "--service", service)
    assert unknown.code == 1
    assert f"has no dead-letter queue {service}.dlq" in unknown.err
    down = await dlq("amqp://guest:guest@127.0.0.1:1/", "replay", "--service", service, "--yes")
    assert down.code == 1
    assert "RabbitMQ does not answer" in down.err
    assert "Traceback" not in down.err


def test_replay_strips_dead_letter_headers_and_deadline() -> None:
    headers: HeadersType = {
        envelope.H_KEY: "k",
        envelope.H_PATH: "/x",
        envelope.H_DEADLINE: 1,
        "x-proxymq-dead-reason": "connect: refused",
        "x-proxymq-attempts": 3,
        "x-proxymq-partition": "s.p0",
        "x-proxymq-dead-at": 2,
        "x-death": [{"reason": "delivery_limit"}],
        "x-first-death-reason": "delivery_limit",
        "x-delivery-count": 4,
    }
    message = aio_pika.Message(b"b", headers=headers, correlation_id="c", reply_to="r")
    letter = read(message, 1)
    replay, key = replay_of(letter, keep_deadline=False)
    assert key == "k"
    assert replay.headers == {envelope.H_KEY: "k", envelope.H_PATH: "/x"}
    assert (replay.correlation_id, replay.reply_to, replay.body) == ("c", "r", b"b")
    kept, _ = replay_of(letter, keep_deadline=True)
    assert kept.headers[envelope.H_DEADLINE] == 1
    unkeyed = read(aio_pika.Message(b"", correlation_id="c"), 1)
    assert replay_of(unkeyed, keep_deadline=False)[1] == "c"
    assert "x-delivery-count" not in kept_copy(message).headers
    assert kept_copy(message).headers["x-death"] == headers["x-death"]


def test_a_replay_is_sent_when_it_is_replayed() -> None:
    """`x-proxymq-sent-at` feeds the queue-wait histogram ("from publish to the first call"):
    a replay kept the original's, and each replayed letter a day old counted a day's wait."""
    day_ago = int(time.time() * 1000) - 86_400_000
    letter = read(
        aio_pika.Message(b"", headers={envelope.H_SENT_AT: day_ago}, correlation_id="c"), 1
    )
    before = int(time.time() * 1000)
    replay, _ = replay_of(letter, keep_deadline=True)
    sent = replay.headers[envelope.H_SENT_AT]
    assert isinstance(sent, int)
    assert before <= sent <= int(time.time() * 1000)


def test_selection() -> None:
    now = datetime.now(UTC)
    old = read(
        aio_pika.Message(
            b"",
            headers={
                "x-proxymq-dead-reason": "Connect: refused",
                "x-proxymq-dead-at": int((now - timedelta(hours=2)).timestamp() * 1000),
                envelope.H_KEY: "k1",
            },
            correlation_id="a",
        ),
        1,
    )
    undated = read(aio_pika.Message(b"", correlation_id="b"), 2)
    assert Selection(reason="connect").matches(old, now)
    assert Selection(older_than=3600, key="k1", ids=frozenset({"a"})).matches(old, now)
    assert not Selection(newer_than=3600).matches(old, now)
    assert not Selection(older_than=0).matches(undated, now)  # an unknown time matches no age
    assert undated.reason == "unknown"
    assert Selection().everything
    assert not Selection(limit=1).everything
    assert [parse_duration(v) for v in ("90", "15m", "2h", "1d")] == [90, 900, 7200, 86400]


def test_identity_survives_a_copy() -> None:
    """A preview pass copies every letter before the action pass reads it again: a message
    published without a message_id is given the one its identity derived (not a random one
    from the client), so the confirmed letter is recognised."""
    original = aio_pika.Message(b"x", headers={"x-proxymq-dead-reason": "503"})
    copy = kept_copy(original)
    assert copy.message_id == read(original, 1).identity[0]
    assert read(original, 1).identity == read(copy, 1).identity
    other = aio_pika.Message(b"x", headers={"x-proxymq-dead-reason": "503"}, message_id="m2")
    assert read(other, 1).identity != read(original, 1).identity


def test_byte_array_headers_read_as_text() -> None:
    """A client may send a header as an AMQP byte array (`x`): it reads as the same text."""
    message = aio_pika.Message(
        b"",
        headers={envelope.H_METHOD: bytearray(b"PATCH"), "x-bin": bytearray(b"\xff")},
    )
    letter = read(message, 1)
    assert letter.method == "PATCH"
    headers = letter.to_full_json()["headers"]
    assert isinstance(headers, dict)
    assert headers == {envelope.H_METHOD: "PATCH", "x-bin": {"base64": "/w=="}}


def test_header_bytes_that_are_no_utf8_can_be_written_back() -> None:
    """pamqp reads such a string as `bytes` and cannot write `bytes`: copies carry a byte
    array, every byte kept."""
    headers: HeadersType = {"x-raw": b"\xff\xfe", "x-nested": {"a": [b"\xff"]}}
    message = aio_pika.Message(b"", headers=headers)
    for copy in (kept_copy(message), replay_of(read(message, 1), keep_deadline=False)[0]):
        assert copy.headers == {
            "x-raw": bytearray(b"\xff\xfe"),
            "x-nested": {"a": [bytearray(b"\xff")]},
        }
        pamqp.encode.field_table(copy.headers)  # raised TypeError for bytes


@pytest.mark.parametrize("value", ["nan", "inf", "1e20", "1e20d", "200000000m"])
def test_a_duration_beyond_any_date_is_a_usage_error(value: str) -> None:
    with pytest.raises(ValueError, match="100 years"):
        parse_duration(value)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["dlq", "list", "--service", "s", "--older-than", value])
    assert exited.value.code == 2


async def publish_dead_letter(amqp_url: str, service: str, request_id: str, reason: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                b"", headers={"x-proxymq-dead-reason": reason}, correlation_id=request_id
            ),
            routing_key=topology.dead_letter_queue(service),
        )
    finally:
        await connection.close()


@pytest.mark.rabbit
async def test_confirmed_purge_acts_on_what_was_shown(
    service: str, amqp: AbstractRobustConnection, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --yes the operator confirms a preview; a matching dead letter that arrives while
    they read the question is not purged behind their back."""
    await topology.declare(amqp, topology.Topology(service, partitions=1))
    for index in range(4):
        await publish_dead_letter(amqp_url, service, f"m{index}", "odd" if index % 2 else "even")
    questions: list[str] = []

    async def confirm(question: str) -> bool:
        questions.append(question)
        await publish_dead_letter(amqp_url, service, "late", "odd")
        return True

    monkeypatch.setattr(dlq_command, "confirm", confirm)
    args = build_parser().parse_args(
        ["dlq", "purge", "--service", service, "--reason", "odd", "--amqp-url", amqp_url]
    )
    assert await asyncio.to_thread(args.run, args) == 0
    assert questions == ["purge 2 of the 4 dead letters? This cannot be undone."]
    assert ids(await listed(amqp_url, service)) == ["m0", "m2", "late"]


@pytest.mark.rabbit
async def test_confirmed_purge_of_one_twin_purges_one(
    service: str, amqp: AbstractRobustConnection, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Letters alike in everything the old identity looked at (no request id, same body) were
    all purged when one was shown and confirmed."""
    await topology.declare(amqp, topology.Topology(service, partitions=1))
    channel = await amqp.channel(publisher_confirms=True)
    dlq_name = topology.dead_letter_queue(service)
    for message_id in (None, None, "same", "same"):  # the client gives None a random id
        await channel.default_exchange.publish(
            aio_pika.Message(b"twin", message_id=message_id), routing_key=dlq_name
        )
    first, second, third, fourth = [row["message_id"] for row in await listed(amqp_url, service)]
    questions: list[str] = []

    async def confirm(question: str) -> bool:
        questions.append(question)
        return True

    monkeypatch.setattr(dlq_command, "confirm", confirm)
    for chosen in (["--id", first], ["--id", "same", "--limit", "1"]):
        args = build_parser().parse_args(
            ["dlq", "purge", "--service", service, *chosen, "--amqp-url", amqp_url]
        )
        assert await asyncio.to_thread(args.run, args) == 0
    assert questions == [
        "purge 1 of the 4 dead letters? This cannot be undone.",
        "purge 1 of the 3 dead letters? This cannot be undone.",
    ]
    remaining = [row["message_id"] for row in await listed(amqp_url, service)]
    assert remaining == [second, fourth]
    assert third == "same"


@pytest.mark.rabbit
async def test_a_letter_that_cannot_be_handled_leaves_the_queue_in_order(
    service: str, amqp: AbstractRobustConnection, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header that is no UTF-8, a partition key AMQP cannot route by, or any other failure
    with one letter: every letter stays, in order, and the command says why in one line."""
    await topology.declare(amqp, topology.Topology(service, partitions=1))

    class Raw(bytes):
        """Written as an AMQP string of bytes that are no UTF-8, as another client might."""

    encode = pamqp.encode.encode_table_value

    def raw_strings(value: Any) -> bytes:
        if isinstance(value, Raw):
            return b"S" + len(value).to_bytes(4, "big") + bytes(value)
        return encode(value)

    monkeypatch.setattr(pamqp.encode, "encode_table_value", raw_strings)
    channel = await amqp.channel(publisher_confirms=True)
    letters: list[tuple[str, HeadersType]] = [
        ("a", {envelope.H_KEY: "ka"}),
        ("raw", {envelope.H_KEY: "kr", "x-raw": Raw(b"\xff\xfeabc")}),
        ("long", {envelope.H_KEY: "K" * 300}),
        ("b", {envelope.H_KEY: "kb"}),
    ]
    for request_id, headers in letters:
        await channel.default_exchange.publish(
            aio_pika.Message(b"body", headers=headers, correlation_id=request_id),
            routing_key=topology.dead_letter_queue(service),
        )
    monkeypatch.undo()
    everything = ["a", "raw", "long", "b"]
    assert ids(await listed(amqp_url, service)) == everything
    assert ids(await listed(amqp_url, service)) == everything
    shown = await dlq(amqp_url, "show", "--service", service, "raw", "--json")
    assert shown.code == 0, shown.err
    assert shown.json()["headers"]["x-raw"] == {"base64": "//5hYmM="}

    replay = await dlq(amqp_url, "replay", "--service", service, "--yes")
    assert replay.code == 1
    assert "Traceback" not in replay.err
    assert "request long was not replayed: its partition key is 300 bytes long" in replay.err
    assert ids(await listed(amqp_url, service)) == ["long", "b"]
    partition = await channel.declare_queue(topology.partition_queue(service, 0), passive=True)
    deliveries: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await partition.consume(deliveries.put, no_ack=True)
    replayed = [await asyncio.wait_for(deliveries.get(), 5) for _ in range(2)]
    assert [m.correlation_id for m in replayed] == ["a", "raw"]
    assert replayed[1].headers["x-raw"] == bytearray(b"\xff\xfeabc")

    def broken(letter: DeadLetter) -> Fate:
        if letter.request_id == "b":
            raise KeyError("surprise")
        return Fate.DROP

    async with await aio_pika.connect(amqp_url) as connection:
        result = await DeadLetterQueue(connection, service).sweep(broken)
    assert result.refused is not None and result.refused.request_id == "b"
    assert "KeyError" in (result.refusal or "")
    assert ids(await listed(amqp_url, service)) == ["b"]  # "long" was dropped before it


def test_a_table_never_splits_a_request_id() -> None:
    """Request ids are copied from a log into `dlq show`; in a narrow table they must stay whole."""
    request_id = "5f0c4e2d9a7b4c1e8f3a6b2d1c0e9f8a"
    letter = read(
        aio_pika.Message(
            b"x" * 2000,
            headers={"x-proxymq-dead-reason": "connect: " + "refused " * 20, envelope.H_KEY: "k"},
            correlation_id=request_id,
        ),
        1,
    )
    console = Console(width=80, file=io.StringIO())
    console.print(letter_table([letter], "t"))
    assert isinstance(console.file, io.StringIO)
    assert request_id in console.file.getvalue()


def test_show_of_a_huge_text_body_shows_its_start() -> None:
    """A text body is shown up to 64 KiB, as a binary one is up to 256 bytes, with how much
    more there is: `show` of an 11 MB JSON body printed 88,000 lines and took 40 s to lay out.
    `--json` has it whole."""
    body = b'{"items": [' + b'{"id": 1, "name": "an item"}, ' * 100_000 + b"]}"
    letter = read(aio_pika.Message(body, correlation_id="huge"), 1)
    console = Console(width=130, file=io.StringIO())
    render_letter(letter, "s.dlq", console)
    assert isinstance(console.file, io.StringIO)
    shown = console.file.getvalue()
    assert '{"items": [{"id": 1' in shown
    assert len(shown) < 80_000
    assert f"... {len(body) - 65_536} more bytes (--json gives the whole body)" in shown
    assert letter.to_full_json()["body_text"] == body.decode()


@pytest.mark.rabbit
async def test_a_letter_with_deeply_nested_http_headers_is_listed_in_order(
    service: str, amqp: AbstractRobustConnection, amqp_url: str
) -> None:
    """The dequeuer dead-letters a request whose `x-proxymq-headers` is `[[[[...` as malformed;
    reading it raised RecursionError, so every `dlq` command stopped at it and left the queue
    rotated, again at each try."""
    await topology.declare(amqp, topology.Topology(service, partitions=1))
    channel = await amqp.channel(publisher_confirms=True)
    letters: list[tuple[str, HeadersType]] = [
        ("a", {}),
        ("deep", {envelope.H_HEADERS: "[" * 100_000, envelope.H_DEAD_REASON: "malformed: x"}),
        ("b", {}),
    ]
    for request_id, headers in letters:
        await channel.default_exchange.publish(
            aio_pika.Message(b"body", headers=headers, correlation_id=request_id),
            routing_key=topology.dead_letter_queue(service),
        )
    assert ids(await listed(amqp_url, service)) == ["a", "deep", "b"]
    shown = await dlq(amqp_url, "show", "--service", service, "deep", "--json")
    assert shown.code == 0, shown.err
    assert shown.json()["http_headers"] is None
    purged = await dlq(amqp_url, "purge", "--service", service, "--id", "deep", "--yes")
    assert purged.code == 0, purged.err
    assert ids(await listed(amqp_url, service)) == ["a", "b"]


async def six_letters(amqp: AbstractRobustConnection, service: str) -> AbstractChannel:
    """A one-partition service with dead letters r0..r5 in its S.dlq; the channel they went on."""
    await topology.declare(amqp, topology.Topology(service, partitions=1))
    channel = await amqp.channel(publisher_confirms=True)
    for index in range(6):
        await channel.default_exchange.publish(
            aio_pika.Message(
                b"", headers={"x-proxymq-dead-reason": "x"}, correlation_id=f"r{index}"
            ),
            routing_key=topology.dead_letter_queue(service),
        )
    return channel


@pytest.mark.rabbit
async def test_replay_at_a_rate_spaces_the_letters(
    service: str, amqp: AbstractRobustConnection, amqp_url: str
) -> None:
    """`--rate 10` replays six letters over half a second or more, each after the one before:
    a service that just recovered serves its live requests in between. Only a lower bound is
    asserted (a busy machine only spaces them more)."""
    channel = await six_letters(amqp, service)
    arrivals: list[tuple[str, float]] = []
    partition = await channel.declare_queue(f"{service}.p0", passive=True)

    async def arrived(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        arrivals.append((message.correlation_id or "", time.monotonic()))

    await partition.consume(arrived, no_ack=True)
    replay = await dlq(amqp_url, "replay", "--service", service, "--yes", "--rate", "10")
    assert replay.code == 0, replay.err
    async with asyncio.timeout(10):
        while len(arrivals) < 6:
            await asyncio.sleep(0.02)
    assert [request_id for request_id, _ in arrivals] == [f"r{i}" for i in range(6)]
    # Sent 0.1 s apart or more; a delivery late by the broker's jitter makes the gap after it
    # short (seen: 0.18 s, then 0.02 s), so the span is what is asserted.
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(arrivals)]
    assert sum(gaps) > 0.4, gaps


@pytest.mark.rabbit
async def test_ctrl_c_during_a_paced_replay_keeps_the_rest_at_once(
    service: str, amqp: AbstractRobustConnection, amqp_url: str
) -> None:
    """A Ctrl-C while the replay waits for its next turn ends the pass without waiting out the
    turn: what was replayed stays replayed, the rest is kept in order."""
    await six_letters(amqp, service)
    process = await asyncio.create_subprocess_exec(
        script("proxymq"),
        *("dlq", "replay", "--service", service, "--yes", "--json", "--rate", "0.1"),
        env={**os.environ, "PROXYMQ_AMQP_URL": amqp_url},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=interruptible,
    )
    await wait_depth(amqp, f"{service}.p0", 1)  # the first went at once; the next in 10 s
    process.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(process.communicate(), 8)
    assert process.returncode == 1
    outcome = json.loads(out)
    assert outcome["stopped"] is True
    assert [row["request_id"] for row in outcome["replayed"]] == ["r0"]
    assert ids(await listed(amqp_url, service)) == [f"r{i}" for i in range(1, 6)]


@pytest.mark.parametrize("value", ["0", "0.05", "-1", "nan", "fast", "1e9"])
def test_a_replay_rate_out_of_range_is_a_usage_error(value: str) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["dlq", "replay", "--service", "s", "--rate", value])
    assert exited.value.code == 2
    for good in ("0.1", "100000"):
        args = build_parser().parse_args(["dlq", "replay", "--service", "s", "--rate", good])
        assert args.rate == float(good)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["replay", "--dry-run"], "would_replay"),
        (["purge", "--dry-run"], "would_purge"),
        (["replay", "--yes"], "replayed"),
        (["purge", "--yes"], "purged"),
        (["purge"], "purged"),  # no match after the preview: nothing to ask
    ],
)
async def test_json_of_an_empty_or_unmatched_pass_has_the_usual_shape(
    amqp_url: str, amqp: AbstractRobustConnection, service: str, args: list[str], key: str
) -> None:
    """`replay`/`purge --json` on an empty S.dlq, or with no letter matching without --yes,
    printed {"service", "changed", "message"}: a script reading `.purged[]` or
    `.would_replay | length` failed exactly when there was nothing to do."""
    await topology.declare(amqp, topology.Topology(service, partitions=1))
    empty = await dlq(amqp_url, *args, "--service", service, "--key", "nobody", "--json")
    assert empty.code == 0, empty.err
    assert empty.json()[key] == []
    assert empty.json()["total"] == 0
    channel = await amqp.channel(publisher_confirms=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b"", headers={"x-proxymq-partition-key": "k"}, correlation_id="c1"),
        routing_key=topology.dead_letter_queue(service),
    )
    unmatched = await dlq(amqp_url, *args, "--service", service, "--key", "nobody", "--json")
    assert unmatched.code == 0, unmatched.err
    assert unmatched.json()[key] == []
    assert unmatched.json()["total"] == 1
    assert await depth(amqp, topology.dead_letter_queue(service)) == 1


@pytest.mark.rabbit
async def test_a_replay_whose_reply_queue_is_gone_does_not_hold_its_key(
    stack: Stack,
    service: str,
    target: Target,
    amqp: AbstractRobustConnection,
    amqp_url: str,
) -> None:
    """A dead letter's reply queue is usually gone (its enqueuer restarted since): the replay's
    reply is not waited for. The dequeuer held each replayed request 15 s for a missing reply
    queue (REPLY_QUEUE_WAIT), and every later request of its key waited behind it. A reply
    queue that is still there gets its reply."""
    await stack.dequeuer(service, target.url)
    channel = await amqp.channel(publisher_confirms=True)
    live = await channel.declare_queue(exclusive=True)
    letters = [("g1", "proxymq.replies.gone-1"), ("g2", "proxymq.replies.gone-2"), ("l", live.name)]
    for request_id, reply_to in letters:
        await channel.default_exchange.publish(
            aio_pika.Message(
                b"",
                headers={
                    envelope.H_KEY: "k",
                    envelope.H_PATH: f"/orders/{request_id}",
                    envelope.H_DEAD_REASON: "connect: reset",
                },
                correlation_id=request_id,
                reply_to=reply_to,
            ),
            routing_key=topology.dead_letter_queue(service),
        )
    started = time.monotonic()
    replay = await dlq(amqp_url, "replay", "--service", service, "--yes")
    assert replay.code == 0, replay.err
    async with asyncio.timeout(8):
        while len(orders(target)) < 3:
            await asyncio.sleep(0.02)
    assert [seen.path for seen in orders(target)] == ["/orders/g1", "/orders/g2", "/orders/l"]
    assert time.monotonic() - started < 8
    reply = await live.get(timeout=5, fail=False)
    async with asyncio.timeout(5):
        while reply is None:
            await asyncio.sleep(0.05)
            reply = await live.get(timeout=5, fail=False)
    assert reply.correlation_id == "l"
