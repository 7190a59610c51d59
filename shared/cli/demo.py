"""`proxymq demo`: the whole pipeline on this machine, a dozen real calls through it.

It starts a small local website (so no internet is needed), `url-fetcher --allow-private`, a
dequeuer for the service and an enqueuer, each as the console script you would run, on free
ports; sends a dozen calls through the enqueuer; prints what came back; then stops everything and
deletes the service's topology, so a demo leaves no queues behind. It exits 0 only when every
call got the expected answer, so it doubles as an end-to-end smoke test.

Processes are stopped however the demo ends (failure, Ctrl-C, SIGTERM); their output goes to log
files whose tails are printed when something fails.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared import topology
from shared.cli import demo_plan
from shared.cli.common import add_amqp_url, description
from shared.cli.ensure_broker import BrokerProblem, connect, quiet_amqp_logs
from shared.cli.status import UnknownService as NoTopology
from shared.cli.status import from_amqp
from shared.cli.topology_cmd import service_name
from shared.connect_failures import redact
from shared.processes import Process, free_port
from shared.settings import TlsFiles

PARTITIONS = 8
START_TIMEOUT = 30.0
STOP_GRACE = 30.0
LOG_TAIL_LINES = 25


class DemoFailed(Exception):
    """The demo cannot go on; the message says why and what to do."""


class Interrupted(BaseException):
    """SIGTERM, turned into an exception so the same `finally` stops the processes."""


class Stack:
    """The demo's processes, started in dependency order and stopped in reverse."""

    def __init__(self, amqp_url: str, logs: Path, tls: TlsFiles) -> None:
        self.amqp_url = amqp_url
        self.tls = tls
        self.logs = logs
        self.processes: list[Process] = []
        self._files: list[IO[bytes]] = []

    def start(self, label: str, name: str, args: list[str], ready_url: str) -> Process:
        log = (self.logs / f"{len(self.processes)}-{label}.log").open("ab")
        self._files.append(log)
        # The URL goes by environment, never on a command line (`ps` shows those).
        env = {"PROXYMQ_AMQP_URL": self.amqp_url, **self.tls.environment()}
        process = Process(name, args, ready_url=ready_url, env=env, log=log)
        process.name = label
        self.processes.append(process)
        process.start()
        try:
            process.wait_ready(START_TIMEOUT)
        except (RuntimeError, TimeoutError) as exc:
            raise DemoFailed(f"{label} did not start: {exc}") from None
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop(STOP_GRACE)
        for file in self._files:
            file.close()

    def tails(self) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            parts.append(f"--- {path.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def uninterruptible() -> Iterator[None]:
    """While stopping: a second Ctrl-C must not leave processes or queues behind (each stop is
    bounded by its grace period, so this cannot hang)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def prepare(amqp_url: str, service: str, tls: TlsFiles) -> None:
    """Refuse a service name in real use (consumers, or waiting messages): the demo would steal
    its requests and then delete its queues. An idle leftover (a killed demo) is removed, since
    its partition count may not match."""
    connection = await connect(amqp_url, f"proxymq demo {service}", tls=tls)
    try:
        try:
            found = await from_amqp(service, connection, note="")
        except NoTopology:
            return
        consumers = sum(p.consumers for p in found.partitions)
        ready = sum(p.ready for p in found.partitions)
        if consumers or ready:
            raise DemoFailed(
                f"service {service!r} is in use on {redact(amqp_url)} ({consumers} consumers, "
                f"{ready} waiting messages): run the demo under another name, "
                "`proxymq demo --service demo-fetcher`"
            )
        await topology.delete(connection, topology.Topology(service))
    finally:
        await connection.close()


async def cleanup(amqp_url: str, service: str, tls: TlsFiles) -> None:
    connection = await connect(amqp_url, f"proxymq demo {service} cleanup", tls=tls)
    try:
        await topology.delete(connection, topology.Topology(service))
    finally:
        await connection.close()


@dataclass(frozen=True)
class Endpoints:
    enqueuer: str
    site: str


def start_all(stack: Stack, service: str, console: Console) -> Endpoints:
    """Start the four processes in dependency order, each waited for until ready."""
    site_port, fetcher_port = free_port(), free_port()
    dequeuer_admin, enqueuer_port, enqueuer_admin = free_port(), free_port(), free_port()
    site = f"http://127.0.0.1:{site_port}"
    fetcher = f"http://127.0.0.1:{fetcher_port}"
    enqueuer = f"http://127.0.0.1:{enqueuer_port}"
    local = "127.0.0.1"
    # Service names and these URLs hold no spaces, so plain split() builds the argument lists.
    with console.status("starting the website, url-fetcher, the dequeuer and the enqueuer..."):
        stack.start(
            "website",
            "python",
            f"-m shared.cli.demo_site --port {site_port}".split(),
            f"{site}/healthz",
        )
        stack.start(
            "url-fetcher",
            "url-fetcher",
            f"--host {local} --port {fetcher_port} --allow-private".split(),
            f"{fetcher}/healthz",
        )
        stack.start(
            "dequeuer",
            "proxymq-dequeuer",
            f"--service {service} --partitions {PARTITIONS} --target {fetcher} --instance-id demo "
            f"--admin-host {local} --admin-port {dequeuer_admin}".split(),
            f"http://{local}:{dequeuer_admin}/readyz",
        )
        stack.start(
            "enqueuer",
            "proxymq-enqueuer",
            f"--host {local} --port {enqueuer_port} --instance-id demo "
            f"--admin-host {local} --admin-port {enqueuer_admin}".split(),
            f"http://{local}:{enqueuer_admin}/readyz",
        )
    console.print(components(site, fetcher, dequeuer_admin, enqueuer, enqueuer_admin, service))
    return Endpoints(enqueuer, site)


def components(
    site: str,
    fetcher: str,
    dequeuer_admin: int,
    enqueuer: str,
    enqueuer_admin: int,
    service: str = "url-fetcher",
) -> Table:
    """Where each process listens, a row each, read at 80 columns too."""
    table = Table.grid(padding=(0, 2))
    table.add_row("website", site, "pages, a redirect, a 404 and a slow page")
    table.add_row("url-fetcher", fetcher, "the microservice (--allow-private)")
    table.add_row(
        "dequeuer", f"admin :{dequeuer_admin}", f"consumes {service}.p0..p{PARTITIONS - 1}"
    )
    table.add_row("enqueuer", enqueuer, f"admin :{enqueuer_admin}")
    return table


def render(
    calls: list[demo_plan.Call], answers_: list[demo_plan.Answer], site: str, console: Console
) -> None:
    """The answers, read at 80 columns too: no borders but under the header, a call's path
    without its method (every one is a POST), and 8 characters of its correlation id."""
    table = Table(
        title="POST calls through the enqueuer",
        title_justify="left",
        caption="key: X-Partition-Key; calls with one key are served in order, one at a time. "
        "id: the start of the call's X-Correlation-ID, as the sidecars log it",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
    )
    table.add_column("#", justify="right")
    table.add_column("request")
    table.add_column("key")
    table.add_column("status")
    table.add_column("ms", justify="right")
    table.add_column("what came back")
    table.add_column("id")
    for number, (call, answer) in enumerate(zip(calls, answers_, strict=True), start=1):
        mark = "" if answer.problem is None else f"\n[red]✗ {answer.problem}[/red]"
        table.add_row(
            str(number),
            f"{call.path}\n[dim]{escape(what_is_fetched(call, site))}[/dim]",
            call.key or "-",
            answer.status,
            f"{answer.latency_ms:.0f}",
            answer.summary + mark,
            answer.correlation_id[:8],
        )
    console.print(table)


def what_is_fetched(call: demo_plan.Call, site: str) -> str:
    """The pages' paths on the local site (its host and port are noise in a table)."""
    body = call.body if isinstance(call.body, dict) else {}
    urls = [str(url) for url in body.get("urls") or [body.get("url")]]
    return ", ".join(url.removeprefix(site) if url.startswith(site + "/") else url for url in urls)


def exercise(stack: Stack, service: str, dead_port: int, amqp_url: str, console: Console) -> int:
    """Start everything, send the calls, show the answers; 0 when every one was expected."""
    console.print(f"[bold]ProxyMQ demo[/bold] (broker {redact(amqp_url)})")
    endpoints = start_all(stack, service, console)
    calls = demo_plan.plan(service, endpoints.site, dead_port)
    started = time.perf_counter()
    with console.status(f"sending {len(calls)} calls..."):
        results = asyncio.run(demo_plan.send_all(endpoints.enqueuer, calls))
    elapsed = time.perf_counter() - started
    render(calls, results, endpoints.site, console)
    good = sum(answer.problem is None for answer in results)
    console.print(summary(good, len(results), elapsed, service))
    if good != len(results):
        console.print(stack.tails(), markup=False, highlight=False)
        return 1
    return 0


def summary(good: int, calls: int, elapsed: float, service: str) -> str:
    """The closing line, in green when every call got the expected answer; the partitions are
    the dequeuer's row above (it said them again, and wrapped at 80 columns)."""
    style = "green" if good == calls else "red"
    return (
        f"[{style}]{good}/{calls} calls got the expected answer[/{style}] in "
        f"{elapsed:.1f} s (service {service!r})"
    )


def run(args: argparse.Namespace) -> int:
    quiet_amqp_logs()
    # A log or a pipe is not a terminal: rich would wrap at 80 columns, too narrow for the table.
    console = Console() if sys.stdout.isatty() else Console(width=130)
    service: str = args.service
    tls = TlsFiles.of(args)
    try:
        asyncio.run(prepare(args.amqp_url, service, tls))
    except (BrokerProblem, DemoFailed) as exc:
        print(f"proxymq demo: {exc}", file=sys.stderr)
        return 1
    logs = Path(tempfile.mkdtemp(prefix="proxymq-demo-"))
    stack = Stack(args.amqp_url, logs, tls)
    code = 1
    dead_port = socket.socket()  # bound, never listening: fetching it is refused at once
    try:
        with sigterm_as_interrupt():
            dead_port.bind(("127.0.0.1", 0))
            code = exercise(stack, service, dead_port.getsockname()[1], args.amqp_url, console)
    except DemoFailed as exc:
        print(f"proxymq demo: {exc}", file=sys.stderr)
        print(stack.tails(), file=sys.stderr)
    except (KeyboardInterrupt, Interrupted):
        print("proxymq demo: interrupted, stopping", file=sys.stderr)
        code = 130
        # Pressed again, during or after the cleanup, Ctrl-C would kill the demo (exit -2).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    finally:
        with uninterruptible():
            dead_port.close()
            stack.stop()
            try:
                asyncio.run(cleanup(args.amqp_url, service, tls))
            except BrokerProblem as exc:
                print(f"proxymq demo: could not delete {service}'s queues: {exc}", file=sys.stderr)
                code = code or 1
            keep = args.keep_logs or code not in (0, 130)
            if keep:
                print(f"proxymq demo: logs kept in {logs}", file=sys.stderr)
            else:
                shutil.rmtree(logs, ignore_errors=True)
    if code == 0:
        console.print(f"stopped; topology of {service!r} deleted")
    return code


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the whole pipeline locally and show a dozen calls going through it",
        description=description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_amqp_url(parser)
    parser.add_argument(
        "--service",
        default="url-fetcher",
        type=service_name,
        metavar="NAME",
        help="service name the demo uses; its queues are deleted at the end (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the processes' log files (they are always kept when the demo fails)",
    )
    parser.set_defaults(run=run)
