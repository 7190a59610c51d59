"""Log lines: a request aiohttp's parser refuses is one warning, not an error with a traceback."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from aiohttp.http_exceptions import BadHttpMessage

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
