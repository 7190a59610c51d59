"""The enqueuer's pure request helpers: target split, asynchronous preference, deadline."""

from __future__ import annotations

import math
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from pamqp import encode

from enqueuer import handlers
from enqueuer.handlers import deadline_of, split_target, wait_of, wants_async
from shared.envelope import HttpRequest, HttpResponse, RequestEnvelope, encode_request
from shared.errors import IdempotencyKeyReused, ProxyMQError, ServiceFailed

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/svc/a%20b/c?x=1&y=%20", ("svc", "/a%20b/c", "x=1&y=%20")),
        ("/svc", ("svc", "/", "")),
        ("/svc/", ("svc", "/", "")),
        ("/svc?x=1", ("svc", "/", "x=1")),
        ("/svc/a/?q", ("svc", "/a/", "q")),
        ("/svc/a%2Fb%3F?k=%26&k=2", ("svc", "/a%2Fb%3F", "k=%26&k=2")),
        ("/svc/a?b?c", ("svc", "/a", "b?c")),
        ("/svc/a+b//c", ("svc", "/a+b//c", "")),
        ("/", ("", "/", "")),
        ("/?x=1", ("", "/", "x=1")),
        ("http://localhost:8080/svc/a%20b?x=1", ("svc", "/a%20b", "x=1")),
        ("https://h/svc", ("svc", "/", "")),
        ("http://h?x=1", ("", "/", "x=1")),
        ("http://h", ("", "/", "")),
        ("http://user@h/svc//a?q", ("svc", "//a", "q")),
    ],
)
def test_split_target(raw: str, expected: tuple[str, str, str]) -> None:
    assert split_target(raw) == expected


def request_with(*headers: tuple[str, str]) -> web.Request:
    return make_mocked_request("POST", "/svc/x", headers=CIMultiDict(headers))


@pytest.mark.parametrize(
    "prefer",
    [
        ["respond-async"],
        ["respond-async, wait=10"],
        ["wait=10, respond-async"],
        ["Respond-Async"],
        ["respond-async; foo=bar"],
        [" respond-async "],
        ["return=minimal", "respond-async"],
        ['respond-async=""'],  # an empty value is none (RFC 7240)
    ],
)
def test_wants_async(prefer: list[str]) -> None:
    assert wants_async(request_with(*(("Prefer", value) for value in prefer)))


@pytest.mark.parametrize(
    "prefer",
    [
        [],
        ["return=minimal"],
        ["respond-asynchronously"],
        ["wait=10"],
        ["return=respond-async"],
        ['note="a, respond-async, b"'],
        ['note="a,respond-async,b"; x=1'],
    ],
)
def test_does_not_want_async(prefer: list[str]) -> None:
    assert not wants_async(request_with(*(("Prefer", value) for value in prefer)))


@pytest.mark.parametrize(
    ("prefer", "seconds"),
    [
        ([], 0.0),
        (["respond-async"], 0.0),
        (["respond-async, wait=5"], 5.0),
        (["respond-async", "Wait = 3; x=1"], 3.0),
        (['wait="4"'], 4.0),
        (["wait=2, wait=9"], 2.0),
        (["wait=1.5"], 0.0),  # delta-seconds: digits only
        (["wait=-1"], 0.0),
        (["wait="], 0.0),
        (["respond-async; wait=5"], 0.0),  # a parameter of respond-async, not the preference
        (['note="wait=5"'], 0.0),
    ],
)
def test_wait_of(prefer: list[str], seconds: float) -> None:
    assert wait_of(request_with(*(("Prefer", value) for value in prefer))) == seconds


class Clock:
    @staticmethod
    def time() -> float:
        return NOW


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "time", Clock)


def timeout_request(value: str | None) -> web.Request:
    return request_with() if value is None else request_with(("X-Request-Timeout", value))


@pytest.mark.usefixtures("frozen")
@pytest.mark.parametrize(
    ("header", "cap", "seconds"),
    [
        (None, 30.0, 30.0),
        ("5", 30.0, 5.0),
        ("2.5", 30.0, 2.5),
        ("100", 30.0, 30.0),
        ("30", 30.0, 30.0),
        ("5", None, 5.0),
        ("86400", None, 86400.0),
        ("abc", 30.0, 30.0),
        ("0", 30.0, 30.0),
        ("-3", 30.0, 30.0),
        ("nan", 30.0, 30.0),
        ("inf", 30.0, 30.0),
        ("", 30.0, 30.0),
        ("1_0", 30.0, 30.0),  # Python's float() reads these; no HTTP client means them
        ("\u0663", 30.0, 30.0),  # an Arabic-Indic three
        ("3, 7", 30.0, 3.0),  # repeats folded into one line: the first, as for two lines
    ],
)
def test_deadline_of(header: str | None, cap: float | None, seconds: float) -> None:
    # Seconds from now: pytest.approx(NOW + seconds) allowed 1,700 s either way (1e-6 of NOW).
    assert deadline_of(timeout_request(header), cap) == NOW + seconds


@pytest.mark.usefixtures("frozen")
@pytest.mark.parametrize("header", [None, "abc", "0", "-1", "nan"])
def test_no_deadline_without_cap_or_valid_timeout(header: str | None) -> None:
    assert deadline_of(timeout_request(header), None) is None


def test_deadline_uses_the_wall_clock() -> None:
    before = time.time()
    deadline = deadline_of(timeout_request("7"), 30.0)
    assert deadline is not None
    assert before + 7 <= deadline <= time.time() + 7


@pytest.mark.parametrize("header", ["inf", "Infinity", "1e308", "1e17"])
def test_uncapped_huge_timeout_still_encodes(header: str) -> None:
    deadline = deadline_of(timeout_request(header), None)
    assert deadline is None or math.isfinite(deadline)
    message = encode_request(
        RequestEnvelope("id", "svc", HttpRequest("GET", "/", "", (), b""), None, deadline, None)
    )
    encode.field_table(message.headers)  # what publishing does with them


@pytest.mark.parametrize(
    ("code", "raised"),
    [
        ("idempotency_key_reused", IdempotencyKeyReused),
        ("method_not_allowed", ServiceFailed),  # the enqueuer's own path alone answers it
        ("internal_error", ServiceFailed),  # a defect of the enqueuer's own
        ("made-up", ServiceFailed),
    ],
)
def test_any_error_code_of_a_reply_is_raised_as_a_proxymq_error(
    code: str, raised: type[ProxyMQError]
) -> None:
    """Any AMQP client may reply with any `x-proxymq-error`; a code a reply may not carry is
    `service_failed`, as the message format says."""
    reply = HttpResponse(502, (), b"", error=code, error_message="m")
    with pytest.raises(ProxyMQError) as caught:
        handlers.answer(reply, "GET")
    assert type(caught.value) is raised
    assert handlers.outcome_of(reply) == raised.code
