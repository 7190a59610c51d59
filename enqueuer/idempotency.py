"""`Idempotency-Key`: a repeated key gets the first request's id and result instead of a second
message while the first runs and within the window from its arrival; a key sent with another
request (method, path, query or body) is refused. Kept per enqueuer, in
memory; the answers kept are bounded by count and by their bytes (the newest whatever its size),
the requests still running by the reply waiter's cap; a key whose request ran out of time, or
lost its reply with an expired reply queue, is forgotten, so a retry after a 504 really tries
again."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

from shared.envelope import HttpResponse
from shared.errors import BrokerUnavailable, GatewayTimeout, IdempotencyKeyReused, ProxyMQError


@dataclass(slots=True)
class First:
    request_id: str
    future: asyncio.Future[HttpResponse]
    expires: float
    fingerprint: bytes
    published: asyncio.Event = field(default_factory=asyncio.Event)
    refused: BaseException | None = None
    counted: int = 0  # the bytes of its answer in the store's total
    accepted: bool = False  # answered 202 once, and counted as such

    def settle(self, refused: BaseException | None) -> None:
        """The first's publish is over: confirmed (`None`) or refused with this error."""
        self.refused = refused
        self.published.set()

    async def wait_published(self) -> None:
        """A repeat goes on once the first is in its queue, and fails as the first did: a 202
        or a wait for a request that was never queued would end in a made-up 504."""
        await self.published.wait()
        if isinstance(self.refused, ProxyMQError):
            raise copy.copy(self.refused)  # a raise adds this repeat's frames to the error
        if self.refused is not None:
            raise BrokerUnavailable(
                "the first request with this Idempotency-Key was not confirmed by RabbitMQ",
            )


class IdempotencyStore:
    """Running firsts apart from answered ones: only answers are dropped, for count, bytes and
    the window (oldest answer first). A running first holds no answer, and its reply slot is
    bounded by --max-in-flight; dropped for others' answers, or at the end of the window while
    it waited in a backlog (an asynchronous request has no deadline), its repeat was a second
    message."""

    def __init__(self, window: float, capacity: int, max_bytes: int) -> None:
        self.window = window
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0  # of the answers of the entries kept
        self._running: dict[bytes, First] = {}
        self._answered: OrderedDict[bytes, First] = OrderedDict()  # in the order answered

    @staticmethod
    def _slot(service: str, key: str) -> bytes:
        """A digest, so a caller's long key costs the same memory as a short one. The key's
        bytes as sent: aiohttp keeps bytes that are no UTF-8 as surrogates."""
        slot = f"{service}\0{key}".encode(errors="surrogateescape")
        return hashlib.blake2b(slot, digest_size=16).digest()

    def get(self, service: str, key: str, digest: bytes) -> First | None:
        """The first request with this key, if it is still kept; `IdempotencyKeyReused` when
        it was another request than the one `digest` (its `fingerprint()`) stands for."""
        self._evict()
        slot = self._slot(service, key)
        first = self._running.get(slot) or self._answered.get(slot)
        if (
            first is None
            or _timed_out(first.future)
            or (first.future.done() and first.expires <= time.monotonic())
        ):
            self._drop(slot)
            return None
        if first.fingerprint != digest:
            raise IdempotencyKeyReused(
                "this Idempotency-Key came with another request (method, path, query or body) "
                "within --idempotency-window: a retry must repeat its request, a new request "
                "needs a new key"
            )
        return first

    def remember(
        self,
        service: str,
        key: str,
        request_id: str,
        future: asyncio.Future[HttpResponse],
        digest: bytes,
    ) -> First:
        slot = self._slot(service, key)
        self._drop(slot)
        first = First(request_id, future, time.monotonic() + self.window, digest)
        self._running[slot] = first
        future.add_done_callback(partial(self._answered_now, slot, first))
        self._evict()
        return first

    def __len__(self) -> int:
        return len(self._running) + len(self._answered)

    def _answered_now(self, slot: bytes, first: First, _: object) -> None:
        if self._running.get(slot) is not first:
            return  # dropped meanwhile, or its key remembered again
        del self._running[slot]
        if _timed_out(first.future) or first.expires <= time.monotonic():
            return  # ran out of time or was never queued, or answered past its window
        first.counted = _size(first)
        self.bytes += first.counted
        self._answered[slot] = first
        self._evict()

    def _evict(self) -> None:
        now = time.monotonic()
        while self._answered:
            slot, oldest = next(iter(self._answered.items()))
            within = len(self._answered) <= self.capacity and (
                self.bytes <= self.max_bytes or len(self._answered) == 1
            )
            if oldest.expires > now and within:
                break
            self._drop(slot)

    def _drop(self, slot: bytes) -> None:
        self._running.pop(slot, None)
        gone = self._answered.pop(slot, None)
        if gone is not None:
            self.bytes -= gone.counted


def fingerprint(method: str, path: str, query: str, body: bytes) -> bytes:
    """What a repeat must share with its first. Not its headers: a retry's `traceparent`, its
    `Date` or its token may well differ."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (method, path, query):
        digest.update(part.encode(errors="surrogateescape") + b"\0")
    digest.update(body)
    return digest.digest()


def _timed_out(future: asyncio.Future[HttpResponse]) -> bool:
    """Cancelled (at its deadline, or never queued) or failed with 504 (its reply lost with an
    expired reply queue): forgotten, so that a retry after a 504 really tries again."""
    if not future.done():
        return False
    return future.cancelled() or isinstance(future.exception(), GatewayTimeout)


def _size(first: First) -> int:
    """The bytes an entry holds: its answer, once there is one."""
    future = first.future
    if not future.done() or future.cancelled() or future.exception() is not None:
        return 0
    return future.result().size
