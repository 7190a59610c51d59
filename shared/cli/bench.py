"""`proxymq bench`: ProxyMQ against its two anchors, measured in the same run.

The anchors bound what ProxyMQ can do on this machine: straight HTTP to the echo target (no queue
at all) and bare aio-pika RPC with the same guarantees (durable quorum queue, persistent,
confirmed, ack after the confirmed reply). Only ratios taken in one run compare, so rounds
alternate the modes (http, rpc, proxymq, http, ...) and each figure is the median over rounds.
Any failed request or process makes the exit code 1; missing a goal does not. A process that
exits during the run stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path

import aio_pika
import aiohttp
import aiormq
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from enqueuer.settings import EnqueuerSettings
from shared import topology
from shared.cli import bench_batch, bench_partitions, bench_report, bench_stack, ensure_broker
from shared.cli.bench_cpu import CpuMeter, local_broker
from shared.cli.bench_load import RequestFailed, Run, Send, drive, measure, summarize
from shared.cli.bench_rpc import RpcClient
from shared.cli.common import add_amqp_url, description
from shared.connect_failures import redact
from shared.settings import TlsFiles

DEFAULT_BODY = b'{"ping":1}'
RPC_PREFETCH = 64  # the dequeuer's default --concurrency: both serve 64 requests at once
EXIT_INTERRUPTED = 130
SCENARIOS = ("anchors", "ordering", "scaling", "failover", "batching")
ORDERING_MIN_REQUESTS = 8
# Each request in flight holds a connection in the bench and one in the process it calls: 256
# stays well within the usual limit of 1024 open files.
MAX_CONCURRENCY = 256
# The bench's enqueuer keeps its default --max-body: a larger body is answered 413, every
# ProxyMQ request failed once the stack had started (and 1e12 bytes were to be built in memory).
MAX_BODY: int = EnqueuerSettings.model_fields["max_body"].default


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value} is not between {minimum} and {maximum}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not >= {minimum}")
        return value

    return parse


positive, non_negative = at_least(1), at_least(0)
partition_count = at_least(1, topology.MAX_PARTITIONS)


def concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None
    return sorted({at_least(1, MAX_CONCURRENCY)(str(value)) for value in values})


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def output_file(suffix: str | None = None) -> Callable[[str], Path]:
    """argparse type of --json and --plot: a file that can be written, known before the run
    rather than after minutes of measuring."""

    def parse(text: str) -> Path:
        path = Path(text)
        if suffix is not None and path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {suffix} file")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a directory")
        folder = path.parent
        if not folder.is_dir():
            raise argparse.ArgumentTypeError(f"no directory {folder}")
        if not os.access(path if path.exists() else folder, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text}")
        return path

    return parse


def plot_file(text: str) -> Path:
    if importlib.util.find_spec("matplotlib") is None:
        raise argparse.ArgumentTypeError("needs matplotlib: pip install 'proxymq[plot]'")
    return output_file(".png")(text)


def say(message: str) -> None:
    """Errors and notes on stderr, whole lines, never wrapped at a width."""
    print(f"proxymq bench: {message}", file=sys.stderr)


def body_of(size: int | None) -> bytes:
    """A JSON body of exactly `size` bytes (a string padded with x), so content stays valid for
    any service that parses it."""
    if size is None:
        return DEFAULT_BODY
    if size < 8:
        return b"x" * size
    return b'{"p":"' + b"x" * (size - 8) + b'"}'


# The flags each scenario takes; one given to a scenario that would ignore it is refused. The
# numbers' defaults are applied after that check, so a flag left out is told from one given.
TAKES = {
    "anchors": (
        "requests",
        "concurrency",
        "rounds",
        "warmup",
        "body_size",
        "partitions",
        "timeout",
        "json",
        "plot",
    ),
    "ordering": ("requests", "json"),
    "scaling": ("requests", "json"),
    "failover": ("trials", "json"),
    "batching": ("requests", "partitions", "json"),
}
DEFAULTS: dict[str, object] = {
    "requests": 2000,
    "concurrency": [1, 64],
    "rounds": 3,
    "warmup": 300,
    "partitions": 8,
    "timeout": 30.0,
    "trials": 10,
}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def scenarios_help() -> str:
    lines = [f"  {name:<9} {' '.join(map(flag, dests))}" for name, dests in TAKES.items()]
    return "flags each --scenario takes (and --amqp-url):\n" + "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "bench",
        help="measure ProxyMQ against plain HTTP and bare RabbitMQ RPC, in the same run",
        description=description(__doc__),
        epilog=scenarios_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--requests",
        metavar="N",
        type=positive,
        help="requests per mode and round; the scenarios' requests drained (default: 2000)",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N[,N...]",
        type=concurrency_list,
        help=f"requests in flight, 1 to {MAX_CONCURRENCY}; a comma list measures each "
        "(default: 1,64)",
    )
    parser.add_argument(
        "--rounds",
        metavar="N",
        type=positive,
        help="rounds alternating the modes; figures are medians over rounds (default: 3)",
    )
    parser.add_argument(
        "--warmup",
        metavar="N",
        type=non_negative,
        help="unmeasured requests per mode before each concurrency's rounds (default: 300)",
    )
    parser.add_argument(
        "--body-size",
        metavar="BYTES",
        type=at_least(0, MAX_BODY),
        help=f"request body in bytes, at most {MAX_BODY} (the enqueuer's --max-body): a JSON "
        "string padded to size (default: a 10-byte JSON)",
    )
    parser.add_argument(
        "--partitions",
        metavar="N",
        type=partition_count,
        help=f"partitions of the bench service, 1 to {topology.MAX_PARTITIONS} (default: 8)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds,
        help="deadline of each request in seconds (default: 30)",
    )
    parser.add_argument(
        "--json", type=output_file(), metavar="FILE", help="write the raw figures as JSON"
    )
    parser.add_argument(
        "--plot",
        type=plot_file,
        metavar="FILE.png",
        help="draw latency and throughput (needs matplotlib)",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="anchors",
        help="anchors: ProxyMQ against HTTP and RPC; ordering: --ordering key against "
        "partition on one dequeuer; scaling: 1, 2 and 4 dequeuers; failover: rebalance and "
        "failover times over --trials; batching: --batch-size 32 against 1 (default: anchors)",
    )
    parser.add_argument(
        "--trials", metavar="N", type=positive, help="failover trials (default: 10)"
    )
    add_amqp_url(parser)
    parser.set_defaults(run=run)


def http_send(session: aiohttp.ClientSession, url: str, body: bytes, timeout: float) -> Send:
    headers = {"Content-Type": "application/json"}
    limit = aiohttp.ClientTimeout(total=timeout)

    async def send() -> None:
        try:
            async with session.post(url, data=body, headers=headers, timeout=limit) as response:
                await response.read()
                if not 200 <= response.status < 300:
                    code = response.headers.get("X-ProxyMQ-Error")
                    raise RequestFailed(f"HTTP {response.status}" + (f" {code}" if code else ""))
        except aiohttp.ClientError as exc:
            raise RequestFailed(type(exc).__name__) from exc

    return send


def rpc_send(client: RpcClient, body: bytes, timeout: float) -> Send:
    async def send() -> None:
        try:
            await client.call(body, timeout)
        except (aiormq.exceptions.AMQPError, RuntimeError) as exc:  # RuntimeError: channel gone
            raise RequestFailed(type(exc).__name__) from exc

    return send


async def open_modes(
    stack: AsyncExitStack,
    connection: aio_pika.abc.AbstractConnection,
    endpoints: bench_stack.Endpoints,
    args: argparse.Namespace,
) -> dict[str, Send]:
    """One `send` per mode, each over its own client, so no mode shares a pool with another."""
    body, limit = body_of(args.body_size), max(args.concurrency)
    sessions = []
    for _ in range(2):
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
        sessions.append(await stack.enter_async_context(aiohttp.ClientSession(connector=connector)))
    client = RpcClient(endpoints.rpc_queue)
    await client.start(connection)
    return {
        "http": http_send(sessions[0], endpoints.echo_url, body, args.timeout),
        "rpc": rpc_send(client, body, args.timeout),
        "proxymq": http_send(sessions[1], endpoints.proxy_url, body, args.timeout),
    }


async def measure_all(
    modes: dict[str, Send],
    args: argparse.Namespace,
    progress: Progress,
    console: Console,
    meter: CpuMeter,
) -> list[Run]:
    """Per concurrency: a warm-up of every mode, then rounds alternating the modes."""
    runs: list[Run] = []
    for concurrency in args.concurrency:
        tasks = []
        if args.warmup > 0:
            total = args.warmup * len(modes)
            warm = progress.add_task(f"c{concurrency} warm-up", total=total)
            tasks.append(warm)
            for send in modes.values():
                await drive(send, args.warmup, concurrency, tick=advance(progress, warm))
        for round_ in range(1, args.rounds + 1):
            for mode, send in modes.items():
                name = f"c{concurrency} round {round_}/{args.rounds} {bench_report.LABELS[mode]}"
                task = progress.add_task(name, total=args.requests)
                tasks.append(task)
                run = await measure(
                    send, mode, concurrency, round_, args.requests, advance(progress, task), meter
                )
                progress.update(task, description=f"{name}: {run.rps:,.0f} req/s")
                runs.append(run)
        for task in tasks:
            progress.update(task, visible=False)
        summaries = summarize(runs)
        console.print(bench_report.table(concurrency, summaries, args.requests))
        for line in bench_report.cpu_lines(concurrency, summaries):
            console.print(line, highlight=False)
    return runs


def advance(progress: Progress, task: TaskID) -> Callable[[], None]:
    def tick() -> None:
        progress.advance(task)

    return tick


async def bench(args: argparse.Namespace, console: Console, logs: Path) -> int:
    async with AsyncExitStack() as stack:
        try:
            connection = await aio_pika.connect(
                args.amqp_url,
                ssl_context=TlsFiles.of(args).context_for(args.amqp_url),
                client_properties={"connection_name": "proxymq bench"},
            )
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            raise bench_stack.StartFailed(
                f"cannot reach RabbitMQ at {redact(args.amqp_url)}: {exc}"
            ) from exc
        stack.push_async_callback(connection.close)
        with console.status("starting echo target, dequeuer, enqueuer and RPC server"):
            endpoints = await bench_stack.start_all(
                stack,
                connection,
                amqp_url=args.amqp_url,
                tls=TlsFiles.of(args),
                partitions=args.partitions,
                prefetch=RPC_PREFETCH,
                logs=logs,
            )
        console.print(f"bench service [bold]{endpoints.service}[/]; process logs in {logs}")
        modes = await open_modes(stack, connection, endpoints, args)
        meter = CpuMeter({**endpoints.pids, "bench": os.getpid()})
        broker = local_broker(args.amqp_url)
        if broker is not None:
            meter.pids["rabbitmq"] = broker
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, refresh_per_second=4) as progress:
            runs = await bench_stack.while_running(
                measure_all(modes, args, progress, console, meter),
                list(endpoints.children.values()),
            )
        return report(args, console, runs, describe(args, connection))


def report(
    args: argparse.Namespace, console: Console, runs: list[Run], settings: dict[str, object]
) -> int:
    """The verdict, the files asked for, and the exit code: 1 when any request failed."""
    summaries = summarize(runs)
    verdict = bench_report.Verdict.of(summaries)
    console.print(verdict.line())
    if args.json is not None:
        bench_report.write_json(args.json, settings, runs, summaries, verdict)
        console.print(f"figures written to {args.json}")
    if args.plot is not None:
        title = (
            f"ProxyMQ bench: {args.requests} requests x {args.rounds} round(s), "
            f"{settings['body_bytes']}-byte body, {settings['cpus']} CPUs"
        )
        bench_report.plot(args.plot, summaries, title)
        console.print(f"plot written to {args.plot}")
    errors = sum(run.error_count for run in runs)
    if errors:
        say(f"{errors} request(s) failed: the figures are not trustworthy")
    return 1 if errors else 0


def describe(
    args: argparse.Namespace, connection: aio_pika.abc.AbstractConnection
) -> dict[str, object]:
    transport = connection.transport
    version = transport.connection.server_properties.get("version") if transport else None
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "body_bytes": len(body_of(args.body_size)),
        "partitions": args.partitions,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rabbitmq": version if isinstance(version, str) else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


async def guarded(args: argparse.Namespace, console: Console) -> int:
    """The process logs are deleted after a good or an interrupted run, kept after a failure."""
    logs = Path(tempfile.mkdtemp(prefix="proxymq-bench-"))
    code = await outcome(args, console, logs)
    if code in (0, EXIT_INTERRUPTED):
        shutil.rmtree(logs, ignore_errors=True)
    else:
        say(f"process logs kept in {logs}")
    return code


async def outcome(args: argparse.Namespace, console: Console, logs: Path) -> int:
    if args.scenario == "anchors":
        work = bench(args, console, logs)
    else:
        work = bench_partitions.run(
            args.scenario,
            args.amqp_url,
            TlsFiles.of(args),
            args.requests,
            args.trials,
            args.json,
            console,
            logs,
        )
    try:
        return await bench_stack.stopped_by_signal(work)
    except bench_stack.StartFailed as exc:
        say(f"the benchmark could not start: {exc}")
        return 1
    except (bench_stack.ProcessExited, TimeoutError) as exc:
        say(f"the benchmark stopped: {exc}")
        return 1
    except asyncio.CancelledError:
        say("interrupted; processes stopped and bench objects deleted")
        return EXIT_INTERRUPTED


async def check_broker(url: str, tls: TlsFiles) -> None:
    """Before any process starts: the broker answers, and knows the exchange type partitions
    need; else `BrokerProblem` says what to run."""
    if not await ensure_broker.has_consistent_hash(url, tls):
        raise ensure_broker.BrokerProblem(
            f"the broker at {redact(url)} has no x-consistent-hash exchange type",
            f"on the broker run `rabbitmq-plugins enable {' '.join(ensure_broker.PLUGINS)}`",
        )


def usage_problem(args: argparse.Namespace) -> str | None:
    """What the parser cannot see, each flag alone being valid; refused before anything starts.
    The defaults of the flags left out are filled in here."""
    takes = TAKES[args.scenario]
    given = [
        flag(dest)
        for dest in (*DEFAULTS, "body_size", "json", "plot")
        if dest not in takes and getattr(args, dest) is not None
    ]
    if given:
        return (
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --scenario "
            f"{args.scenario}, which takes {' '.join(map(flag, takes))}"
        )
    for dest, default in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.scenario == "ordering" and args.requests < ORDERING_MIN_REQUESTS:
        # A quarter of them is the --ordering partition drain, timed between two arrivals.
        return (
            f"--scenario ordering needs --requests {ORDERING_MIN_REQUESTS} or more, "
            f"not {args.requests}"
        )
    return None


def run(args: argparse.Namespace) -> int:
    """The same loop as the sidecars (uvloop when installed): a fair comparison needs it."""
    problem = usage_problem(args)
    if problem is not None:
        say(problem)
        return 2
    console = Console()
    try:
        asyncio.run(check_broker(args.amqp_url, TlsFiles.of(args)))
    except ensure_broker.BrokerProblem as exc:
        say(str(exc))
        return 1
    if args.scenario == "batching":
        argv = ["--requests", str(args.requests), "--partitions", str(args.partitions)]
        argv += ["--amqp-url", args.amqp_url]
        for name, value in asdict(TlsFiles.of(args)).items():
            argv += [f"--{name.replace('_', '-')}", value] if value else []
        bench_batch.main([*argv, *(["--json", str(args.json)] if args.json else [])])
    runner: Callable[[Coroutine[object, object, int]], int] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        return runner(guarded(args, console))
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
