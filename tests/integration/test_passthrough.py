"""Through the pair, a call looks like a direct call: method, raw path and query, headers, body
bytes, status, multi-value headers, redirects passed back, hop-by-hop headers dropped."""

from __future__ import annotations

import asyncio
import base64
import gzip
import http.server
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dequeuer.forwarder import MAX_ANSWER_HEADERS
from shared import envelope
from tests.conftest import Stack, foreign_replier, reply_headers
from tests.target import Target

pytestmark = pytest.mark.rabbit


@pytest.fixture
async def pair(stack: Stack, service: str, target: Target) -> str:
    await stack.dequeuer(service, target.url)
    _, url = await stack.enqueuer()
    return f"{url}/{service}"


async def test_request_arrives_unchanged(
    pair: str, target: Target, http: aiohttp.ClientSession
) -> None:
    body = bytes(range(256)) * 4
    async with http.post(
        f"{pair}/echo/a%20b/%C3%A9?b=2&a=1&a=%20x&empty=",
        data=body,
        headers={
            "Content-Type": "application/octet-stream",
            "X-Custom": "yes",
            "X-Partition-Key": "user-1",
        },
    ) as response:
        assert response.status == 200
        echoed = await response.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo/a%20b/%C3%A9"
    assert echoed["query"] == "b=2&a=1&a=%20x&empty="
    assert base64.b64decode(echoed["body"]) == body
    headers = dict(echoed["headers"])
    assert headers["X-Custom"] == "yes"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["X-Partition-Key"] == "user-1"
    assert headers["X-Correlation-ID"] == response.headers["X-Correlation-ID"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_methods(pair: str, target: Target, http: aiohttp.ClientSession, method: str) -> None:
    async with http.request(
        method, f"{pair}/echo/m", data=b"x" if method != "GET" else None
    ) as response:
        assert response.status == 200
        assert (await response.json())["method"] == method


async def test_head_has_no_body(pair: str, target: Target, http: aiohttp.ClientSession) -> None:
    async with http.head(f"{pair}/echo/h") as response:
        assert response.status == 200
        assert await response.read() == b""
    assert target.seen[-1].method == "HEAD"


async def test_head_keeps_the_content_length(
    pair: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A HEAD answers with the size a GET would have, as the microservice said it."""
    async with http.head(f"{target.url}/bytes/100000") as direct:
        assert direct.headers["Content-Length"] == "100000"
    async with http.head(f"{pair}/bytes/100000") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "100000"
        assert await response.read() == b""
    async with http.get(f"{pair}/bytes/10") as response:
        assert response.headers["Content-Length"] == "10"
        assert await response.read() == b"x" * 10


async def test_a_304_keeps_the_content_length(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A 304 may say the size of the representation it stands for (RFC 9110 8.6); it came back
    without it. A 204's is still left out: it must have none."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}")
    _, url = await stack.enqueuer()
    target.raw_response = (
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n'
        b"Connection: close\r\n\r\n"
    )
    for method in ("GET", "HEAD"):
        async with http.request(method, f"{url}/{service}/page") as response:
            assert response.status == 304
            assert response.headers["ETag"] == '"v1"'
            assert response.headers.getall("Content-Length") == ["1234"]
            assert await response.read() == b""
    target.raw_response = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
    async with http.get(f"{url}/{service}/page") as response:
        assert response.status == 204
        assert "Content-Length" not in response.headers


async def test_a_replys_content_length_counts_for_head_only(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    """A reply from any AMQP client cannot break the caller's HTTP framing: its Content-Length
    is the body's, whatever the reply's headers claim, except in answer to a HEAD."""
    answer = reply_headers(200, [("Content-Length", "999"), ("X-Replier", "foreign")])
    channel = await foreign_replier(amqp, service, answer, b"ok")
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/x") as response:
        assert response.headers["X-Replier"] == "foreign"
        assert response.headers["Content-Length"] == "2"
        assert await response.read() == b"ok"
    async with http.head(f"{url}/{service}/x") as response:
        assert response.headers["Content-Length"] == "999"
    await channel.close()


async def test_a_foreign_replys_hop_by_hop_headers_are_dropped(
    stack: Stack, service: str, http: aiohttp.ClientSession, amqp: AbstractRobustConnection
) -> None:
    """`Transfer-Encoding` beside the length the enqueuer sets made the caller's client refuse
    the answer (400 "Content-Length can't be present with Transfer-Encoding")."""
    hops = [("Transfer-Encoding", "chunked"), ("Connection", "close, X-Hop"), ("X-Hop", "1")]
    answer = reply_headers(200, [*hops, ("X-Replier", "foreign")])
    channel = await foreign_replier(amqp, service, answer, b"ok")
    _, url = await stack.enqueuer()
    for _ in range(2):  # the caller's connection stays usable
        async with http.get(f"{url}/{service}/x") as response:
            assert response.status == 200
            assert await response.read() == b"ok"
            assert response.headers["X-Replier"] == "foreign"
            assert not {"Transfer-Encoding", "Connection", "X-Hop"} & set(response.headers)
    await channel.close()


async def test_hop_by_hop_headers_are_not_carried(
    pair: str, target: Target, http: aiohttp.ClientSession
) -> None:
    async with http.get(
        f"{pair}/echo/hop",
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "X-End": "kept",
        },
    ) as response:
        seen = {name.lower() for name, _ in (await response.json())["headers"]}
    assert "x-end" in seen
    assert not seen & {"x-hop", "keep-alive", "te"}


@pytest.mark.parametrize("code", [201, 204, 400, 404, 418, 500])
async def test_status_passes_through(
    pair: str, target: Target, http: aiohttp.ClientSession, code: int
) -> None:
    """Any answer that is not retryable, a 500 included, is the caller's answer as it is."""
    async with http.get(f"{pair}/status/{code}") as response:
        assert response.status == code
        assert "X-ProxyMQ-Error" not in response.headers
        if code != 204:
            assert await response.text() == f"status {code}"


async def test_a_500_is_not_retried(pair: str, target: Target, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{pair}/status/500") as response:
        assert response.status == 500
    assert sum(1 for s in target.seen if s.path == "/status/500") == 1


async def test_multi_value_headers_and_cookies(
    pair: str, target: Target, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{pair}/cookies") as response:
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert response.headers.getall("X-Multi") == ["one", "two"]
        assert response.headers["X-Custom"] == "1"
        assert await response.text() == "cookies"


async def test_cookies_of_one_caller_never_reach_another(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The dequeuer keeps no cookie jar: a `Set-Cookie` the microservice sent one caller must not
    come back on the next caller's request. The target is a host name (`localhost`), where a
    client's default jar keeps cookies (it refuses them for IP addresses)."""
    await stack.dequeuer(service, f"http://localhost:{target.port}")
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/cookies") as response:
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    async with http.get(f"{url}/{service}/echo/next") as response:
        assert response.status == 200
    [seen] = [s for s in target.seen if s.path == "/echo/next"]
    assert [v for n, v in seen.headers if n.lower() == "cookie"] == []


async def test_redirect_is_passed_back_not_followed(
    pair: str, target: Target, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{pair}/redirect", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/echo/after-redirect"
    assert [s.path for s in target.seen] == ["/redirect"]


async def test_compressed_body_is_not_decoded(
    pair: str, target: Target, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{pair}/gzip") as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await response.read()) == b"hello " * 100


async def test_response_without_content_type_stays_without(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    target.raw_response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Raw: 1\r\n\r\nhello"
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}")
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/anything") as response:
        assert response.status == 200
        assert await response.read() == b"hello"
        assert response.headers["X-Raw"] == "1"
        assert "Content-Type" not in response.headers
        assert "X-Correlation-ID" in response.headers


async def test_an_answer_after_early_hints_is_the_callers(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A microservice may send a `103 Early Hints` before its answer. The dequeuer watched the
    103's head as the answer's: a HEAD's answer after it was cut off (the call failed, and after
    its retries the caller got 502), and a 204's stray body was read as the next answer."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}", "--max-attempts", "1")
    _, url = await stack.enqueuer()
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    target.raw_response = hints + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Raw: 1\r\n\r\nhello"
    for method, body in (("GET", b"hello"), ("HEAD", b"")):
        async with http.request(method, f"{url}/{service}/page") as response:
            assert response.status == 200
            assert response.headers["X-Raw"] == "1"
            assert response.headers["Content-Length"] == "5"
            assert await response.read() == body
    target.raw_response = hints + b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"
    async with http.get(f"{url}/{service}/none") as response:
        assert response.status == 204
        assert await response.read() == b""


async def test_correlation_id_on_every_answer(pair: str, http: aiohttp.ClientSession) -> None:
    ids = set()
    for path in ("echo/1", "status/404", "status/500"):
        async with http.get(f"{pair}/{path}") as response:
            ids.add(response.headers["X-Correlation-ID"])
    assert len(ids) == 3


async def test_expect_100_continue_is_answered_by_the_enqueuer(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The enqueuer reads the whole body before publishing, so `Expect: 100-continue` ends
    there. Carried on, the dequeuer's client held the body back for a `100 Continue` that the
    microservice (like many servers) never sends, and the call ran into its deadline."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}")
    _, url = await stack.enqueuer()
    body = b"x" * 5000
    async with http.post(
        f"{url}/{service}/upload", data=body, expect100=True, headers={"X-Request-Timeout": "5"}
    ) as response:
        assert response.status == 200
        assert await response.read() == b"ok"
    [(head, received)] = [seen for seen in target.raw_seen if b"/upload" in seen[0]]
    assert b"expect" not in head.lower()
    assert received == body


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzip.compress(b"hello " * 100)),
        ("deflate", b"\x78\x9c" + b"not really deflate"),
        ("br", b"plain"),
        ("zstd", b"\x28\xb5\x2f\xfd anything"),
    ],
    ids=["gzip", "deflate", "br", "zstd"],
)
async def test_a_compressed_request_body_arrives_as_sent(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    encoding: str,
    body: bytes,
) -> None:
    """`Content-Encoding` is the microservice's business: the body reaches it as the caller
    sent it. The enqueuer's server used to decompress it, so a gzip body arrived inflated but
    still labelled gzip, a short `br` body arrived empty, a broken one got a plain 500, `zstd`
    a plain 400, and --max-body was held against the inflated size."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}")
    _, url = await stack.enqueuer("--max-body", "1KiB")
    bomb = gzip.compress(bytes(3_000_000))  # 2.9 KB that inflate to 3 MB
    headers = {"Content-Encoding": encoding, "Content-Type": "text/plain"}
    async with http.post(f"{url}/{service}/up", data=body, headers=headers) as response:
        assert response.status == 200, await response.text()
    [(head, received)] = [seen for seen in target.raw_seen if b"/up " in seen[0]]
    assert received == body
    assert f"content-encoding: {encoding}".encode() in head.lower()
    async with http.post(f"{url}/{service}/up", data=bomb, headers=headers) as response:
        assert response.headers["X-ProxyMQ-Error"] == "body_too_large"
        message = (await response.json())["error"]["message"]
    assert message == f"the body is {len(bomb)} bytes; at most 1024 are allowed"


async def test_more_headers_than_aiohttp_takes_by_default(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """`--max-headers` above aiohttp's 128 is the limit that holds: 150 headers pass, more
    get 431 from the guard (up to twice as many; past that, the parser's 400 bad_request). aiohttp's
    parser refused anything over 128 with a plain 400."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}")
    _, url = await stack.enqueuer("--max-headers", "200")
    many = {f"X-H{i}": "v" for i in range(150)}
    async with http.get(f"{url}/{service}/many", headers=many) as response:
        assert response.status == 200
    [(head, _)] = [seen for seen in target.raw_seen if b"/many " in seen[0]]
    assert b"\r\nX-H149: v\r\n" in head
    more = {f"X-H{i}": "v" for i in range(250)}
    async with http.get(f"{url}/{service}/more", headers=more) as response:
        assert response.headers["X-ProxyMQ-Error"] == "headers_too_large"


def raw_header_names(head: bytes) -> list[bytes]:
    return [line.split(b":")[0].lower() for line in head.split(b"\r\n")[1:] if b":" in line]


async def test_a_foreign_requests_hop_by_hop_headers_are_not_sent(
    stack: Stack, service: str, target: Target, amqp: AbstractRobustConnection
) -> None:
    """A request published by any AMQP client cannot break the framing of the dequeuer's
    keep-alive connections: the length is the body's, whatever its headers claim."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}")
    channel = await amqp.channel()
    replies = await channel.declare_queue(exclusive=True)
    headers = [
        ["Content-Length", "999"],
        ["Transfer-Encoding", "chunked"],
        ["Expect", "100-continue"],
        ["Connection", "X-Hop"],
        ["X-Hop", "1"],
        ["X-Kept", "yes"],
    ]
    exchange = await channel.get_exchange(service)
    await exchange.publish(
        aio_pika.Message(
            b"hi",
            correlation_id="foreign-1",
            reply_to=replies.name,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={envelope.H_PATH: "/foreign", envelope.H_HEADERS: json.dumps(headers)},
        ),
        routing_key="k",
    )
    for _ in range(100):
        if (reply := await replies.get(fail=False)) is not None:
            break
        await asyncio.sleep(0.1)
    assert reply is not None, "no reply within 10 s"
    assert envelope.decode_response(reply.headers, reply.body).status == 200
    [(head, body)] = [seen for seen in target.raw_seen if b"/foreign" in seen[0]]
    assert raw_header_names(head).count(b"content-length") == 1
    assert b"content-length: 2" in head.lower()
    assert not {b"transfer-encoding", b"expect", b"x-hop"} & set(raw_header_names(head))
    assert b"x-kept: yes" in head.lower()
    assert body == b"hi"
    await channel.close()


async def test_a_request_target_in_absolute_form(
    pair: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """`GET http://host/svc/path` (what a client sends to a server it takes for its proxy)
    counts by its path, as RFC 9112 asks of a server; it was a 404 for a service `http:`."""
    host, port = pair.removeprefix("http://").split("/")[0].split(":")
    service = pair.rsplit("/", 1)[1]
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET http://api.example/{service}/echo/abs%20x?q=1 HTTP/1.1\r\n"
        "Host: api.example\r\nConnection: close\r\n\r\n".encode()
    )
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    [seen] = [s for s in target.seen if s.path.startswith("/echo/abs")]
    assert (seen.path, seen.query) == ("/echo/abs%20x", "q=1")


async def test_the_microservice_is_told_its_calls_budget(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """`X-Request-Timeout` tells the microservice how long this call may take: the caller's
    time left cut to --call-timeout. It said the caller's time even where --call-timeout cut
    the call sooner, and nothing at all for a request without a deadline."""
    await stack.dequeuer(service, target.url, "--call-timeout", "2")
    _, url = await stack.enqueuer()
    async with http.get(f"{url}/{service}/echo/a", headers={"X-Request-Timeout": "10"}) as r:
        assert r.status == 200
    async with http.get(f"{url}/{service}/echo/b", headers={"X-Request-Timeout": "1"}) as r:
        assert r.status == 200
    async with http.get(f"{url}/{service}/echo/c", headers={"Prefer": "respond-async"}) as r:
        assert r.status == 202
    async with asyncio.timeout(10):
        while len(target.seen) < 3:
            await asyncio.sleep(0.05)
    budgets = {s.path: float(dict(s.headers)["X-Request-Timeout"]) for s in target.seen}
    assert budgets["/echo/a"] == 2.0 and budgets["/echo/c"] == 2.0
    assert 0.5 < budgets["/echo/b"] < 1.0


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


async def raw_call(
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    *,
    chunked: bool = False,
) -> Answer:
    """One HTTP/1.1 exchange written byte for byte, the target exactly as in `url`: aiohttp's
    client would merge a name spelled two ways itself. The connection closes after the
    answer, so its body ends there."""
    address, _, path = url.removeprefix("http://").partition("/")
    host, port = address.split(":")
    lines = [f"{method} /{path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:7], body[7:]) if c)
        body += b"0\r\n\r\n"
    elif body:
        lines.append(f"Content-Length: {len(body)}")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
    async with asyncio.timeout(20):
        data = await reader.read()
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode().split("\r\n")
    pairs = [(name, value.strip()) for name, _, value in (f.partition(":") for f in fields)]
    if rest and values(pairs, "Transfer-Encoding"):
        content = b""
        while (size := int(rest.split(b"\r\n", 1)[0], 16)) > 0:
            chunk = rest.split(b"\r\n", 1)[1]
            content, rest = content + chunk[:size], chunk[size + 2 :]
        rest = content
    return Answer(int(status_line.split()[1]), pairs, rest)


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name.lower()]


async def test_a_hash_in_the_request_target_reaches_the_microservice(
    pair: str, target: Target
) -> None:
    """A `#` in a request target (no fragment there: a target has none, but the parsers on
    both ends take it) reaches the microservice as a direct call sends it. The dequeuer's
    client took it for the start of a fragment: `/a#b?c=1` arrived as `/a`, its query lost."""
    for sent in ("/echo/a#b?c=1", "/echo/x?c=1#d&e=%23"):
        target.seen.clear()
        direct = await raw_call("GET", target.url + sent, [])
        via = await raw_call("GET", pair + sent, [])
        assert (via.status, direct.status) == (200, 200)
        [there, here] = target.seen
        assert (here.path, here.query) == (there.path, there.query)


async def test_a_name_repeated_in_another_case_keeps_every_value(pair: str, target: Target) -> None:
    """Header names are case-insensitive: `X-Tag: a`, `x-tag: b`, `X-TAG: c` are three values
    of one header. aiohttp's client kept only the last of a name spelled two ways, so the
    microservice saw `X-TAG: c` alone."""
    sent = [("X-Tag", "a"), ("x-tag", "b"), ("X-TAG", "c"), ("x-tag", "d")]
    answer = await raw_call("GET", f"{pair}/echo/tag", sent)
    assert answer.status == 200
    [seen] = target.seen
    assert values(seen.headers, "x-tag") == ["a", "b", "c", "d"]


async def test_an_answer_with_many_headers_passes(
    stack: Stack, service: str, target: Target
) -> None:
    """An answer may carry more than 128 headers (here 150 cookies cleared at logout), up to
    1,024. The dequeuer's client refused more than 128 as no
    HTTP: the request was dead-lettered and its caller got 502 `service_failed`."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}")
    _, url = await stack.enqueuer()
    cookies = "".join(f"Set-Cookie: c{i}=; Max-Age=0\r\n" for i in range(150))
    target.raw_response = f"HTTP/1.1 200 OK\r\n{cookies}Content-Length: 3\r\n\r\nbye".encode()
    answer = await raw_call("GET", f"{url}/{service}/logout", [])
    assert (answer.status, answer.body) == (200, b"bye")
    assert values(answer.headers, "Set-Cookie") == [f"c{i}=; Max-Age=0" for i in range(150)]
    many = "".join(f"X-H{i}: v\r\n" for i in range(MAX_ANSWER_HEADERS + 1))
    target.raw_response = f"HTTP/1.1 200 OK\r\n{many}Content-Length: 0\r\n\r\n".encode()
    refused = await raw_call("GET", f"{url}/{service}/too-many", [])
    assert refused.status == 502  # the bound that keeps a broken answer's memory in check


# The differential check: the same request sent to the microservice directly and through the
# pair; what the microservice saw and what the caller got must be the same, but for what the
# contract allows to differ.
DIFFERENTIAL = settings(
    max_examples=40,
    deadline=None,  # two busy cores: time is no property here
    database=None,  # nothing written into the work tree
    derandomize=True,  # the same examples in every run
    suppress_health_check=list(HealthCheck),
)
# Recomputed or dropped on the way (hop-by-hop, lengths, Host), or added by the dequeuer.
NOT_COMPARED_IN = {"host", "connection", "content-length", "transfer-encoding"} | {
    n.lower() for n in ("X-Correlation-ID", "X-ProxyMQ-Attempt", "X-Request-Timeout")
}
NOT_COMPARED_OUT = {"connection", "content-length", "transfer-encoding", "x-correlation-id"}
METHODS = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "POST", "PURGE", "M-SEARCH", "QUERY"]
SEGMENTS = ["a", "", ".", "..", "%2F", "%20", "a%2Fb", "%C3%A9", ";p=1", "x;y=2", "a+b", "%25", "~"]
QUERY_PARTS = ["a=1", "a=2", "a", "b=", "c=x+y", "c=x%20y", "d=%26%3D", "e=%E2%98%83", "", "f=a/b?"]
VALUES = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
    | st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zl", "Zp"]))
).map(str.strip)  # a parser drops the whitespace around a value
IN_NAMES = ["X-Tag", "x-tag", "X-TAG", "X-Odd_Name", "Accept", "accept", "Cookie", "X-Empty"]
OUT_NAMES = ["Set-Cookie", "set-cookie", "WWW-Authenticate", "Vary", "Cache-Control", "Link"]
OUT_SINGLE = ["Content-Type", "Content-Encoding", "Location", "ETag", "Date", "Server"]


def comparable(headers: list[tuple[str, str]], ignored: set[str]) -> list[tuple[str, str]]:
    """Header names are case-insensitive; their order and repeats count."""
    return [(n.lower(), v) for n, v in headers if n.lower() not in ignored]


def run_property(check: Callable[[], None]) -> Awaitable[None]:
    """Hypothesis drives the examples from a thread, the checks run on the test's loop (where
    the target answers)."""
    return asyncio.to_thread(check)


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]], bytes, bool]:
    method = draw(st.sampled_from(METHODS))
    path = "/" + "/".join(draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5)))
    query = "&".join(draw(st.lists(st.sampled_from(QUERY_PARTS), max_size=4)))
    headers = draw(st.lists(st.tuples(st.sampled_from(IN_NAMES), VALUES), max_size=8))
    if draw(st.booleans()):
        headers.append(("Content-Type", draw(st.sampled_from(["text/plain; charset=latin-1", ""]))))
    body = draw(st.binary(max_size=300)) if method not in ("GET", "HEAD") else b""
    return method, path + (f"?{query}" if query else ""), headers, body, draw(st.booleans())


