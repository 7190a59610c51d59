"""Log lines: a request aiohttp's parser refuses is one warning, not an error with a traceback;
a broker connection that keeps failing is one line a minute."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from aiohttp.http_exceptions import BadHttpMessage
from aiormq.exceptions import AMQPConnectionError, ProbableAuthenticationError

from shared import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """The sidecars' logging set-up, writing to a string; pytest's own handlers come back."""
    root, server = logging.getLogger(), logging.getLogger("aiohttp.server")
    handlers, level, filters = root.handlers[:], root.level, server.filters[:]
    text = io.StringIO()
    logs.setup("info")
    handler = root.handlers[0]
    assert isinstance(handler, logs.GatheringHandler)
    handler.setStream(text)
    yield text
    root.handlers[:], server.filters[:] = handlers, filters
    root.setLevel(level)


def test_a_refused_request_is_one_warning_line(stream: io.StringIO) -> None:
    error = BadHttpMessage("Invalid header token:\n\n    b'Bad Header'\n         ^")
    logging.getLogger("aiohttp.server").error(
        "Error handling request from %s", "10.1.2.3", exc_info=error
    )
    logging.getLogger().handlers[0].flush()
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert "WARNING" in line and "Traceback" not in line
    assert "peer=10.1.2.3" in line and "reason=Invalid header token" in line


def test_other_server_errors_keep_their_traceback(stream: io.StringIO) -> None:
    try:
        raise KeyError("ours")
    except KeyError as error:
        logging.getLogger("aiohttp.server").error("Error handling request", exc_info=error)
    logging.getLogger().handlers[0].flush()
    assert "ERROR" in stream.getvalue() and "Traceback" in stream.getvalue()


class _Connection:
    url = "amqp://guest:s3cret@127.0.0.1:5999/?heartbeat=15&fail_fast=0&reconnect_interval=1.0"


def _attempt(error: BaseException) -> logging.LogRecord:
    """The record aio-pika's robust connection logs for each failed attempt."""
    return logging.LogRecord(
        "aio_pika.robust_connection",
        logging.WARNING,
        __file__,
        1,
        'Connection attempt to "%s" failed: %s. Reconnecting after %r seconds.',
        (_Connection(), error, 1.0),
        None,
    )


def test_a_failing_broker_connection_is_one_line_a_minute() -> None:
    """Each attempt, once a second, was an aiormq ERROR with a repr and an aio-pika warning
    with the URL's internal options; a wrong password did not say what to fix."""
    now = [0.0]
    attempts = logs._ConnectAttempts(clock=lambda: now[0])
    refused = AMQPConnectionError(111, "Connection refused")
    creating = logging.LogRecord(
        "aiormq.connection", logging.ERROR, __file__, 1, "error when creating transport: %r",
        (refused,), None,
    )  # fmt: skip
    assert not attempts.filter(creating)
    first = _attempt(refused)
    assert attempts.filter(first)
    assert first.getMessage() == (
        "cannot connect to amqp://guest:***@127.0.0.1:5999/: Connection refused; "
        "trying again every 1 s"
    )
    told = []
    for _ in range(119):
        now[0] += 1.0
        record = _attempt(refused)
        if attempts.filter(record):
            told.append(record.getMessage())
    assert told == [
        "cannot connect to amqp://guest:***@127.0.0.1:5999/: Connection refused; trying again "
        "every 1 s (failed alike 59 more times since it was last logged)"
    ]
    wrong = _attempt(ProbableAuthenticationError("ACCESS_REFUSED - Login was refused"))
    assert attempts.filter(wrong)  # another failure is told at once
    assert "refused the credentials (ACCESS_REFUSED" in wrong.getMessage()
    assert "fix the user and password in --amqp-url / PROXYMQ_AMQP_URL" in wrong.getMessage()
    now[0] += attempts.OUTAGE_GAP
    assert attempts.filter(_attempt(refused))  # a later outage is told at once too
