"""What `proxymq bench` prints and writes: a table per concurrency, the verdict against the
product's goals, the raw figures as JSON and the latency plot.

Ratios are always taken against the RPC anchor of the same run: machines are noisy, and only
figures measured side by side compare.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from shared.cli.bench_load import Run, Summary

MODES = ("http", "rpc", "proxymq")
LABELS = {"http": "HTTP direct", "rpc": "aio-pika RPC", "proxymq": "ProxyMQ"}
# The processes each mode's requests pass through, for the CPU-per-request line.
PATHS = {
    "http": ("bench", "echo"),
    "rpc": ("bench", "rpc server", "rabbitmq"),
    "proxymq": ("bench", "enqueuer", "dequeuer", "echo", "rabbitmq"),
}
OUTSIDE_WARN = 0.1  # cores used by other processes during a run: worth a mention
COLORS = {"http": "tab:green", "rpc": "tab:blue", "proxymq": "tab:red"}
# The product's goals (issue text): throughput at c64 relative to RPC, p50 overhead at c1.
RATIO_AT, RATIO_GOAL, RATIO_TARGET = 64, 0.7, 0.8
OVERHEAD_AT, OVERHEAD_GOAL_MS, OVERHEAD_TARGET_MS = 1, 1.2, 1.0


def shown(value: float, places: int = 2, *, up: bool = False) -> float:
    """A figure as printed, and judged: rounded down (up for a figure that must stay below its
    goal), so a verdict never contradicts the number beside it and no miss is rounded into a
    meet (0.696 is printed 0.69, not 0.70 beside 'missed'; an overhead of 1.204 ms, +1.21)."""
    unit = 10.0**places
    scaled = round(value * unit, 6)  # 0.29 * 100 is 28.999999999999996
    return (math.ceil(scaled) if up else math.floor(scaled)) / unit


def by_key(summaries: Sequence[Summary]) -> dict[tuple[int, str], Summary]:
    return {(s.concurrency, s.mode): s for s in summaries}


def ratio(summary: Summary, rpc: Summary | None) -> float | None:
    return summary.rps / rpc.rps if rpc is not None and rpc.rps > 0 else None


def overhead(summary: Summary, rpc: Summary | None) -> float | None:
    return summary.p50_ms - rpc.p50_ms if rpc is not None else None


def table(concurrency: int, summaries: Sequence[Summary], requests: int) -> Table:
    found = by_key(summaries)
    rpc = found.get((concurrency, "rpc"))
    rounds = max((s.rounds for s in summaries if s.concurrency == concurrency), default=0)
    result = Table(
        title=f"concurrency {concurrency}: {requests} requests, median of {rounds} round(s)",
        title_justify="left",
    )
    result.add_column("mode", no_wrap=True)
    for name in ("req/s", "p50 ms", "p99 ms", "errors", "req/s vs RPC", "p50 - RPC p50 (ms)"):
        result.add_column(name, justify="right")
    for mode in MODES:
        summary = found.get((concurrency, mode))
        if summary is None:
            continue
        share, extra = ratio(summary, rpc), overhead(summary, rpc)
        result.add_row(
            LABELS[mode],
            f"{summary.rps:,.0f}",
            f"{summary.p50_ms:.2f}",
            f"{summary.p99_ms:.2f}",
            f"[red]{summary.errors}[/]" if summary.errors else "0",
            "-" if share is None else f"{share:.2f}",
            "-" if extra is None else f"{extra:+.2f}",
        )
    return result


def cpu_lines(concurrency: int, summaries: Sequence[Summary]) -> list[str]:
    """CPU time per request along each mode's path: on a small machine the throughput ratio
    follows the inverse ratio of these sums."""
    found = by_key(summaries)
    lines = []
    for mode in MODES:
        summary = found.get((concurrency, mode))
        if summary is None or not summary.cpu_us:
            continue
        parts = [(name, summary.cpu_us[name]) for name in PATHS[mode] if name in summary.cpu_us]
        total = sum(us for _, us in parts)
        detail = " + ".join(f"{name} {us:.0f}" for name, us in parts)
        outside = summary.outside_cores
        noise = f"; outside load {outside:.2f} core" if outside >= OUTSIDE_WARN else ""
        lines.append(f"  {LABELS[mode]}: {detail} = {total:.0f} µs CPU per request{noise}")
    return lines


@dataclass(frozen=True)
class Verdict:
    """ProxyMQ against the goals; None where the run did not measure that concurrency."""

    ratio: float | None
    overhead_ms: float | None

    @classmethod
    def of(cls, summaries: Sequence[Summary]) -> Verdict:
        found = by_key(summaries)
        proxy, rpc = found.get((RATIO_AT, "proxymq")), found.get((RATIO_AT, "rpc"))
        share = ratio(proxy, rpc) if proxy is not None else None
        proxy, rpc = found.get((OVERHEAD_AT, "proxymq")), found.get((OVERHEAD_AT, "rpc"))
        extra = overhead(proxy, rpc) if proxy is not None else None
        return cls(share, extra)

    def line(self) -> str:
        def mark(ok: bool) -> str:
            return "[green]met[/]" if ok else "[red]missed[/]"

        if self.ratio is None:
            first = f"c{RATIO_AT} throughput ratio not measured (add {RATIO_AT} to --concurrency)"
        else:
            share = shown(self.ratio)
            first = (
                f"c{RATIO_AT} ProxyMQ/RPC throughput {share:.2f} "
                f"(goal >= {RATIO_GOAL}: {mark(share >= RATIO_GOAL)}, "
                f"target {RATIO_TARGET}: {mark(share >= RATIO_TARGET)})"
            )
        if self.overhead_ms is None:
            second = (
                f"c{OVERHEAD_AT} p50 overhead not measured (add {OVERHEAD_AT} to --concurrency)"
            )
        else:
            extra = shown(self.overhead_ms, up=True)
            second = (
                f"c{OVERHEAD_AT} ProxyMQ p50 - RPC p50 {extra:+.2f} ms "
                f"(goal <= {OVERHEAD_GOAL_MS} ms: {mark(extra <= OVERHEAD_GOAL_MS)}, "
                f"target {OVERHEAD_TARGET_MS} ms: {mark(extra <= OVERHEAD_TARGET_MS)})"
            )
        return f"Verdict: {first}; {second}"

    def as_json(self) -> dict[str, object]:
        return {
            f"ratio_c{RATIO_AT}": self.ratio,
            "ratio_goal": RATIO_GOAL,
            "ratio_target": RATIO_TARGET,
            f"p50_overhead_ms_c{OVERHEAD_AT}": self.overhead_ms,
            "overhead_goal_ms": OVERHEAD_GOAL_MS,
            "overhead_target_ms": OVERHEAD_TARGET_MS,
        }


def write_json(
    path: Path,
    settings: Mapping[str, object],
    runs: Sequence[Run],
    summaries: Sequence[Summary],
    verdict: Verdict,
) -> None:
    found = by_key(summaries)
    rows = []
    for summary in summaries:
        rpc = found.get((summary.concurrency, "rpc"))
        rows.append(
            {
                **asdict(summary),
                "ratio_vs_rpc": ratio(summary, rpc),
                "p50_minus_rpc_ms": overhead(summary, rpc),
            }
        )
    document = {
        "settings": dict(settings),
        "summary": rows,
        "verdict": verdict.as_json(),
        "runs": [run.as_json() for run in runs],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def plot(path: Path, summaries: Sequence[Summary], title: str) -> None:
    """Two panels over concurrency: throughput, and latency (p50 solid, p99 dashed). matplotlib
    is imported here, with the Agg backend, so the command runs without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    concurrencies = sorted({s.concurrency for s in summaries})
    found = by_key(summaries)
    for mode in MODES:
        points = [found[(c, mode)] for c in concurrencies if (c, mode) in found]
        if not points:
            continue
        xs = [p.concurrency for p in points]
        color = COLORS[mode]
        left.plot(xs, [p.rps for p in points], label=LABELS[mode], color=color, marker="o")
        right.plot(
            xs, [p.p50_ms for p in points], label=f"{LABELS[mode]} p50", color=color, marker="o"
        )
        right.plot(
            xs,
            [p.p99_ms for p in points],
            label=f"{LABELS[mode]} p99",
            color=color,
            marker="s",
            markerfacecolor="none",
            linestyle="--",
        )
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrency (requests in flight)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    for axis in (left, right):
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.yaxis.set_minor_formatter(NullFormatter())
    left.set_ylabel("throughput (requests/s, log scale)")
    left.set_title("Throughput")
    right.set_ylabel("latency (ms, log scale)")
    right.set_title("Latency: p50 solid (dots), p99 dashed (squares)")
    figure.suptitle(title)
    figure.savefig(path, dpi=120)
    plt.close(figure)
