"""Traffic, bookkeeping and the three checks every fault test makes.

The issue's promise, as checked here after each fault:

1. nothing accepted is lost: every request answered 200 (by the microservice) or 202 (accepted
   for later) reaches the microservice, at least once, and every 202's result becomes final;
2. what cannot be accepted is refused at once with a clear error: statuses are only 200, 202,
   503 `broker_unavailable` (with Retry-After) or 504 `timeout`;
3. nothing hangs: every synchronous answer comes within its deadline, every 202 or 503 at once.

Per-key order is checked on what the microservice saw: the first arrival of each request of a
key comes in the order the key's requests were sent (at-least-once: repeats are allowed and
counted, reordering is not).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import REPORT_ENV
from tests.target import Target

HANG_SLACK = 1.5  # seconds past a deadline still counted as "on time" (2 busy cores)
ANSWER_AT_ONCE = 2.5  # a 202 or a refusal must come this fast, outage or not
PUBLISH_BOUND = 10.0 + HANG_SLACK  # enqueuer's PUBLISH_TIMEOUT: a black hole can't be seen sooner
HANG = -1  # status recorded when the enqueuer did not answer at all in time
NO_CONNECTION = -2  # status recorded when the enqueuer refused the TCP connection


@dataclass(frozen=True)
class Arrival:
    """One call the microservice got, with what the dequeuer told it about the delivery."""

    at: float
    earlier_deliveries: str | None
    attempt: str | None


class TimedTarget(Target):
    """The test microservice, also noting when and how each keyed request arrived (monotonic
    clock of the test process, the same clock the traffic uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: dict[tuple[str, int], list[Arrival]] = defaultdict(list)

    async def keyed(self, request: web.Request) -> web.Response:
        key, seq = request.match_info["key"], int(request.match_info["seq"])
        self.arrivals[(key, seq)].append(
            Arrival(
                time.monotonic(),
                request.headers.get("X-ProxyMQ-Earlier-Deliveries"),
                request.headers.get("X-ProxyMQ-Attempt"),
            )
        )
        return await super().keyed(request)


@dataclass
class Call:
    key: str
    seq: int
    asynchronous: bool
    started: float
    elapsed: float
    status: int
    error: str | None = None
    request_id: str | None = None
    retry_after: str | None = None
    final: int | None = None  # the 202's result status, once polled


@dataclass
class Traffic:
    """Paced requests over `keys` keys; a key's next request leaves once the previous one is
    answered, so its requests are sent in order. Every other request per key is asynchronous
    (`Prefer: respond-async`, no deadline: it must be processed however long the outage);
    synchronous ones carry `X-Request-Timeout: timeout`."""

    url: str  # http://host:port/{service}
    keys: int = 12
    rate: float = 80.0  # requests a second, all keys together
    timeout: float = 5.0
    work: float = 0.005  # seconds the microservice spends per request
    prefix: str = "k"
    calls: list[Call] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _next: dict[str, int] = field(default_factory=dict)

    def key_names(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(self.keys)]

    async def run(self, http: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._loop(http, key) for key in self.key_names()))

    async def _loop(self, http: aiohttp.ClientSession, key: str) -> None:
        pause = self.keys / self.rate
        while not self.stop.is_set():
            seq = self._next.get(key, 0)
            await self.send(http, key, asynchronous=seq % 2 == 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), pause)

    async def send(
        self,
        http: aiohttp.ClientSession,
        key: str,
        *,
        asynchronous: bool,
        work: float | None = None,
    ) -> Call:
        seq = self._next.get(key, 0)
        self._next[key] = seq + 1
        headers = {"X-Partition-Key": key}
        if asynchronous:
            headers["Prefer"] = "respond-async"
        else:
            headers["X-Request-Timeout"] = str(self.timeout)
        bound = (PUBLISH_BOUND if asynchronous else self.timeout) + HANG_SLACK + 5
        started = time.monotonic()
        call = Call(key, seq, asynchronous, started, 0.0, HANG)
        try:
            async with asyncio.timeout(bound):
                async with http.post(
                    f"{self.url}/keyed/{key}/{seq}?sleep={self.work if work is None else work}",
                    headers=headers,
                ) as response:
                    await response.read()
                    call.status = response.status
                    call.error = response.headers.get("X-ProxyMQ-Error")
                    call.request_id = response.headers.get("X-Correlation-ID")
                    call.retry_after = response.headers.get("Retry-After")
        except TimeoutError:
            call.status = HANG
        except aiohttp.ClientError as exc:
            call.status, call.error = NO_CONNECTION, repr(exc)
        call.elapsed = time.monotonic() - started
        self.calls.append(call)
        return call

    async def backlog(
        self, http: aiohttp.ClientSession, keys: int, per_key: int, work: float
    ) -> list[Call]:
        """Asynchronous requests queued faster than they are processed: confirmed by the broker
        and still waiting when the fault comes."""

        async def one_key(key: str) -> list[Call]:
            return [
                await self.send(http, key, asynchronous=True, work=work) for _ in range(per_key)
            ]

        names = [f"{self.prefix}b{i}" for i in range(keys)]
        return [c for calls in await asyncio.gather(*map(one_key, names)) for c in calls]

    # -- after the run ----------------------------------------------------------------------

    def accepted(self) -> list[Call]:
        return [c for c in self.calls if c.status in (200, 202)]

    def sent_per_key(self) -> dict[str, int]:
        return dict(self._next)

    async def collect_results(self, http: aiohttp.ClientSession, timeout: float) -> list[Call]:
        """Poll every 202 until its result is final; returns those still pending at `timeout`."""
        base = self.url.rsplit("/", 1)[0]
        pending = [c for c in self.calls if c.status == 202]
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            still = []
            for call in pending:
                async with http.get(f"{base}/_proxymq/requests/{call.request_id}") as response:
                    await response.read()
                    if response.status == 202:
                        still.append(call)
                    else:
                        call.final = response.status
            pending = still
            if pending:
                await asyncio.sleep(0.3)
        return pending


