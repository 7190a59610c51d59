"""The processes `proxymq bench` measures, started as a user would and always torn down.

Each process is registered on an `AsyncExitStack` before anything can fail after it, and the
broker objects it creates are registered before it starts, so a failed start, an error or Ctrl-C
still stops every process (SIGTERM) and deletes the bench service's topology and the RPC queue.
Logs go to files; when a process does not come up, the tail of its log is the error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiormq
from aio_pika.abc import AbstractConnection

from shared import topology
from shared.cli import bench_rpc
from shared.processes import Process, free_port

READY_TIMEOUT = 30.0
STOP_GRACE = 10.0


class StartFailed(RuntimeError):
    """A process of the benchmark did not come up; the run is broken, not slow."""


@dataclass(frozen=True)
class Endpoints:
    """Where each mode sends its requests."""

    echo_url: str
    proxy_url: str
    rpc_queue: str
    service: str
    pids: dict[str, int]  # process name -> pid, for the CPU figures


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


async def launch(stack: AsyncExitStack, process: Process, log: Path) -> Process:
    """Start, register the stop, then wait for readiness (blocking probes run in a thread).
    The child keeps its own descriptor of the log file, so ours is closed at once."""
    with log.open("wb") as handle:
        process.log = handle
        process.start()
    stack.push_async_callback(asyncio.to_thread, process.stop, STOP_GRACE)
    try:
        await asyncio.to_thread(process.wait_ready, READY_TIMEOUT)
    except (RuntimeError, TimeoutError) as exc:
        raise StartFailed(f"{exc}\n--- last lines of {log} ---\n{log_tail(log)}") from exc
    return process


async def wait_consumer(
    connection: AbstractConnection, queue: str, process: Process, log: Path
) -> None:
    """The RPC server has no HTTP port: it is ready when the broker counts its consumer."""
    deadline = time.monotonic() + READY_TIMEOUT
    channel = await connection.channel()
    try:
        while time.monotonic() < deadline:
            if process.popen is not None and process.popen.poll() is not None:
                raise StartFailed(
                    f"{process.name} exited with code {process.popen.returncode}\n"
                    f"--- last lines of {log} ---\n{log_tail(log)}"
                )
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            if result.consumer_count:
                return
            await asyncio.sleep(0.05)
    finally:
        await channel.close()
    raise StartFailed(f"{process.name} did not consume {queue} within {READY_TIMEOUT:g} s")


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


async def start_echo(stack: AsyncExitStack, logs: Path) -> tuple[Process, int]:
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
) -> Process:
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
) -> Process:
    channel = await connection.channel()
    await bench_rpc.declare_queue(channel, queue)
    await channel.close()
    stack.push_async_callback(delete_queue, connection, queue)
    log = logs / "rpc-server.log"
    process = module_process(
        "rpc server",
        "shared.cli.bench_rpc",
        ["--serve", "--queue", queue, "--prefetch", str(prefetch)],
        env=env,
    )
    await launch(stack, process, log)
    await wait_consumer(connection, queue, process, log)
    return process


async def start_all(
    stack: AsyncExitStack,
    connection: AbstractConnection,
    *,
    amqp_url: str,
    partitions: int,
    prefetch: int,
    logs: Path,
) -> Endpoints:
    """Echo target, dequeuer, enqueuer and the RPC server; the AMQP URL goes by environment
    variable, so a password never shows in `ps`."""
    suffix = uuid.uuid4().hex[:8]
    service, rpc_queue = f"bench-{suffix}", f"proxymq.bench.rpc.{suffix}"
    env = {"PROXYMQ_AMQP_URL": amqp_url}
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
        pids={
            "echo": echo.pid,
            "dequeuer": dequeuer.pid,
            "enqueuer": enqueuer.pid,
            "rpc server": rpc_server.pid,
        },
    )
