"""What `proxymq bench` prints from its figures: the outside load and the verdict."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from shared.cli import bench_report
from shared.cli.bench_cpu import OUTSIDE
from shared.cli.bench_load import Run, summarize


def run(round_: int, seconds: float, outside_us: float) -> Run:
    """1000 requests of ProxyMQ at c64 in `seconds`, beside `outside_us` per request elsewhere."""
    return Run(
        "proxymq", 64, round_, 1000, seconds, (0.001,) * 1000, Counter(), {OUTSIDE: outside_us}
    )


def test_outside_load_is_the_median_of_each_rounds_own_figure() -> None:
    """Two rounds of 0.2 cores each: one slow round beside 2000 µs per request, one fast beside
    100. The medians of µs and of req/s multiplied gave 1.10 cores."""
    slow, fast = run(1, 10.0, 2000.0), run(2, 0.5, 100.0)
    assert slow.outside_cores == pytest.approx(fast.outside_cores) == pytest.approx(0.2)
    (line,) = bench_report.cpu_lines(64, summarize([slow, fast]))
    assert "outside load 0.20 core" in line


@pytest.mark.parametrize(
    ("ratio", "overhead_ms"), [(0.696, 1.204), (0.704, 1.196), (0.7996, 0.9951), (0.795, 1.0049)]
)
def test_the_verdict_agrees_with_the_figures_it_prints(ratio: float, overhead_ms: float) -> None:
    """Judged on the exact ratio, 0.696 printed as '0.70 (goal >= 0.7: missed)'."""
    line = bench_report.Verdict(ratio, overhead_ms).line()
    found = re.search(
        r"throughput ([\d.]+) \(goal >= ([\d.]+): (\S+), target ([\d.]+): (\S+)\)", line
    )
    assert found, line
    shown, goal, verdict, target, against_target = found.groups()
    assert ("met" in verdict) == (float(shown) >= float(goal)), line
    assert ("met" in against_target) == (float(shown) >= float(target)), line
    found = re.search(
        r"p50 ([+-][\d.]+) ms \(goal <= ([\d.]+) ms: (\S+), target ([\d.]+) ms: (\S+)\)", line
    )
    assert found, line
    shown, goal, verdict, target, against_target = found.groups()
    assert ("met" in verdict) == (float(shown) <= float(goal)), line
    assert ("met" in against_target) == (float(shown) <= float(target)), line


def test_no_miss_is_rounded_into_a_meet() -> None:
    """0.696 is not 0.7, and 1.204 ms is over 1.2 ms: the figures are rounded against the goal."""
    line = bench_report.Verdict(0.696, 1.204).line()
    assert "throughput 0.69 (goal >= 0.7: [red]missed" in line
    assert "p50 +1.21 ms (goal <= 1.2 ms: [red]missed" in line
    assert bench_report.shown(0.29) == 0.29 and bench_report.shown(0.7) == 0.7
