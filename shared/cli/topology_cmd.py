"""`proxymq topology declare|delete|show --service S`: a service's RabbitMQ objects by hand.

The dequeuer declares its service's topology when it starts; declaring ahead of time lets an
enqueuer accept requests (they wait in the queues) before any dequeuer runs, and lets an operator
see a layout mismatch before a deployment does. Deleting drops queued messages, hence the
confirmation; a service whose queues have consumers (running dequeuers) is refused unless
--force, which --yes does not imply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import aiohttp
from aio_pika.abc import AbstractConnection
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared import topology
from shared.cli.common import (
    add_amqp_url,
    add_management_url,
    add_setting,
    confirm,
    description,
    integer,
)
from shared.cli.ensure_broker import BrokerProblem, connect, management_url
from shared.cli.status import (
    MANAGEMENT_TIMEOUT,
    Management,
    ManagementUnavailable,
    consumers_of,
    passive,
)
from shared.connect_failures import redact
from shared.settings import TlsFiles

PROG = "proxymq topology"


def service_name(value: str) -> str:
    """argparse type: a bad name is a usage error (exit 2) before anything is contacted."""
    try:
        return topology.check_service_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


positive = integer(1, topology.INT64_MAX)
partition_count = integer(1, topology.MAX_PARTITIONS)


async def with_connection(
    args: argparse.Namespace, action: Callable[[AbstractConnection], Awaitable[int]]
) -> int:
    name = f"proxymq topology {args.action} {args.service}"
    connection = await connect(args.amqp_url, name, tls=TlsFiles.of(args))
    try:
        return await action(connection)
    finally:
        await connection.close()


def declare(args: argparse.Namespace) -> int:
    try:
        layout = topology.Topology(
            args.service, args.partitions, args.delivery_limit, args.max_length
        )
    except ValueError as exc:
        print(f"{PROG} declare: {exc}", file=sys.stderr)
        return 2

    async def action(connection: AbstractConnection) -> int:
        fresh = not (
            await topology.partitions_present(connection, args.service)
            or await topology.exchange_exists(connection, layout.exchange)
            or await topology.queue_exists(connection, layout.dead_letters)
        )
        try:
            await topology.declare(connection, layout)
        except Exception as exc:
            if fresh:  # a refused declaration leaves no half layout behind
                with contextlib.suppress(Exception):
                    await topology.delete(connection, layout)
            left = " (nothing was left declared)" if fresh else ""
            print(f"{PROG} declare: {exc}{left}", file=sys.stderr)
            return 1
        print(
            f"declared {layout.exchange} (x-consistent-hash), {layout.queues[0]}.."
            f"{layout.queues[-1]} ({layout.partitions} quorum partitions, delivery limit "
            f"{layout.delivery_limit}"
            + (f", max length {layout.max_length}" if layout.max_length else "")
            + f") and {layout.dead_letters}, with {topology.dead_letter_exchange(layout.service)} "
            f"(fanout to it and {topology.notify_queue(layout.service)}) and "
            f"{topology.ring_marker(layout.service)} (the hash ring is in partition order)"
        )
        return 0

    return _run(args, action)


def delete(args: argparse.Namespace) -> int:
    layout = topology.Topology(args.service)

    async def action(connection: AbstractConnection) -> int:
        partitions = await topology.partitions_present(connection, args.service)
        notify = topology.notify_queue(args.service)
        queues = [*partitions, layout.dead_letters, notify]
        depths = {name: await passive(connection, name) for name in queues}
        present = {name: found for name, found in depths.items() if found is not None}
        has_exchange = await topology.exchange_exists(connection, layout.exchange)
        if not present and not has_exchange:
            print(f"service {args.service!r} has no topology at {redact(args.amqp_url)}")
            return 0
        messages = sum(found[0] for found in present.values())
        consumers = sum(found[1] for found in present.values())
        if consumers and not args.force:
            held = {name: found[1] for name, found in present.items() if found[1]}
            who = await _consumers(connection, held, args.management_url)
            print(
                f"{PROG} delete: refusing: {consumers} consumer(s) attached ({who}); deleting "
                "the queues would cancel them and drop what they hold: stop the service's "
                "dequeuers first, or pass --force to delete anyway",
                file=sys.stderr,
            )
            return 1
        what = (
            f"{len(present)} queues of service {args.service!r} "
            f"({len(partitions)} partitions + dead letters + {notify}) holding {messages} ready "
            "messages"
            + (f", with {consumers} consumers attached" if consumers else "")
            + f", and exchanges {', '.join(_other_exchanges(args.service))}"
        )
        try:
            if not args.yes and not await confirm(f"delete {what}?"):
                print("nothing deleted", file=sys.stderr)
                return 1
        except asyncio.CancelledError:  # Ctrl-C at the question
            print("\nnothing deleted", file=sys.stderr)
            raise
        await topology.delete(connection, layout)
        print(f"deleted {what}")
        return 0

    return _run(args, action)


def show(args: argparse.Namespace) -> int:
    async def action(connection: AbstractConnection) -> int:
        partitions = await topology.partitions_present(connection, args.service)
        declared = bool(partitions)
        layout = topology.Topology(args.service, len(partitions) or args.partitions)
        dead = await passive(connection, layout.dead_letters)
        exchange = await topology.exchange_exists(connection, layout.exchange)
        console = Console()
        state = (
            f"declared, {len(partitions)} partitions"
            if declared
            else f"not declared; what --partitions {args.partitions} would declare:"
        )
        # A line of its own, not the table's title: rich centres a title and so its wrapped end.
        console.print(f"service {args.service}: {state}", highlight=False)
        table = Table(show_header=False)
        table.add_column("what")
        table.add_column("value")
        table.add_row("exchange", f"{layout.exchange} (x-consistent-hash)" + _missing(exchange))
        table.add_row("partition queues", ", ".join(partitions or layout.queues))
        arguments = _args(layout)
        if declared:
            found = await _declared_args(connection, partitions[0], args.management_url)
            arguments = found or (
                arguments + " [yellow](ProxyMQ's defaults: only the management API can tell "
                "the queues' own, and it did not answer)[/yellow]"
            )
        table.add_row("queue arguments", arguments)
        table.add_row("dead letters", layout.dead_letters + _missing(dead is not None))
        service = args.service
        dead_exchange = topology.dead_letter_exchange(service)
        notify = topology.notify_queue(service)
        table.add_row(
            "dead-letter exchange",
            f"{dead_exchange} (fanout to {layout.dead_letters} and {notify})"
            + _missing(await topology.exchange_exists(connection, dead_exchange)),
        )
        table.add_row(
            "notifications",
            f"{notify} (the broker's dead letters, answered 502 by a dequeuer)"
            + _missing(await topology.queue_exists(connection, notify)),
        )
        members = topology.members_exchange(service)
        table.add_row(
            "membership",
            f"{members} (fanout; a queue {members}.ID per dequeuer)"
            + (
                ""
                if await topology.exchange_exists(connection, members)
                else " (no dequeuer has run yet)"
            ),
        )
        if exchange:
            table.add_row("hash ring", await _ring_state(connection, service))
        table.add_row("KEDA pattern", topology.partition_pattern(args.service))
        console.print(table)
        return 0

    return _run(args, action)


async def _ring_state(connection: AbstractConnection, service: str) -> str:
    if await topology.exchange_exists(connection, topology.ring_marker(service)):
        return f"in partition order ({topology.ring_marker(service)} is there)"
    return (
        "[yellow]in RabbitMQ's own order, maybe (no "
        f"{topology.ring_marker(service)}): the next sidecar to connect binds the partitions "
        "in order[/yellow]"
    )


@contextlib.asynccontextmanager
async def _management(
    connection: AbstractConnection, base: str | None
) -> AsyncIterator[Management]:
    """The management API at `base`, by default the one of the node that answered;
    ManagementUnavailable when it cannot be asked."""
    if not isinstance(connection, aio_pika.Connection):
        raise ManagementUnavailable("no AMQP URL to find the management API by")
    url = str(connection.url)
    timeout = aiohttp.ClientTimeout(total=MANAGEMENT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield Management(session, base or management_url(url), url)


async def _consumers(
    connection: AbstractConnection, counts: dict[str, int], management_base: str | None
) -> str:
    """Who consumes each queue: the consumers' connection names from the management API (a
    dequeuer names its connection `proxymq-dequeuer S INSTANCE`), else how many there are. The
    API's statistics lag by up to 5 s: a consumer that just attached may be counted unnamed."""
    names: dict[str, list[str]] = {}
    with contextlib.suppress(ManagementUnavailable, KeyError, TypeError, AttributeError):
        async with _management(connection, management_base) as management:
            connections = await management.connection_names()
            for queue in counts:
                found = await management.queue(queue)
                consumers = consumers_of(found, connections) if found is not None else []
                names[queue] = [c.connection for c in consumers if c.connection != "(gone)"]
    return "; ".join(
        f"{queue}: {', '.join(names.get(queue) or [f'{count} consumer(s)'])}"
        for queue, count in counts.items()
    )


