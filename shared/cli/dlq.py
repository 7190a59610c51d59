"""`proxymq dlq list|show|replay|purge --service S`: the dead letters of a service in `S.dlq`.

A request lands in `S.dlq` when its retries ran out, when it was malformed, or when the broker
dropped it for exceeding the quorum delivery limit (docs/dead-letters.md). These commands look at
those requests, send chosen ones back through the service's exchange, or delete them. Messages
not chosen stay in `S.dlq` in their order.

Each command makes one pass through the queue. It copies every message it does not replay or
delete to the tail, with a publisher confirm, before it acks the original: on a quorum queue this
is the only way to read messages without reordering them. So even `list` writes to the queue, and
a large queue takes a while (a progress bar shows it on a terminal). Ctrl-C once finishes the
pass without changing anything more; a second Ctrl-C aborts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime

from aio_pika.abc import AbstractConnection
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from shared import hash_ring, topology
from shared.cli.common import add_amqp_url, add_setting, confirm, description
from shared.cli.dlq_letters import DeadLetter, Selection, parse_duration
from shared.cli.dlq_pass import (
    DeadLetterQueue,
    Decide,
    DlqError,
    Fate,
    NoDeadLetterQueue,
    Pace,
    PassInterrupted,
    PassResult,
    light,
)
from shared.cli.dlq_pass import Progress as OnProgress  # rich has a Progress of its own
from shared.cli.dlq_render import letter_table, render_letter
from shared.cli.ensure_broker import BrokerProblem, connect
from shared.cli.topology_cmd import positive, service_name
from shared.connect_failures import redact
from shared.settings import TlsFiles

PROG = "proxymq dlq"
TABLE_ROWS = 50  # rows of a preview or summary table; --json always has them all
Action = Callable[[argparse.Namespace, AbstractConnection, "Session"], Awaitable[int]]


class Session:
    """What one command run shares: its consoles and the Ctrl-C state of the pass."""

    def __init__(self, args: argparse.Namespace) -> None:
        # Not a terminal (a pipe, a CI log): rich would wrap at 80 columns, as in `status`.
        self.out = Console() if sys.stdout.isatty() else Console(width=130)
        self.err = Console(stderr=True)
        self.stop = asyncio.Event()
        self.asking = False  # a Ctrl-C now answers the question, before any pass
        self.json = bool(getattr(args, "json", False))

    async def confirm(self, question: str) -> bool:
        """The operator's answer; a Ctrl-C at the question is a no, since nothing has been
        changed yet (it used to go unnoticed until Enter, then claim an aborted pass)."""
        self.asking = True
        answer = asyncio.ensure_future(confirm(question))
        interrupted = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait((answer, interrupted), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.asking = False
            interrupted.cancel()
            answer.cancel()
        if not answer.done() or answer.cancelled():
            self.err.print()  # past the question's line
            return False
        return answer.result()

    @contextlib.contextmanager
    def progress(self, what: str) -> Iterator[OnProgress]:
        """A bar on a terminal only: scripts and `--json` readers get clean output."""
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
            disable=not self.err.is_terminal,
        ) as bar:
            task = bar.add_task(what, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update


def choose(selection: Selection, fate: Fate, shown: Sequence[DeadLetter] | None = None) -> Decide:
    """`fate` for letters that match, up to `--limit`, in queue order. With `shown` (what a
    preview showed and the operator confirmed), exactly those, each once: letters that arrived
    after the preview, or twins of a shown one, are not acted on behind the operator's back."""
    now = datetime.now(UTC)
    chosen = 0
    left = None if shown is None else Counter(letter.identity for letter in shown)

    def decide(letter: DeadLetter) -> Fate:
        nonlocal chosen
        if selection.limit is not None and chosen >= selection.limit:
            return Fate.KEEP
        if left is None:
            if not selection.matches(letter, now):
                return Fate.KEEP
        elif left[letter.identity] > 0:
            left[letter.identity] -= 1
        else:
            return Fate.KEEP
        chosen += 1
        return fate

    return decide


