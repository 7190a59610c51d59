"""Membership -> assignment -> subscriptions: which partitions this dequeuer consumes.

A dequeuer takes part only while its microservice is ready. Every view change recomputes the
same balanced assignment everywhere; this process subscribes to its share and gives up the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dequeuer.assignment import assign
from dequeuer.membership import Membership
from dequeuer.partitions import Partitions

log = logging.getLogger(__name__)


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
        membership.on_change = self.rebalance

    def set_available(self, available: bool) -> None:
        if self.membership.available != available:
            self.membership.available = available
            self.rebalance()

    def rebalance(self) -> None:
        view = self.membership.view()
        mine = assign(self.count, view).get(self.membership.instance_id, frozenset())
        if mine != self._mine:
            log.info(
                "partitions of this dequeuer: %s (members: %d)",
                ",".join(map(str, sorted(mine))) or self._why_none(),
                len(view),
            )
            self._mine = mine
            self.on_rebalance()
            self.partitions.want(mine)

    def _why_none(self) -> str:
        """Standby (more dequeuers than partitions) and a pause are told apart in the log."""
        if self.membership.leaving:
            return "none (leaving)"
        if not self.membership.available:
            return "none (paused: the microservice is not ready)"
        return "none (standby: the other dequeuers hold every partition)"
