"""`Idempotency-Key`: a repeated key within the window gets the first request's id and result
instead of a second message. Kept per enqueuer, in memory, bounded by count; a key whose request
ran out of time is forgotten, so a retry after a 504 really tries again."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

from shared.envelope import HttpResponse


@dataclass(frozen=True, slots=True)
class First:
    request_id: str
    future: asyncio.Future[HttpResponse]
    expires: float


class IdempotencyStore:
    def __init__(self, window: float, capacity: int) -> None:
        self.window = window
        self.capacity = capacity
        self._entries: OrderedDict[bytes, First] = OrderedDict()

    @staticmethod
    def _slot(service: str, key: str) -> bytes:
        """A digest, so a caller's long key costs the same memory as a short one."""
        return hashlib.blake2b(f"{service}\0{key}".encode(), digest_size=16).digest()

    def get(self, service: str, key: str) -> First | None:
        self._evict()
        slot = self._slot(service, key)
        first = self._entries.get(slot)
        if first is None or first.future.cancelled():
            self._entries.pop(slot, None)
            return None
        return first

    def remember(
        self, service: str, key: str, request_id: str, future: asyncio.Future[HttpResponse]
    ) -> None:
        self._entries[self._slot(service, key)] = First(
            request_id, future, time.monotonic() + self.window
        )
        self._evict()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        now = time.monotonic()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires > now and len(self._entries) <= self.capacity:
                break
            self._entries.popitem(last=False)
