"""The processes `proxymq bench` measures, started as a user would and always torn down.

Each process is registered on an `AsyncExitStack` before anything can fail after it, and the
broker objects it creates are registered before it starts, so a failed start, an error or Ctrl-C
still stops every process (SIGTERM) and deletes the bench service's topology and the RPC queue.
Logs go to files; when a process does not come up, or exits during the run, the tail of its log
is the error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiormq
from aio_pika.abc import AbstractConnection

from shared import topology
from shared.cli import bench_rpc
from shared.processes import Process, free_port
from shared.settings import TlsFiles

READY_TIMEOUT = 30.0
STOP_GRACE = 10.0
WATCH_INTERVAL = 0.5
T = TypeVar("T")


class StartFailed(RuntimeError):
    """A process of the benchmark did not come up; the run is broken, not slow."""


class ProcessExited(RuntimeError):
    """A process of the benchmark exited during the run: the requests through it would only
    time out, one deadline after another."""


@dataclass(frozen=True)
class Endpoints:
    """Where each mode sends its requests."""

    echo_url: str
    proxy_url: str
    rpc_queue: str
    service: str
    children: dict[str, Child]  # by the names of the CPU figures

    @property
    def pids(self) -> dict[str, int]:
        return {name: child.process.pid for name, child in self.children.items()}


def module_process(
    name: str,
    module: str,
    args: Sequence[str],
    *,
    ready_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Process:
    """A `python -m` command as a `Process`; `Process` itself only looks up console scripts."""
    process = Process("python", args, ready_url=ready_url, env=env)
    process.name = name
    process.args = [sys.executable, "-m", module, *args]
    return process


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


@dataclass(frozen=True)
class Child:
    """A started process and the file its output goes to."""

    process: Process
    log: Path

    def exited(self) -> int | None:
        return None if self.process.popen is None else self.process.popen.poll()

    def tail(self) -> str:
        return f"--- last lines of {self.log} ---\n{log_tail(self.log)}"


async def launch(stack: AsyncExitStack, process: Process, log: Path) -> Child:
    """Start, register the stop, then wait for readiness (blocking probes run in a thread).
    The child keeps its own descriptor of the log file, so ours is closed at once."""
    with log.open("wb") as handle:
        process.log = handle
        process.start()
    stack.push_async_callback(asyncio.to_thread, process.stop, STOP_GRACE)
    child = Child(process, log)
    try:
        await asyncio.to_thread(process.wait_ready, READY_TIMEOUT)
    except (RuntimeError, TimeoutError) as exc:
        raise StartFailed(f"{exc}\n{child.tail()}") from exc
    return child


async def while_running(work: Awaitable[T], children: Sequence[Child]) -> T:
    """`work`, stopped with `ProcessExited` as soon as one of the children exits."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=WATCH_INTERVAL)
            for child in children:
                code = child.exited()
                if code is not None:
                    raise ProcessExited(
                        f"{child.process.name} exited with code {code} during the run\n"
                        + child.tail()
                    )
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


