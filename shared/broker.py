"""The broker connection of a sidecar: connected in the background, so the HTTP side answers
(503, `/readyz` false) while RabbitMQ is still down, and restored by aio-pika's robust connection
afterwards. No retry loop of our own."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiormq
from aio_pika import RobustConnection
from aio_pika.abc import AbstractChannel, AbstractRobustConnection, UnderlayChannel
from aio_pika.connection import make_url
from aio_pika.tools import OneShotCallback
from yarl import URL

from shared.amqp_transport import CoalescingTransportFactory, read_text_leniently
from shared.connect_failures import redact
from shared.errors import BrokerUnavailable
from shared.settings import SidecarSettings, TlsFiles, split_urls

log = logging.getLogger(__name__)
read_text_leniently()
T = TypeVar("T")
OnConnect = Callable[[AbstractRobustConnection], Awaitable[None]]
# A connection attempt that gets no AMQP answer by then (a frozen node, a black-holed route:
# the TCP connect succeeds, nothing comes back) is given up, and the next address tried. Without
# it the attempt waits forever and the sidecar never reconnects.
CONNECT_TIMEOUT = 10.0
# What aio-pika and aiormq raise when the broker is gone, refuses, or a channel was closed under
# us (aiormq's ChannelInvalidStateError is a RuntimeError).
BROKER_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)


def forget_closed_channels() -> None:
    """A channel's watch on its connection's close goes with the channel. aio-pika watches it
    through `connection.closing`, which in aiormq 7 is a new observer at each look, kept until
    the connection closes; the look that was to remove aio-pika's callback at the channel's
    close made one more. Both stayed, 4 KB a channel, for as long as the connection lived: each
    publishing channel the enqueuer replaces after a nack (one a second while a partition
    refuses), each partition a dequeuer gives up."""
    if not isinstance(inspect.getattr_static(aiormq.base.Base, "closing", None), property):
        return  # an older aiormq: `closing` is the connection's own future, nothing is kept

    async def create(
        cls: type[UnderlayChannel],
        /,
        connection: aiormq.abc.AbstractConnection,
        close_callback: Callable[..., Awaitable[Any]],
        **kwargs: Any,
    ) -> UnderlayChannel:
        callback = OneShotCallback(close_callback)
        await connection.ready()
        watch = connection.closing
        watch.add_done_callback(callback)
        channel = await connection.channel(**kwargs)

        def forget(_: object) -> None:
            watch.remove_done_callback(callback)
            watch.cancel()

        closing = channel.closing
        closing.add_done_callback(callback)
        closing.add_done_callback(forget)
        return cls(channel=channel, close_callback=callback)

    async def close(self: UnderlayChannel, exc: aiormq.abc.ExceptionType | None = None) -> None:
        if not self.close_callback.finished.is_set():
            await self.channel.close(exc)
            await self.close_callback.wait()

    UnderlayChannel.create = classmethod(create)  # type: ignore[assignment]
    UnderlayChannel.close = close  # type: ignore[method-assign]


forget_closed_channels()


class _Watch:
    """The tasks inside an `unless_closed` step on one channel, cancelled when it closes: one
    observer per channel, a set entry per step (an observer and a timeout per step cost 18 µs,
    4 % of each sidecar's CPU per request)."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.inside: set[asyncio.Task[Any]] = set()
        self.cancelled: set[asyncio.Task[Any]] = set()
        self.reason: BaseException | None = None
        self.channel = weakref.ref(channel)
        self.closing = channel.closing  # an observer of the close, held as long as the watch
        self.closing.add_done_callback(self._closed)

    def _closed(self, closing: asyncio.Future[Any]) -> None:
        self.reason = None if closing.cancelled() else closing.exception()
        for task in self.inside:  # each waits inside its step: the cancel lands there
            task.cancel()
            self.cancelled.add(task)
        # The reason's traceback holds the channel: left in the map, neither went, and every
        # reconnect kept each lost channel (and what its frames held) for good.
        channel = self.channel()
        if channel is not None:
            _watches.pop(channel, None)


_watches: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, _Watch] = (
    weakref.WeakKeyDictionary()
)


