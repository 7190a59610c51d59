"""Which failures are retried, and how long the dequeuer waits between attempts."""

from __future__ import annotations

import email.utils
import time

import pytest

from dequeuer import consumer
from dequeuer.consumer import MAX_BACKOFF, RetryPolicy
from dequeuer.forwarder import CallFailed, FailureKind
from dequeuer.settings import DequeuerSettings
from shared.envelope import HttpResponse

DEFAULT_RETRY_ON = frozenset(DequeuerSettings.model_fields["retry_on"].default)


def policy(backoff: float = 0.2, retry_on: frozenset[str] = DEFAULT_RETRY_ON) -> RetryPolicy:
    return RetryPolicy(max_attempts=3, backoff=backoff, retry_on=retry_on)


def reply(status: int) -> HttpResponse:
    return HttpResponse(status, (), b"")


def test_default_set_is_the_contract() -> None:
    assert frozenset({"connect", "timeout", "502", "503", "504"}) == DEFAULT_RETRY_ON


@pytest.mark.parametrize("kind", ["connect", "timeout"])
def test_no_answer_is_retryable(kind: FailureKind) -> None:
    assert policy().retryable(CallFailed(kind, "detail"))


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_statuses_are_retryable(status: int) -> None:
    assert policy().retryable(reply(status))


@pytest.mark.parametrize("status", [200, 201, 302, 400, 404, 409, 429, 500, 501, 505])
def test_other_answers_are_final(status: int) -> None:
    assert not policy().retryable(reply(status))


def test_configured_set_is_honoured() -> None:
    custom = policy(retry_on=frozenset({"500", "timeout"}))
    assert custom.retryable(reply(500))
    assert custom.retryable(CallFailed("timeout", "slow"))
    assert not custom.retryable(reply(503))
    assert not custom.retryable(CallFailed("connect", "refused"))


class FixedJitter:
    """Stands in for `random`, always drawing the given end of the interval."""

    def __init__(self, end: str) -> None:
        self.end = end
        self.calls: list[tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.calls.append((low, high))
        return low if self.end == "low" else high


@pytest.mark.parametrize(
    ("attempt", "nominal"),
    [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (6, 6.4), (7, 10.0), (8, 10.0), (30, 10.0)],
)
def test_delay_doubles_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch, attempt: int, nominal: float
) -> None:
    jitter = FixedJitter("high")
    monkeypatch.setattr(consumer, "random", jitter)
    assert policy(backoff=0.2).delay(attempt) == pytest.approx(nominal)
    jitter.end = "low"
    assert policy(backoff=0.2).delay(attempt) == pytest.approx(nominal / 2)
    assert jitter.calls == [(0.5, 1.0), (0.5, 1.0)]


def test_cap_is_ten_seconds() -> None:
    assert MAX_BACKOFF == 10.0


def test_real_jitter_stays_in_the_upper_half() -> None:
    retry = policy(backoff=0.2)
    for attempt in range(1, 12):
        nominal = min(10.0, 0.2 * 2 ** (attempt - 1))
        for _ in range(50):
            assert nominal * 0.5 <= retry.delay(attempt) <= nominal


def test_zero_backoff_retries_at_once() -> None:
    assert policy(backoff=0).delay(5) == 0.0


def asking(value: str) -> HttpResponse:
    return HttpResponse(503, (("Retry-After", value),), b"")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("soon", None),
        ("-1", None),
        ("1.5", None),
        ("", None),
        # Digits that are no ASCII: "²" raised ValueError, and the 503 was rejected, not retried.
        ("²", None),
        ("١٢", None),
    ],
)
def test_retry_after_in_seconds(value: str, seconds: float | None) -> None:
    assert consumer.retry_after(asking(value)) == seconds


def test_retry_after_as_a_date() -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    asked = consumer.retry_after(asking(later))
    assert asked is not None and 28 <= asked <= 30
    assert consumer.retry_after(asking("Mon, 01 Jan 2001 00:00:00 GMT")) == 0.0


def test_retry_after_in_each_http_date_format() -> None:
    """RFC 9110 5.6.7: a recipient accepts all three HTTP-date formats. The asctime one has no
    zone (it is GMT), and parsed as a local time it was ignored: the retry came at once."""
    later = time.gmtime(time.time() + 30)
    for form in ("%a, %d %b %Y %H:%M:%S GMT", "%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"):
        asked = consumer.retry_after(asking(time.strftime(form, later)))
        assert asked is not None and 28 <= asked <= 30, form


def test_a_retry_waits_at_least_what_retry_after_asks() -> None:
    """A 503 with `Retry-After: 2` was tried again 150 ms later."""
    retry = policy(backoff=0.1)
    assert retry.delay(1, asking("2")) == 2.0
    assert retry.delay(1, asking("3600")) == MAX_BACKOFF  # the same cap as the backoff
    assert 0.05 <= retry.delay(1, asking("soon")) <= 0.1
    assert 0.05 <= retry.delay(1, CallFailed("connect", "refused")) <= 0.1
    assert policy(backoff=8).delay(2, asking("1")) >= 5  # the backoff (5-10 s) when longer
