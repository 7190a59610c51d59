"""One pass over a service's dead-letter queue: each message is taken from the head and then
replayed, dropped, or copied to the tail, one at a time.

Why copy to the tail instead of giving the message back: `S.dlq` is a quorum queue, and on
RabbitMQ 3.10 no way of returning messages taken with `basic.get` keeps their order (measured,
see docs/dead-letters.md). A nack with requeue puts the message at the back, and past 32 such
messages part of them come back reversed. One `multiple` nack, or closing the channel, returns
them in hash order. So each message is copied to the tail, and the original is acked only after
the broker confirms the copy. This keeps order by construction. It also holds at most one message
unacked, so a crash returns one message, never a scrambled batch, and memory does not grow with
the queue.

The pass takes exactly as many messages as the passive declare counted when it started. It never
meets its own copies, so it ends. When it ends, the kept messages are in their original order;
dead letters that arrived meanwhile sit among them where the pass was when they came.

Two passes at once would interleave their copies. A pass therefore holds an exclusive queue
`S.dlq-lock` while it runs. The broker deletes that queue with the connection, so a crashed
pass leaves no lock behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)

from shared import topology
from shared.broker import BROKER_ERRORS
from shared.cli.dlq_letters import DeadLetter, kept_copy, read, replay_of
from shared.cli.status import passive

OPERATION_TIMEOUT = 30.0  # one get or one confirmed publish; a healthy broker takes milliseconds


class Fate(enum.Enum):
    KEEP = "keep"
    REPLAY = "replay"
    DROP = "drop"


Decide = Callable[[DeadLetter], Fate]
Progress = Callable[[int, int], None]  # (messages handled, messages in the pass)


class Pace:
    """At most `rate` replays a second, evenly spaced: a service that just recovered gets its
    dead letters as a trickle among its live requests, not as a block at the head of its
    partitions that every newer request waits behind. None replays as fast as the broker
    confirms."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 0.0 if rate is None else 1.0 / rate
        self._next = 0.0

    async def turn(self, stop: asyncio.Event | None) -> bool:
        """Wait for the next replay's turn; False when `stop` was set meanwhile (a Ctrl-C
        changes nothing more, so the letter is kept)."""
        if not self.interval:
            return True
        now = asyncio.get_running_loop().time()
        wait = self._next - now
        self._next = max(now, self._next) + self.interval
        if wait > 0:
            if stop is None:
                await asyncio.sleep(wait)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        return stop is None or not stop.is_set()


class DlqError(Exception):
    """A state the operator must know about; the message says what it means for the queue."""


class NoDeadLetterQueue(DlqError):
    pass


class Busy(DlqError):
    pass


