"""`proxymq cluster start|stop|status`: a RabbitMQ cluster of throwaway nodes on this machine.

Fault tests (a node killed, a cluster failing over, a TLS listener) need brokers they may break,
and the broker on 5672 is shared: it must never be stopped or reconfigured. Each node made here
is its own Erlang VM with its own name, ports, data, logs, config and plugins, all under one
state directory, so starting, killing or deleting them touches nothing else:

- the real scripts in `/usr/lib/rabbitmq/bin` are run, not Debian's `/usr/sbin` wrappers: run as
  root those `su rabbitmq` and drop the environment that names our node;
- `RABBITMQ_CONF_ENV_FILE` points at a file of ours: `/etc/rabbitmq/rabbitmq-env.conf` names the
  shared node;
- `HOME` is the state directory, so the nodes and `rabbitmqctl` share an Erlang cookie of their
  own (no cookie of the shared broker is read or written);
- every listener (AMQP, management, distribution) is bound to 127.0.0.1;
- a node named like the shared one or on its port is refused, and `stop` only signals a process
  whose environment names the node's pid file (pids get reused).

`state.json` in the directory records the layout, so `stop` and `status` work from another
process (a test's finalizer, an operator's shell) than the one that started the nodes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from shared.cli.common import integer

DEFAULT_DIR = Path("/tmp/proxymq-cluster")
PLUGINS = ("rabbitmq_consistent_hash_exchange", "rabbitmq_management")
SHARED_NODE, SHARED_PORT = "rabbit@localhost", 5672
START_TIMEOUT = 90.0
CTL_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
STATE_FILE = "state.json"


class ClusterError(Exception):
    """A node did not start, join or answer; the message names the node and its log."""


def scripts_dir() -> Path:
    """Where `rabbitmq-server` and `rabbitmqctl` really live (not the `su` wrappers)."""
    for candidate in (os.environ.get("RABBITMQ_SCRIPTS_DIR"), "/usr/lib/rabbitmq/bin"):
        if candidate and (Path(candidate) / "rabbitmq-server").exists():
            return Path(candidate)
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise ClusterError("rabbitmq-server is not installed: apt-get install rabbitmq-server")
    return Path(found).resolve().parent


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As a server binds: a port whose last connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, low: int = 20000, high: int = 29999) -> list[int]:
    """Distinct free ports below the ephemeral range: a node's CLI tools use its distribution
    port + 10000, which must stay a valid port."""
    chosen: list[int] = []
    rng = random.Random()
    while len(chosen) < count:
        port = rng.randint(low, high)
        if port not in chosen and port_free(port):
            chosen.append(port)
    return chosen


@dataclass(frozen=True)
class Node:
    name: str  # rabbit1@localhost
    port: int
    management_port: int
    dist_port: int
    directory: str
    tls_port: int | None = None

    @property
    def path(self) -> Path:
        return Path(self.directory)

    @property
    def pid_file(self) -> Path:
        return self.path / "pid"

    def amqp_url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}/"

    def amqps_url(self, user: str = "guest", password: str = "guest") -> str:
        assert self.tls_port is not None, "this node has no TLS listener"
        return (
            f"amqps://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.tls_port}/"
        )

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def pid(self) -> int | None:
        """The node's VM, if it runs and really is this node (pids get reused)."""
        try:
            pid = int(self.pid_file.read_text().strip())
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if f"RABBITMQ_PID_FILE={self.pid_file}".encode() in environ else None


