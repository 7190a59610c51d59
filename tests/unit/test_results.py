"""Results of asynchronous requests: kept until read, bounded by TTL and capacity."""

from __future__ import annotations

import pytest

from enqueuer import results
from enqueuer.results import ResultStore
from shared.envelope import HttpResponse
from shared.errors import GatewayTimeout


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(results, "time", fake)
    return fake


def ok(body: bytes = b"done") -> HttpResponse:
    return HttpResponse(200, (("Content-Type", "text/plain"),), body)


def test_pending_then_finished(clock: Clock) -> None:
    store = ResultStore(ttl=60, capacity=10, max_bytes=1 << 20)
    store.add("r1")
    outcome = store.get("r1")
    assert outcome is not None
    assert outcome.pending
    assert outcome.response is None

    store.finish("r1", ok(b"payload"), None)
    outcome = store.get("r1")
    assert outcome is not None
    assert not outcome.pending
    assert outcome.response == ok(b"payload")
    assert outcome.error is None
    assert len(store) == 1


def test_finished_with_error(clock: Clock) -> None:
    store = ResultStore(ttl=60, capacity=10, max_bytes=1 << 20)
    store.add("r1")
    error = GatewayTimeout("too late")
    store.finish("r1", None, error)
    outcome = store.get("r1")
    assert outcome is not None
    assert not outcome.pending
    assert outcome.error is error


def test_unknown_id(clock: Clock) -> None:
    assert ResultStore(ttl=60, capacity=10, max_bytes=1 << 20).get("nope") is None


def test_finished_result_expires_after_ttl(clock: Clock) -> None:
    store = ResultStore(ttl=60, capacity=10, max_bytes=1 << 20)
    store.add("r1")
    store.finish("r1", ok(), None)
    clock.now += 60
    assert store.get("r1") is not None
    clock.now += 0.5
    assert store.get("r1") is None
    assert len(store) == 0


def test_ttl_counts_from_finish_not_from_add(clock: Clock) -> None:
    store = ResultStore(ttl=60, capacity=10, max_bytes=1 << 20)
    store.add("r1")
    clock.now += 1000
    assert store.get("r1") is not None
    store.finish("r1", ok(), None)
    clock.now += 59
    assert store.get("r1") is not None


def test_pending_never_expires(clock: Clock) -> None:
    store = ResultStore(ttl=1, capacity=1, max_bytes=1 << 20)
    store.add("r1")
    clock.now += 10_000
    store.add("r2")
    store.finish("r2", ok(), None)
    outcome = store.get("r1")
    assert outcome is not None
    assert outcome.pending


def test_only_expired_results_go(clock: Clock) -> None:
    store = ResultStore(ttl=60, capacity=10, max_bytes=1 << 20)
    for request_id in ("old", "middle"):
        store.add(request_id)
        store.finish(request_id, ok(), None)
    clock.now += 30
    store.add("new")
    store.finish("new", ok(), None)
    clock.now += 31
    assert store.get("old") is None
    assert store.get("middle") is None
    assert store.get("new") is not None


def test_capacity_evicts_oldest_finished(clock: Clock) -> None:
    store = ResultStore(ttl=600, capacity=2, max_bytes=1 << 20)
    for request_id in ("a", "b", "c"):
        store.add(request_id)
    for request_id in ("b", "a", "c"):
        clock.now += 1
        store.finish(request_id, ok(request_id.encode()), None)
    assert store.get("b") is None, "finished first, so evicted first"
    assert store.get("a") is not None
    assert store.get("c") is not None
    assert len(store) == 2


def test_capacity_never_evicts_pending(clock: Clock) -> None:
    store = ResultStore(ttl=600, capacity=2, max_bytes=1 << 20)
    for index in range(5):
        store.add(f"pending-{index}")
    for request_id in ("x", "y", "z"):
        store.add(request_id)
        store.finish(request_id, ok(), None)
    for index in range(5):
        outcome = store.get(f"pending-{index}")
        assert outcome is not None
        assert outcome.pending
    assert store.get("x") is None
    assert store.get("y") is not None
    assert store.get("z") is not None
    assert len(store) == 7


def test_bodies_beyond_max_bytes_evict_the_oldest(clock: Clock) -> None:
    store = ResultStore(ttl=600, capacity=100, max_bytes=1000)
    for request_id in ("r1", "r2", "r3"):
        store.add(request_id)
        store.finish(request_id, ok(b"x" * 400), None)
        clock.now += 1
    assert store.get("r1") is None  # 1200 bytes: the oldest went
    assert store.get("r2") is not None and store.get("r3") is not None
    held = 2 * ok(b"x" * 400).size
    assert store.bytes == held
    store.add("r4")
    store.finish("r4", None, GatewayTimeout("late"))  # an error holds no body
    assert store.bytes == held and len(store) == 3


def test_the_newest_result_is_kept_whatever_its_size(clock: Clock) -> None:
    store = ResultStore(ttl=600, capacity=100, max_bytes=1000)
    store.add("small")
    store.finish("small", ok(b"x" * 10), None)
    store.add("huge")
    store.finish("huge", ok(b"x" * 5000), None)
    assert store.get("small") is None
    outcome = store.get("huge")
    assert outcome is not None and outcome.response is not None
    assert store.bytes == ok(b"x" * 5000).size


def test_expiry_gives_the_bytes_back(clock: Clock) -> None:
    store = ResultStore(ttl=10, capacity=100, max_bytes=1000)
    store.add("r1")
    store.finish("r1", ok(b"x" * 600), None)
    clock.now += 11
    assert store.get("r1") is None
    assert store.bytes == 0


def test_only_results_dropped_before_their_ttl_are_counted(clock: Clock) -> None:
    dropped: list[None] = []
    store = ResultStore(ttl=10, capacity=1, max_bytes=1000, on_dropped=lambda: dropped.append(None))
    for request_id, body in (("a", b"a"), ("b", b"b" * 2000), ("c", b"c")):
        store.add(request_id)
        store.finish(request_id, ok(body), None)
    assert len(dropped) == 2  # a for --max-results, b for both bounds
    clock.now += 11
    assert store.get("c") is None
    assert len(dropped) == 2, "expired, not dropped"


def test_headers_count_against_max_bytes(clock: Clock) -> None:
    """A reply's headers may take a whole AMQP frame (128 KiB) with no body: counted as
    nothing, 1,500 such results held 150 MiB with --max-result-bytes 1MiB."""
    store = ResultStore(ttl=600, capacity=100, max_bytes=1000)
    heavy = HttpResponse(204, (("X-Big", "v" * 395),), b"")
    for request_id in ("r1", "r2", "r3"):
        store.add(request_id)
        store.finish(request_id, heavy, None)
    assert store.get("r1") is None
    assert store.bytes == 800
