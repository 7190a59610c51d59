"""Membership -> assignment -> subscriptions: which partitions this dequeuer consumes.

A dequeuer takes part only while its microservice is ready and its circuit breaker lets calls
through. Every view change recomputes the same balanced assignment everywhere; this process
subscribes to its share and gives up the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from dequeuer.assignment import assign
from dequeuer.membership import Membership
from dequeuer.partitions import Partitions
from shared.breaker import CLOSED, OPEN

log = logging.getLogger(__name__)
PAUSE_HOLD = 300.0  # seconds a paused dequeuer keeps its partitions while nobody can take them
# Longest absence for an open breaker; below PAUSE_HOLD, so a lone dequeuer is back before its
# hold ends and keeps its partitions however long its breaker stays open, as it always did.
MAX_AWAY = 120.0


class Coordinator:
    def __init__(
        self,
        membership: Membership,
        partitions: Partitions,
        count: int,
        on_rebalance: Callable[[], None] = lambda: None,
        breaker_reset: float = 10.0,
    ) -> None:
        self.membership = membership
        self.partitions = partitions
        self.count = count
        self.on_rebalance = on_rebalance
        self.breaker_reset = breaker_reset
        self._mine: frozenset[int] | None = None
        self._paused_at: float | None = None
        self._ready = False
        self._tripped = 0  # breaker openings since it last closed
        self._back: asyncio.TimerHandle | None = None
        membership.on_change = self.rebalance

    def set_available(self, available: bool) -> None:
        """The microservice's readiness."""
        self._ready = available
        self._update()

    def breaker_changed(self, state: str) -> None:
        """An open breaker pauses this dequeuer as a microservice that is not ready does: its
        partitions go to dequeuers whose microservice answers (they stalled here, their
        requests waiting for the breaker while the others idled). It comes back after
        --breaker-reset, as a member again, for a request to probe its microservice: one
        that fails opens the breaker again, and the next absence is twice as long, up to
        MAX_AWAY, so a microservice that stays broken moves partitions rarely."""
        if state == OPEN:
            self._tripped += 1
            if self._back is not None:
                self._back.cancel()
            away = min(MAX_AWAY, self.breaker_reset * 2 ** min(self._tripped - 1, 30))
            self._back = asyncio.get_running_loop().call_later(away, self._come_back)
        elif state == CLOSED:
            self._tripped = 0
            self._come_back()
            return
        self._update()

    def _come_back(self) -> None:
        if self._back is not None:
            self._back.cancel()
            self._back = None
        self._update()

    def _update(self) -> None:
        available = self._ready and self._back is None
        if self.membership.available != available:
            self.membership.available = available
            self._paused_at = None if available else time.monotonic()
            if not available:
                asyncio.get_running_loop().call_later(PAUSE_HOLD, self.rebalance)
            self.rebalance()

    def rebalance(self) -> None:
        view = self.membership.view()
        mine = assign(self.count, view).get(self.membership.instance_id, frozenset())
        if not view and self._holding():
            mine = self._mine or frozenset()
        if mine != self._mine:
            log.info(
                "partitions of this dequeuer: %s (members: %d)",
                ",".join(map(str, sorted(mine))) or self._why_none(),
                len(view),
            )
            self._mine = mine
            self.on_rebalance()
            self.partitions.want(mine)

    def _holding(self) -> bool:
        """A pause keeps the partitions while no dequeuer is available to take them, for up to
        PAUSE_HOLD. Given up, their held requests went back to their queues for nobody, each
        return counted against their delivery limit: a microservice failing its readiness probe
        now and then got requests it was never called for dead-lettered (`delivery_limit`).
        Past PAUSE_HOLD, an outage is long: they go back once, not once per consumer_timeout."""
        return (
            self._paused_at is not None
            and not self.membership.leaving
            and time.monotonic() - self._paused_at < PAUSE_HOLD
        )

    def _why_none(self) -> str:
        """Standby (more dequeuers than partitions) and a pause are told apart in the log."""
        if self.membership.leaving:
            return "none (leaving)"
        if not self._ready:
            return "none (paused: the microservice is not ready)"
        if not self.membership.available:
            return "none (paused: the circuit breaker is open)"
        return "none (standby: the other dequeuers hold every partition)"