async def collect(
    dlq: DeadLetterQueue, session: Session, selection: Selection, what: str
) -> tuple[list[DeadLetter], PassResult]:
    """The letters `selection` picks, in queue order, from a pass that changes nothing."""
    found: list[DeadLetter] = []
    pick = choose(selection, Fate.DROP)  # only tells picked from not: nothing is dropped

    def decide(letter: DeadLetter) -> Fate:
        if pick(letter) is not Fate.KEEP:
            found.append(light(letter))
        return Fate.KEEP

    with session.progress(what) as progress:
        result = await dlq.sweep(decide, progress=progress, stop=session.stop)
    intact(result, dlq.name)
    return found, result


def intact(result: PassResult, queue: str) -> None:
    """A read-only pass that could not handle a letter kept it and all after it in place, but
    what it read is incomplete: say so rather than show part of the queue."""
    if result.refused is not None:
        raise DlqError(
            f"dead letter #{result.refused.position} (request "
            f"{result.refused.request_id or '-'}) could not be read: {result.refusal}; every "
            f"letter is still in {queue}, in order"
        )


# --- list ---------------------------------------------------------------------------------


async def list_action(
    args: argparse.Namespace, connection: AbstractConnection, session: Session
) -> int:
    dlq = DeadLetterQueue(connection, args.service)
    selection = selection_of(args)
    letters, result = await collect(dlq, session, selection, f"reading {dlq.name}")
    if result.stopped:
        session.err.print("stopped before the whole queue was read: no list (the queue is intact)")
        return 1
    if session.json:
        print(
            json.dumps(
                {
                    "service": args.service,
                    "queue": dlq.name,
                    "total": result.seen,
                    "selection": selection.describe(),
                    "dead_letters": [letter.to_json() for letter in letters],
                },
                indent=2,
            )
        )
        return 0
    title = f"{dlq.name}: {result.seen} dead letter{'s' if result.seen != 1 else ''}"
    if not selection.everything:
        title += f", {len(letters)} shown ({selection.describe()})"
    session.out.print(letter_table(letters, title))
    if not result.seen:
        session.out.print(f"{dlq.name} is empty")
    else:
        session.out.print(f"[dim]`{PROG} show --service {args.service} ID` shows one in full[/dim]")
    return 0


# --- show ---------------------------------------------------------------------------------

MAX_CANDIDATES = 20


async def show_action(
    args: argparse.Namespace, connection: AbstractConnection, session: Session
) -> int:
    """An exact request or message id, or a prefix of one that only one letter has."""
    dlq = DeadLetterQueue(connection, args.service)
    wanted: str = args.id
    exact: list[DeadLetter] = []
    prefixed: list[DeadLetter] = []

    def decide(letter: DeadLetter) -> Fate:
        if letter.has_id(wanted):
            exact.append(letter)
        elif len(prefixed) < MAX_CANDIDATES and any(
            (value or "").startswith(wanted)
            for value in (letter.request_id, letter.message.message_id)
        ):
            prefixed.append(letter)
        return Fate.KEEP

    with session.progress(f"reading {dlq.name}") as progress:
        result = await dlq.sweep(decide, progress=progress, stop=session.stop)
    intact(result, dlq.name)
    found = exact or prefixed
    if result.stopped and not exact:
        session.err.print("stopped before the whole queue was read (the queue is intact)")
        return 1
    if not found:
        session.err.print(
            f"{PROG} show: no dead letter in {dlq.name} has request or message id "
            f"{escape(wanted)!r}"
        )
        return 1
    if not exact and len(prefixed) > 1:
        ids = ", ".join(letter.request_id or "?" for letter in prefixed)
        session.err.print(
            f"{PROG} show: {escape(wanted)!r} starts several ids: {escape(ids)}; give more of it"
        )
        return 1
    if session.json:
        items = [letter.to_full_json() for letter in found]
        print(json.dumps(items[0] if len(items) == 1 else items, indent=2))
        return 0
    for letter in found:
        render_letter(letter, dlq.name, session.out)
    if len(found) > 1:
        session.out.print(f"[yellow]{len(found)} copies of this request are in {dlq.name}[/]")
    return 0