class PassInterrupted(DlqError):
    def __init__(self, message: str, result: PassResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class PassResult:
    total: int  # messages in S.dlq when the pass started
    seen: int = 0
    kept: int = 0
    replayed: list[DeadLetter] = field(default_factory=list)  # bodies left out: see `light`
    dropped: list[DeadLetter] = field(default_factory=list)
    # The first letter that could not be replayed (or copied); it was kept, and every later one.
    refused: DeadLetter | None = None
    refusal: str | None = None
    stopped: bool = False  # asked to stop (Ctrl-C): the rest was kept unchanged


def lock_name(service: str) -> str:
    """`S.<word>`, never matching `^S\\.p\\d+$`: KEDA and `proxymq status` do not see it."""
    return f"{topology.dead_letter_queue(service)}-lock"


def light(letter: DeadLetter) -> DeadLetter:
    """The letter without its body (size kept): a pass over a big queue only keeps what it
    reports."""
    message = letter.message
    return replace(
        letter,
        message=aio_pika.Message(
            b"",
            headers=message.headers,
            correlation_id=message.correlation_id,
            message_id=message.message_id,
            reply_to=message.reply_to,
            content_type=message.content_type,
        ),
    )


class DeadLetterQueue:
    """`S.dlq` of one service on a connection the caller owns."""

    def __init__(self, connection: AbstractConnection, service: str) -> None:
        self.connection = connection
        self.service = service
        self.name = topology.dead_letter_queue(service)
        self._reply_queues: dict[str, bool] = {}  # reply queue -> there, when first asked

    async def depth(self) -> int:
        found = await passive(self.connection, self.name)
        if found is None:
            raise NoDeadLetterQueue(self.name)
        return found[0]

    async def sweep(
        self,
        decide: Decide,
        *,
        keep_deadline: bool = False,
        progress: Progress | None = None,
        stop: asyncio.Event | None = None,
        pace: Pace | None = None,
    ) -> PassResult:
        """Go once through the queue; `decide` gives each message's fate. A letter that cannot be
        replayed is kept and turns the rest of the pass into keeps: a broker that refused one (no
        queue bound, partition full) would refuse the next ones for the same reason."""
        async with self._locked():
            get_channel = await self.connection.channel()
            publish_channel = await self.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            result = PassResult(total=0)
            try:
                try:
                    queue = await get_channel.declare_queue(self.name, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    raise NoDeadLetterQueue(self.name) from None
                result.total = int(queue.declaration_result.message_count or 0)
                exchange = await publish_channel.get_exchange(self.service, ensure=False)
                turn = partial((pace or Pace(None)).turn, stop)
                for position in range(1, result.total + 1):
                    message = await queue.get(no_ack=False, fail=False, timeout=OPERATION_TIMEOUT)
                    if message is None:
                        break  # someone else took messages since the count
                    if stop is not None and stop.is_set():
                        result.stopped = True
                    letter = read(message, position)
                    fate = Fate.KEEP
                    if not (result.stopped or result.refused):
                        fate = await self._fate(
                            decide, exchange, letter, keep_deadline, result, turn
                        )
                        if stop is not None and stop.is_set():
                            result.stopped = True
                    if fate is Fate.KEEP:
                        await self._keep(publish_channel, message, letter, result)
                    else:
                        await message.ack()
                        done = result.replayed if fate is Fate.REPLAY else result.dropped
                        done.append(light(letter))
                    result.seen = position
                    if progress is not None:
                        progress(position, result.total)
                return result
            except (*BROKER_ERRORS, TimeoutError) as exc:
                raise PassInterrupted(str(exc) or type(exc).__name__, result) from exc
            finally:
                await _close(publish_channel)
                await _close(get_channel)

    async def _fate(
        self,
        decide: Decide,
        exchange: AbstractExchange,
        letter: DeadLetter,
        keep_deadline: bool,
        result: PassResult,
        turn: Callable[[], Awaitable[bool]],
    ) -> Fate:
        """What became of the letter: a replay that failed, for whatever reason, is a keep and
        recorded as the pass's refusal. Only the broker going away ends a pass midway; anything
        else about one letter must not leave the queue rotated."""
        try:
            fate = decide(letter)
            if fate is Fate.REPLAY and not await turn():
                return Fate.KEEP
            refusal = (
                await self._replay(exchange, letter, keep_deadline) if fate is Fate.REPLAY else None
            )
        except (*BROKER_ERRORS, TimeoutError):
            raise
        except Exception as exc:
            refusal = f"it could not be handled ({_said(exc)})"
        if refusal is None:
            return fate
        result.refused, result.refusal = light(letter), refusal
        return Fate.KEEP

    async def _keep(
        self,
        channel: AbstractChannel,
        message: AbstractIncomingMessage,
        letter: DeadLetter,
        result: PassResult,
    ) -> None:
        """Copy to the tail, then ack. A message the client cannot write again is given back
        instead: one nack puts it at the tail too (docs/dead-letters.md), where its copy would
        have gone."""
        result.kept += 1
        try:
            await channel.default_exchange.publish(
                kept_copy(message), routing_key=self.name, mandatory=True, timeout=OPERATION_TIMEOUT
            )
        except (*BROKER_ERRORS, TimeoutError):
            raise
        except Exception as exc:
            await message.nack(requeue=True)
            if result.refused is None:
                result.refused = light(letter)
                result.refusal = f"it could not be copied ({_said(exc)}), so it was given back"
            return
        await message.ack()

    async def _replay(
        self, exchange: AbstractExchange, letter: DeadLetter, keep_deadline: bool
    ) -> str | None:
        """Publish and wait for the confirm; why it was not replayed, or None."""
        try:
            replay, routing_key = replay_of(letter, keep_deadline=keep_deadline)
        except ValueError as exc:
            return str(exc)
        if replay.reply_to and not await self._reply_queue_there(replay.reply_to):
            replay.reply_to = None
        try:
            await exchange.publish(
                replay, routing_key=routing_key, mandatory=True, timeout=OPERATION_TIMEOUT
            )
        except aiormq.exceptions.PublishError:
            return (
                f"exchange {self.service} routed it to no queue (no partition is bound: "
                "is the topology declared?)"
            )
        except aiormq.exceptions.DeliveryError:
            return "the broker refused it (its partition is full: x-max-length)"
        return None

    async def _reply_queue_there(self, name: str) -> bool:
        """Whether a replay's reply queue still exists, asked once a pass per queue. A dead
        letter's is usually gone (its enqueuer's, gone a minute after it), and the dequeuer
        waits 15 s for a missing reply queue with the request held, every later request of its
        key behind it: a replay whose reply nobody can take is sent without `reply_to`. Only
        a queue the broker says is missing counts as gone: an exclusive one of another
        connection is locked to us, not gone."""
        if name not in self._reply_queues:
            channel = await self.connection.channel()
            self._reply_queues[name] = True
            try:
                await channel.declare_queue(name, passive=True, timeout=OPERATION_TIMEOUT)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self._reply_queues[name] = False
            except aiormq.exceptions.ChannelClosed:
                pass  # RESOURCE_LOCKED, ACCESS_REFUSED: there, as far as we know
            finally:
                await _close(channel)
        return self._reply_queues[name]

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        channel = await self.connection.channel()
        try:
            await channel.declare_queue(
                lock_name(self.service),
                exclusive=True,
                auto_delete=True,
                arguments={"x-queue-type": "classic"},
            )
        except aiormq.exceptions.ChannelLockedResource:
            raise Busy(
                f"another `proxymq dlq` command is going through {self.name} right now "
                f"(it holds {lock_name(self.service)}); try again when it is done"
            ) from None
        except aiormq.exceptions.AMQPError as exc:
            raise DlqError(f"could not declare the lock {lock_name(self.service)}: {exc}") from exc
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await channel.queue_delete(lock_name(self.service))
            await _close(channel)


def _said(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _close(channel: AbstractChannel) -> None:
    """Closing after a broker-side channel error must not hide that error."""
    if not channel.is_closed:
        with contextlib.suppress(Exception):
            await channel.close()
