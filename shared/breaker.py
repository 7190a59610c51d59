"""Circuit breakers: pybreaker keeps the state and the counts, this adds what asyncio needs.

The dequeuer's breaker in front of the microservice makes requests wait (unacked, safe in
RabbitMQ) while it is open, instead of failing them into the dead-letter queue (`wait_turn`).
The enqueuer's breaker on the broker connection answers 503 at once while it is open
(`admit_now`). Either way, after `reset_timeout` exactly one call goes ahead as the half-open
probe and its outcome closes or re-opens the breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import pybreaker

log = logging.getLogger(__name__)
CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN


class _Failed(Exception):
    """Stands for a failed call when telling pybreaker an outcome."""


def _outcome(failed: bool) -> None:
    if failed:
        raise _Failed


class ServiceBreaker(pybreaker.CircuitBreakerListener):
    def __init__(
        self, fail_max: int, reset_timeout: float, on_state: Callable[[str], None] = lambda _: None
    ) -> None:
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout, listeners=[self]
        )
        self.reset_timeout = reset_timeout
        self.on_state = on_state
        self._opened_at = 0.0
        self._probing = False
        self._changed = asyncio.Event()

    @property
    def state(self) -> str:
        return str(self._breaker.current_state)

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: object,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        if new_state.name == OPEN:
            self._opened_at = time.monotonic()
        level = logging.INFO if new_state.name == CLOSED else logging.WARNING
        log.log(level, "circuit breaker %s", new_state.name)
        self.on_state(new_state.name)
        self._changed.set()
        self._changed = asyncio.Event()

    def admit_now(self) -> bool | None:
        """Without waiting: None when the breaker refuses, otherwise whether this is the probe."""
        state = self.state
        if state == CLOSED:
            return False
        if self._probing:
            return None
        if state == OPEN and self.retry_after() > 0:
            return None
        if state == OPEN:
            self._breaker.half_open()
        self._probing = True
        return True

    def retry_after(self) -> float:
        return max(0.0, self._opened_at + self.reset_timeout - time.monotonic())

    async def wait_turn(self, abandon: asyncio.Event) -> bool | None:
        """None when `abandon` was set first; otherwise whether this call is the probe."""
        while not abandon.is_set():
            state = self.state
            wait = 0.05
            if state == CLOSED:
                return False
            if not self._probing:
                if state == HALF_OPEN:
                    self._probing = True
                    return True
                wait = self._opened_at + self.reset_timeout - time.monotonic()
                if wait <= 0:
                    self._breaker.half_open()
                    self._probing = True
                    return True
            waiters = [asyncio.ensure_future(e.wait()) for e in (self._changed, abandon)]
            await asyncio.wait(
                waiters, timeout=max(wait, 0.05), return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in waiters:
                waiter.cancel()
        return None

    def record(self, failed: bool, probe: bool) -> None:
        if probe:
            self._probing = False
        if not failed and not probe and self._breaker.fail_counter == 0 and self.state == CLOSED:
            return  # the common case: nothing to count, skip pybreaker's lock and state machine
        if self.state == OPEN or (self.state == HALF_OPEN and self._probing and not probe):
            # A call that started before the breaker opened says nothing new; while the probe
            # runs, it alone decides (a stale failure re-opened the breaker, and the probe's
            # success, recorded against an open breaker, was dropped).
            return
        with contextlib.suppress(_Failed, pybreaker.CircuitBreakerError):
            self._breaker.call(_outcome, failed)

    def reset(self) -> None:
        """Close now: what opened the breaker is known to be over. For the enqueuer's breaker,
        a restored broker connection; waiting out `reset_timeout` after it only refused
        callers that would have been served."""
        self._probing = False
        if self.state != CLOSED:
            self._breaker.close()

    def abandon_probe(self, probe: bool) -> None:
        """A probe that never called (its partition was given up) lets the next one try."""
        if probe:
            self._probing = False