# --- replay and purge ---------------------------------------------------------------------


async def replay_action(
    args: argparse.Namespace, connection: AbstractConnection, session: Session
) -> int:
    if not await topology.exchange_exists(connection, args.service):
        session.err.print(
            f"{PROG} replay: exchange {args.service!r} does not exist, so nothing can be "
            f"replayed (nothing was changed); declare it first: proxymq topology declare "
            f"--service {args.service}"
        )
        return 1
    await hash_ring.ensure(connection, args.service)  # each letter to its key's partition
    return await change(args, connection, session, Fate.REPLAY)


async def purge_action(
    args: argparse.Namespace, connection: AbstractConnection, session: Session
) -> int:
    return await change(args, connection, session, Fate.DROP)


async def change(
    args: argparse.Namespace, connection: AbstractConnection, session: Session, fate: Fate
) -> int:
    """Preview (unless --yes), confirm, then one pass acting on exactly what was previewed."""
    verb = "replay" if fate is Fate.REPLAY else "purge"
    dlq = DeadLetterQueue(connection, args.service)
    selection = selection_of(args)
    if await dlq.depth() == 0:
        return report_nothing(session, f"{dlq.name} is empty: nothing to {verb}", args, verb, 0)
    shown: list[DeadLetter] | None = None
    if args.dry_run or not args.yes:
        letters, result = await collect(dlq, session, selection, f"reading {dlq.name}")
        if result.stopped:
            session.err.print("stopped: nothing was changed")
            return 1
        if args.dry_run:
            return report_dry_run(session, args, letters, result, verb)
        if not letters:
            return report_nothing(
                session,
                f"no dead letter in {dlq.name} matches: {selection.describe()}",
                args,
                verb,
                result.seen,
            )
        target = f" to exchange {args.service}" if fate is Fate.REPLAY else ""
        session.out.print(
            letter_table(letters, f"to {verb}{target} ({selection.describe()})", TABLE_ROWS)
        )
        question = f"{verb} {len(letters)} of the {result.seen} dead letters{target}?"
        if fate is Fate.DROP:
            question += " This cannot be undone."
        rate = getattr(args, "rate", None)
        if rate is not None:
            question += f" (at most {rate:g} a second: {len(letters) / rate:.0f} s or more)"
        if not await session.confirm(question):
            session.err.print(f"nothing was changed in {dlq.name}")
            return 1
        shown = letters
    with session.progress(f"{verb} {dlq.name}") as progress:
        result = await dlq.sweep(
            choose(selection, fate, shown),
            keep_deadline=getattr(args, "keep_deadline", False),
            progress=progress,
            stop=session.stop,
            pace=Pace(getattr(args, "rate", None)),
        )
    return report_change(session, args, dlq.name, result, fate)


def report_nothing(
    session: Session, message: str, args: argparse.Namespace, verb: str, total: int
) -> int:
    """`--json` has the shape the same command has when letters match (a dry run's, or a
    pass's), so that a script reads an empty list rather than missing keys."""
    if session.json and args.dry_run:
        print(
            json.dumps(
                {
                    "service": args.service,
                    "dry_run": True,
                    "total": total,
                    "selection": selection_of(args).describe(),
                    f"would_{verb}": [],
                    "message": message,
                },
                indent=2,
            )
        )
    elif session.json:
        print(
            json.dumps(
                {
                    "service": args.service,
                    "total": total,
                    "replayed" if verb == "replay" else "purged": [],
                    "kept": total,
                    "refused": None,
                    "refusal": None,
                    "stopped": False,
                    "message": message,
                },
                indent=2,
            )
        )
    else:
        session.out.print(Text(message))
    return 0


