"""A one-minute soak in `make test` (a longer one: `python -m tests.soak --minutes 5`): mixed
traffic, dequeuers SIGKILLed and replaced periodically, one broker restart, on the session's own
node. Nothing accepted may be lost, and neither sidecar may grow much."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cli.cluster import LocalCluster
from tests.reliability.support import report
from tests.soak import soak

pytestmark = [pytest.mark.rabbit, pytest.mark.reliability]
SECONDS = 45.0
GROWTH_BOUND_MIB = 40.0  # over a minute; a leak of one object per request would pass it


@pytest.mark.timeout(240)
async def test_soak(node: LocalCluster, tmp_path: Path) -> None:
    figures = await soak(node, SECONDS, tmp_path)
    problems = figures.pop("problems")
    report("soak", figures)
    assert not problems, "\n".join(problems[:15])
    assert figures["lost_requests"] == 0 and figures["lost_results"] == 0
    start, end = figures["rss_mib_start"], figures["rss_mib_end"]
    for sidecar in ("enqueuer", "dequeuer"):
        assert end[sidecar] - start[sidecar] < GROWTH_BOUND_MIB, (sidecar, start, end)
