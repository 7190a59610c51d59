"""Results of `Prefer: respond-async` requests, kept for `GET /_proxymq/requests/{id}`.

Memory is bounded: pending entries count against the enqueuer's in-flight cap, and finished ones
expire after a TTL or, beyond `capacity` results or `max_bytes` (bodies and headers), oldest
first. The newest result is kept whatever its size (at most the dequeuer's --max-response and an
AMQP frame of headers). A result
dropped before its TTL is counted (`on_dropped`): its poller gets 404 like for an unknown id, and
only the count tells an operator that the bounds are too small for the traffic.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass

from shared.envelope import HttpResponse
from shared.errors import ProxyMQError


@dataclass(slots=True)
class Outcome:
    response: HttpResponse | None = None
    error: ProxyMQError | None = None
    finished_at: float | None = None

    @property
    def pending(self) -> bool:
        return self.finished_at is None


class ResultStore:
    def __init__(
        self,
        ttl: float,
        capacity: int,
        max_bytes: int,
        on_dropped: Callable[[], None] = lambda: None,
    ) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._on_dropped = on_dropped
        self.bytes = 0  # of the finished results' bodies
        self._pending: dict[str, Outcome] = {}
        self._finished: OrderedDict[str, Outcome] = OrderedDict()

    def add(self, request_id: str) -> None:
        self._pending[request_id] = Outcome()

    def finish(
        self, request_id: str, response: HttpResponse | None, error: ProxyMQError | None
    ) -> None:
        outcome = self._pending.pop(request_id, None) or Outcome()
        outcome.response, outcome.error, outcome.finished_at = response, error, time.monotonic()
        self._forget(request_id)
        self._finished[request_id] = outcome
        self.bytes += _size(outcome)
        self._evict()

    def get(self, request_id: str) -> Outcome | None:
        self._evict()
        return self._pending.get(request_id) or self._finished.get(request_id)

    def __len__(self) -> int:
        return len(self._pending) + len(self._finished)

    def pending_ids(self) -> Container[str]:
        return self._pending.keys()

    def _evict(self) -> None:
        horizon = time.monotonic() - self.ttl
        while self._finished:
            request_id, oldest = next(iter(self._finished.items()))
            assert oldest.finished_at is not None
            within = len(self._finished) <= self.capacity and (
                self.bytes <= self.max_bytes or len(self._finished) == 1
            )
            if oldest.finished_at >= horizon:
                if within:
                    break
                self._on_dropped()
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        gone = self._finished.pop(request_id, None)
        if gone is not None:
            self.bytes -= _size(gone)


def _size(outcome: Outcome) -> int:
    return 0 if outcome.response is None else outcome.response.size