async def test_a_request_reaches_the_microservice_as_a_direct_call_does(
    pair: str, target: Target
) -> None:
    """Method, raw path and query, header names (any case), values, repeats and their order,
    body bytes (chunked by the caller or not, with NULs, up to --max-body): the microservice
    sees the same as when called directly."""
    loop = asyncio.get_running_loop()

    async def compare(
        method: str, path: str, headers: list[tuple[str, str]], body: bytes, chunked: bool
    ) -> None:
        target.seen.clear()
        direct = await raw_call(method, target.url + path, headers, body, chunked=chunked)
        via = await raw_call(method, pair + path, headers, body, chunked=chunked)
        assert (via.status, direct.status) == (200, 200), via.body[:300]
        [there, here] = target.seen
        assert (here.method, here.path, here.query) == (there.method, there.path, there.query)
        assert here.body == there.body == body
        assert comparable(here.headers, NOT_COMPARED_IN) == comparable(
            there.headers, NOT_COMPARED_IN
        )

    @DIFFERENTIAL
    @given(request=http_requests())
    @example(request=("PUT", "/a/%2F/../b;p//", [("X-Tag", "a"), ("x-tag", "")], b"\0" * 9, True))
    @example(request=("POST", "/big", [], bytes(range(256)) * 4096, False))  # --max-body
    @example(request=("PATCH", "/long", [("X-Long", "v" * 8000)], b"", False))
    def same(request: tuple[str, str, list[tuple[str, str]], bytes, bool]) -> None:
        asyncio.run_coroutine_threadsafe(compare(*request), loop).result(timeout=60)

    await run_property(same)


