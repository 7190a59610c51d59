"""A TCP proxy between the sidecars and a broker that breaks connections the way networks do.

A broker that stops closes its connections cleanly; a network does not. `reset()` aborts every
connection with an RST (a crashed host, a firewall reset); `blackhole()` keeps every socket open
but forwards nothing more, and new connections are accepted into the same silence (a frozen VM,
a route gone without a word): only heartbeats and timeouts can tell. `stall()` does the same
but stops reading too, so the senders' buffers fill and their writes block. `refuse()` resets every
new connection at once (a host that is up but not serving). `heal()` lets new connections
through again; the black-holed and stalled ones stay dead, as a half-open TCP connection does.
`reset_when` resets the connection whose client sends the first of those byte strings (a queue's
name, say), and drops it from the list: cuts at chosen steps of the protocol, in turn.
`hold()` keeps what the broker sends (its confirms, its deliveries) from the clients until
`release()`, then passes it on, nothing lost: a slow broker, deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

CHUNK = 64 * 1024


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    silent: bool = False
    stalled: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


class FaultyProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.blocking = False
        self.refusing = False
        self.accepted = 0
        self.reset_when: list[bytes] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pairs: set[_Pair] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> FaultyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            self._close(pair, reset=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    @property
    def connections(self) -> int:
        """Connections forwarding right now (black-holed ones not counted)."""
        return sum(1 for p in self._pairs if not p.silent)

    def reset(self) -> int:
        """Abort every connection with an RST on both sides; returns how many."""
        pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair, reset=True)
        return len(pairs)

    def blackhole(self) -> int:
        """Silence every connection, now and new ones, until `heal()`; returns how many."""
        self.blocking = True
        for pair in self._pairs:
            pair.silent = True
        return len(self._pairs)

    def stall(self) -> int:
        """Stop reading from every connection, now and new ones, until `heal()`: the senders'
        buffers fill and their writes block, as on a path that drops everything without a word
        (a black hole whose TCP stops acknowledging); returns how many."""
        self.blocking = True
        for pair in self._pairs:
            pair.silent = pair.stalled = True
        return len(self._pairs)

    def refuse(self) -> None:
        """Reset new connections at once, until `heal()`."""
        self.refusing = True

    def hold(self) -> None:
        """Hold what the broker sends to the clients, until `release()`."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def heal(self) -> None:
        self.blocking = self.refusing = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        pair = _Pair(writer, silent=self.blocking)
        self._pairs.add(pair)
        if self.refusing:
            self._close(pair, reset=True)
            return
        try:
            if pair.silent:  # accepted into silence: read and drop until the client gives up
                await self._drain(reader)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            pair.upstream = up_writer
            pair.tasks = [
                asyncio.create_task(self._pump(reader, up_writer, pair)),
                asyncio.create_task(self._pump(up_reader, writer, pair, held=True)),
            ]
            await asyncio.wait(pair.tasks, return_when=asyncio.FIRST_COMPLETED)
            if pair.silent:  # one side closed while silenced: keep the other side in the dark
                await asyncio.gather(*pair.tasks, return_exceptions=True)
        finally:
            self._close(pair, reset=False)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: _Pair,
        *,
        held: bool = False,
    ) -> None:
        """`held`: the broker's side, which `hold()` holds."""
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(CHUNK):
                if held:
                    await self._flowing.wait()
                if self.reset_when and self.reset_when[0] in data:
                    del self.reset_when[0]
                    self._close(pair, reset=True)
                    return
                if pair.stalled:  # read no more, and keep the socket open
                    await asyncio.get_running_loop().create_future()
                if pair.silent:
                    continue
                writer.write(data)
                await writer.drain()

    @staticmethod
    async def _drain(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(CHUNK):
                pass

    def _close(self, pair: _Pair, *, reset: bool) -> None:
        if pair not in self._pairs:
            return
        self._pairs.discard(pair)
        for task in pair.tasks:
            task.cancel()
        for writer in pair.writers():
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:  # linger 0: close() sends RST, not FIN
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                writer.transport.abort()
            else:
                writer.close()
