"""Membership -> assignment -> subscriptions: which partitions this dequeuer consumes.

A dequeuer takes part only while its microservice is ready. Every view change recomputes the
same balanced assignment everywhere; this process subscribes to its share and gives up the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from dequeuer.assignment import assign
from dequeuer.membership import Membership
from dequeuer.partitions import Partitions

log = logging.getLogger(__name__)
PAUSE_HOLD = 300.0  # seconds a paused dequeuer keeps its partitions while nobody can take them


class Coordinator:
    def __init__(
        self,
        membership: Membership,
        partitions: Partitions,
        count: int,
        on_rebalance: Callable[[], None] = lambda: None,
    ) -> None:
        self.membership = membership
        self.partitions = partitions
        self.count = count
        self.on_rebalance = on_rebalance
        self._mine: frozenset[int] | None = None
        self._paused_at: float | None = None
        membership.on_change = self.rebalance

    def set_available(self, available: bool) -> None:
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
        if not self.membership.available:
            return "none (paused: the microservice is not ready)"
        return "none (standby: the other dequeuers hold every partition)"