@st.composite
def http_answers(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
    """A method and the raw answer the microservice gives it, and the body a caller gets."""
    method = draw(st.sampled_from(["GET", "HEAD"]))
    status = draw(st.integers(200, 599).filter(lambda s: s not in (502, 503, 504)))
    headers = draw(st.lists(st.tuples(st.sampled_from(OUT_NAMES), VALUES), max_size=6))
    for name in draw(st.lists(st.sampled_from(OUT_SINGLE), unique=True)):
        headers.append((name, draw(VALUES)))
    body = draw(st.binary(max_size=2000))
    if draw(st.booleans()):
        body = gzip.compress(body, mtime=0)
        headers.append(("Content-Encoding", "gzip"))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if status in (204, 304):
        body, framing = b"", "none"
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
    sent = wire = body if method == "GET" else b""  # a HEAD's answer has no body
    if framing == "chunked" and method == "GET":
        wire = (b"%x\r\n%s\r\n" % (len(sent), sent) if sent else b"") + b"0\r\n\r\n"
    head = [f"HTTP/1.1 {status} Whatever", *(f"{n}: {v}" for n, v in headers), "Connection: close"]
    return method, "\r\n".join(head).encode() + b"\r\n\r\n" + wire, sent


ANSWER_401 = (
    b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=x\r\n"
    b'www-authenticate: Bearer error="invalid_token"\r\nContent-Length: 0\r\n'
    b"Connection: close\r\n\r\n"
)
ANSWER_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 99999\r\n"
    b"Date: Tue, 15 Nov 1994 08:12:31 GMT\r\nServer: theirs\r\nConnection: close\r\n\r\n"
)


