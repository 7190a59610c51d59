"""`python -m shared.cli.bench_batch`: what `--batch-size` buys against a microservice whose calls
cost more than its items.

The microservice (this module again, run with `--serve`) does one call at a time, like a service
with a single worker, and each call costs 10 ms plus 0.5 ms per item: a fixed cost per call
(a round trip to a database, a model invocation) that batching shares between items. For each
batch size, N requests are published straight to the service's exchange with aio-pika (no
`reply_to`: nobody waits for the answers, so only the drain is measured, not an enqueuer), then a
dequeuer is started and drains them. Throughput is timed by the microservice itself, from the
start of its first call to the end of its last, so the dequeuer's start-up is not counted.

The goal: batches of 32 drain at least 5 times faster than single requests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
from aiohttp import web
from rich.console import Console
from rich.table import Table

from shared import envelope, service, topology
from shared.cli import bench_stack
from shared.cli.bench_report import shown
from shared.cli.common import add_amqp_url
from shared.connect_failures import redact
from shared.envelope import HttpRequest, RequestEnvelope
from shared.processes import free_port
from shared.settings import TlsFiles

CALL_COST = 0.010  # seconds per call, whatever it holds
ITEM_COST = 0.0005  # seconds per item of a call
WORK_PATH = "/work"
BATCH_PATH = "/batch"
GOAL = 5.0
DRAIN_TIMEOUT = 600.0


# --- the microservice ------------------------------------------------------------------------


@dataclass
class Stats:
    """What the microservice did, on its own clock (monotonic seconds)."""

    calls: int = 0
    items: int = 0
    largest: int = 0
    first_start: float | None = None
    last_end: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "calls": self.calls,
            "items": self.items,
            "largest": self.largest,
            "seconds": None
            if self.first_start is None or self.last_end is None
            else self.last_end - self.first_start,
        }


STATS = web.AppKey("stats", Stats)
WORKER = web.AppKey("worker", asyncio.Lock)


async def work(app: web.Application, items: int) -> None:
    """One call's cost, one call at a time: the lock is the single worker, so the cost is
    capacity (concurrent calls would only hide it behind asyncio.sleep)."""
    stats = app[STATS]
    async with app[WORKER]:
        if stats.first_start is None:
            stats.first_start = time.monotonic()
        await asyncio.sleep(CALL_COST + ITEM_COST * items)
        stats.calls += 1
        stats.items += items
        stats.largest = max(stats.largest, items)
        stats.last_end = time.monotonic()


async def plain(request: web.Request) -> web.Response:
    await request.read()
    await work(request.app, 1)
    return web.json_response({"ok": True})


async def batch(request: web.Request) -> web.Response:
    """The batch protocol of docs/batching.md, every item answered 200."""
    items = await request.json()
    await work(request.app, len(items))
    body = envelope_body({"ok": True})
    answer = {"status": 200, "headers": [["Content-Type", "application/json"]], "body": body}
    return web.json_response([answer] * len(items))


def envelope_body(value: object) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].to_json())


async def ready(request: web.Request) -> web.Response:
    return web.Response(text="ready")


def create_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = Stats()
    app[WORKER] = asyncio.Lock()
    app.router.add_post(WORK_PATH, plain)
    app.router.add_post(BATCH_PATH, batch)
    app.router.add_get("/stats", stats)
    app.router.add_get("/ready", ready)
    return app


async def serve(port: int) -> int:
    runner = await service.start_site(create_app(), "127.0.0.1", port)
    try:
        await service.wait_for_stop()
    finally:
        await runner.cleanup()
    return 0


# --- the benchmark ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    batch_size: int
    requests: int
    seconds: float
    calls: int
    largest: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def mean_batch(self) -> float:
        return self.requests / self.calls


async def publish(connection: aio_pika.abc.AbstractConnection, name: str, count: int) -> None:
    """`count` requests, each with its own partition key, confirmed by the broker; no reply_to."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        exchange = topology.exchange_name(name)
        body = b'{"job": 1}'
        headers = (("Content-Type", "application/json"),)
        for start in range(0, count, 500):
            confirms = []
            for i in range(start, min(count, start + 500)):
                request = RequestEnvelope(
                    request_id=uuid.uuid4().hex,
                    service=name,
                    request=HttpRequest("POST", WORK_PATH, "", headers, body),
                    partition_key=f"k{i}",
                    deadline=None,
                    reply_to=None,
                )
                message = envelope.encode_request(request)
                confirms.append(
                    envelope.publish(channel, message, exchange, f"k{i}", mandatory=True)
                )
            await asyncio.gather(*confirms)
    finally:
        await channel.close()