async def unless_closed(channel: aiormq.abc.AbstractChannel, step: Awaitable[T]) -> T:
    """`step` (a publish, an ack), given up with the channel's close reason (else
    `ChannelInvalidStateError`) if `channel` closes first. aiormq hands frames to its writer
    through a bounded queue: when a connection dies while that queue is full (its socket had
    stopped taking data), a publish or an ack waiting for room is never woken, and the
    request's lane, with every later request of its key, stayed stuck for good."""
    if channel.is_closed:
        if isinstance(step, Coroutine):
            step.close()  # never started
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    watch = _watches.get(channel)
    if watch is None:
        watch = _watches[channel] = _Watch(channel)
    task = asyncio.current_task()
    assert task is not None
    watch.inside.add(task)
    try:
        return await step
    except asyncio.CancelledError:
        if task not in watch.cancelled or task.uncancel() > 0:
            raise  # not ours, or someone else cancels the task too
        if isinstance(watch.reason, Exception):  # the broker's, as `refused_for_size` reads it
            raise watch.reason from None
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed") from None
    finally:
        watch.inside.discard(task)
        watch.cancelled.discard(task)


async def set_up(
    connection: AbstractRobustConnection, step: Callable[[], Awaitable[None]], what: str
) -> None:
    """`step` of the first connection's set-up, made again once the connection is back when
    it failed because the connection was lost under it (a broker going down as the sidecar
    comes up, an RST). Taken for a refusal of the set-up, such a loss ended the sidecar
    ("cannot serve", exit 1). A refusal on a live connection (access refused, a topology
    mismatch) still ends it.
    `step` must leave nothing behind when it fails."""
    while True:
        transport = connection.transport
        try:
            await step()
            return
        except (*BROKER_ERRORS, asyncio.CancelledError) as exc:
            if being_cancelled() or (transport is not None and not transport.connection.is_closed):
                raise
            log.warning("the connection was lost while %s (%s): again once it is back", what, exc)
        await _reconnected(connection)


async def _reconnected(connection: AbstractRobustConnection) -> None:
    """Until the robust connection is back, its channels restored (a reconnect takes at least
    its interval: the loss that brings the caller here cannot be followed by it already)."""
    back: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_back(*_: object) -> None:
        if not back.done():
            back.set_result(None)

    connection.reconnect_callbacks.add(on_back)
    try:
        await back
    finally:
        connection.reconnect_callbacks.discard(on_back)


CLOSE_WAIT = 2.0  # seconds a channel or connection close may take once the sidecar stops


async def confirming_channel(connection: AbstractRobustConnection) -> AbstractChannel:
    """A channel for publishing requests or replies: confirms on, returns raised. One that
    fails to open is closed again, or it would be restored with the connection, a second
    channel beside the one opened next."""
    channel = connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        await channel
    except BaseException:
        await closed_within(channel.close())
        raise
    return channel


async def closed_within(closing: Awaitable[object], wait: float = CLOSE_WAIT) -> None:
    """A close at exit that a silent broker cannot hold up: aiormq waits for the broker's
    close-ok until heartbeats give the connection up (two of them: 30 s by default), and a
    dequeuer stopping with its broker black-holed took 32 s, past Kubernetes' 30 s grace.
    Not for rebalances: a channel given up without its close-ok may stay open on the broker,
    holding its partition."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(closing, wait)


def being_cancelled() -> bool:
    """Whether the current task is being cancelled. A `CancelledError` while it is not comes
    from aiormq, which fails the steps pending on a connection it gives up (heartbeats missed)
    with it: a broker error like the others, not a reason for a background task to end."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# RabbitMQ's max_message_size unless rabbitmq.conf says otherwise; AMQP does not tell a client.
DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024


def warn_above_max_message_size(flag: str, size: int) -> None:
    """A limit above the broker's lets through messages the broker refuses by closing the
    channel, which fails whatever else was in flight on it."""
    if size > DEFAULT_MAX_MESSAGE_SIZE:
        log.warning(
            "%s %d is above RabbitMQ's default max_message_size (%d): unless rabbitmq.conf "
            "raises it, larger messages are refused, and what is in flight on their channel "
            "fails with them",
            flag,
            size,
            DEFAULT_MAX_MESSAGE_SIZE,
        )


def refused_for_size(exc: BaseException, size: int) -> bool:
    """RabbitMQ closed the channel because the message of `size` body bytes was over its
    `max_message_size`: sent again, it would be refused again. Every publish in flight on that
    channel fails with the same exception; the size it names tells which one was refused."""
    return isinstance(
        exc, aiormq.exceptions.ChannelPreconditionFailed
    ) and f"message size {size} is larger than configured max size" in str(exc)


TLS_PORT = 5671  # RabbitMQ's TLS listener unless configured otherwise
# How long a first connection may take before the URLs are probed for the wrong scheme: a few
# attempts, and no probe at all of a broker that answers.
SCHEME_CHECK_AFTER = 3.0


async def _tell_scheme_mismatch(urls: list[str]) -> None:
    """Once the first connection is late, say it if a URL's scheme is not what its port speaks:
    aio-pika logs each attempt as `WRONG_VERSION_NUMBER` or `Server connection unexpectedly
    closed`, which names neither TLS nor the port."""
    await asyncio.sleep(SCHEME_CHECK_AFTER)
    for url in urls:
        mismatch = await scheme_mismatch(url)
        if mismatch is not None:
            log.error("the broker connection cannot work: %s", mismatch)


async def scheme_mismatch(url: str, timeout: float = 2.0) -> str | None:
    """What is likely wrong when `url` asks for TLS where its port speaks plain AMQP (amqps://
    to 5672) or the other way round: neither failure says so (`WRONG_VERSION_NUMBER`, a
    connection closed unanswered). None when the port speaks what the URL asks, or cannot be
    reached. One probe connection, for a connection that already failed."""
    parsed = URL(url)
    tls = parsed.scheme == "amqps"
    host, port = parsed.host or "127.0.0.1", parsed.explicit_port or (TLS_PORT if tls else 5672)
    where = f"{redact(url)} asks for {'TLS' if tls else 'plain AMQP'}, but {host}:{port} speaks"
    if tls:
        if await _answers_amqp(host, port, timeout):
            return f"{where} plain AMQP: use amqp://, or the broker's TLS port ({TLS_PORT})"
    elif await _answers_tls(host, port, timeout):
        return f"{where} TLS: use amqps://"
    return None


async def _answers_amqp(host: str, port: int, timeout: float) -> bool:
    """A broker answers AMQP's protocol header with Connection.Start (a method frame: its
    first byte is 1), or with the protocol header of the version it wants instead."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        return (await asyncio.wait_for(reader.read(8), timeout)).startswith((b"\x01", b"AMQP"))
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


async def _answers_tls(host: str, port: int, timeout: float) -> bool:
    """A TLS handshake completes, whoever's certificate it shows: only the protocol counts."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        connecting = asyncio.open_connection(host, port, ssl=context)
        _, writer = await asyncio.wait_for(connecting, timeout)
    except (OSError, TimeoutError):  # ssl.SSLError is an OSError
        return False
    writer.close()
    return True


