"""HTTP <-> AMQP message encoding: what a dequeuer, an enqueuer or any AMQP client relies on."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import pytest
from pamqp import decode, encode

from shared.envelope import (
    H_DEADLINE,
    H_HEADERS,
    H_KEY,
    H_METHOD,
    H_PATH,
    H_QUERY,
    H_STATUS,
    H_VERSION,
    HttpRequest,
    HttpResponse,
    MalformedMessage,
    RequestEnvelope,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    end_to_end,
)

BODY = bytes(range(256))
HEADERS = (
    ("Content-Type", "application/octet-stream"),
    ("X-Multi", "first"),
    ("Accept", "*/*"),
    ("x-multi", "second"),
    ("X-Multi", "third, with comma"),
)


def wire(headers: Mapping[str, object] | None) -> dict[str, object]:
    """The headers as a consumer gets them: encoded to an AMQP field table and back."""
    _, table = decode.field_table(encode.field_table(dict(headers or {})))  # type: ignore[arg-type]
    return dict(table)


def make_envelope(**changes: object) -> RequestEnvelope:
    fields: dict[str, object] = {
        "request_id": "req-1",
        "service": "orders",
        "request": HttpRequest("PATCH", "/a%20b/c%2Fd", "x=1&y=%20&x=2", HEADERS, BODY),
        "partition_key": "customer-42",
        "deadline": 1_700_000_000.123,
        "reply_to": "proxymq.replies.e1",
    }
    fields.update(changes)
    return RequestEnvelope(**fields)  # type: ignore[arg-type]


def round_trip(envelope: RequestEnvelope) -> RequestEnvelope:
    message = encode_request(envelope)
    return decode_request(
        wire(message.headers), message.body, message.properties.correlation_id, "reply-q"
    )


def test_request_round_trip() -> None:
    original = make_envelope()
    message = encode_request(original)
    decoded = decode_request(
        wire(message.headers),
        message.body,
        message.properties.correlation_id,
        message.properties.reply_to,
    )
    assert decoded.request == original.request
    assert decoded.request.body == BODY
    assert decoded.request.headers == HEADERS
    assert decoded.request_id == "req-1"
    assert decoded.service == "orders"
    assert decoded.partition_key == "customer-42"
    assert decoded.reply_to == "proxymq.replies.e1"
    assert decoded.deadline == 1_700_000_000.123
    assert decoded.sent_at is not None


def test_request_message_properties() -> None:
    message = encode_request(make_envelope())
    assert message.properties.delivery_mode == 2
    assert message.properties.correlation_id == "req-1"
    assert message.properties.message_id == "req-1"
    assert message.properties.reply_to == "proxymq.replies.e1"
    assert message.body == BODY
    assert message.headers[H_VERSION] == 1


@pytest.mark.parametrize("deadline", [1_700_000_000.001, 1_700_000_000.999, 1_800_000_123.5])
def test_deadline_keeps_milliseconds(deadline: float) -> None:
    decoded = round_trip(make_envelope(deadline=deadline))
    assert decoded.deadline == pytest.approx(deadline, abs=0.001)
    assert decoded.deadline is not None
    assert round(decoded.deadline * 1000) == round(deadline * 1000)


def test_no_key_and_no_deadline_stay_absent() -> None:
    message = encode_request(make_envelope(partition_key=None, deadline=None, reply_to=None))
    assert H_KEY not in message.headers
    assert H_DEADLINE not in message.headers
    decoded = decode_request(wire(message.headers), message.body, "req-1", None)
    assert decoded.partition_key is None
    assert decoded.deadline is None
    assert decoded.remaining() is None
    assert decoded.reply_to is None


def test_remaining() -> None:
    envelope = make_envelope(deadline=1000.0)
    assert envelope.remaining(now=990.0) == 10.0
    assert envelope.remaining(now=1001.0) == -1.0


@pytest.mark.parametrize(
    ("path", "query"),
    [("/", ""), ("/a/b/", "q"), ("/%E2%82%AC?/x", "a=%26&b"), ("/x+y", "a+b=c%2Bd")],
)
def test_raw_path_and_query_unchanged(path: str, query: str) -> None:
    request = HttpRequest("GET", path, query, (), b"")
    decoded = round_trip(make_envelope(request=request))
    assert (decoded.request.path, decoded.request.query) == (path, query)


def test_minimal_message_from_another_client() -> None:
    """A plain AMQP publisher may leave out everything but the correlation id."""
    decoded = decode_request({}, b"{}", "abc", "amq.rabbitmq.reply-to")
    assert decoded.request == HttpRequest("POST", "/", "", (), b"{}")
    assert decoded.partition_key is None
    assert decoded.deadline is None


def test_an_expiration_is_the_deadline_when_there_is_no_deadline_header() -> None:
    """The contract's `expiration` (seconds here, as aio-pika reads it) counts from
    `x-proxymq-sent-at` when sent, else from now; `x-proxymq-deadline` wins over it."""
    sent = {"x-proxymq-sent-at": 1_700_000_000_000}
    assert decode_request(sent, b"", "a", None, expiration=2.5).deadline == 1_700_000_002.5
    before = time.time()
    deadline = decode_request({}, b"", "a", None, expiration=2.5).deadline
    assert deadline is not None and before + 2.5 <= deadline <= time.time() + 2.5
    exact = {"x-proxymq-deadline": 1_800_000_000_000}
    assert decode_request(exact, b"", "a", None, expiration=2.5).deadline == 1_800_000_000
    assert decode_request({}, b"", "a", None, expiration=None).deadline is None


def test_a_key_or_sent_at_of_another_type_is_ignored() -> None:
    """As docs/message-format.md says: the routing key is then the key."""
    headers = {"x-proxymq-partition-key": 5, "x-proxymq-sent-at": "x"}
    decoded = decode_request(headers, b"", "abc", None, "user-5")
    assert (decoded.partition_key, decoded.sent_at) == ("user-5", None)


def test_bytes_header_values_are_decoded() -> None:
    headers = {H_METHOD: b"GET", H_PATH: b"/x", H_KEY: b"k", H_HEADERS: b'[["A", "b"]]'}
    decoded = decode_request(headers, b"", "abc", None)
    assert decoded.request.method == "GET"
    assert decoded.request.path == "/x"
    assert decoded.partition_key == "k"
    assert decoded.request.headers == (("A", "b"),)


def test_response_round_trip() -> None:
    response = HttpResponse(
        201, (("Set-Cookie", "a=1"), ("Location", "/x"), ("Set-Cookie", "b=2")), BODY
    )
    message = encode_response(response, "req-1")
    assert message.properties.correlation_id == "req-1"
    assert decode_response(wire(message.headers), message.body) == response


def test_response_round_trip_with_error_code() -> None:
    response = HttpResponse(
        502, (), b"", error="service_failed", error_message="3 attempts: connect refused"
    )
    message = encode_response(response, "req-1")
    decoded = decode_response(wire(message.headers), message.body)
    assert decoded == response
    assert decoded.error == "service_failed"
    assert decoded.error_message == "3 attempts: connect refused"


def test_end_to_end_drops_hop_by_hop() -> None:
    headers = [
        ("Connection", "keep-alive, X-Private"),
        ("connection", "X-OTHER"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Trailer", "X-Sum"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic x"),
        ("Proxy-Connection", "close"),
        ("Host", "example.org"),
        ("Content-Length", "3"),
        ("X-Private", "named by Connection"),
        ("x-other", "named by Connection, other case"),
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Authorization", "Bearer t"),
        ("Set-Cookie", "b=2"),
    ]
    assert end_to_end(headers) == (
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Authorization", "Bearer t"),
        ("Set-Cookie", "b=2"),
    )


def test_end_to_end_keeps_everything_without_hop_by_hop() -> None:
    assert end_to_end(HEADERS) == HEADERS


def good_headers() -> dict[str, object]:
    return wire(encode_request(make_envelope()).headers)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({H_VERSION: 2}, "unsupported x-proxymq-version"),
        ({H_VERSION: "1"}, "unsupported x-proxymq-version"),
        ({H_METHOD: ""}, "is not an HTTP method"),
        ({H_METHOD: "GE T"}, "is not an HTTP method"),
        ({H_METHOD: "GET\r\n"}, "is not an HTTP method"),
        ({H_METHOD: "/"}, "is not an HTTP method"),
        ({H_METHOD: 7}, "x-proxymq-method must be a string"),
        ({H_PATH: "a/b"}, "does not start with '/'"),
        ({H_PATH: ""}, "does not start with '/'"),
        ({H_PATH: "http://evil/"}, "does not start with '/'"),
        ({H_PATH: "/a b"}, "must be visible ASCII"),
        ({H_PATH: "/a\r\nX-Injected: 1"}, "must be visible ASCII"),
        ({H_PATH: "/a\tb"}, "must be visible ASCII"),
        ({H_PATH: "/caf\u00e9"}, "must be visible ASCII"),
        ({H_QUERY: "a=1 HTTP/1.1"}, "must be visible ASCII"),
        ({H_QUERY: "a=\x7f"}, "must be visible ASCII"),
        ({H_METHOD: "CONNECT"}, "CONNECT asks for a tunnel"),
        ({H_HEADERS: "not json"}, "JSON list of [name, value]"),
        ({H_HEADERS: '{"A": "b"}'}, "JSON list of [name, value]"),
        ({H_HEADERS: '[["A"]]'}, "JSON list of [name, value]"),
        ({H_HEADERS: '[["A", "b", "c"]]'}, "JSON list of [name, value]"),
        ({H_HEADERS: '[["A", 1]]'}, "JSON list of [name, value]"),
        ({H_HEADERS: '["A: b"]'}, "JSON list of [name, value]"),
        ({H_HEADERS: 5}, "JSON list of [name, value]"),
        ({H_HEADERS: '[["X-Evil", "a\\r\\nInjected: 1"]]'}, "invalid HTTP header"),
        ({H_HEADERS: '[["X-Evil", "a\\nb"]]'}, "invalid HTTP header"),
        ({H_HEADERS: '[["X-Evil", "a\\u0000b"]]'}, "invalid HTTP header"),
        ({H_HEADERS: '[["Bad Name", "v"]]'}, "invalid HTTP header"),
        ({H_HEADERS: '[["", "v"]]'}, "invalid HTTP header"),
        ({H_DEADLINE: "1700000000000"}, "x-proxymq-deadline must be milliseconds"),
        ({H_DEADLINE: True}, "x-proxymq-deadline must be milliseconds"),
        ({H_DEADLINE: [1]}, "x-proxymq-deadline must be milliseconds"),
    ],
)
def test_decode_request_rejects(changes: dict[str, object], message: str) -> None:
    headers = good_headers()
    headers.update(changes)
    with pytest.raises(MalformedMessage, match=message.replace("[", r"\[")):
        decode_request(headers, b"", "req-1", None)


@pytest.mark.parametrize("correlation_id", [None, ""])
def test_decode_request_needs_correlation_id(correlation_id: str | None) -> None:
    with pytest.raises(MalformedMessage, match="correlation_id"):
        decode_request(good_headers(), b"", correlation_id, "reply-q")


@pytest.mark.parametrize("method", ["VERSION-CONTROL", "M-SEARCH"])
def test_decode_request_accepts_token_methods(method: str) -> None:
    request = HttpRequest(method, "/", "", (), b"")
    assert round_trip(make_envelope(request=request)).request.method == method


def test_decode_request_rejects_non_ascii_method() -> None:
    headers = good_headers()
    headers[H_METHOD] = "GÉT"
    with pytest.raises(MalformedMessage, match="is not an HTTP method"):
        decode_request(headers, b"", "req-1", None)


@pytest.mark.parametrize("status", [None, 99, 100, 101, 103, 199, 600, -1, "200", True, 200.0])
def test_decode_response_rejects_bad_status(status: object) -> None:
    headers: dict[str, object] = {H_HEADERS: "[]"}
    if status is not None:
        headers[H_STATUS] = status
    with pytest.raises(MalformedMessage, match="x-proxymq-status"):
        decode_response(headers, b"")


@pytest.mark.parametrize("status", [200, 204, 302, 599])
def test_decode_response_accepts_status_range(status: int) -> None:
    assert decode_response({H_STATUS: status}, b"").status == status


def test_decode_response_rejects_bad_headers() -> None:
    headers = {H_STATUS: 200, H_HEADERS: json.dumps([["Set-Cookie", "a\r\nb"]])}
    with pytest.raises(MalformedMessage, match="invalid HTTP header"):
        decode_response(headers, b"")