def report_dry_run(
    session: Session,
    args: argparse.Namespace,
    letters: list[DeadLetter],
    result: PassResult,
    verb: str,
) -> int:
    if session.json:
        print(
            json.dumps(
                {
                    "service": args.service,
                    "dry_run": True,
                    "total": result.seen,
                    "selection": selection_of(args).describe(),
                    f"would_{verb}": [letter.to_json() for letter in letters],
                },
                indent=2,
            )
        )
        return 0
    session.out.print(
        letter_table(
            letters,
            f"dry run: would {verb} {len(letters)} of {result.seen} dead letters "
            f"({selection_of(args).describe()})",
        )
    )
    session.out.print("dry run: nothing was changed")
    return 0


def report_change(
    session: Session, args: argparse.Namespace, queue: str, result: PassResult, fate: Fate
) -> int:
    done = result.replayed if fate is Fate.REPLAY else result.dropped
    verb = "replayed" if fate is Fate.REPLAY else "purged"
    if session.json:
        print(
            json.dumps(
                {
                    "service": args.service,
                    "total": result.seen,
                    verb: [letter.to_json() for letter in done],
                    "kept": result.kept,
                    "refused": None if result.refused is None else result.refused.to_json(),
                    "refusal": result.refusal,
                    "stopped": result.stopped,
                },
                indent=2,
            )
        )
    else:
        where = f" to exchange {args.service}" if fate is Fate.REPLAY else ""
        if done:
            session.out.print(letter_table(done, f"{verb}{where}", TABLE_ROWS))
        session.out.print(
            f"{verb} {len(done)} dead letter{'s' if len(done) != 1 else ''}{where}; "
            f"{result.kept} kept in {queue} in their order"
        )
        if fate is Fate.REPLAY and done:
            session.out.print(
                "[dim]their original callers are gone: replies to reply queues still there "
                "are dropped there, the others are not sent (see docs/dead-letters.md)[/dim]"
            )
        if result.stopped:
            session.err.print("stopped on request: the rest was kept unchanged")
    if result.refused is not None:
        session.err.print(
            Text(
                f"{PROG} {args.action}: request {result.refused.request_id or '-'} was not "
                f"{verb}: {result.refusal}. It and every later one are still in {queue}, in "
                "order."
            )
        )
        return 1
    return 1 if result.stopped else 0


# --- running ------------------------------------------------------------------------------


def selection_of(args: argparse.Namespace) -> Selection:
    return Selection(
        ids=frozenset(getattr(args, "ids", None) or ()),
        reason=getattr(args, "reason", None),
        key=getattr(args, "key", None),
        older_than=getattr(args, "older_than", None),
        newer_than=getattr(args, "newer_than", None),
        limit=getattr(args, "limit", None),
    )


async def with_connection(args: argparse.Namespace, action: Action) -> int:
    session = Session(args)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_interrupt() -> None:
        """The first Ctrl-C lets the pass finish as keeps, so the queue ends in its order; the
        second aborts at once (one message may then be out of place or doubled)."""
        if session.stop.is_set():
            if main_task is not None:
                main_task.cancel()
            return
        session.stop.set()
        if not session.asking:
            session.err.print("stopping: keeping the rest in place (Ctrl-C again to abort)")

    name = f"proxymq dlq {args.action} {args.service}"
    connection = await connect(args.amqp_url, name, tls=TlsFiles.of(args))
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        return await action(args, connection, session)
    finally:
        await connection.close()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


