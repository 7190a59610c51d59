"""Process plumbing shared by the sidecars: event loop, listening sites, stopping on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


def run(main: Coroutine[Any, Any, int]) -> None:
    """Run `main` on uvloop when it is installed and exit with its code."""
    try:
        import uvloop

        sys.exit(uvloop.run(main))
    except ImportError:
        sys.exit(asyncio.run(main))


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    cancel_on_disconnect: bool = False,
    runner_class: type[web.AppRunner] = web.AppRunner,
    **parser: Any,
) -> web.AppRunner:
    """`cancel_on_disconnect`: a caller who hangs up frees its handler (and its reply waiter)
    at once instead of at its deadline. `parser`: aiohttp's request parser options
    (`max_field_size`, `auto_decompress`, ...)."""
    runner = runner_class(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=5,
        handler_cancellation=cancel_on_disconnect,
        **parser,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    except OSError as exc:
        await runner.cleanup()  # stops what the app started, its broker connection included
        program = os.path.basename(sys.argv[0])
        raise SystemExit(f"{program}: cannot listen on {host}:{port}: {bind_error(exc)}") from None
    return runner


def bind_error(exc: OSError) -> str:
    """Why a listening socket could not be bound, in a few words: asyncio's text repeats the
    address (`error while attempting to bind on address ('127.0.0.1', 8080): address already in
    use`) after our message has named it."""
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


async def wait_for_stop(*watched: asyncio.Task[Any], stop: asyncio.Event | None = None) -> None:
    """Return on SIGTERM or SIGINT, or once `stop` is set (the dequeuer's `POST /drain`: the
    same stop without a signal); re-raise if a watched background task fails first, so a fatal
    startup error (a topology mismatch, say) ends the process instead of leaving it half alive.

    A second signal, during the graceful stop that follows, stops the process at once (what an
    operator pressing Ctrl-C again means): a second SIGINT used to be a traceback in the middle of
    the stop, a second SIGTERM an exit without a word. Setting `stop` again changes nothing, and
    the first signal after it is the first: a plain container's SIGTERM during its preStop
    hook's drain ended the drain at once."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event() if stop is None else stop
    signals = 0

    def signalled(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            _stop_now(sig)
        log.info("stop signal received")
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled, sig)
    stopper = asyncio.create_task(stopping.wait())
    try:
        pending = {stopper, *watched}
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                return
            for task in done:
                task.result()
    finally:
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
        if not stopping.is_set():  # a watched task failed: any signal now stops at once
            signals = 1


def _stop_now(sig: signal.Signals) -> None:
    """Requests held unanswered go back to RabbitMQ with the connection; callers still waiting
    on an enqueuer see their connection close."""
    log.warning(
        "second stop signal (%s): stopping now, without waiting for work in flight", sig.name
    )
    logging.shutdown()  # the gathered log lines, this one included
    os._exit(128 + sig)