async def stopped_by_signal(work: Awaitable[T]) -> T:
    """`work` in the running loop's main task, which the first Ctrl-C or SIGTERM cancels, so the
    same cleanup runs in both cases. Later ones are ignored until the process exits, so they
    cannot cut the cleanup short and leave processes or queues behind (each stop is bounded by
    its grace period, so this cannot hang)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    # One ignored when the bench started (`make bench &` ignores SIGINT) stays ignored.
    signals = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN]
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            task.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, stop)
    try:
        return await work
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
            if stopping:
                signal.signal(sig, signal.SIG_IGN)


async def wait_consumer(connection: AbstractConnection, queue: str, child: Child) -> None:
    """The RPC server has no HTTP port: it is ready when the broker counts its consumer."""
    deadline = time.monotonic() + READY_TIMEOUT
    channel = await connection.channel()
    try:
        while time.monotonic() < deadline:
            code = child.exited()
            if code is not None:
                raise StartFailed(f"{child.process.name} exited with code {code}\n{child.tail()}")
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            if result.consumer_count:
                return
            await asyncio.sleep(0.05)
    finally:
        await channel.close()
    raise StartFailed(f"{child.process.name} did not consume {queue} within {READY_TIMEOUT:g} s")


async def delete_queue(connection: AbstractConnection, name: str) -> None:
    with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError):
        channel = await connection.channel()
        try:
            await channel.queue_delete(name)
        finally:
            if not channel.is_closed:
                await channel.close()


async def delete_topology(connection: AbstractConnection, service: str) -> None:
    with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError):
        await topology.delete(connection, topology.Topology(service))


async def start_echo(stack: AsyncExitStack, logs: Path) -> tuple[Child, int]:
    port = free_port()
    process = module_process(
        "echo target",
        "shared.cli.bench_echo",
        ["--port", str(port)],
        ready_url=f"http://127.0.0.1:{port}/ready",
    )
    return await launch(stack, process, logs / "echo.log"), port


async def start_sidecar(
    stack: AsyncExitStack, command: str, args: list[str], env: Mapping[str, str], logs: Path
) -> Child:
    """A sidecar on a free admin port (localhost only), ready when its /readyz says so."""
    admin = free_port()
    process = Process(
        command,
        [*args, "--admin-host", "127.0.0.1", "--admin-port", str(admin)],
        ready_url=f"http://127.0.0.1:{admin}/readyz",
        env=env,
    )
    return await launch(stack, process, logs / f"{command}.log")


async def start_rpc_server(
    stack: AsyncExitStack,
    connection: AbstractConnection,
    queue: str,
    prefetch: int,
    env: Mapping[str, str],
    logs: Path,
) -> Child:
    channel = await connection.channel()
    await bench_rpc.declare_queue(channel, queue)
    await channel.close()
    stack.push_async_callback(delete_queue, connection, queue)
    process = module_process(
        "rpc server",
        "shared.cli.bench_rpc",
        ["--serve", "--queue", queue, "--prefetch", str(prefetch)],
        env=env,
    )
    child = await launch(stack, process, logs / "rpc-server.log")
    await wait_consumer(connection, queue, child)
    return child


async def start_all(
    stack: AsyncExitStack,
    connection: AbstractConnection,
    *,
    amqp_url: str,
    tls: TlsFiles,
    partitions: int,
    prefetch: int,
    logs: Path,
) -> Endpoints:
    """Echo target, dequeuer, enqueuer and the RPC server; the AMQP URL goes by environment
    variable, so a password never shows in `ps`."""
    suffix = uuid.uuid4().hex[:8]
    service, rpc_queue = f"bench-{suffix}", f"proxymq.bench.rpc.{suffix}"
    env = {"PROXYMQ_AMQP_URL": amqp_url, **tls.environment()}
    echo, echo_port = await start_echo(stack, logs)
    stack.push_async_callback(delete_topology, connection, service)
    target = ["--service", service, "--target", f"http://127.0.0.1:{echo_port}"]
    dequeuer = await start_sidecar(
        stack, "proxymq-dequeuer", [*target, "--partitions", str(partitions)], env, logs
    )
    port = free_port()
    enqueuer = await start_sidecar(stack, "proxymq-enqueuer", ["--port", str(port)], env, logs)
    rpc_server = await start_rpc_server(stack, connection, rpc_queue, prefetch, env, logs)
    return Endpoints(
        echo_url=f"http://127.0.0.1:{echo_port}/echo",
        proxy_url=f"http://127.0.0.1:{port}/{service}/echo",
        rpc_queue=rpc_queue,
        service=service,
        children={
            "echo": echo,
            "dequeuer": dequeuer,
            "enqueuer": enqueuer,
            "rpc server": rpc_server,
        },
    )