async def test_an_answer_reaches_the_caller_as_a_direct_call_gets_it(
    stack: Stack, service: str, target: Target
) -> None:
    """Every status from 200 to 599 but the retried 502-504, end-to-end headers (any case,
    repeats and their order, empty values, Date and Server the microservice's or none),
    bodies as bytes (gzip untouched), whatever the framing; a HEAD's Content-Length."""
    await stack.dequeuer(service, f"http://127.0.0.1:{target.raw_port}")
    _, url = await stack.enqueuer()
    loop = asyncio.get_running_loop()

    async def compare(method: str, raw: bytes, body: bytes) -> None:
        target.raw_response = raw
        direct = await raw_call(method, f"http://127.0.0.1:{target.raw_port}/x", [])
        via = await raw_call(method, f"{url}/{service}/x", [])
        assert via.status == direct.status, via.body[:300]
        assert via.body == direct.body == body
        assert comparable(via.headers, NOT_COMPARED_OUT) == comparable(
            direct.headers, NOT_COMPARED_OUT
        )
        if method == "HEAD":
            assert values(via.headers, "Content-Length") == values(direct.headers, "Content-Length")
        elif via.status not in (204, 304):
            assert values(via.headers, "Content-Length") == [str(len(body))]

    @DIFFERENTIAL
    @given(answer=http_answers())
    @example(answer=("GET", ANSWER_401, b""))
    @example(answer=("GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nno type", b"no type"))
    @example(answer=("HEAD", ANSWER_HEAD, b""))
    def same(answer: tuple[str, bytes, bytes]) -> None:
        asyncio.run_coroutine_threadsafe(compare(*answer), loop).result(timeout=60)

    await run_property(same)


