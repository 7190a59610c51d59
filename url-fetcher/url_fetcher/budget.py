"""The caller's time budget: `X-Request-Timeout`, the seconds the dequeuer still waits."""

from __future__ import annotations

import asyncio

from aiohttp import web

DEADLINE_HEADER = "X-Request-Timeout"
CALLER_TIMEOUT = "the caller's time ran out (X-Request-Timeout)"


def budget_of(value: str | None) -> float | None:
    """The seconds an `X-Request-Timeout` value gives, 0 meaning none left; None for no value
    or one that is no duration (negative, NaN, not a number), which leaves the service's own
    caps alone. Read as the enqueuer reads it (the first of repeats folded into one line, ASCII
    digits only: Python's float() also reads `1_0` and other scripts' digits), but for 0: the
    enqueuer ignores it, and here it is a batch item that spent its time waiting."""
    if value is None:
        return None
    first = value.partition(",")[0]
    if not first.isascii() or "_" in first:
        return None
    try:
        seconds = float(first)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None  # NaN is not >= 0


def caller_deadline(request: web.Request, cap: float) -> float | None:
    """The loop time at which `request`'s caller stops waiting, when that is within `cap`
    seconds (the service's own limit); None when the own limit comes first."""
    budget = budget_of(request.headers.get(DEADLINE_HEADER))
    if budget is None or budget >= cap:
        return None
    return asyncio.get_running_loop().time() + budget