async def _declared_args(
    connection: AbstractConnection, queue: str, management_base: str | None
) -> str | None:
    """The arguments the partition was declared with, which may not be today's defaults (a
    layout made with another --delivery-limit); AMQP cannot read them, the management API of
    the node that answered can. None when it cannot be asked."""
    try:
        async with _management(connection, management_base) as management:
            found = await management.queue(queue)
    except ManagementUnavailable:
        return None
    arguments = found.get("arguments") if found is not None else None
    if not isinstance(arguments, dict):
        return None
    return escape(
        ", ".join(
            f"{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in arguments.items()
        )
    )


def _other_exchanges(service: str) -> list[str]:
    """What `topology.delete` deletes besides the queues and exchange `S`."""
    return [
        topology.exchange_name(service),
        topology.dead_letter_exchange(service),
        topology.members_exchange(service),
        topology.ring_marker(service),
    ]


def _missing(exists: bool) -> str:
    return "" if exists else " [yellow](missing)[/yellow]"


def _args(layout: topology.Topology) -> str:
    args = layout.partition_args()
    return ", ".join(
        f"{key.replace('_', '-')}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in args.items()
    )


def _run(args: argparse.Namespace, action: Callable[[AbstractConnection], Awaitable[int]]) -> int:
    try:
        return asyncio.run(with_connection(args, action))
    except BrokerProblem as exc:
        print(f"{PROG} {args.action}: {exc}", file=sys.stderr)
        return 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "topology",
        help="declare, delete or show a service's exchange and queues",
        description=description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        child = actions.add_parser(name, help=help_text, description=help_text)
        add_setting(
            child, "--service", service_name, required=True, metavar="NAME", help="service name"
        )
        add_amqp_url(child)
        return child

    declare_parser = action(
        "declare", "declare the exchange, partition queues and dead letters (idempotent)"
    )
    add_setting(
        declare_parser,
        "--partitions",
        partition_count,
        default=8,
        metavar="N",
        help=f"partition queues, 1 to {topology.MAX_PARTITIONS} (default: 8)",
    )
    add_setting(
        declare_parser,
        "--delivery-limit",
        positive,
        default=20,
        metavar="N",
        help="quorum queue x-delivery-limit: deliveries before the broker dead-letters a "
        "message, at most 2^63-1 (default: 20)",
    )
    add_setting(
        declare_parser,
        "--max-length",
        positive,
        metavar="N",
        help="x-max-length of each partition (reject-publish: the enqueuer answers 429 when "
        "full); no limit by default",
    )
    declare_parser.set_defaults(run=declare)

    delete_parser = action("delete", "delete the exchange and queues, messages included")
    delete_parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete_parser.add_argument(
        "--force",
        action="store_true",
        help="delete even while consumers (running dequeuers) are attached; without it such a "
        "service is refused, with --yes or not",
    )
    add_management_url(delete_parser)
    delete_parser.set_defaults(run=delete)

    show_parser = action("show", "show the names, queue arguments and the KEDA pattern")
    add_setting(
        show_parser,
        "--partitions",
        partition_count,
        default=8,
        metavar="N",
        help="partition count shown when the service is not declared yet (default: 8)",
    )
    add_management_url(show_parser)
    show_parser.set_defaults(run=show)