async def drained(http: aiohttp.ClientSession, url: str, count: int) -> dict[str, object]:
    """The microservice's stats once it has done `count` items."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        async with http.get(f"{url}/stats") as response:
            figures: dict[str, object] = await response.json()
        done = figures["items"]
        if isinstance(done, int) and done >= count:
            return figures
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{count} requests were not drained within {DRAIN_TIMEOUT:g} s")


async def measure(
    args: argparse.Namespace, batch_size: int, connection: aio_pika.abc.AbstractConnection
) -> Result:
    """One fresh microservice, service and dequeuer per batch size; all torn down after."""
    logs = Path(args.logs)
    name = f"bench-batch-{uuid.uuid4().hex[:8]}"
    env = {"PROXYMQ_AMQP_URL": args.amqp_url, **TlsFiles.of(args).environment()}
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
        port = free_port()
        microservice = bench_stack.module_process(
            "microservice",
            "shared.cli.bench_batch",
            ["--serve", "--port", str(port)],
            ready_url=f"http://127.0.0.1:{port}/ready",
        )
        await bench_stack.launch(stack, microservice, logs / f"microservice-{batch_size}.log")
        stack.push_async_callback(bench_stack.delete_topology, connection, name)
        await topology.declare(connection, topology.Topology(name, args.partitions))
        await publish(connection, name, args.requests)
        target = f"http://127.0.0.1:{port}"
        await bench_stack.start_sidecar(
            stack,
            "proxymq-dequeuer",
            [
                *("--service", name, "--target", target, "--partitions", str(args.partitions)),
                *("--concurrency", str(args.concurrency), "--batch-size", str(batch_size)),
                *("--batch-wait-ms", str(args.batch_wait_ms), "--ready-path", "/ready"),
            ],
            env,
            logs,
        )
        figures = await drained(http, target, args.requests)
    seconds, calls, largest = figures["seconds"], figures["calls"], figures["largest"]
    assert isinstance(seconds, float) and isinstance(calls, int) and isinstance(largest, int)
    return Result(batch_size, args.requests, seconds, calls, largest)


async def bench(args: argparse.Namespace, console: Console) -> int:
    console.print(
        f"[bold]batching[/]: {args.requests} requests, a microservice costing "
        f"{CALL_COST * 1000:g} ms per call + {ITEM_COST * 1000:g} ms per item, one call at a "
        f"time; broker {redact(args.amqp_url)}"
    )
    connection = await aio_pika.connect(
        args.amqp_url,
        ssl_context=TlsFiles.of(args).context_for(args.amqp_url),
        client_properties={"connection_name": "proxymq bench-batch"},
    )
    results = []
    try:
        for batch_size in (1, args.batch_size):
            with console.status(f"draining with --batch-size {batch_size}"):
                results.append(await measure(args, batch_size, connection))
    finally:
        await connection.close()
    single, batched = results
    table = Table(title="proxymq-dequeuer --batch-size, draining pre-published requests")
    for column in ("batch size", "requests", "seconds", "req/s", "calls", "mean batch", "max"):
        table.add_column(column, justify="right")
    table.add_column("vs single", justify="right")
    for result in results:
        table.add_row(
            str(result.batch_size),
            str(result.requests),
            f"{result.seconds:.2f}",
            f"{result.rate:.0f}",
            str(result.calls),
            f"{result.mean_batch:.1f}",
            str(result.largest),
            f"{shown(result.rate / single.rate, 1):.1f}x",
        )
    console.print(table)
    ratio = shown(batched.rate / single.rate, 1)
    verdict = "[green]met[/]" if ratio >= GOAL else "[red]missed[/]"
    console.print(f"goal: batches of {batched.batch_size} >= {GOAL:g}x single: {verdict}")
    if args.json:
        figures = [{**vars(r), "rate": r.rate, "mean_batch": r.mean_batch} for r in results]
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(figures, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shared.cli.bench_batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests drained (2000)")
    parser.add_argument("--batch-size", type=int, default=32, help="against 1 (32)")
    parser.add_argument("--batch-wait-ms", type=int, default=20, help="dequeuer flag (20)")
    parser.add_argument("--concurrency", type=int, default=64, help="dequeuer flag (64)")
    parser.add_argument("--partitions", type=int, default=8, help="of the bench service (8)")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--logs", metavar="DIR", help="process logs (a temporary directory)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    add_amqp_url(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve:
        service.run(serve(args.port))
    console = Console()
    if args.batch_size < 2 or args.requests < 1 or args.concurrency < args.batch_size:
        parser.error("need --batch-size >= 2, --requests >= 1, --concurrency >= --batch-size")
    with tempfile.TemporaryDirectory(prefix="proxymq-bench-batch-") as scratch:
        args.logs = args.logs or scratch
        try:
            sys.exit(asyncio.run(bench_stack.stopped_by_signal(bench(args, console))))
        except (bench_stack.StartFailed, TimeoutError, OSError) as exc:
            print(f"proxymq bench: the benchmark stopped: {exc}", file=sys.stderr)
            sys.exit(1)
        except (KeyboardInterrupt, asyncio.CancelledError):
            print(
                "proxymq bench: interrupted; processes stopped and bench objects deleted",
                file=sys.stderr,
            )
            sys.exit(130)


if __name__ == "__main__":
    main()
