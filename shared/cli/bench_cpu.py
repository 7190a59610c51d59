"""CPU time per request of each process of the benchmark, read from /proc (Linux only).

On a small machine the modes are CPU-bound: their throughput ratio is about the inverse ratio of
the CPU they spend per request, summed over every process on the path (the broker included).
So the bench reports where that CPU goes; elsewhere than Linux the figures are simply absent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from yarl import URL

PROC = Path("/proc")
LISTEN = "0A"  # the LISTEN state in /proc/net/tcp


def cpu_seconds(pid: int) -> float | None:
    """User plus system time; None when the process is gone or there is no /proc."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU time spent by the whole machine (every core, every process), from /proc/stat."""
    try:
        first = (PROC / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def listening_pid(port: int) -> int | None:
    """The local process listening on TCP `port` (the broker, when it runs here): found by the
    socket's inode, since a machine may run several brokers on other ports."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


OUTSIDE = "outside"  # CPU the machine spent beyond the benchmark's processes


class CpuMeter:
    """Snapshots of the processes' CPU time; `per_request` is the difference, in µs/request.

    It also reports what the rest of the machine used meanwhile (`outside`): on a shared machine
    a round that ran beside someone else's load is visible as such instead of silently slow."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)

    def snapshot(self) -> dict[str, float]:
        taken = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        taken[OUTSIDE] = machine_busy_seconds()
        return {name: value for name, value in taken.items() if value is not None}

    def per_request(self, before: Mapping[str, float], requests: int) -> dict[str, float]:
        after = self.snapshot()
        used = {
            name: after[name] - before[name] for name in after if name in before and requests > 0
        }
        if OUTSIDE in used:
            used[OUTSIDE] -= sum(seconds for name, seconds in used.items() if name != OUTSIDE)
            used[OUTSIDE] = max(0.0, used[OUTSIDE])
        return {name: seconds / requests * 1e6 for name, seconds in used.items()}


def local_broker(amqp_url: str) -> int | None:
    """The pid of the broker at `amqp_url` when it runs on this machine, else None."""
    url = URL(amqp_url)
    if url.host not in ("127.0.0.1", "localhost", "::1"):
        return None
    return listening_pid(url.port or (5671 if url.scheme == "amqps" else 5672))