class CarelessHandler(http.server.BaseHTTPRequestHandler):
    """Python's http.server answering as many handlers do: `do_HEAD = do_GET`, so a HEAD's
    answer has the GET's body, and `/204` or `/304` send one too (`/late/...`: the body a moment
    after the head, in a TCP segment of its own). Keeps its connections alive."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        status = int(self.path.rsplit("/", 1)[-1] or 200)
        self.send_response(status)
        self.send_header("Content-Length", "5")
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if self.path.startswith("/late/"):
            self.wfile.flush()
            time.sleep(0.3)
        self.wfile.write(b"hello")

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def careless() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CarelessHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("late", ["", "/late"])
async def test_a_body_on_a_bodyless_answer_is_left_out(
    stack: Stack, service: str, careless: str, http: aiohttp.ClientSession, late: str
) -> None:
    """A HEAD, 204 or 304 answered with a body anyway: the status and headers reach the caller,
    without the body; the connection is not used again, so the stray bytes are never read as
    the next call's answer. aiohttp's parser took them for the next answer: 502 and a dead
    letter, or, arriving late, the next call's answer broken."""
    await stack.dequeuer(service, careless, "--concurrency", "1")
    _, url = await stack.enqueuer()
    for method, path, status in [("HEAD", "/200", 200), ("GET", "/204", 204), ("GET", "/304", 304)]:
        async with http.request(method, f"{url}/{service}{late}{path}") as response:
            assert response.status == status, await response.text()
            assert response.headers["ETag"] == '"v1"'
            assert await response.read() == b""
        async with http.get(f"{url}/{service}{late}/200") as response:
            assert response.status == 200, await response.text()
            assert await response.read() == b"hello"


