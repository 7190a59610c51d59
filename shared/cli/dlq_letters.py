"""What a dead letter says, read from its AMQP message, and the messages a replay or a keep builds.

Pure functions; the broker pass (`dlq_pass`) and the command (`dlq`) build on them. Two kinds of
dead letters share `S.dlq`, and `read` gives both the same shape (one reason, one time, one
partition), so no command has to care which kind it holds:

- copies the dequeuer made (`dequeuer/consumer.py`, `dead_letter()`): the original request with
  `x-proxymq-dead-reason`, `-attempts`, `-partition` and `-dead-at` added;
- messages the broker dropped itself (the quorum delivery limit): RabbitMQ's `x-death` list and
  `x-first-death-*` headers instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import string
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import aio_pika
from aio_pika.abc import AbstractMessage, HeadersType

from shared import envelope

# Written by dequeuer/consumer.py `dead_letter()`.
H_DEAD_REASON, H_ATTEMPTS = envelope.H_DEAD_REASON, envelope.H_ATTEMPTS
H_PARTITION, H_DEAD_AT = envelope.H_PARTITION, envelope.H_DEAD_AT
DEQUEUER_HEADERS = frozenset({H_DEAD_REASON, H_ATTEMPTS, H_PARTITION, H_DEAD_AT})
# Written by RabbitMQ when it dead-letters (x-death) or delivers (x-delivery-count): bookkeeping
# about the message's past, not part of the request.
BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-reason",
        "x-first-death-queue",
        "x-first-death-exchange",
        "x-last-death-reason",
        "x-last-death-queue",
        "x-last-death-exchange",
        "x-delivery-count",
    }
)
PREVIEW_BYTES = 256  # of a binary body, in hex
TEXT_PREVIEW_BYTES = 65_536  # of a text body
MAX_ROUTING_KEY = 255  # bytes: an AMQP short string
# Ages beyond this are no dead letter's (and `now - age` must stay a date).
MAX_AGE_SECONDS = 100 * 365 * 86400
Source = Literal["dequeuer", "broker", "unknown"]


@dataclass(frozen=True)
class DeadLetter:
    """One message of `S.dlq` as the commands show it; `message` keeps everything it carried."""

    position: int  # 1-based place in S.dlq when it was read
    message: AbstractMessage
    reason: str
    source: Source
    attempts: int | None
    partition: str | None
    dead_at: datetime | None
    partition_key: str | None
    method: str | None
    path: str | None
    query: str | None
    http_headers: tuple[tuple[str, str], ...] | None  # None: absent or unreadable
    deadline: datetime | None
    body_size: int  # kept apart from `message`: a pass keeps letters without their bodies
    # What tells two dead letters apart across two passes (a preview, then the action).
    identity: tuple[str, ...] = field(default=())

    @property
    def request_id(self) -> str | None:
        return self.message.correlation_id

    def has_id(self, wanted: str) -> bool:
        return wanted in (self.message.correlation_id, self.message.message_id)

    def to_json(self) -> dict[str, object]:
        """The `list --json` row: stable keys, times as ISO 8601 UTC and as epoch ms."""
        return {
            "position": self.position,
            "request_id": self.request_id,
            "message_id": self.message.message_id,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "partition_key": self.partition_key,
            "reason": self.reason,
            "source": self.source,
            "attempts": self.attempts,
            "partition": self.partition,
            "dead_at": _iso(self.dead_at),
            "dead_at_ms": None if self.dead_at is None else int(self.dead_at.timestamp() * 1000),
            "deadline": _iso(self.deadline),
            "body_size": self.body_size,
        }

    def to_full_json(self) -> dict[str, object]:
        """The `show --json` object: the row plus every property, header and the whole body."""
        data = self.to_json()
        text = body_text(self.message.body)
        data.update(
            {
                "properties": {k: json_safe(v) for k, v in properties(self.message).items()},
                "headers": {k: json_safe(v) for k, v in (self.message.headers or {}).items()},
                "http_headers": None if self.http_headers is None else list(self.http_headers),
                "body_text": text,
                "body_base64": None
                if text is not None
                else base64.b64encode(self.message.body).decode(),
            }
        )
        return data


def read(message: AbstractMessage, position: int) -> DeadLetter:
    """Never raises: a dead letter is often there because it is malformed, and it must still
    be listed, shown, purged or replayed."""
    headers: Mapping[str, object] = message.headers or {}
    death = _first_death(headers)
    reason = _text(headers.get(H_DEAD_REASON))
    source: Source = "dequeuer"
    if reason is None:
        reason = _text(headers.get("x-first-death-reason")) or _text(death.get("reason"))
        source = "broker" if reason is not None else "unknown"
    dead_at_ms = _int(headers.get(H_DEAD_AT))
    dead_at = _from_ms(dead_at_ms) if dead_at_ms is not None else _time(death.get("time"))
    deadline_ms = _int(headers.get(envelope.H_DEADLINE))
    reason = reason or "unknown"
    return DeadLetter(
        position=position,
        message=message,
        reason=reason,
        source=source,
        attempts=_int(headers.get(H_ATTEMPTS)),
        partition=_text(headers.get(H_PARTITION))
        or _text(headers.get("x-first-death-queue"))
        or _text(death.get("queue")),
        dead_at=dead_at,
        partition_key=_text(headers.get(envelope.H_KEY)),
        method=_text(headers.get(envelope.H_METHOD)),
        path=_text(headers.get(envelope.H_PATH)),
        query=_text(headers.get(envelope.H_QUERY)),
        http_headers=_http_headers(headers.get(envelope.H_HEADERS)),
        deadline=None if deadline_ms is None else _from_ms(deadline_ms),
        body_size=len(message.body),
        identity=_identity(message, dead_at_ms, dead_at, reason, headers),
    )


def _identity(
    message: AbstractMessage,
    dead_at_ms: int | None,
    dead_at: datetime | None,
    reason: str,
    headers: Mapping[str, object],
) -> tuple[str, ...]:
    """What tells a letter apart from every other: its message_id, else one derived from its
    content (which `kept_copy` then gives it, so the next pass sees the same), and its content.
    Two letters alike in all of it are interchangeable; `choose` counts them."""
    content = (
        message.correlation_id or "",
        str(dead_at_ms if dead_at_ms is not None else _iso(dead_at)),
        reason,
        _text(headers.get(envelope.H_KEY)) or "",
        str(len(message.body)),
        hashlib.sha256(message.body).hexdigest(),
    )
    derived = hashlib.sha256("\0".join(content).encode()).hexdigest()[:32]
    return (message.message_id or derived, *content)


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on; every given filter must match (no filter = all).

    A letter whose time is unknown matches no time filter: "older than an hour" must not catch a
    message nobody can date."""

    ids: frozenset[str] = frozenset()
    reason: str | None = None
    key: str | None = None
    older_than: float | None = None  # seconds
    newer_than: float | None = None
    limit: int | None = None

    @property
    def everything(self) -> bool:
        return not (self.ids or self.reason or self.key is not None) and (
            self.older_than is None and self.newer_than is None and self.limit is None
        )

    def matches(self, letter: DeadLetter, now: datetime) -> bool:
        if self.ids and not any(letter.has_id(wanted) for wanted in self.ids):
            return False
        if self.reason is not None and self.reason.lower() not in letter.reason.lower():
            return False
        if self.key is not None and letter.partition_key != self.key:
            return False
        if self.older_than is not None and (
            letter.dead_at is None or letter.dead_at > now - timedelta(seconds=self.older_than)
        ):
            return False
        return self.newer_than is None or (
            letter.dead_at is not None
            and letter.dead_at >= now - timedelta(seconds=self.newer_than)
        )

    def describe(self) -> str:
        parts = [f"id {', '.join(sorted(self.ids))}"] if self.ids else []
        if self.reason is not None:
            parts.append(f"reason contains {self.reason!r}")
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        if self.older_than is not None:
            parts.append(f"dead for more than {duration(self.older_than)}")
        if self.newer_than is not None:
            parts.append(f"dead for less than {duration(self.newer_than)}")
        if self.limit is not None:
            parts.append(f"the first {self.limit}")
        return "; ".join(parts) or "all"


