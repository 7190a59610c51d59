"""Hostile input: whatever a caller sends to the enqueuer or any AMQP client publishes to a
partition, nothing crashes, answers 500, hangs or grows without bound.

- Property-based (hypothesis, deterministic here): message decoding only ever raises
  `MalformedMessage`; a partition key is a key or a 400; encoding then decoding a request gives
  it back; the url-fetcher's SSRF guard refuses private IPv4 addresses in every spelling and its
  resolver never hands out a refused address.
- A bounded fuzz run of raw HTTP against a running enqueuer: random methods, encoded and
  overlong paths, huge, many and invalid headers, garbage deadlines, Prefer and Idempotency-Key
  values, bodies, deep JSON for a `json:` key source.
- Malformed messages published for real: each is dead-lettered once with its reason.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from ipaddress import IPv4Address, IPv4Network, ip_address

import aio_pika
import aiohttp
import pytest
from aiohttp.abc import ResolveResult
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from shared import envelope, partition_key, topology
from shared.cli.cluster import LocalCluster
from shared.envelope import (
    HOP_BY_HOP,
    HttpRequest,
    HttpResponse,
    MalformedMessage,
    RequestEnvelope,
)
from shared.errors import BadPartitionKey
from shared.processes import Process
from tests.conftest import Stack, metric
from tests.reliability.support import TimedTarget, report, rss_mib
from url_fetcher.guard import ForbiddenTarget, TargetGuard, parse_ip_literal

pytestmark = pytest.mark.reliability
PROPERTIES = settings(
    max_examples=250,
    deadline=None,  # two busy cores: time is no property here
    database=None,  # nothing written into the work tree
    derandomize=True,  # the same examples in every run: `make test` stays deterministic
    suppress_health_check=[HealthCheck.too_slow],
)

# What pamqp hands a consumer as header values: AMQP field-table types.
field_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=True)
    | st.decimals(allow_nan=False, allow_infinity=False, places=2)
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.datetimes(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
header_names = st.sampled_from(
    [
        envelope.H_VERSION,
        envelope.H_METHOD,
        envelope.H_PATH,
        envelope.H_QUERY,
        envelope.H_HEADERS,
        envelope.H_KEY,
        envelope.H_DEADLINE,
        envelope.H_SENT_AT,
        envelope.H_SERVICE,
        envelope.H_STATUS,
        envelope.H_ERROR,
        envelope.H_ERROR_MESSAGE,
    ]
) | st.text(max_size=12)
json_headers = st.one_of(
    st.text(max_size=60),
    st.builds(json.dumps, st.lists(st.lists(st.text(max_size=10), max_size=3), max_size=4)),
    st.builds(lambda depth: "[" * depth + "]" * depth, st.integers(1, 200_000)),
    st.builds(lambda depth: "[" * depth, st.integers(1, 200_000)),
)
amqp_headers = st.dictionaries(
    header_names, field_values | json_headers, max_size=10
) | st.fixed_dictionaries({envelope.H_HEADERS: json_headers})


@PROPERTIES
@given(
    headers=amqp_headers,
    body=st.binary(max_size=64),
    correlation_id=st.none() | st.text(max_size=40),
    reply_to=st.none() | st.text(max_size=40),
)
def test_decode_request_raises_only_malformed(
    headers: dict[str, object], body: bytes, correlation_id: str | None, reply_to: str | None
) -> None:
    try:
        request = envelope.decode_request(headers, body, correlation_id, reply_to)
    except MalformedMessage:
        return
    assert request.request_id == correlation_id
    assert envelope.valid_header(
        "X-Correlation-ID", request.request_id
    )  # sent on to the microservice
    assert request.request.path.startswith("/")
    assert all(0x21 <= ord(c) <= 0x7E for c in request.request.path + request.request.query)
    assert request.request.body == body
    assert not {name.lower() for name, _ in request.request.headers} & HOP_BY_HOP


@PROPERTIES
@given(headers=amqp_headers, body=st.binary(max_size=64))
def test_decode_response_raises_only_malformed(headers: dict[str, object], body: bytes) -> None:
    try:
        response = envelope.decode_response(headers, body)
    except MalformedMessage:
        return
    assert 200 <= response.status <= 599
    assert not {name.lower() for name, _ in response.headers} & (HOP_BY_HOP - {"content-length"})


tokens = st.text(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=16,
)
header_values = st.text(st.characters(blacklist_characters="\r\n\x00"), max_size=40)
target_characters = st.characters(min_codepoint=0x21, max_codepoint=0x7E)  # visible ASCII
# What survives the trip: every header but the hop-by-hop ones, which each side drops.
end_to_end_names = tokens.filter(lambda name: name.lower() not in HOP_BY_HOP)


@PROPERTIES
@given(
    method=tokens,
    path=st.builds(lambda p: "/" + p, st.text(target_characters, max_size=40)),
    query=st.text(target_characters, max_size=40),
    headers=st.lists(st.tuples(end_to_end_names, header_values), max_size=6),
    body=st.binary(max_size=256),
    key=st.none() | st.text(max_size=40),
    deadline=st.none() | st.integers(0, 2**40).map(lambda ms: ms / 1000),
)
def test_request_survives_encoding(
    method: str,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
    body: bytes,
    key: str | None,
    deadline: float | None,
) -> None:
    """What the enqueuer encodes, the dequeuer decodes back unchanged (bytes, order, repeats)."""
    sent = RequestEnvelope(
        "id-1", "svc", HttpRequest(method, path, query, tuple(headers), body), key, deadline, "r"
    )
    message = envelope.encode_request(sent)
    got = envelope.decode_request(message.headers, message.body, "id-1", "r")
    assert got.request == sent.request
    assert got.partition_key == key
    assert got.deadline == (None if deadline is None else int(deadline * 1000) / 1000)


@PROPERTIES
@given(
    status=st.integers(200, 599),
    headers=st.lists(st.tuples(end_to_end_names, header_values), max_size=6),
    body=st.binary(max_size=256),
)
def test_response_survives_encoding(
    status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    sent = HttpResponse(status, tuple(headers), body)
    message = envelope.encode_response(sent, "id-1")
    assert envelope.decode_response(message.headers, message.body) == sent


json_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
key_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda doc: json.dumps({"user": {"id": doc}}).encode(), json_documents),
    st.builds(lambda depth: b"[" * depth, st.integers(1, 200_000)),
    st.builds(lambda depth: b'{"user":' * depth, st.integers(1, 100_000)),
)


@PROPERTIES
@given(
    body=key_bodies,
    content_type=st.sampled_from(["application/json", "", "text/plain", "application/x+json"]),
    header=st.none() | st.text(max_size=300),
    query=st.text(max_size=80),
    required=st.booleans(),
)
def test_partition_key_is_a_key_or_a_400(
    body: bytes, content_type: str, header: str | None, query: str, required: bool
) -> None:
    sources = partition_key.parse_sources(["json:/user/id", "header:X-Partition-Key", "query:key"])
    headers = {} if header is None else {"X-Partition-Key": header}
    try:
        key = partition_key.extract(sources, headers, query, body, content_type, required=required)
    except BadPartitionKey:
        return
    assert key is None or (key and len(key.encode()) <= partition_key.MAX_KEY_BYTES)


def test_deep_json_is_malformed_not_a_crash() -> None:
    """Regression: `[[[[...` made json.loads raise RecursionError, which is no ValueError: the
    dequeuer held such a message unacked for good, the enqueuer answered 500."""
    with pytest.raises(MalformedMessage):
        envelope.decode_request({envelope.H_HEADERS: "[" * 100_000}, b"", "id", None)
    sources = partition_key.parse_sources(["json:/user/id"])
    with pytest.raises(BadPartitionKey):
        partition_key.extract(sources, {}, "", b"[" * 100_000, "application/json", required=True)
    assert partition_key.extract(sources, {}, "", b"[" * 100_000, "application/json") is None


NON_PUBLIC = [
    IPv4Network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
              "100.64.0.0/10", "0.0.0.0/8")
]  # fmt: skip


def spellings(ip: IPv4Address, rng: random.Random) -> list[str]:
    """Ways a URL host can name `ip` that getaddrinfo() or an IPv6 stack maps onto it."""
    value = int(ip)
    a, b, c, d = ip.packed
    return [
        str(ip),
        str(value),
        hex(value),
        "0" + oct(value)[2:],
        f"{a}.{value & 0xFFFFFF}",
        f"{a}.{b}.{value & 0xFFFF}",
        ".".join(rng.choice([str(x), hex(x), "0" + oct(x)[2:]]) for x in (a, b, c, d)),
        f"{ip}.",
        f"[::ffff:{ip}]",
        f"[::ffff:{a << 8 | b:x}:{c << 8 | d:x}]",
        f"[64:ff9b::{ip}]",
        f"[2002:{a << 8 | b:x}:{c << 8 | d:x}::1]",
    ]


@PROPERTIES
@given(network=st.sampled_from(NON_PUBLIC), offset=st.integers(0, 2**32 - 1), seed=st.integers())
def test_guard_refuses_private_ipv4_in_every_spelling(
    network: IPv4Network, offset: int, seed: int
) -> None:
    ip = network[offset % network.num_addresses]
    guard = TargetGuard()
    for host in spellings(ip, random.Random(seed)):
        with pytest.raises(ForbiddenTarget):
            guard.check_url(URL(f"http://{host}/x"))
        literal = parse_ip_literal(host)
        assert literal is not None, host
        if literal.version == 4:
            assert literal == ip, host


@PROPERTIES
@given(st.integers(0, 2**32 - 1), st.integers())
def test_ip_literals_match_inet_aton(value: int, seed: int) -> None:
    """Whatever spelling the C library accepts, the guard reads as the same address."""
    for host in spellings(IPv4Address(value), random.Random(seed))[:8]:
        try:
            expected = IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            continue
        assert parse_ip_literal(host) == expected, host


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda v: str(IPv4Address(v))),
    st.integers(0, 2**128 - 1).map(
        lambda v: str(ip_address(v) if v >= 2**32 else ip_address(v + 2**32))
    ),
    st.sampled_from(
        ["127.0.0.1", "::1", "10.0.0.1", "169.254.169.254", "::ffff:127.0.0.1", "fe80::1"]
    ),
)


@PROPERTIES
@given(st.lists(addresses, min_size=1, max_size=6))
def test_resolver_hands_out_no_refused_address(resolved: list[str]) -> None:
    """A DNS name that resolves to private addresses (all or some) is never connected to them."""
    guard = TargetGuard()
    results: list[ResolveResult] = [
        {"hostname": "evil.example", "host": a, "port": 80, "family": socket.AF_INET, "proto": 0,
         "flags": 0}
        for a in resolved
    ]  # fmt: skip
    try:
        kept = guard.filter("evil.example", results)
    except ForbiddenTarget:
        assert all(guard.refusal(ip_address(a)) for a in resolved)
        return
    assert kept and all(guard.refusal(ip_address(r["host"])) is None for r in kept)


# -- the enqueuer's HTTP surface, for real ---------------------------------------------------

FUZZ_REQUESTS = 1500
FUZZ_CONCURRENCY = 8
ANSWER_WITHIN = 5.0 + 3.0  # --timeout 5 plus slack: past that the enqueuer hangs
GARBAGE = ["", " ", "nan", "inf", "-inf", "-1", "0", "1e309", "0x10", "\uff11\uff10", "\t3",
           "9" * 400, "1;2", "null", "\xff", "respond-async", "%00"]  # fmt: skip


@dataclass
class Fuzzed:
    raw: bytes
    valid: bool  # well-formed HTTP/1.1: it must get an answer
    note: str


def fuzz_request(rng: random.Random, service: str) -> Fuzzed:
    """One random request, mostly well-formed HTTP with hostile content, sometimes not."""
    valid = True
    notes: list[str] = []
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "PROPFIND"])
    if rng.random() < 0.08:
        method, valid = rng.choice(["G ET", "GE\x00T", "X" * 300, "", "\xe9"]), False
        notes.append("bad method")
    segment = rng.choice(
        ["echo", "a%20b", "%2e%2e/%2e%2e", "..%2f..%2fetc", "%00", "%zz", "%ff%fe", "a" * 3000,
         "x/" * 200, "ü", ";a=b", "", "%252F"]
    )  # fmt: skip
    base = rng.choice(
        [f"/{service}/", f"/{service}/", "/no-such-service/", "/_proxymq/requests/", "/"]
    )
    path = base + segment
    if rng.random() < 0.3:
        path += "?" + rng.choice(
            ["key=" + rng.choice(GARBAGE), "%%%", "a=" + "b" * 5000, "key=k&key=j"]
        )
    if rng.random() < 0.05:
        path, valid = "/" + "a" * 20_000, rng.random() < 0.5
        notes.append("overlong target")
    headers: list[tuple[str, str]] = [("Host", "127.0.0.1"), ("Connection", "close")]
    for name, values in (
        ("X-Partition-Key", ["", "k", "k" * 300, "ü", "a b"]),
        ("X-Request-Timeout", [*GARBAGE, "0.5", "2"]),
        ("Prefer", ["respond-async", "RESPOND-ASYNC; wait=1", "respond-async, respond-async",
                    "wait=0", ",,;;", "respond-async" * 200]),
        ("Idempotency-Key", ["", "k", "k" * 5000, "ü", "\x7f"]),
        ("Content-Type", ["application/json", "application/json; charset=x", "text/plain", "\x01"]),
        ("traceparent", ["00-" + "0" * 32 + "-" + "0" * 16 + "-01", "garbage"]),
    ):  # fmt: skip
        if rng.random() < 0.35:
            headers.append((name, rng.choice(values)))
    if rng.random() < 0.05:
        headers += [(f"X-Many-{i}", "v") for i in range(rng.choice([50, 150]))]
        notes.append("many headers")
    if rng.random() < 0.04:
        headers.append(("X-Huge", "h" * rng.choice([9000, 70_000])))
        notes.append("huge header")
    if rng.random() < 0.04:
        headers.append((rng.choice(["Bad Header", "X:Y", "Ü", ""]), "v"))
        valid = False
        notes.append("bad header name")
    body = rng.choice(
        [b"", b"x" * rng.randint(0, 2000), bytes(rng.randrange(256) for _ in range(200)),
         json.dumps({"user": {"id": rng.choice([1, "u", None, [], {}, 1e308, "k" * 300])}})
         .encode(),
         b"[" * 60_000, b'{"user":' * 30_000, b"x" * 70_000]
    )  # fmt: skip
    length = len(body)
    if rng.random() < 0.05:
        length += rng.randint(1, 100)  # shorter than declared: the client hangs up half way
        notes.append("truncated body")
    headers.append(("Content-Length", str(length)))
    if rng.random() < 0.03:
        headers.append(("Transfer-Encoding", "chunked"))  # with Content-Length: smuggling
        valid = False
        notes.append("TE+CL")
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return Fuzzed(head.encode("utf-8", "surrogateescape") + body, valid, ",".join(notes))


async def send_raw(port: int, data: bytes, hang_up: bool) -> tuple[int | None, float, bytes]:
    """Send bytes, read the answer until the server closes (`Connection: close`). `hang_up`
    half-closes after sending, as a client that gives up mid-body does (the enqueuer then
    cancels the request: no answer is expected)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(ANSWER_WITHIN + 5):
            writer.write(data)
            try:
                await writer.drain()
                if hang_up:
                    writer.write_eof()
            except OSError:
                pass
            answer = b""
            try:
                while chunk := await reader.read(65536):
                    answer += chunk
            except OSError:
                pass
    except TimeoutError:
        return None, time.monotonic() - started, b"(no answer: hang)"
    finally:
        writer.close()
    status = None
    if answer[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 "):
        status = int(answer[9:12])
    return status, time.monotonic() - started, answer[:2000]


@pytest.mark.rabbit
async def test_fuzz_the_enqueuer(
    node: LocalCluster,
    stacks: Callable[[str], Stack],
    service: str,
    timed_target: TimedTarget,
    http: aiohttp.ClientSession,
) -> None:
    stack = stacks(node.nodes[0].amqp_url())
    dequeuer = await stack.dequeuer(service, timed_target.url, "--partitions", "2")
    enqueuer, url = await stack.enqueuer(
        "--timeout", "5", "--max-body", "64KiB", "--max-in-flight", "500",
        "--partition-key", "json:/user/id", "--partition-key", "header:X-Partition-Key",
        "--partition-key", "query:key",
    )  # fmt: skip
    port = int(url.rsplit(":", 1)[1])
    rss_before = rss_mib(enqueuer.pid)
    rng = random.Random(20261123)
    requests = [fuzz_request(rng, service) for _ in range(FUZZ_REQUESTS)]
    slots = asyncio.Semaphore(FUZZ_CONCURRENCY)

    async def one(request: Fuzzed) -> tuple[Fuzzed, int | None, float, bytes]:
        async with slots:
            hang_up = "truncated" in request.note
            return (request, *await send_raw(port, request.raw, hang_up))

    started = time.monotonic()
    results = await asyncio.gather(*map(one, requests))
    elapsed = time.monotonic() - started
    problems = []
    statuses: dict[str, int] = {}
    for request, status, took, answer in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        where = f"{request.note or 'plain'}: {request.raw[:120]!r} -> {answer[:300]!r}"
        if took > ANSWER_WITHIN:
            problems.append(f"hang ({took:.1f} s) {where}")
        elif status is None and request.valid and "truncated" not in request.note:
            problems.append(f"no answer {where}")
        elif status is not None and status >= 500 and b"X-ProxyMQ-Error" not in answer:
            problems.append(f"{status} not from the contract {where}")
        elif status == 500:
            problems.append(f"500 {where}")
        elif status == 503:  # the broker is fine: hostile callers must not open the breaker
            problems.append(f"503 {where}")
    assert not problems, "\n".join(problems[:15])
    async with http.post(
        f"{url}/{service}/echo/after", headers={"X-Partition-Key": "after"}
    ) as response:
        assert response.status == 200, "the pipeline does not work after the fuzz run"
    rss_after = rss_mib(enqueuer.pid)
    logs = stack.log_text()
    report(
        "hostile HTTP",
        {
            "requests": len(results),
            "seconds": round(elapsed, 1),
            "statuses": dict(sorted(statuses.items())),
            "enqueuer_rss_mib": [rss_before, rss_after],
            "dequeuer_rss_mib": rss_mib(dequeuer.pid),
        },
    )
    for process in (enqueuer, dequeuer):
        assert isinstance(process, Process) and process.popen is not None
        assert process.popen.poll() is None, f"{process.name} died"
    # A request aiohttp's parser refuses (400) is one warning line, not a traceback: any
    # traceback left is a failure of ours.
    assert "Traceback" not in logs, logs[logs.index("Traceback") :][:3000]
    assert "refused a malformed HTTP request (400)" in logs

    assert rss_after - rss_before < 64, f"enqueuer grew from {rss_before} to {rss_after} MiB"


MALFORMED = {
    "deep JSON headers": ({envelope.H_HEADERS: "[" * 100_000}, "malformed"),
    "unknown version": ({envelope.H_VERSION: 99}, "unsupported"),
    "method not a token": ({envelope.H_METHOD: "GE T"}, "is not an HTTP method"),
    "path without slash": ({envelope.H_PATH: "etc/passwd"}, "does not start with"),
    "deadline as text": ({envelope.H_DEADLINE: "soon"}, "milliseconds"),
    "method as a table": ({envelope.H_METHOD: {"a": 1}}, "must be a string"),
    "headers as a number": ({envelope.H_HEADERS: 7}, "JSON list"),
    "header with CRLF": ({envelope.H_HEADERS: json.dumps([["X", "a\r\nInjected: 1"]])}, "invalid"),
    "truncated headers JSON": ({envelope.H_HEADERS: '[["X", "a"'}, "JSON list"),
    "decimal version": ({envelope.H_VERSION: Decimal("1.5")}, "unsupported"),
    # Sent on, these put a second request line's words into the one the microservice reads.
    "path with CRLF": ({envelope.H_PATH: "/x HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /y"}, "ASCII"),
    "query with a space": ({envelope.H_QUERY: "a=1 HTTP/1.1"}, "ASCII"),
    "path not ASCII": ({envelope.H_PATH: "/café"}, "ASCII"),
    "CONNECT": ({envelope.H_METHOD: "CONNECT"}, "tunnel"),
}


@pytest.mark.rabbit
async def test_malformed_messages_are_dead_lettered_once(
    node: LocalCluster,
    stacks: Callable[[str], Stack],
    service: str,
    timed_target: TimedTarget,
    http: aiohttp.ClientSession,
) -> None:
    """Published by a plain AMQP client, as anyone may: each lands in S.dlq once with its reason;
    none reaches the microservice, none is retried, the partition goes on serving."""
    stack = stacks(node.nodes[0].amqp_url())
    dequeuer = await stack.dequeuer(service, timed_target.url, "--partitions", "2")
    _, url = await stack.enqueuer()
    connection = await aio_pika.connect(node.nodes[0].amqp_url())
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(service)
        for name, (headers, _) in MALFORMED.items():
            await exchange.publish(
                aio_pika.Message(b"body", headers=headers, correlation_id=name),  # type: ignore[arg-type]
                routing_key=name,
            )
        await exchange.publish(aio_pika.Message(b"no id"), routing_key="no correlation id")
        dlq = await channel.declare_queue(topology.dead_letter_queue(service), passive=True)
        reasons: dict[str, str] = {}
        async with asyncio.timeout(20):
            while len(reasons) < len(MALFORMED) + 1:
                dead = await dlq.get(fail=False)
                if dead is None:
                    await asyncio.sleep(0.1)
                    continue
                await dead.ack()
                reasons[dead.correlation_id or "-"] = str(dead.headers[envelope.H_DEAD_REASON])
        await asyncio.sleep(1)
        assert await dlq.get(fail=False) is None, "a malformed message was dead-lettered twice"
    finally:
        await connection.close()
    for name, (_, reason) in MALFORMED.items():
        assert reason in reasons[name], (name, reasons[name])
    assert "correlation_id" in reasons["-"]
    assert timed_target.seen == []
    port = dequeuer.admin_port  # type: ignore[attr-defined]
    counted = await metric(http, port, "proxymq_dequeuer_messages_total", {"outcome": "malformed"})
    assert counted == len(MALFORMED) + 1
    async with http.get(
        f"{url}/{service}/echo/fine", headers={"X-Request-Timeout": "10"}
    ) as response:
        assert response.status == 200