@contextlib.asynccontextmanager
async def running(traffic: Traffic, http: aiohttp.ClientSession) -> AsyncIterator[Traffic]:
    task = asyncio.create_task(traffic.run(http))
    try:
        yield traffic
    finally:
        traffic.stop.set()
        await task


async def processed(target: TimedTarget, calls: Iterable[Call], timeout: float) -> list[Call]:
    """Wait until every call reached the microservice; returns those that never did."""
    wanted = list(calls)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        missing = [c for c in wanted if (c.key, c.seq) not in target.arrivals]
        if not missing:
            return []
        await asyncio.sleep(0.2)
    return [c for c in wanted if (c.key, c.seq) not in target.arrivals]


@dataclass
class Verdict:
    """What a fault did to the traffic; `check()` asserts the promise, `figures` are reported."""

    figures: dict[str, object]
    problems: list[str]

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)


async def verify(
    traffic: Traffic,
    target: TimedTarget,
    http: aiohttp.ClientSession,
    *,
    settle: float = 60.0,
    statuses: frozenset[int] = frozenset({200, 202, 503, 504}),
    logs: Callable[[], str] = str,
    lost_with_node: Callable[[Call], bool] = lambda call: False,
) -> Verdict:
    """`logs()`, the dequeuers' log lines once the requests are processed, tell which partition
    served each request: a key served from two partitions is a problem of its own (after a
    broker restart RabbitMQ rebuilds its hash ring in an order of its own, and the sidecars
    must put it back before they publish: `shared/hash_ring.py`)."""
    problems: list[str] = []
    accepted = traffic.accepted()
    lost = await processed(target, accepted, settle)
    pending = await traffic.collect_results(http, settle / 2)
    # A reply confirmed into the enqueuer's reply queue as its node stopped goes with the
    # queue (reliability.md, Known gaps): counted apart, and a problem at any other moment.
    with_node = [call for call in pending if lost_with_node(call)]
    pending = [call for call in pending if not lost_with_node(call)]
    served_by, moved_keys = partitions_in(logs()), 0
    for call in lost[:10]:
        problems.append(f"lost: {call}")
    for call in pending[:10]:
        arrived = [
            round(a.at - call.started, 2) for a in target.arrivals.get((call.key, call.seq), [])
        ]
        problems.append(f"202 without a final result: {call}; arrived after {arrived} s")
    for call in traffic.calls:
        if call.status not in statuses:
            problems.append(f"unexpected answer {call.status} ({call.error}): {call}")
        elif call.status == 503 and (call.error != "broker_unavailable" or not call.retry_after):
            problems.append(f"503 without broker_unavailable and Retry-After: {call}")
        elif call.status == 429 and (call.error != "backpressure" or not call.retry_after):
            problems.append(f"429 without backpressure and Retry-After: {call}")
        elif call.status == 504 and call.error != "timeout":
            problems.append(f"504 without code timeout: {call}")
        if not call.asynchronous and call.elapsed > traffic.timeout + HANG_SLACK:
            problems.append(f"synchronous call past its deadline ({call.elapsed:.2f} s): {call}")
        if call.asynchronous and call.elapsed > PUBLISH_BOUND:
            problems.append(f"asynchronous call not answered at once ({call.elapsed:.2f} s)")
    finals = [c.final for c in traffic.calls if c.status == 202 and c.final is not None]
    if any(f != 200 for f in finals):
        problems.append(f"202 results other than 200: {sorted(set(finals))}")
    duplicates = 0
    for key, count in traffic.sent_per_key().items():
        first_seen = sorted(
            (seen[0].at, seq)
            for seq in range(count)
            if (seen := target.arrivals.get((key, seq))) is not None
        )
        ids = {c.seq: c.request_id for c in traffic.calls if c.key == key}
        used = {p for _, seq in first_seen if (p := served_by.get(ids.get(seq) or ""))}
        if len(used) > 1:
            moved_keys += 1
            where = {
                p: ranges(s for _, s in first_seen if served_by.get(ids.get(s) or "") == p)
                for p in sorted(used)
            }
            problems.append(f"{key} was served from two partitions: {where}")
        order = [seq for _, seq in first_seen]
        if order != sorted(order):
            problems.append(f"{key} out of order: {order}")
            problems += misordered(traffic, target, key, order, served_by)
        duplicates += sum(len(target.arrivals.get((key, s), [])) > 1 for s in range(count))
    if moved_keys:  # when the sidecars put the ring back, against their reconnects
        problems += [
            f"  log: {line}"
            for line in logs().splitlines()
            if "hash_ring" in line or "reconnected" in line or "connected to" in line
        ][:30]
    refused_late = [
        c.elapsed for c in traffic.calls if c.status == 503 and c.elapsed > ANSWER_AT_ONCE
    ]
    figures: dict[str, object] = {
        "sent": len(traffic.calls),
        "accepted": len(accepted),
        "answered_200": sum(c.status == 200 for c in traffic.calls),
        "accepted_202": sum(c.status == 202 for c in traffic.calls),
        "refused_503": sum(c.status == 503 for c in traffic.calls),
        "timed_out_504": sum(c.status == 504 for c in traffic.calls),
        "backpressure_429": sum(c.status == 429 for c in traffic.calls),
        "lost_requests": len(lost),
        "lost_results": len(pending),
        "results_lost_with_their_node": len(with_node),
        "processed_twice": duplicates,
        "keys_moved_to_another_partition": moved_keys,
        "slowest_sync_s": round(
            max((c.elapsed for c in traffic.calls if not c.asynchronous), default=0.0), 2
        ),
        "slowest_async_s": round(
            max((c.elapsed for c in traffic.calls if c.asynchronous), default=0.0), 2
        ),
        "refusals_slower_than_2.5s": len(refused_late),
    }
    return Verdict(figures, problems)