class FailoverConnection(RobustConnection):
    """A robust connection over several broker addresses: each connection attempt, the first
    and every reconnect, goes to the next address in turn, so losing a cluster node moves the
    sidecar to another within one reconnect interval per dead node.

    aio-pika connects to `self.url` and clears `self.transport` right before every attempt; the
    `transport` setter below advances the address at that moment (aio-pika has no multi-host
    connection of its own: mosquito/aio-pika#141)."""

    def __init__(
        self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        self.failover_urls: list[URL] = [URL(u) for u in kwargs.pop("failover_urls", [])]
        # aio-pika puts every keyword into the URL's query, ours too. aiormq reads the heartbeat
        # from that query, so each address gets it (without it aiormq uses 60 s); the list of
        # addresses, passwords included, must not stay in a URL that gets logged.
        self._options = {k: v for k, v in URL(url).query.items() if k != "failover_urls"}
        self._next = 0
        self._transport: Any = None
        super().__init__(URL(url).with_query(self._options), loop, **kwargs)
        self._next = 0  # the constructor cleared the transport once: that was no attempt
        self.kwargs["transport_factory"] = CoalescingTransportFactory()

    @property
    def transport(self) -> Any:
        return self._transport

    @transport.setter
    def transport(self, value: Any) -> None:
        if value is None and self.failover_urls:
            url = self.failover_urls[self._next % len(self.failover_urls)]
            self.url = url.with_query({**self._options, **url.query})
            self._next += 1
        self._transport = value


def for_sidecar(settings: SidecarSettings, name: str) -> Broker:
    """The broker connection a sidecar's settings describe."""
    return Broker(
        settings.amqp_url,
        name,
        heartbeat=settings.amqp_heartbeat,
        ssl_context=TlsFiles.of(settings).context_for(settings.amqp_url),
    )


class Broker:
    """Holds the one robust connection; `connection` raises `BrokerUnavailable` until it is up."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        heartbeat: int = 15,
        reconnect_interval: float = 1.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self.heartbeat = heartbeat
        self.reconnect_interval = reconnect_interval
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self._connection: AbstractRobustConnection | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_connect: list[OnConnect] = []
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        connection = self._connection
        return (
            connection is not None
            and self._ready.is_set()
            and not connection.is_closed
            and (connection.connected.is_set())
        )

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None or not self.connected:
            raise BrokerUnavailable("RabbitMQ cannot be reached right now")
        return self._connection

    def on_connect(self, callback: OnConnect) -> None:
        """Run once when the first connection is made (declarations, consumers)."""
        self._on_connect.append(callback)

    def start(self) -> None:
        self._task = asyncio.create_task(self._connect(), name=f"connect {self.name}")

    @property
    def task(self) -> asyncio.Task[None]:
        """Fails when the first connection's set-up fails for good (a topology mismatch)."""
        assert self._task is not None, "start() first"
        return self._task

    async def _connect(self) -> None:
        log.info("connecting to %s", redact(self.url))
        urls = split_urls(self.url)
        options: dict[str, Any] = {
            "failover_urls": urls if len(urls) > 1 else [],
            "heartbeat": self.heartbeat,
            "fail_fast": False,
            "reconnect_interval": self.reconnect_interval,
        }
        # What `aio_pika.connect_robust` does, with the connection known before it connects:
        # `close()` must close it even while the first attempt is under way. Left open, its
        # reconnect task takes the cancellation at exit for a lost attempt and tries again,
        # and the process never ends (a sidecar whose port was taken hung so).
        connection = FailoverConnection(
            make_url(urls[0], **options),
            client_properties={"connection_name": self.name},
            ssl_context=self.ssl_context,
            **options,
        )
        self._connection = connection
        check = asyncio.create_task(_tell_scheme_mismatch(urls), name="scheme check")
        try:
            await connection.connect(timeout=self.connect_timeout)
        finally:
            check.cancel()
        connection.reconnect_callbacks.add(self._reconnected)
        for callback in self._on_connect:
            await callback(connection)
        self._ready.set()
        log.info("connected to %s", redact(self.url))

    def _reconnected(self, *_: object) -> None:
        self.reconnects += 1
        log.warning("reconnected to %s", redact(self.url))

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connection is not None:
            await closed_within(self._connection.close())
