"""Is the microservice up? Nothing is consumed until it is (slow starts), and consumption pauses
while it stops answering."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable

import aiohttp

from shared.settings import masked

log = logging.getLogger(__name__)
PROBE_HEADERS = {"User-Agent": "proxymq-dequeuer readiness probe"}


class Readiness:
    """With a ready path, ready means a 2xx there; without one, any HTTP answer from the target
    (a 404 included) means the process is up."""

    def __init__(
        self,
        target: str,
        path: str | None,
        *,
        timeout: float,
        interval: float,
        failures_to_pause: int = 3,
        on_change: Callable[[bool], None] = lambda _: None,
    ) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.url = target.rstrip("/") + (path or "/")
        self.shown = masked(self.url)  # a target may hold a password (Basic auth)
        self.strict = path is not None
        self.timeout = timeout
        self.interval = interval
        self.failures_to_pause = failures_to_pause
        self.on_change = on_change
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """A session of its own, made on first use: in the calls' pool a probe waited behind
        --concurrency busy calls until it timed out, and a busy microservice was taken for a
        dead one (paused, its calls delivered again and run twice)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1), cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def probe(self) -> str | None:
        """None when the microservice is up, else why not. The status decides; the body is not
        waited for. Read, an endless one (a `/` that is an event stream) timed every probe out,
        and the microservice was never ready; a large one was read into memory at each probe.
        Left unread, a body that has all arrived keeps the connection for the next probe; a
        longer one closes it."""
        try:
            async with self.session.get(
                self.url,
                allow_redirects=False,
                headers=PROBE_HEADERS,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as r:
                up = 200 <= r.status < 300 if self.strict else r.status < 500
                return None if up else f"it answered {r.status}"
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except aiohttp.ClientConnectorError as exc:  # its text repeats the URL
            return f"cannot connect: {_connect_failure(exc.os_error)}"
        except (aiohttp.ClientError, OSError) as exc:
            return str(exc) or type(exc).__name__

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="microservice readiness")

    async def _watch(self) -> None:
        """Says once why nothing is consumed yet: a wrong --target or --ready-path left the
        dequeuer silent, its requests waiting, with only `/readyz` to tell."""
        delay, failures, told = 0.1, 0, False
        while True:
            why = await self.probe()
            if why is None:
                failures = 0
                if not self.ready.is_set():
                    log.info("microservice ready at %s", self.shown)
                    self.ready.set()
                    self.on_change(True)
            else:
                failures += 1
                if self.ready.is_set() and failures >= self.failures_to_pause:
                    log.warning(
                        "microservice stopped answering at %s (%s): pausing", self.shown, why
                    )
                    self.ready.clear()
                    self.on_change(False)
                elif not self.ready.is_set() and not told:
                    log.info(
                        "waiting for the microservice at %s (%s): nothing is consumed until "
                        "it is ready",
                        self.shown,
                        why,
                    )
                told = True
            if self.ready.is_set():
                delay = self.interval
            else:  # back off while it boots, up to the normal interval
                delay = min(self.interval, delay * 2 if why is not None else self.interval)
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def _connect_failure(error: OSError) -> str:
    """The system's words for a socket's error number; an ssl error's own text, as its number
    is OpenSSL's (1 read as `Operation not permitted`), and a DNS error's, whose is negative."""
    code = error.errno or 0
    if code > 0 and not isinstance(error, ssl.SSLError):
        return os.strerror(code)
    return error.strerror or str(error) or type(error).__name__