SERVED = re.compile(r"replied correlation_id=(\S+) .*?partition=(\S+)")


def partitions_in(logs: str) -> dict[str, str]:
    """Request id -> the partition whose dequeuer replied to it, from the dequeuers' log lines."""
    return {match[1]: match[2] for match in SERVED.finditer(logs)}


def ranges(seqs: Iterable[int]) -> str:
    """`0-46, 108-132`: a key's request numbers, shortly."""
    runs: list[list[int]] = []
    for seq in sorted(seqs):
        if runs and seq == runs[-1][-1] + 1:
            runs[-1].append(seq)
        else:
            runs.append([seq])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def misordered(
    traffic: Traffic,
    target: TimedTarget,
    key: str,
    order: list[int],
    served_by: dict[str, str] | None = None,
) -> list[str]:
    """For each request that reached the microservice after a later one of its key, and for its
    neighbours: what the caller got and every arrival, to tell a late publish from a late
    redelivery (times in seconds from the key's first request)."""
    late = {seq for i, seq in enumerate(order) if any(seq < earlier for earlier in order[:i])}
    calls = {c.seq: c for c in traffic.calls if c.key == key}
    origin = min((c.started for c in calls.values()), default=0.0)
    lines = []
    for seq in sorted({near for s in late for near in (s - 1, s, s + 1)}):
        call = calls.get(seq)
        if call is None:
            continue
        arrivals = [
            f"{a.at - origin:.2f}s (earlier deliveries {a.earlier_deliveries or 0}, "
            f"attempt {a.attempt})"
            for a in target.arrivals.get((key, seq), [])
        ]
        partition = (served_by or {}).get(call.request_id or "", "?")
        lines.append(
            f"  {key}/{seq} id={call.request_id} sent {call.started - origin:.2f}s, answered "
            f"{call.status} {call.error or ''} after {call.elapsed:.2f}s; arrived {arrivals} "
            f"from {partition}"
        )
    return lines


def recovery_time(traffic: Traffic, since: float) -> float | None:
    """Seconds from `since` (the broker back) until every key had a request accepted again."""
    firsts: list[float] = []
    for key in traffic.key_names():
        done = [
            c.started + c.elapsed
            for c in traffic.calls
            if c.key == key and c.status in (200, 202) and c.started >= since
        ]
        if not done:
            return None
        firsts.append(min(done))
    return max(firsts) - since


async def wait_recovered(traffic: Traffic, since: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recovered = recovery_time(traffic, since)
        if recovered is not None:
            return recovered
        await asyncio.sleep(0.1)
    raise AssertionError(f"service did not recover within {timeout:g} s")


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2) if values else 0.0,
        "worst": round(max(values), 2) if values else 0.0,
    }


def report(name: str, figures: dict[str, object]) -> None:
    """Print the figures (shown with `-s` or on failure) and append them to the session's
    report file, which the reliability conftest prints at the end of the run."""
    line = json.dumps({"test": name, **figures}, sort_keys=False)
    print("RELIABILITY", line)
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as file:
            file.write(line + "\n")
