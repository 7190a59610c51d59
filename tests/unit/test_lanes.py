"""Per-key order with parallelism across keys.

Jobs block on events the test opens; progress is observed after yielding to the loop, never by
measuring time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Hashable

import pytest

from dequeuer.lanes import Job, Lanes


async def settle() -> None:
    """Let every runnable task take its next steps."""
    for _ in range(20):
        await asyncio.sleep(0)


class Probe:
    """Jobs that record when they start and end, and wait for their gate to open."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.started: list[str] = []
        self.finished: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    def job(self, name: str, *, fail: bool = False, gated: bool = True) -> Job:
        gate = self.gates.setdefault(name, asyncio.Event())
        if not gated:
            gate.set()

        async def run() -> None:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.started.append(name)
            try:
                await gate.wait()
                if fail:
                    raise RuntimeError(f"job {name} failed")
            finally:
                self.running -= 1
                self.finished.append(name)

        return run

    def open(self, *names: str) -> None:
        for name in names or tuple(self.gates):
            self.gates[name].set()


@pytest.fixture
async def lanes() -> AsyncIterator[Lanes]:
    made = Lanes()
    yield made
    await made.cancel()


def submit_all(lanes: Lanes, probe: Probe, jobs: list[tuple[Hashable, str]]) -> None:
    for key, name in jobs:
        lanes.submit(key, probe.job(name))


async def test_same_key_runs_one_at_a_time_in_submission_order(lanes: Lanes) -> None:
    probe = Probe()
    names = [f"j{i}" for i in range(5)]
    submit_all(lanes, probe, [("k", name) for name in names])
    for index, name in enumerate(names):
        await settle()
        assert probe.started == names[: index + 1]
        assert probe.running == 1
        probe.open(name)
    assert await lanes.drain(timeout=5)
    assert probe.finished == names
    assert probe.peak == 1


async def test_different_keys_run_in_parallel() -> None:
    lanes = Lanes()
    probe = Probe()
    submit_all(lanes, probe, [(f"key-{i}", f"j{i}") for i in range(4)])
    await settle()
    assert probe.running == 4
    probe.open()
    assert await lanes.drain(timeout=5)
    assert sorted(probe.finished) == ["j0", "j1", "j2", "j3"]


async def test_keys_interleave_but_each_keeps_its_order(lanes: Lanes) -> None:
    probe = Probe()
    jobs: list[tuple[Hashable, str]] = [
        ("a", "a0"),
        ("b", "b0"),
        ("a", "a1"),
        (("partition", 1), "c0"),
        ("b", "b1"),
        ("a", "a2"),
    ]
    for key, name in jobs:
        lanes.submit(key, probe.job(name, gated=False))
    assert await lanes.drain(timeout=5)
    for prefix in ("a", "b"):
        started = [name for name in probe.started if name.startswith(prefix)]
        assert started == sorted(started)
    assert len(probe.finished) == 6


async def test_failing_job_does_not_stop_its_lane(
    lanes: Lanes, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()
    lanes.submit("k", probe.job("bad", fail=True, gated=False))
    lanes.submit("k", probe.job("good", gated=False))
    lanes.submit("other", probe.job("other", gated=False))
    with caplog.at_level(logging.ERROR, logger="dequeuer.lanes"):
        assert await lanes.drain(timeout=5)
    assert probe.started.index("bad") < probe.started.index("good")
    assert set(probe.finished) == {"bad", "good", "other"}
    assert any("failed" in record.getMessage() for record in caplog.records)
    assert lanes.busy == 0


async def test_lane_is_reused_after_it_emptied(lanes: Lanes) -> None:
    probe = Probe()
    lanes.submit("k", probe.job("first", gated=False))
    assert await lanes.drain(timeout=5)
    lanes.submit("k", probe.job("second", gated=False))
    assert await lanes.drain(timeout=5)
    assert probe.finished == ["first", "second"]


async def test_drain_without_jobs(lanes: Lanes) -> None:
    assert await lanes.drain(timeout=0)


async def test_drain_false_on_timeout_then_true(lanes: Lanes) -> None:
    probe = Probe()
    lanes.submit("k", probe.job("slow"))
    assert not await lanes.drain(timeout=0.01)
    assert probe.finished == []
    probe.open()
    assert await lanes.drain(timeout=5)
    assert probe.finished == ["slow"]


async def test_busy_counts_running_and_queued_jobs(lanes: Lanes) -> None:
    probe = Probe()
    assert lanes.busy == 0
    submit_all(lanes, probe, [("a", "a0"), ("a", "a1"), ("a", "a2"), ("b", "b0")])
    assert lanes.busy == 4
    await settle()
    assert lanes.busy == 4
    assert probe.running == 2  # a0 and b0; a1 and a2 queue behind a0
    probe.open("a0")
    await settle()
    assert lanes.busy == 3
    probe.open()
    assert await lanes.drain(timeout=5)
    assert lanes.busy == 0


async def test_cancel_stops_running_jobs() -> None:
    lanes = Lanes()
    probe = Probe()
    submit_all(lanes, probe, [("a", "a0"), ("b", "b0")])
    await settle()
    assert probe.running == 2
    await lanes.cancel()
    assert probe.running == 0
    assert await lanes.drain(timeout=0)


async def test_cancel_before_start_leaves_no_lane() -> None:
    lanes = Lanes()
    probe = Probe()
    lanes.submit("k", probe.job("never"))
    await lanes.cancel()
    assert lanes.busy == 0
    lanes.submit("k", probe.job("after", gated=False))
    assert await lanes.drain(timeout=1)
    assert probe.finished == ["after"]
