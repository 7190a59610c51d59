"""Per-key order with parallelism across keys.

Each lane is a FIFO of jobs that share a key and run one after another; different lanes run at
once. The three `--ordering` modes are the same mechanism with a different lane key: the partition
key, the partition, or the request itself. How many jobs exist is bounded by the partitions'
prefetch; how many of them call the microservice at once is the consumer's `--concurrency`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)
Job = Callable[[], Awaitable[None]]


class Lanes:
    def __init__(self) -> None:
        self._lanes: dict[Hashable, deque[Job]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, key: Hashable, job: Job) -> None:
        """Jobs of one key start in submission order, each after the previous one finished.

        A lane runs in a task of its own, never in the task that delivered its first message:
        aiormq cancels its delivery tasks when their connection drops, and a lane ended that way
        would take the jobs queued behind it along."""
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(job)
            return
        self._lanes[key] = deque([job])
        task = asyncio.create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: Hashable) -> None:
        lane = self._lanes[key]
        try:
            while lane:
                try:
                    await lane[0]()
                except Exception:
                    log.exception("a job of lane %r failed", key)
                lane.popleft()
        finally:
            del self._lanes[key]

    @property
    def busy(self) -> int:
        """Jobs submitted and not finished, running or queued behind their key."""
        return sum(len(lane) for lane in self._lanes.values())

    async def drain(self, timeout: float) -> bool:
        """Wait until every submitted job has finished; False when time ran out first."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._lanes.clear()  # a task cancelled before its first step never ran its `finally`
