"""AMQP frames written in one pass of the event loop leave in one send; frames read with text
that is no UTF-8 do not end the connection.

aiormq writes every frame (a publish, an ack) with its own `write`, and the event loop sends each
at once: a syscall per frame, and a TCP segment per frame for RabbitMQ to read. Under load a
sidecar writes dozens of frames per pass; gathering them into one `writelines` at the end of the
pass cuts the writes per request several times over (docs/benchmarks.md).

Frames leave in the order aiormq wrote them, a close sends what is gathered first, and `drain`
keeps its meaning ("resume writing when the transport is not paused", never "the bytes are
sent"): an ack still waits for its turn in aiormq's writer, as before (publishes wait for
their confirm only, `envelope.publish`); only the syscall is shared. Bytes waiting here for
the end of the pass are lost with a dropped connection exactly like bytes in the kernel's send
buffer, and recovered the same way
(unconfirmed publishes fail, unacked deliveries come back).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from pamqp import common, decode
from yarl import URL


class CoalescingWriter:
    """A `StreamWriter` whose writes wait for the end of the loop's current pass."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self._writer.is_closing():
            self._writer.writelines(pending)

    async def drain(self) -> None:
        await self._writer.drain()

    def write_eof(self) -> None:
        self.flush()
        self._writer.write_eof()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


class CoalescingTransportFactory(TransportFactory):
    """aiormq's own TCP or TLS transport (by the URL's scheme), with a `CoalescingWriter`."""

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        inner = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await inner.create(url, **kwargs)
        return reader, CoalescingWriter(writer)  # type: ignore[return-value]


def _short_str(value: bytes) -> tuple[int, str]:
    """pamqp's `short_str`, with bytes that are no UTF-8 read as replacement characters."""
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    return length + 1, value[1 : length + 1].decode("utf-8", "replace")


def _field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """pamqp's `field_table`, with keys that are no UTF-8 read as replacement characters."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset, end = 4, 4 + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        data: common.FieldTable = {}
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "replace")
            consumed, data[key] = decode.embedded_value(value[offset + key_length :])
            offset += key_length + consumed
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def read_text_leniently() -> None:
    """Make pamqp read AMQP short strings (a message's correlation_id, message_id, reply_to, a
    routing key) and header names that are no UTF-8, as long strings already are. Strict, one
    message from another client with such bytes raised in aiormq's frame reader, which closed
    the sidecar's whole connection, again at each redelivery: no partition was served until the
    broker dead-lettered the message, with those held beside it, at the delivery limit."""
    decode.METHODS["shortstr"] = _short_str
    decode.METHODS["table"] = decode.TABLE_MAPPING[b"F"] = _field_table