@dataclass
class LocalCluster:
    """Nodes under `directory`; `nodes[0]` is the seed the others join."""

    directory: Path
    nodes: list[Node]
    config: list[str] = field(default_factory=list)  # extra rabbitmq.conf lines, every node

    @classmethod
    def layout(
        cls,
        directory: Path,
        count: int = 3,
        *,
        prefix: str = "rabbit",
        ports: Sequence[int] = (5681, 5682, 5683),
        management_ports: Sequence[int] = (15681, 15682, 15683),
        dist_ports: Sequence[int] = (25681, 25682, 25683),
        tls_ports: Sequence[int] | None = None,
        config: Sequence[str] = (),
    ) -> LocalCluster:
        directory = directory.resolve()
        nodes = [
            Node(
                name=f"{prefix}{i + 1}@localhost",
                port=ports[i],
                management_port=management_ports[i],
                dist_port=dist_ports[i],
                directory=str(directory / f"{prefix}{i + 1}"),
                tls_port=None if tls_ports is None else tls_ports[i],
            )
            for i in range(count)
        ]
        for node in nodes:
            used = {node.port, node.management_port, node.dist_port, node.tls_port}
            if node.name == SHARED_NODE or SHARED_PORT in used or 15672 in used:
                raise ClusterError(f"{node.name} would collide with the shared broker on 5672")
        return cls(directory, nodes, list(config))

    @classmethod
    def with_free_ports(
        cls, directory: Path, count: int, prefix: str, *, tls: bool = False, config: Sequence[str]
    ) -> LocalCluster:
        """For tests: ports nobody uses right now, so two test sessions never collide."""
        ports = free_ports(4 * count)
        return cls.layout(
            directory,
            count,
            prefix=prefix,
            ports=ports[0:count],
            management_ports=ports[count : 2 * count],
            dist_ports=ports[2 * count : 3 * count],
            tls_ports=ports[3 * count :] if tls else None,
            config=config,
        )

    @classmethod
    def load(cls, directory: Path) -> LocalCluster:
        state = json.loads((directory / STATE_FILE).read_text())
        return cls(Path(state["directory"]), [Node(**n) for n in state["nodes"]], state["config"])

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            "directory": str(self.directory),
            "nodes": [asdict(n) for n in self.nodes],
            "config": self.config,
        }
        (self.directory / STATE_FILE).write_text(json.dumps(state, indent=2))

    def urls(self, user: str = "guest", password: str = "guest") -> str:
        """The value for `--amqp-url`: every node, comma-separated, seed first."""
        return ",".join(node.amqp_url(user, password) for node in self.nodes)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name or n.name.split("@")[0] == name)

    # -- files and environment ------------------------------------------------------------

    def prepare(self) -> None:
        """Write cookie, config and plugin files; the cookie first, before any VM could race
        to create one."""
        self.save()
        cookie = self.directory / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
            cookie.chmod(0o400)
        for node in self.nodes:
            node.path.mkdir(parents=True, exist_ok=True)
            lines = [
                f"listeners.tcp.local = 127.0.0.1:{node.port}",
                "management.tcp.ip = 127.0.0.1",
                f"management.tcp.port = {node.management_port}",
                "log.file.level = info",
                "log.console = false",
            ]
            if node.tls_port is not None:
                lines.append(f"listeners.ssl.local = 127.0.0.1:{node.tls_port}")
            (node.path / "rabbitmq.conf").write_text("\n".join([*lines, *self.config]) + "\n")
            (node.path / "enabled_plugins").write_text(f"[{','.join(PLUGINS)}].\n")
            (node.path / "rabbitmq-env.conf").write_text("# this node's settings are in env\n")

    def env(self, node: Node) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "HOME"
        }
        path = node.path
        return {
            **base,
            "HOME": str(self.directory),
            "RABBITMQ_CONF_ENV_FILE": str(path / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONFIG_FILE": str(path / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(path / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(path / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(path / "mnesia"),
            "RABBITMQ_LOG_BASE": str(path / "log"),
            "RABBITMQ_PID_FILE": str(node.pid_file),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(path / "plugins-expand"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def ctl(self, node: Node, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True) -> str:
        """`rabbitmqctl -n NODE ...`: always with `-n`, so the shared node is never addressed."""
        return self._run(node, "rabbitmqctl", "-n", node.name, *args, timeout=timeout, check=check)

    def _run(self, node: Node, tool: str, *args: str, timeout: float, check: bool = True) -> str:
        try:
            done = subprocess.run(
                [str(scripts_dir() / tool), *args],
                env=self.env(node),
                cwd=self.directory,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{tool} {' '.join(args)} took over {timeout:g} s") from None
        if check and done.returncode != 0:
            raise ClusterError(
                f"{tool} {' '.join(args)} failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-800:]}\n  log: {self.log_file(node)}"
            )
        return done.stdout

    def log_file(self, node: Node) -> Path:
        return node.path / "log" / f"{node.name}.log"

    # -- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """All nodes booted in parallel, then joined to the seed: `stop_app` and `start_app` in
        parallel (each takes seconds), `join_cluster` one node at a time (concurrent joins race
        on the schema)."""
        self.prepare()
        for node in self.nodes:
            self.launch(node)
        self._each(self.nodes, lambda n: self.wait(n, timeout))
        seed, others = self.nodes[0], self.nodes[1:]
        self._each(others, lambda n: self.ctl(n, "stop_app"))
        for node in others:
            self.ctl(node, "join_cluster", seed.name)
        self._each(others, lambda n: self.ctl(n, "start_app"))

    @staticmethod
    def _each(nodes: Sequence[Node], action: Callable[[Node], object]) -> None:
        if nodes:
            with ThreadPoolExecutor(len(nodes)) as pool:
                list(pool.map(action, nodes))

    def launch(self, node: Node) -> None:
        """Boot the VM in the background (`-detached`); `wait` tells when it serves."""
        for port in (node.port, node.management_port, node.dist_port, node.tls_port):
            if port is not None and not port_free(port):
                raise ClusterError(f"port {port} of {node.name} is already in use")
        node.pid_file.unlink(missing_ok=True)
        subprocess.run(
            [str(scripts_dir() / "rabbitmq-server"), "-detached"],
            env=self.env(node),
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            check=True,
            timeout=CTL_TIMEOUT,
        )

    def wait(self, node: Node, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not node.pid_file.exists():
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name} wrote no pid file; see {self.log_file(node)}")
            time.sleep(0.1)
        self.ctl(
            node,
            "wait",
            "--timeout",
            str(int(max(1, deadline - time.monotonic()))),
            str(node.pid_file),
            timeout=timeout + 10,
        )

    def start_node(self, node: Node, timeout: float = START_TIMEOUT) -> None:
        """Boot one node again; a former cluster member rejoins by itself from its data."""
        self.launch(node)
        self.wait(node, timeout)

    def stop_node(self, node: Node, timeout: float = STOP_TIMEOUT) -> None:
        """Graceful (`rabbitmqctl stop`), SIGKILL when it takes longer than `timeout`."""
        if node.pid() is None:
            return
        with contextlib.suppress(ClusterError):
            self.ctl(node, "stop", str(node.pid_file), timeout=timeout)
        self.kill_node(node)

    def kill_node(self, node: Node) -> None:
        """SIGKILL the VM: a crash, no goodbye to clients or peers."""
        pid = node.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, *, graceful: bool = True) -> None:
        """Every node; graceful stops run in parallel. Safe to call twice, or on a layout whose
        nodes never started."""
        self._each(self.nodes, self.stop_node if graceful else self.kill_node)

    def destroy(self) -> None:
        """Stop without waiting for goodbyes and delete the state directory."""
        self.stop(graceful=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- looking at it ------------------------------------------------------------------------

    def running_nodes(self, node: Node) -> list[str]:
        """The cluster members `node` sees running ([] when it does not answer)."""
        try:
            out = self.ctl(node, "cluster_status", "--formatter", "json", timeout=20)
        except ClusterError:
            return []
        return list(json.loads(out).get("running_nodes", []))

    def management(self, node: Node, path: str, timeout: float = 5.0) -> object:
        request = urllib.request.Request(
            node.management_url + path,
            headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def queue_leader(self, queue: str, vhost: str = "/") -> Node:
        """The node leading a quorum queue's Raft group, asked of any node that answers."""
        errors = []
        for node in self.nodes:
            if node.pid() is None:
                continue
            try:
                info = self.management(node, f"/api/queues/{quote(vhost, safe='')}/{queue}")
            except (urllib.error.URLError, OSError, ValueError) as exc:
                errors.append(f"{node.name}: {exc}")
                continue
            if isinstance(info, dict) and info.get("leader"):
                return self.node(str(info["leader"]))
        raise ClusterError(f"no node knows the leader of {queue}: {errors}")

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "node": node.name,
                "pid": node.pid(),
                "amqp": node.amqp_url(),
                "management": node.management_url,
                "running_nodes": self.running_nodes(node) if node.pid() else [],
            }
            for node in self.nodes
        ]


# -- the `proxymq cluster` command ---------------------------------------------------------------


MAX_NODES = 9
DESCRIPTION = """\
proxymq cluster start|stop|status: a RabbitMQ cluster of throwaway nodes on this machine, for
trying ProxyMQ against a cluster and for fault tests.

The nodes run beside any broker already here and never touch it: each has its own name, ports
(all on 127.0.0.1), data, logs, config and Erlang cookie, under one state directory (--dir) that
stop --clean removes. A layout that would use the local broker's name or ports (5672, 15672) is
refused. start prints the PROXYMQ_AMQP_URL that points the sidecars at every node; stop and
status work from any shell, as the state directory records the layout. Needs rabbitmq-server
installed (make broker installs it); see docs/cluster.md.
"""
MAX_BASE_PORT = 65535 - 20000 - (MAX_NODES - 1)  # distribution ports are base + 20000 + i


def _start(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    n, base = args.nodes, args.base_port
    try:  # refused before anything runs or is written
        cluster = LocalCluster.layout(
            directory,
            n,
            prefix=args.prefix,
            ports=[base + i for i in range(n)],
            management_ports=[base + 10000 + i for i in range(n)],
            dist_ports=[base + 20000 + i for i in range(n)],
        )
    except ClusterError as exc:
        print(f"proxymq cluster start: {exc}: choose another --base-port", file=sys.stderr)
        return 2
    if (directory / STATE_FILE).exists() and any(
        n.pid() for n in LocalCluster.load(directory).nodes
    ):
        print(f"a cluster already runs from {directory}: proxymq cluster stop --dir {directory}")
        return 1
    started = time.monotonic()
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"proxymq cluster start: {exc}", file=sys.stderr)
        cluster.stop(graceful=False)
        return 1
    print(f"{n} nodes clustered in {time.monotonic() - started:.1f} s, state in {directory}")
    for node in cluster.nodes:
        print(f"  {node.name}  amqp :{node.port}  management :{node.management_port}")
    print(f"PROXYMQ_AMQP_URL={cluster.urls()}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not (directory / STATE_FILE).exists():
        print(f"no cluster state in {directory}")
        return 0
    cluster = LocalCluster.load(directory)
    cluster.stop()
    if args.clean:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"stopped {', '.join(n.name for n in cluster.nodes)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not (directory / STATE_FILE).exists():
        print(f"no cluster state in {directory}")
        return 1
    rows = LocalCluster.load(directory).status()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            state = f"pid {row['pid']}" if row["pid"] else "down"
            members = ", ".join(map(str, row["running_nodes"])) or "-"  # type: ignore[call-overload]
            print(f"{row['node']:<24} {state:<12} {row['amqp']:<36} sees running: {members}")
    return 0 if all(row["pid"] for row in rows) else 3


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "cluster",
        help="start, stop or look at a local RabbitMQ cluster for fault tests",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = actions.add_parser("start", help="start and cluster the nodes")
    start.add_argument(
        "--nodes",
        type=integer(1, MAX_NODES),
        default=3,
        metavar="N",
        help=f"how many nodes, 1 to {MAX_NODES} (default: 3)",
    )
    start.add_argument(
        "--base-port",
        type=integer(1024, MAX_BASE_PORT),
        default=5681,
        metavar="PORT",
        help="AMQP port of the first node; management is +10000, distribution +20000, so at most "
        f"{MAX_BASE_PORT} (default: 5681)",
    )
    start.add_argument(
        "--prefix",
        default="rabbit",
        metavar="PREFIX",
        help="node names PREFIX1@localhost, PREFIX2@localhost, ... (default: rabbit)",
    )
    start.set_defaults(run=_start)
    stop = actions.add_parser("stop", help="stop every node of the state directory")
    stop.add_argument("--clean", action="store_true", help="also delete the state directory")
    stop.set_defaults(run=_stop)
    status = actions.add_parser("status", help="which nodes run and whom each sees")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(run=_status)
    for action in (start, stop, status):
        action.add_argument(
            "--dir",
            default=str(DEFAULT_DIR),
            metavar="DIR",
            help=f"state directory (default: {DEFAULT_DIR})",
        )