def kept_copy(message: AbstractMessage) -> aio_pika.Message:
    """The same message for the tail of `S.dlq`: everything kept but the broker's
    `x-delivery-count`, which describes this delivery, not the message. A message without a
    message_id gets the one its identity derived (else the client would add a random one, and
    the letter a preview showed would not be recognised by the pass that acts on it)."""
    headers = {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"}
    copy = _rebuild(message, headers)
    copy.message_id = read(message, 0).identity[0]
    return copy


def replay_of(letter: DeadLetter, *, keep_deadline: bool) -> tuple[aio_pika.Message, str]:
    """The request as it was published, and its routing key.

    Our dead-letter headers and the broker's death records go (the dequeuer would otherwise carry
    an old failure along); the deadline goes too unless asked to keep it, since a past deadline
    makes the dequeuer drop the request unanswered as expired. `x-proxymq-sent-at` becomes now:
    it times the queue-wait histogram, where the original's counted a letter's age as its wait.
    All else stays: ids, reply_to (the pass removes one whose queue is gone), HTTP headers, body.
    The routing key is the partition key, so the request lands in the partition its key hashes
    to; without one, the request id, as the enqueuer does."""
    drop = DEQUEUER_HEADERS | BROKER_HEADERS
    if not keep_deadline:
        drop = drop | {envelope.H_DEADLINE}
    message = letter.message
    headers = {k: v for k, v in (message.headers or {}).items() if k not in drop}
    if envelope.H_SENT_AT in headers:
        headers[envelope.H_SENT_AT] = int(time.time() * 1000)
    routing_key = letter.partition_key or message.correlation_id or uuid.uuid4().hex
    if len(routing_key.encode()) > MAX_ROUTING_KEY:
        raise ValueError(
            f"its partition key is {len(routing_key.encode())} bytes long, and AMQP routes by "
            f"at most {MAX_ROUTING_KEY}"
        )
    return _rebuild(message, headers), routing_key


def _rebuild(message: AbstractMessage, headers: HeadersType) -> aio_pika.Message:
    return aio_pika.Message(
        message.body,
        headers=envelope.writable(headers),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=message.user_id,
        app_id=message.app_id,
    )


def properties(message: AbstractMessage) -> dict[str, object]:
    """The AMQP properties that are set, by their AMQP names."""
    found: dict[str, object] = {
        "correlation_id": message.correlation_id,
        "message_id": message.message_id,
        "reply_to": message.reply_to,
        "delivery_mode": int(message.delivery_mode),
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "priority": message.priority,
        "expiration": message.expiration,
        "timestamp": message.timestamp,
        "type": message.type,
        "user_id": message.user_id,
        "app_id": message.app_id,
    }
    return {k: v for k, v in found.items() if v is not None}


_PRINTABLE = set(string.printable) - {"\x0b", "\x0c"}


def body_text(body: bytes) -> str | None:
    """The body as text when it is UTF-8 a person can read (JSON, form data, plain text)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if all(ch in _PRINTABLE or ord(ch) > 127 for ch in text):
        return text
    return None


def hex_preview(body: bytes, limit: int = PREVIEW_BYTES) -> str:
    """`xxd`-style lines for the first `limit` bytes of a binary body."""
    lines = []
    for offset in range(0, min(len(body), limit), 16):
        chunk = body[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        ascii_ = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {hexes:<47}  {ascii_}")
    return "\n".join(lines)


def json_safe(value: object) -> object:
    """AMQP table values (strings or byte arrays, datetimes, nested tables) as JSON values."""
    if isinstance(value, bytes | bytearray):
        text = body_text(bytes(value))
        return text if text is not None else {"base64": base64.b64encode(value).decode()}
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def human_time(moment: datetime | None, now: datetime) -> str:
    """Local time with how long ago, the date only when it is not today: what an operator
    compares against logs, kept short enough for a table column."""
    if moment is None:
        return "-"
    ago = max(0.0, (now - moment).total_seconds())
    local = moment.astimezone()
    shown = (
        f"{local:%H:%M:%S}"
        if local.date() == now.astimezone().date()
        else f"{local:%Y-%m-%d %H:%M}"
    )
    return f"{shown} ({duration(ago)} ago)"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def parse_duration(value: str) -> float:
    """Seconds, or a number with s, m, h or d: `--older-than 90`, `--older-than 2h`."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = value.strip().lower()
    factor = units.get(text[-1:]) if text else None
    number = float(text[:-1] if factor is not None else text)
    if number < 0:
        raise ValueError(f"{value!r} is negative")
    seconds = number * (factor or 1)
    if not math.isfinite(seconds) or seconds > MAX_AGE_SECONDS:
        raise ValueError(f"{value!r} is more than 100 years")
    return seconds


def _first_death(headers: Mapping[str, object]) -> Mapping[str, object]:
    """The newest `x-death` entry (RabbitMQ puts it first)."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return {}


def _text(value: object) -> str | None:
    """A header as text, whether sent as a string (bytes when not UTF-8) or a byte array."""
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _from_ms(ms: int) -> datetime | None:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _time(value: object) -> datetime | None:
    """An AMQP timestamp: pamqp gives a datetime (UTC); an int is epoch seconds."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int) and not isinstance(value, bool):
        return _from_ms(value * 1000)
    return None


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _http_headers(raw: object) -> tuple[tuple[str, str], ...] | None:
    text = _text(raw)
    if text is None:
        return None
    try:
        pairs = json.loads(text)
    except (ValueError, RecursionError):  # "[[[[...": the dequeuer dead-letters it as malformed
        return None
    if not isinstance(pairs, list):
        return None
    return tuple(
        (str(pair[0]), str(pair[1]))
        for pair in pairs
        if isinstance(pair, list | tuple) and len(pair) == 2
    )
