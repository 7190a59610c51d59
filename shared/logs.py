"""Structured logs: every line on the request path carries the correlation id, service and
partition, set once at the entry point in a context variable."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TextIO

from aiohttp.http_exceptions import HttpProcessingError
from aiormq.exceptions import AMQPConnectionError
from yarl import URL

from shared.connect_failures import failure_reason, redact, refusal

request_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "proxymq_request_context", default=MappingProxyType({})
)


def bind(**fields: str | None) -> None:
    """Add fields (correlation_id, service, partition...) to the current task's log lines."""
    request_context.set({**request_context.get(), **{k: v for k, v in fields.items() if v}})


class _ConnectionLosses(logging.Filter):
    """A broker connection lost without a close (an RST, a path gone silent) is an event the
    robust connection handles: aiormq logged each with two chained tracebacks, and aio-pika
    an ERROR for each channel whose restore found the connection already closed (it is
    restored with the connection). One warning line each says what happened; a reader that
    failed otherwise (a malformed frame), and any other error, keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, AMQPConnectionError) and isinstance(
            error.__cause__, (OSError, asyncio.IncompleteReadError)
        ):
            record.msg, record.args = "broker connection lost: %s", (error,)
            record.exc_info, record.exc_text = None, None
        elif (
            record.name == "aio_pika.tools"
            and isinstance(record.args, tuple)
            and len(record.args) == 3
            and "RobustChannel._on_close" in repr(record.args[0])
            and isinstance(record.args[2], RuntimeError)  # "... closed": no connection now
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "a channel waits for the broker connection to be restored: %s"
            record.args = (record.args[2],)
        return True


class _ConnectAttempts(logging.Filter):
    """A broker down, or refusing the sidecar (a wrong password, a vhost it may not use), is
    tried again every second for as long as that lasts. Each attempt was two lines: aiormq's
    ERROR with the exception's repr, and aio-pika's warning naming the URL with its internal
    options (`?heartbeat=15&fail_fast=0&...`) and, for a vhost, `got <Connection.Close object at
    0x...>`. One warning says what failed and what to fix, and again once a minute while the
    same failure goes on."""

    REPEAT_EVERY = 60.0
    # Failures further apart than this are two outages: the second is told at once.
    OUTAGE_GAP = 30.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.told: dict[str, tuple[float, float, int]] = {}  # line -> told, last seen, untold

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "aiormq.connection":
            return not str(record.msg).startswith("error when creating transport")
        args = record.args
        if not (
            str(record.msg).startswith("Connection attempt to")
            and isinstance(args, tuple)
            and len(args) == 3
        ):
            return True
        connection, error, interval = args
        if not isinstance(error, BaseException):
            return True
        url = redact(str(URL(str(getattr(connection, "url", ""))).with_query(None)))
        refused = refusal(url, error)
        line = (
            f"{refused[0]}: {refused[1]}"
            if refused
            else f"cannot connect to {url}: {failure_reason(error)}"
        )
        now = self.clock()
        told, seen, untold = self.told.get(line, (-math.inf, -math.inf, 0))
        if now - told < self.REPEAT_EVERY and now - seen < self.OUTAGE_GAP:
            self.told[line] = (told, now, untold + 1)
            return False
        self.told = {k: v for k, v in self.told.items() if now - v[1] < self.OUTAGE_GAP}
        self.told[line] = (now, now, 0)
        again = f" (failed alike {untold} more times since it was last logged)" if untold else ""
        record.msg, record.args = "%s; trying again every %g s%s", (line, interval, again)
        return True


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.ctx = request_context.get()
        return True


class _MalformedRequests(logging.Filter):
    """aiohttp answers a request its parser refuses with 400 and logs it at ERROR with the
    parser's traceback: a caller's mistake, not ours, that any caller can repeat to flood the
    log. One warning line says what was refused; errors of our own keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = (error.message or type(error).__name__).strip().splitlines()[0]
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "refused a malformed HTTP request (400)", ()
            record.exc_info, record.exc_text = None, None
            record.fields = {"peer": peer, "reason": reason.rstrip(":")[:200]}
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "ctx", {}),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {**getattr(record, "ctx", {}), **getattr(record, "fields", {})}
        extra = " ".join(f"{k}={_escaped(v)}" for k, v in fields.items())
        text = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: "
        text += record.getMessage() + (f" {extra}" if extra else "")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _escaped(value: object) -> object:
    """A field as its repr when it holds a line break or another control character: a request
    id from another AMQP client is any string, and its line breaks wrote log lines of the
    publisher's choosing (a forged ERROR) into the text log. One `isprintable` per field."""
    return repr(value) if isinstance(value, str) and not value.isprintable() else value


class GatheringHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines below WARNING at most every FLUSH_AFTER seconds, in one write.

    A line per request, each written and flushed on its own, was a syscall per request in each
    sidecar (about 5 % of its CPU under load). Warnings and errors, and everything logged with
    no event loop running, are written at once; `flush()` (also at exit) writes what waits."""

    FLUSH_AFTER = 0.05

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        if record.levelno >= logging.WARNING or len(self._lines) >= 256:
            self.flush()
        elif len(self._lines) == 1:
            try:
                asyncio.get_running_loop().call_later(self.FLUSH_AFTER, self.flush)
            except RuntimeError:  # no event loop in this thread
                self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines = self._lines, []
            try:
                if lines:
                    self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):  # stderr closed: nowhere left to write
                pass


def setup(level: str = "info", json_logs: bool = False) -> None:
    # Neither format shows them, and each costs every record a syscall or a lookup.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    handler = GatheringHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiormq").setLevel(max(root.level, logging.WARNING))
    logging.getLogger("aio_pika").setLevel(max(root.level, logging.WARNING))
    attempts = _ConnectAttempts()
    for name in ("aiormq.connection", "aio_pika.tools", "aio_pika.robust_connection"):
        logging.getLogger(name).filters[:] = [_ConnectionLosses(), attempts]
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    server.filters[:] = [_MalformedRequests()]


def fields(**values: object) -> dict[str, dict[str, object]]:
    """`log.info("done", extra=fields(status=200))` puts structured fields on one line."""
    return {"fields": values}
