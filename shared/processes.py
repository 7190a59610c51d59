"""Starting ProxyMQ's commands as a user would, for `proxymq demo`, `proxymq bench` and the tests:
the console script in this environment, a readiness probe, and a stop that waits."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

# Below Linux's default ephemeral range (32768-60999), and below the ports `proxymq cluster`
# picks for its nodes (20000-29999).
LISTEN_PORTS = range(10_000, 20_000)
# Ports this process handed out lately: free until their process binds them, they were at times
# handed out twice (the demo's url-fetcher and its dequeuer's admin port, "address already in use").
_given: deque[int] = deque(maxlen=1024)


def free_port() -> int:
    """A port free now, for a process to listen on. Not one the kernel hands out for outgoing
    connections: such a port (what binding to port 0 gives) was at times taken by some
    connection's source port before the process bound it, and the process exited with
    "address already in use"."""
    ephemeral = _ephemeral_ports()
    for port in random.sample(LISTEN_PORTS, 200):
        if port in ephemeral or port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _given.append(port)
            return port
    with socket.socket() as sock:  # a machine with another ephemeral range, or all ports taken
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_ports() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32_768, 61_000)


def script(name: str) -> str:
    """The console script beside this interpreter, so a venv's commands run without activation."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed: run `make install`")
    return found


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Process:
    """One running command; `stop()` sends SIGTERM and waits, SIGKILL after `grace`.

    Its environment is this process's without the `PROXYMQ_*` variables, plus `env`: those
    configure the operator's own sidecars, and inherited they stopped the bench's and the demo's
    (a PROXYMQ_AMQP_URL_FILE beside the URL they are given) or failed their requests (a
    PROXYMQ_MAX_BODY, PROXYMQ_SERVICES or PROXYMQ_AUTH_TOKEN_FILE)."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        ready_url: str | None = None,
        env: Mapping[str, str] | None = None,
        log: IO[bytes] | int | None = None,
    ) -> None:
        self.name = name
        self.args = [script(name), *args]
        self.ready_url = ready_url
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("PROXYMQ_")}
        self.env = {**inherited, **(env or {})}
        self.log = subprocess.DEVNULL if log is None else log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.popen = subprocess.Popen(
            self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        return self

    def wait_ready(self, timeout: float = 20.0) -> Process:
        if self.ready_url is None:
            return self
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}")
            if http_ok(self.ready_url):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} was not ready at {self.ready_url} within {timeout:g} s")

    @property
    def pid(self) -> int:
        assert self.popen is not None, "start() first"
        return self.popen.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, grace: float = 30.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def __enter__(self) -> Process:
        return self.start().wait_ready()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
