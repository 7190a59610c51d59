"""Benchmarks of elastic partitions: `proxymq bench --scenario ordering|scaling|failover`.

- ordering: one dequeuer drains requests for 500 keys over 8 partitions from a microservice
  whose every call takes 20 ms, with `--ordering key` and then `--ordering partition`.
- scaling: `--ordering partition` with 1, 2 and 4 dequeuer processes, each calling with
  `--concurrency 2` like a pod whose microservice serves two requests at a time.
- failover: median and worst of N rebalances (a dequeuer joins two others) and failovers (a
  dequeuer is SIGKILLed and every partition answers again).

Requests are published straight to the service's exchange (no reply, no deadline), so the
figures are the dequeuers' and not the enqueuer's; throughput is timed at the microservice over
the middle 60 % of arrivals, while every partition has a backlog.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp
from aio_pika.abc import AbstractRobustConnection
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from shared import envelope, topology
from shared.cli.bench_report import shown
from shared.cli.bench_stack import Child, launch, module_process, while_running
from shared.processes import Process, free_port
from shared.settings import TlsFiles

PARTITIONS, KEYS, LATENCY_MS = 8, 500, 20.0


@dataclass
class Bench:
    amqp_url: str
    tls: TlsFiles
    connection: AbstractRobustConnection
    logs: Path
    stack: AsyncExitStack
    console: Console
    results: dict[str, object] = field(default_factory=dict)
    # The processes that must live: one that exits stops the scenario (`while_running`).
    watched: list[Child] = field(default_factory=list)

    async def sleeper(self) -> str:
        port = free_port()
        process = module_process(
            "sleeper",
            "shared.cli.bench_sleeper",
            ["--port", str(port), "--latency-ms", str(LATENCY_MS)],
            ready_url=f"http://127.0.0.1:{port}/_stats",
        )
        await self.run(process)
        return f"http://127.0.0.1:{port}"

    async def dequeuer(self, service: str, target: str, *args: str) -> Process:
        admin = free_port()
        process = Process(
            "proxymq-dequeuer",
            [
                "--service",
                service,
                "--target",
                target,
                "--admin-port",
                str(admin),
                "--partitions",
                str(PARTITIONS),
                "--log-level",
                "warning",
                *args,
            ],
            ready_url=f"http://127.0.0.1:{admin}/readyz",
            env={"PROXYMQ_AMQP_URL": self.amqp_url, **self.tls.environment()},
        )
        process.admin_port = admin  # type: ignore[attr-defined]
        await self.run(process)
        return process

    async def run(self, process: Process) -> None:
        log = self.logs / f"{process.name}-{uuid.uuid4().hex[:6]}.log"
        self.watched.append(await launch(self.stack, process, log))

    def unwatch(self, process: Process) -> None:
        """`process` is about to be killed on purpose."""
        self.watched[:] = [child for child in self.watched if child.process is not process]

    async def service(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        layout = topology.Topology(name, PARTITIONS)
        await topology.declare(self.connection, layout)
        self.stack.push_async_callback(topology.delete, self.connection, layout)
        return name

    async def publish(self, service: str, count: int) -> None:
        """`count` requests over KEYS keys, confirmed, with no reply wanted."""
        channel = await self.connection.channel(publisher_confirms=True)
        rng = random.Random(7)

        async def one(i: int) -> None:
            key = f"key-{rng.randrange(KEYS)}"
            request = envelope.RequestEnvelope(
                f"bench-{i}",
                service,
                envelope.HttpRequest("POST", "/work", "", (), b"{}"),
                key,
                None,
                None,
            )
            await envelope.publish(
                channel, envelope.encode_request(request), service, key, mandatory=True
            )

        for start in range(0, count, 200):
            await asyncio.gather(*(one(i) for i in range(start, min(count, start + 200))))
        await channel.close()

    async def drain_rate(self, target: str, count: int, timeout: float = 300) -> float:
        """Requests per second while every partition still has work: between the 20th and
        the 80th percentile of arrivals at the microservice. The drain's tail is left out: it
        measures how unevenly the keys hashed, not the dequeuers."""
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                async with http.get(f"{target}/_stats") as response:
                    stats = await response.json()
                if stats["count"] >= count:
                    arrivals = sorted(stats["arrivals"])
                    low, high = int(0.2 * count), int(0.8 * count)
                    return float((high - low) / max(1e-6, arrivals[high] - arrivals[low]))
                await asyncio.sleep(0.2)
            await http.post(f"{target}/_reset")
        raise TimeoutError(f"the dequeuers did not drain {count} requests in {timeout:g} s")

    async def measure_drain(self, dequeuer_args: Sequence[Sequence[str]], count: int) -> float:
        """Publish `count` requests first (so publishing takes no CPU from the drain), start the
        dequeuers, time the drain at the microservice; tear everything down after."""
        async with AsyncExitStack() as stack:
            outer, self.stack, self.watched = self.stack, stack, []
            try:
                target = await self.sleeper()
                service = await self.service()
                await self.publish(service, count)
                await asyncio.gather(*(self.dequeuer(service, target, *a) for a in dequeuer_args))
                return await while_running(self.drain_rate(target, count), self.watched)
            finally:
                self.stack = outer


async def ordering(bench: Bench, count: int) -> None:
    key = await bench.measure_drain([["--ordering", "key", "--concurrency", "128"]], count)
    partition = await bench.measure_drain([["--ordering", "partition"]], count // 4)
    bench.results["ordering"] = {
        "key_rps": key,
        "partition_rps": partition,
        "ratio": key / partition,
    }
    table = Table(
        title=f"ordering: 1 dequeuer, {PARTITIONS} partitions, {KEYS} keys, "
        f"{LATENCY_MS:g} ms per call"
    )
    for column in ("--ordering", "req/s", "ratio"):
        table.add_column(column, justify="right")
    ratio = shown(key / partition)
    table.add_row("key (--concurrency 128)", f"{key:.0f}", f"{ratio:.2f}x")
    table.add_row("partition", f"{partition:.0f}", "1.00x")
    bench.console.print(table)
    bench.console.print(f"goal: key >= 6x partition -> {'met' if ratio >= 6 else 'MISSED'}")


async def scaling(bench: Bench, count: int) -> None:
    rates = {}
    for dequeuers in (1, 2, 4):
        args = [["--ordering", "partition", "--concurrency", "2"]] * dequeuers
        rates[dequeuers] = await bench.measure_drain(args, count * dequeuers)
    bench.results["scaling"] = {str(d): r for d, r in rates.items()}
    table = Table(
        title="scaling: --ordering partition, --concurrency 2 per dequeuer, "
        f"{LATENCY_MS:g} ms per call"
    )
    for column in ("dequeuers", "req/s", "vs one", "goal"):
        table.add_column(column, justify="right")
    goals = {1: 1.0, 2: 1.8, 4: 3.5}
    for dequeuers, rate in rates.items():
        ratio = shown(rate / rates[1])
        table.add_row(
            str(dequeuers),
            f"{rate:.0f}",
            f"{ratio:.2f}x",
            f">= {goals[dequeuers]}x {'met' if ratio >= goals[dequeuers] else 'MISSED'}",
        )
    bench.console.print(table)


async def owned(http: aiohttp.ClientSession, process: Process) -> int:
    port = process.admin_port  # type: ignore[attr-defined]
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("proxymq_dequeuer_partitions_owned{"):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def balanced(http: aiohttp.ClientSession, live: Sequence[Process]) -> float:
    started = time.monotonic()
    low, high = PARTITIONS // len(live), -(-PARTITIONS // len(live))
    while time.monotonic() - started < 30:
        counts = [await owned(http, p) for p in live]
        if sum(counts) == PARTITIONS and all(low <= c <= high for c in counts):
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise TimeoutError("the dequeuers did not balance within 30 s")


async def all_partitions_answer(bench: Bench, service: str) -> None:
    """One request per partition, through the queue, until every one is served."""
    keys = [f"probe-{i}" for i in range(64)]
    channel = await bench.connection.channel(publisher_confirms=True)
    replies = await channel.declare_queue(exclusive=True)
    for key in keys:
        request = envelope.RequestEnvelope(
            key,
            service,
            envelope.HttpRequest("GET", "/probe", "", (), b""),
            key,
            None,
            replies.name,
        )
        await envelope.publish(
            channel, envelope.encode_request(request), service, key, mandatory=True
        )
    got: set[str] = set()
    async with replies.iterator() as messages:
        async for message in messages:
            await message.ack()
            got.add(message.correlation_id or "")
            if got >= set(keys):
                break
    await channel.close()


async def failover(bench: Bench, trials: int) -> None:
    rebalance, fail = [], []
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
        outer, bench.stack, bench.watched = bench.stack, stack, []
        try:
            target = await bench.sleeper()
            service = await bench.service()
            live = [await bench.dequeuer(service, target) for _ in range(2)]
            await balanced(http, live)

            async def trial() -> None:
                joined = await bench.dequeuer(service, target)
                started = time.monotonic()
                await balanced(http, [*live, joined])
                rebalance.append(time.monotonic() - started)
                bench.unwatch(joined)
                joined.signal(signal.SIGKILL)
                killed = time.monotonic()
                await asyncio.wait_for(all_partitions_answer(bench, service), 30)
                fail.append(time.monotonic() - killed)
                await balanced(http, live)

            with Progress(console=bench.console, transient=True) as progress:
                task = progress.add_task("rebalances and failovers", total=trials)
                for _ in range(trials):
                    await while_running(trial(), bench.watched)
                    progress.advance(task)
        finally:
            bench.stack = outer
    bench.results["failover"] = {"rebalance_s": rebalance, "failover_s": fail}
    table = Table(title=f"{trials} trials: 2 dequeuers, a third joins, then is SIGKILLed")
    for column in ("event", "median s", "worst s", "bound"):
        table.add_column(column, justify="right")
    table.add_row(
        "rebalance after a join",
        f"{statistics.median(rebalance):.2f}",
        f"{max(rebalance):.2f}",
        "5 s",
    )
    table.add_row(
        "every partition served after a kill",
        f"{statistics.median(fail):.2f}",
        f"{max(fail):.2f}",
        "5 s",
    )
    bench.console.print(table)


async def run(
    scenario: str,
    amqp_url: str,
    tls: TlsFiles,
    requests: int,
    trials: int,
    json_path: Path | None,
    console: Console,
    logs: Path,
) -> int:
    connection = await aio_pika.connect_robust(
        amqp_url,
        ssl_context=tls.context_for(amqp_url),
        client_properties={"connection_name": "proxymq bench partitions"},
    )
    try:
        async with AsyncExitStack() as stack:
            bench = Bench(amqp_url, tls, connection, logs, stack, console)
            if scenario == "ordering":
                await ordering(bench, requests)
            elif scenario == "scaling":
                await scaling(bench, max(100, requests // 10))
            else:
                await failover(bench, trials)
    finally:
        await connection.close()
    if json_path is not None:
        await asyncio.to_thread(json_path.write_text, json.dumps(bench.results, indent=2))
    return 0