@pytest.mark.parametrize("deadline", ["expiration", "x-proxymq-deadline"])
async def test_a_request_with_only_the_documented_properties_is_answered(
    stack: Stack, service: str, target: Target, amqp: AbstractRobustConnection, deadline: str
) -> None:
    """The contract's list, and nothing of ProxyMQ's own: exchange `S`, the key as routing key,
    `correlation_id`, `message_id`, `reply_to`, `expiration` or the deadline header,
    `delivery_mode=2`, and headers for method, path, query and HTTP headers. The microservice
    gets the request as sent; the reply carries status and headers in AMQP headers and the
    answer's body as its body."""
    await stack.dequeuer(service, target.url, "--partitions", "2")
    channel = await amqp.channel(publisher_confirms=True)
    replies = await channel.declare_queue(exclusive=True)
    ends = {"expiration": 20} if deadline == "expiration" else {}
    headers: dict[str, object] = {
        "x-proxymq-method": "PUT",
        "x-proxymq-path": "/echo/items/%C3%A9",
        "x-proxymq-query": "a=1&a=2",
        "x-proxymq-headers": json.dumps([["Content-Type", "text/plain"], ["X-Tag", "a"]]),
    }
    if deadline == "x-proxymq-deadline":
        headers[deadline] = int((time.time() + 20) * 1000)
    exchange = await channel.get_exchange(service)
    await exchange.publish(
        aio_pika.Message(
            b"\x00payload\xff",
            correlation_id="from-another-client",
            message_id="from-another-client",
            reply_to=replies.name,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers,  # type: ignore[arg-type]
            **ends,  # type: ignore[arg-type]
        ),
        routing_key="key-1",
        mandatory=True,
    )
    async with asyncio.timeout(15):
        async with replies.iterator() as answers:
            reply = await anext(answers)
    [seen] = target.seen
    assert (seen.method, seen.path, seen.query) == ("PUT", "/echo/items/%C3%A9", "a=1&a=2")
    assert seen.body == b"\x00payload\xff"
    sent = dict(seen.headers)
    assert (sent["X-Tag"], sent["Content-Type"]) == ("a", "text/plain")
    assert sent["X-Correlation-ID"] == "from-another-client"
    assert 0 < float(sent["X-Request-Timeout"]) <= 20
    assert reply.correlation_id == "from-another-client"
    assert reply.headers["x-proxymq-status"] == 200
    answered = dict(json.loads(str(reply.headers["x-proxymq-headers"])))
    assert answered["Content-Type"].startswith("application/json")
    echoed = json.loads(reply.body)
    assert (echoed["method"], echoed["query"]) == ("PUT", "a=1&a=2")
    assert base64.b64decode(echoed["body"]) == b"\x00payload\xff"
    assert "x-proxymq-error" not in reply.headers
    await channel.close()