def runner(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        where = f"{PROG} {args.action}"
        try:
            return asyncio.run(with_connection(args, action))
        except BrokerProblem as exc:
            print(f"{where}: {exc}", file=sys.stderr)
        except NoDeadLetterQueue as exc:
            print(
                f"{where}: service {args.service!r} has no dead-letter queue {exc} at "
                f"{redact(args.amqp_url)}: check the name (proxymq status --service "
                f"{args.service}); the queue is made when its dequeuer first starts",
                file=sys.stderr,
            )
        except PassInterrupted as exc:
            done = exc.result
            print(
                f"{where}: stopped after {done.seen} of {done.total} messages: {exc}\n"
                f"  nothing was lost: the {done.seen} handled ones "
                f"({len(done.replayed)} replayed, {len(done.dropped)} purged, {done.kept} kept) "
                "are done, kept ones now sit behind the rest; the message being handled at the "
                "time may be in the queue twice",
                file=sys.stderr,
            )
        except DlqError as exc:  # Busy, for one
            print(f"{where}: {exc}", file=sys.stderr)
        except BrokenPipeError:
            # `| head` closed stdout: not an error of ours; quiet the interpreter's last flush.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except asyncio.CancelledError:
            print(
                f"{where}: aborted; nothing was lost, but the messages already passed now sit "
                "behind the rest, and the one being handled may be in the queue twice",
                file=sys.stderr,
            )
            return 130
        return 1

    return run


def duration_arg(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a duration: seconds, or a number with s, m, h or d, at most 100 "
            "years"
        ) from None


def rate_arg(value: str) -> float:
    """Replays a second. At least 0.1: each wait holds one letter unacked, and RabbitMQ gives
    up a delivery unacked for 30 minutes (`consumer_timeout`)."""
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if not 0.1 <= rate <= 100_000:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a rate: replays a second, from 0.1 to 100000"
        )
    return rate


def add_filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("which dead letters (all given filters must match)")
    group.add_argument(
        "--id",
        dest="ids",
        action="append",
        metavar="ID",
        help="request id (correlation id) or message id; repeat for several",
    )
    group.add_argument(
        "--reason", metavar="TEXT", help="reason contains this text (case-insensitive)"
    )
    group.add_argument("--key", metavar="KEY", help="partition key is exactly this")
    group.add_argument(
        "--older-than",
        type=duration_arg,
        metavar="SECONDS",
        help="dead-lettered more than this long ago (e.g. 90, 15m, 2h, 1d)",
    )
    group.add_argument(
        "--newer-than",
        type=duration_arg,
        metavar="SECONDS",
        help="dead-lettered less than this long ago",
    )
    group.add_argument(
        "--limit", type=positive, metavar="N", help="at most N, the first in queue order"
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "dlq",
        help="list, show, replay or purge a service's dead letters",
        description=description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, run: Action) -> argparse.ArgumentParser:
        child = actions.add_parser(name, help=help_text, description=help_text)
        add_setting(
            child, "--service", service_name, required=True, metavar="NAME", help="service name"
        )
        add_amqp_url(child)
        child.set_defaults(run=runner(run))
        return child

    listing = action("list", "a table of the dead letters, in queue order", list_action)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_filters(listing)

    show = action(
        "show", "one dead letter in full: properties, headers, request, body", show_action
    )
    show.add_argument("id", metavar="ID", help="request id, message id, or a unique prefix")
    show.add_argument("--json", action="store_true", help="print JSON (the body in full)")

    replay = action(
        "replay",
        "publish dead letters again to the service's exchange, with their partition key",
        replay_action,
    )
    add_filters(replay)
    replay.add_argument(
        "--keep-deadline",
        action="store_true",
        help="keep x-proxymq-deadline (by default it is removed: a past deadline would make "
        "the dequeuer drop the request as expired)",
    )
    replay.add_argument(
        "--rate",
        type=rate_arg,
        metavar="PER_SECOND",
        help="replay at most this many a second, evenly spaced (0.1 to 100000; default: as "
        "fast as the broker confirms), so a service that just recovered serves its live "
        "requests in between",
    )

    purge = action("purge", "delete dead letters (no filter: all of them)", purge_action)
    add_filters(purge)

    for child in (replay, purge):
        child.add_argument("--dry-run", action="store_true", help="show what would be done")
        child.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        child.add_argument("--json", action="store_true", help="print JSON")
