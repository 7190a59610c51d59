"""`url-fetcher`: run the fetch service until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web

from shared import logs
from shared.service import bind_error
from shared.settings import load
from url_fetcher.app import create_app
from url_fetcher.settings import UrlFetcherSettings

log = logging.getLogger("url_fetcher")


def main(argv: list[str] | None = None) -> None:
    """Parse flags and environment, then serve; exits 0 on SIGTERM once requests have drained."""
    settings = load(UrlFetcherSettings, argv)
    logs.setup()  # the sidecars' format: their lines read alike side by side
    try:
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            print=None,
            access_log=None,  # one line per fetch is logged by the fetcher instead
            shutdown_timeout=longest_request(settings) + 1,  # a second to write the answer
            loop=_event_loop(),
        )
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, bind_error(exc))
        sys.exit(1)


def longest_request(settings: UrlFetcherSettings) -> float:
    """Seconds the longest request may legitimately take, so SIGTERM lets it finish: a fetch
    within --fetch-timeout, a batch (of either kind, nested too) within --batch-timeout."""
    return max(settings.fetch_timeout, settings.batch_timeout)


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (faster sockets), else the standard loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    main()
