"""The load generator of `proxymq bench`: exactly N requests from C workers, timed one by one.

Every mode (plain HTTP, bare RPC, ProxyMQ) is driven by this one loop, so the three figures differ
only by what `send` does. Workers pull from a shared counter instead of taking N/C each, so a
slow request never leaves a worker idle at the end while another still has a backlog.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from shared.cli.bench_cpu import OUTSIDE, CpuMeter

Send = Callable[[], Awaitable[None]]


class RequestFailed(Exception):
    """A request that got an answer, but not a 2xx one; `kind` names it in the error counts."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True)
class Run:
    """One measured pass of one mode at one concurrency."""

    mode: str
    concurrency: int
    round: int
    requests: int
    seconds: float
    latencies: tuple[float, ...] = field(repr=False)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_us: dict[str, float] = field(default_factory=dict)  # per process, µs per request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies, 0.50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 0.99) * 1000

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def outside_cores(self) -> float:
        """The CPU the rest of the machine used during the run, in cores."""
        return self.cpu_us.get(OUTSIDE, 0.0) * self.rps / 1e6

    def as_json(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "round": self.round,
            "requests": self.requests,
            "seconds": round(self.seconds, 4),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 3) if self.latencies else 0,
            "errors": self.error_count,
            "error_kinds": dict(self.errors),
            "cpu_us_per_request": {name: round(us, 1) for name, us in self.cpu_us.items()},
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the reported latency is one a request really had, not an interpolation."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def drive(
    send: Send,
    requests: int,
    concurrency: int,
    *,
    tick: Callable[[], None] = lambda: None,
) -> tuple[float, list[float], Counter[str]]:
    """Run `requests` calls of `send` with `concurrency` workers; return the wall time, each
    request's latency and the errors by kind. A failed request is counted, never retried: a
    benchmark that hides its errors measures something else."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            started = time.perf_counter()
            try:
                await send()
            except RequestFailed as failure:
                errors[failure.kind] += 1
            except (TimeoutError, OSError, ConnectionError) as exc:
                errors[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - started)
            tick()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    return time.perf_counter() - started, latencies, errors


async def measure(
    send: Send,
    mode: str,
    concurrency: int,
    round_: int,
    requests: int,
    tick: Callable[[], None],
    meter: CpuMeter | None = None,
) -> Run:
    before = meter.snapshot() if meter is not None else {}
    seconds, latencies, errors = await drive(send, requests, concurrency, tick=tick)
    cpu = meter.per_request(before, requests) if meter is not None else {}
    return Run(mode, concurrency, round_, requests, seconds, tuple(latencies), errors, cpu)


@dataclass(frozen=True)
class Summary:
    """One mode at one concurrency: the median over rounds of each figure separately."""

    mode: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rounds: int
    cpu_us: dict[str, float]
    outside_cores: float  # the median of each round's own figure


def summarize(runs: Sequence[Run]) -> list[Summary]:
    """Medians, not means: one round disturbed by the machine should not move the figure."""
    groups: dict[tuple[int, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.concurrency, run.mode), []).append(run)
    return [
        Summary(
            mode=mode,
            concurrency=concurrency,
            rps=statistics.median(r.rps for r in group),
            p50_ms=statistics.median(r.p50_ms for r in group),
            p99_ms=statistics.median(r.p99_ms for r in group),
            errors=sum(r.error_count for r in group),
            rounds=len(group),
            cpu_us=_median_cpu(group),
            outside_cores=statistics.median(r.outside_cores for r in group),
        )
        for (concurrency, mode), group in groups.items()
    ]


def _median_cpu(runs: Sequence[Run]) -> dict[str, float]:
    names = {name for run in runs for name in run.cpu_us}
    return {
        name: statistics.median(run.cpu_us[name] for run in runs if name in run.cpu_us)
        for name in sorted(names)
    }
