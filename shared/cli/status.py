"""`proxymq status --service S`: a service's partitions as the broker sees them.

Per partition queue: depth (ready, unacked), consumers, which consumer is the single active one
and which wait as standbys, plus the dead-letter queue's depth. The management API is the only
place that knows the active consumer (AMQP tells a consumer nothing about it), so it is asked
first; when it cannot be reached, plain AMQP passive declares still give depth and consumer
count. Management statistics lag by up to the broker's statistics interval (5 s by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp
import aiormq
from aio_pika.abc import AbstractConnection
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from yarl import URL

from shared import topology
from shared.cli.common import add_amqp_url, add_management_url, add_setting, description
from shared.cli.ensure_broker import BrokerProblem, connect, management_access
from shared.cli.ensure_broker import management_url as default_management_url
from shared.connect_failures import redact
from shared.settings import NO_TLS, TlsFiles

MANAGEMENT_TIMEOUT = 5.0
PARTITION_INDEX = re.compile(r"\.p(\d+)$")


@dataclass
class Consumer:
    """One consumer of a partition queue, named by its connection (the sidecars name theirs)."""

    connection: str
    active: bool
    status: str


@dataclass
class PartitionStatus:
    name: str
    ready: int
    unacked: int | None
    consumers: int
    active: str | None = None
    standbys: list[str] = field(default_factory=list)


@dataclass
class ServiceStatus:
    service: str
    source: str  # "management" or "amqp"
    pattern: str
    partitions: list[PartitionStatus]
    dead_letters: str
    dead_letter_messages: int | None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["totals"] = {
            "ready": sum(p.ready for p in self.partitions),
            "unacked": sum(p.unacked or 0 for p in self.partitions),
        }
        return data


class UnknownService(Exception):
    """The broker has no partition queues for the service."""


class ManagementUnavailable(Exception):
    """The management API cannot be used (down, disabled, refused); AMQP is the fallback."""


def vhost_of(amqp_url: str) -> str:
    """The vhost the AMQP URL names, the way aio-pika reads it (`/` when the path is empty)."""
    return URL(amqp_url).path[1:] or "/"


class Management:
    """A small client of RabbitMQ's management HTTP API, with the AMQP URL's credentials."""

    def __init__(self, session: aiohttp.ClientSession, base: str, amqp_url: str) -> None:
        self.session = session
        self.base, authorization = management_access(base, amqp_url)
        self.url = amqp_url
        self.vhost = quote(vhost_of(amqp_url), safe="")
        self.headers = {"Authorization": authorization}

    async def get(self, path: str) -> Any:
        """GET `path` (already percent-encoded); None on 404."""
        url = URL(f"{self.base}/api/{path}", encoded=True)
        try:
            async with self.session.get(url, headers=self.headers) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise ManagementUnavailable(f"{url} answered {response.status}")
                return await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ManagementUnavailable(f"{self.base}: {exc or type(exc).__name__}") from None

    async def queue(self, name: str) -> dict[str, Any] | None:
        found = await self.get(f"queues/{self.vhost}/{quote(name, safe='')}")
        return found if isinstance(found, dict) else None

    async def connection_names(self) -> dict[str, str]:
        """Address-style connection name -> the name the client gave (the sidecars name theirs
        after service and instance); consumer details only carry the address."""
        found = await self.get(f"vhosts/{self.vhost}/connections?columns=name,user_provided_name")
        return {
            str(item["name"]): str(item.get("user_provided_name") or item["name"])
            for item in found or []
            if isinstance(item, dict) and "name" in item
        }

    async def queue_names(self, pattern: str) -> list[str]:
        """Names matching `pattern`, filtered by the broker; pages of 500 (up to 1024
        partitions exist). The local match guards against a broker ignoring the filter."""
        names: list[str] = []
        page, pages = 1, 1
        while page <= pages:
            query = f"page={page}&page_size=500&use_regex=true&name={quote(pattern, safe='')}"
            found = await self.get(f"queues/{self.vhost}?{query}&columns=name")
            if found is None:
                break
            if not isinstance(found, dict):
                raise ManagementUnavailable(f"{self.base} answered no list of queues")
            names += [str(item["name"]) for item in found.get("items", [])]
            pages = int(found.get("page_count") or 1)
            page += 1
        return [name for name in names if re.match(pattern, name)]


def consumers_of(queue: dict[str, Any], names: dict[str, str]) -> list[Consumer]:
    """Every consumer of a queue; right after a consumer's process dies the broker may still
    list it for a few seconds with no channel: it is shown as "(gone)"."""
    found = []
    for detail in queue.get("consumer_details") or []:
        channel = detail.get("channel_details") or {}
        address = str(channel.get("connection_name") or "") if isinstance(channel, dict) else ""
        found.append(
            Consumer(
                connection=names.get(address, address) if address else "(gone)",
                active=bool(detail.get("active")),
                status=str(detail.get("activity_status") or ""),
            )
        )
    return found


def by_index(names: list[str]) -> list[str]:
    def index(name: str) -> int:
        match = PARTITION_INDEX.search(name)
        return int(match.group(1)) if match else -1

    return sorted(names, key=index)


async def from_management(service: str, management: Management) -> ServiceStatus:
    pattern = topology.partition_pattern(service)
    names = by_index(await management.queue_names(pattern))
    if not names and not isinstance(await management.get(f"vhosts/{management.vhost}"), dict):
        # Another broker's API (PROXYMQ_MANAGEMENT_URL): the vhost the AMQP URL opened is
        # unknown there, which says nothing about the service.
        raise ManagementUnavailable(f"{management.base} has no vhost {vhost_of(management.url)}")
    if not names:
        raise UnknownService(service)
    queues = await asyncio.gather(*(management.queue(name) for name in names))
    connections = await management.connection_names()
    partitions = []
    for name, queue in zip(names, queues, strict=True):
        if queue is None:
            continue  # deleted between the list and the get
        consumers = consumers_of(queue, connections)
        active = [c.connection for c in consumers if c.active]
        partitions.append(
            PartitionStatus(
                name=name,
                ready=int(queue.get("messages_ready") or 0),
                unacked=int(queue.get("messages_unacknowledged") or 0),
                consumers=int(queue.get("consumers") or len(consumers)),
                active=active[0] if active else None,
                standbys=[c.connection for c in consumers if not c.active],
            )
        )
    dead = await management.queue(topology.dead_letter_queue(service))
    return ServiceStatus(
        service=service,
        source="management",
        pattern=pattern,
        partitions=partitions,
        dead_letters=topology.dead_letter_queue(service),
        dead_letter_messages=None if dead is None else int(dead.get("messages") or 0),
        note="management statistics lag by up to 5 s",
    )


async def passive(connection: AbstractConnection, name: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of a queue, or None when it is missing. A passive declare of
    a missing queue closes the channel, hence a channel per check."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


async def from_amqp(service: str, connection: AbstractConnection, note: str) -> ServiceStatus:
    """Partitions are found as `topology.delete` finds them, past missing ones (p0 included):
    counting up from p0 to the first gap called a half-deleted service unknown."""
    partitions = []
    for name in await topology.partitions_present(connection, service):
        found = await passive(connection, name)
        if found is None:
            continue  # deleted meanwhile
        ready, consumers = found
        partitions.append(
            PartitionStatus(name=name, ready=ready, unacked=None, consumers=consumers)
        )
    if not partitions:
        raise UnknownService(service)
    dead = await passive(connection, topology.dead_letter_queue(service))
    return ServiceStatus(
        service=service,
        source="amqp",
        pattern=topology.partition_pattern(service),
        partitions=partitions,
        dead_letters=topology.dead_letter_queue(service),
        dead_letter_messages=None if dead is None else dead[0],
        note=note,
    )


async def collect(
    service: str, amqp_url: str, management_base: str | None, tls: TlsFiles = NO_TLS
) -> ServiceStatus:
    """AMQP first: the management API on the URL's host says nothing about the URL's port,
    vhost or credentials, and only a broker that answered can say a service has no queues. The
    management API asked is the one of the node that answered."""
    connection = await connect(amqp_url, f"proxymq status {service}", tls=tls)
    try:
        url = str(connection.url) if isinstance(connection, aio_pika.Connection) else amqp_url
        timeout = aiohttp.ClientTimeout(total=MANAGEMENT_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            management = Management(session, management_base or default_management_url(url), url)
            try:
                return await from_management(service, management)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # A 200 that is no RabbitMQ answer (a proxy's page, another service's JSON).
                problem = f"{management.base} answered in another shape: {exc!r}"
            except ManagementUnavailable as exc:
                problem = str(exc)
            note = (
                f"management API unavailable ({problem}): depth and consumer counts from AMQP "
                "only; `rabbitmq-plugins enable rabbitmq_management` shows the active "
                "consumers"
            )
        return await from_amqp(service, connection, note)
    finally:
        await connection.close()


def render(status: ServiceStatus, console: Console) -> None:
    amqp_only = status.source == "amqp"
    table = Table(title=f"service {status.service}: {len(status.partitions)} partitions")
    table.add_column("queue")
    table.add_column("ready", justify="right")
    table.add_column("unacked", justify="right")
    table.add_column("consumers", justify="right")
    table.add_column("active consumer")
    table.add_column("standbys")
    prefix = f"proxymq-dequeuer {status.service} "

    def short(name: str) -> str:
        """Dequeuers name their connection `proxymq-dequeuer S INSTANCE`; S is in the title."""
        return escape(name.removeprefix(prefix))

    def active(partition: PartitionStatus) -> str:
        if amqp_only:
            return "?"
        if partition.consumers == 0:
            return "[yellow]no consumer[/yellow]"
        return short(partition.active) if partition.active else "[red]none active[/red]"

    for partition in status.partitions:
        table.add_row(
            partition.name,
            str(partition.ready),
            "?" if partition.unacked is None else str(partition.unacked),
            str(partition.consumers),
            active(partition),
            "?" if amqp_only else (", ".join(map(short, partition.standbys)) or "-"),
        )
    totals = status.to_json()["totals"]
    table.add_section()
    table.add_row(
        "total", str(totals["ready"]), "?" if amqp_only else str(totals["unacked"]), "", "", ""
    )
    console.print(table)
    dead = "missing" if status.dead_letter_messages is None else status.dead_letter_messages
    console.print(f"dead letters: {status.dead_letters} = {dead}")
    console.print(f"KEDA queue pattern: {status.pattern}")
    if status.note:
        console.print(f"[dim]({status.note})[/dim]")


def run(args: argparse.Namespace) -> int:
    try:
        topology.check_service_name(args.service)
    except ValueError as exc:
        print(f"proxymq status: {exc}", file=sys.stderr)
        return 2
    try:
        status = asyncio.run(
            collect(args.service, args.amqp_url, args.management_url, TlsFiles.of(args))
        )
    except BrokerProblem as exc:
        print(f"proxymq status: {exc}", file=sys.stderr)
        return 1
    except UnknownService:
        print(
            f"proxymq status: service {args.service!r} has no partition queues at "
            f"{redact(args.amqp_url)}; start its dequeuer (proxymq-dequeuer --service "
            f"{args.service}) or declare it (proxymq topology declare --service {args.service})",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        # Not a terminal (a pipe, a CI log): rich would wrap at 80 columns.
        render(status, Console() if sys.stdout.isatty() else Console(width=130))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "status",
        help="a service's partitions: depth, consumers, the active one and its standbys",
        description=description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_setting(
        parser,
        "--service",
        required=True,
        metavar="NAME",
        help="the service (its exchange and queues)",
    )
    add_amqp_url(parser)
    add_management_url(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)
