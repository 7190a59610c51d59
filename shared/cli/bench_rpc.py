"""The bare aio-pika RPC anchor of `proxymq bench`, with the guarantees ProxyMQ gives.

The request goes persistent, confirmed and mandatory to a durable quorum queue; the server
publishes the reply with publisher confirms and acks the request only once the reply is
confirmed (at-least-once, as the dequeuer does); the client has one reply queue and a
correlation id -> future map (as the enqueuer does). What ProxyMQ costs beyond this anchor is
its own work: HTTP in and out, the envelope, partitions, lanes.

The server is its own process, `python -m shared.cli.bench_rpc --serve --queue NAME`, on
uvloop like the sidecars; the client runs inside the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from shared import service
from shared.cli.bench_load import RequestFailed
from shared.cli.common import add_amqp_url
from shared.settings import TlsFiles

log = logging.getLogger(__name__)
CONTENT_TYPE = "application/json"


async def declare_queue(channel: AbstractChannel, name: str) -> AbstractQueue:
    """Both sides declare the same quorum queue, so whichever starts first makes it."""
    return await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})


class RpcServer:
    """Echoes each request to its `reply_to`; acks only after the broker confirmed the reply,
    so a crash between the two delivers the request again instead of losing its answer."""

    def __init__(self, queue: str, prefetch: int) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self._replies: AbstractChannel | None = None

    async def start(self, connection: AbstractConnection) -> None:
        self._replies = await connection.channel(publisher_confirms=True)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        queue = await declare_queue(channel, self.queue)
        await queue.consume(self.on_request)

    async def on_request(self, message: AbstractIncomingMessage) -> None:
        assert self._replies is not None
        if message.reply_to:
            await self._replies.default_exchange.publish(
                aio_pika.Message(
                    message.body,
                    correlation_id=message.correlation_id,
                    content_type=message.content_type,
                ),
                routing_key=message.reply_to,
            )
        await message.ack()


async def serve(url: str, queue: str, prefetch: int, tls: TlsFiles) -> int:
    connection = await aio_pika.connect(
        url,
        ssl_context=tls.context_for(url),
        client_properties={"connection_name": f"proxymq bench rpc server {queue}"},
    )
    try:
        await RpcServer(queue, prefetch).start(connection)
        await service.wait_for_stop()
    finally:
        await connection.close()
    return 0


class RpcClient:
    """Modelled on the enqueuer's reply waiter: the future's done callback removes its entry, so
    a reply, a timeout and a cancel clean up the same way."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self._futures: dict[str, asyncio.Future[bytes]] = {}
        self._channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None

    async def start(self, connection: AbstractConnection) -> None:
        self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        replies = await connection.channel()
        await replies.set_qos(prefetch_count=0)
        self._reply_queue = await replies.declare_queue(exclusive=True, auto_delete=True)
        await self._reply_queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._futures.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message.body)

    async def call(self, body: bytes, timeout: float) -> bytes:
        assert self._channel is not None, "start() first"
        assert self._reply_queue is not None, "start() first"
        request_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._futures[request_id] = future
        future.add_done_callback(lambda _: self._futures.pop(request_id, None))
        try:
            async with asyncio.timeout(timeout):
                await self._channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        content_type=CONTENT_TYPE,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        correlation_id=request_id,
                        message_id=request_id,
                        reply_to=self._reply_queue.name,
                    ),
                    routing_key=self.queue,
                    mandatory=True,
                )
                return await future
        except TimeoutError:
            raise RequestFailed("rpc timeout") from None
        finally:
            future.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.cli.bench_rpc",
        description="RPC anchor server for proxymq bench: echoes requests from a quorum queue.",
    )
    parser.add_argument(
        "--serve", action="store_true", required=True, help="run the server (the only mode)"
    )
    parser.add_argument("--queue", required=True, help="durable quorum queue to consume")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=64,
        help="requests held at once, like the dequeuer's --concurrency (%(default)s)",
    )
    add_amqp_url(parser)
    args = parser.parse_args(argv)
    service.run(serve(args.amqp_url, args.queue, args.prefetch, TlsFiles.of(args)))


if __name__ == "__main__":
    main()
