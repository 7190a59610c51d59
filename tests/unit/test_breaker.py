"""The breaker: opens after N failures, one probe after the reset, outcome closes or re-opens."""

from __future__ import annotations

import asyncio

import pytest

from shared.breaker import CLOSED, HALF_OPEN, OPEN, ServiceBreaker


async def test_opens_after_failures_and_probes_once() -> None:
    states: list[str] = []
    breaker = ServiceBreaker(2, 0.05, on_state=states.append)
    never = asyncio.Event()
    assert await breaker.wait_turn(never) is False
    breaker.record(failed=True, probe=False)
    assert breaker.state == CLOSED
    breaker.record(failed=True, probe=False)
    assert breaker.state == OPEN
    assert breaker.admit_now() is None  # refused while open
    first = asyncio.ensure_future(breaker.wait_turn(never))
    second = asyncio.ensure_future(breaker.wait_turn(never))
    assert await asyncio.wait_for(first, 1) is True  # the probe
    assert breaker.state == HALF_OPEN
    await asyncio.sleep(0.1)
    assert not second.done()  # the others wait for the probe's outcome
    breaker.record(failed=False, probe=True)
    assert await asyncio.wait_for(second, 1) is False
    assert breaker.state == CLOSED
    assert states == [OPEN, HALF_OPEN, CLOSED]


async def test_failed_probe_reopens() -> None:
    breaker = ServiceBreaker(1, 0.01)
    breaker.record(failed=True, probe=False)
    await asyncio.sleep(0.02)
    assert breaker.admit_now() is True
    breaker.record(failed=True, probe=True)
    assert breaker.state == OPEN


async def test_abandon_wakes_a_waiter() -> None:
    breaker = ServiceBreaker(1, 60)
    breaker.record(failed=True, probe=False)
    abandon = asyncio.Event()
    waiter = asyncio.ensure_future(breaker.wait_turn(abandon))
    await asyncio.sleep(0.05)
    abandon.set()
    assert await asyncio.wait_for(waiter, 1) is None


@pytest.mark.parametrize("failed", [True, False])
async def test_outcomes_while_open_change_nothing(failed: bool) -> None:
    breaker = ServiceBreaker(1, 60)
    breaker.record(failed=True, probe=False)
    breaker.record(failed=failed, probe=False)
    assert breaker.state == OPEN


async def test_reset_closes_an_open_breaker_at_once() -> None:
    states: list[str] = []
    breaker = ServiceBreaker(2, 60, on_state=states.append)
    for _ in range(2):
        breaker.record(failed=True, probe=False)
    assert breaker.admit_now() is None
    breaker.reset()
    assert breaker.state == CLOSED
    assert breaker.admit_now() is False  # no probe: calls go ahead as usual
    breaker.record(failed=True, probe=False)
    assert breaker.state == CLOSED  # the failures before the reset no longer count
    breaker.record(failed=True, probe=False)
    assert breaker.state == OPEN
    assert states == [OPEN, CLOSED, OPEN]


@pytest.mark.parametrize("failed", [True, False])
async def test_only_the_probe_decides_a_half_open_breaker(failed: bool) -> None:
    """A call begun before the breaker opened (a slow one) ending while the probe runs says
    nothing of now. Its failure re-opened the breaker, and the probe's success, then recorded
    against an open breaker, was dropped: every request waited one more --breaker-reset."""
    breaker = ServiceBreaker(1, 0.01)
    breaker.record(failed=True, probe=False)
    await asyncio.sleep(0.02)
    assert await breaker.wait_turn(asyncio.Event()) is True
    breaker.record(failed=failed, probe=False)
    assert breaker.state == HALF_OPEN
    breaker.record(failed=False, probe=True)
    assert breaker.state == CLOSED


async def test_a_failure_after_an_abandoned_probe_reopens() -> None:
    """The enqueuer's probe cut off by its publish deadline: abandoned, then reported as a
    timeout of no probe's, which re-opens the breaker."""
    breaker = ServiceBreaker(1, 0.01)
    breaker.record(failed=True, probe=False)
    await asyncio.sleep(0.02)
    probe = breaker.admit_now()
    assert probe is True
    breaker.abandon_probe(probe)
    breaker.record(failed=True, probe=False)
    assert breaker.state == OPEN
