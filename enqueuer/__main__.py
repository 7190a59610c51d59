"""`proxymq-enqueuer`: load settings, serve the API and the admin port until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from enqueuer.app import BROKER, ENQUEUER, create_app
from enqueuer.protocol import ApiRunner
from enqueuer.settings import EnqueuerSettings
from shared import logs, service, tracing
from shared.admin import admin_app
from shared.broker import BROKER_ERRORS, warn_above_max_message_size
from shared.errors import QueueInUse
from shared.settings import load

log = logging.getLogger("enqueuer")


async def serve(settings: EnqueuerSettings) -> int:
    warn_above_max_message_size("--max-body", settings.max_body)
    app = create_app(settings)
    broker = app[BROKER]
    metrics = app[ENQUEUER].metrics
    try:
        async with contextlib.AsyncExitStack() as sites:  # a site that cannot start stops the rest
            api = await service.start_site(
                app,
                settings.host,
                settings.port,
                cancel_on_disconnect=True,
                runner_class=ApiRunner,  # its own answers to what aiohttp's parser refuses
                # The body goes to the microservice as it came, compressed or not.
                auto_decompress=False,
                # The guard decides on the number of headers (431) up to twice --max-headers;
                # aiohttp's 128 refused below a larger --max-headers with a 400. Lines
                # keep aiohttp's 8 KiB: a head is held whole while it arrives, and 128 lines
                # of 64 KiB held by each of 20 slow connections took 280 MB.
                max_headers=max(128, 2 * settings.max_headers),
                # aiohttp's 3,630 s let a caller trickling a head in hold it for an hour.
                keepalive_timeout=settings.idle_timeout,
            )
            sites.push_async_callback(api.cleanup)
            admin = await service.start_site(
                admin_app(lambda: {"broker_connected": broker.connected}, metrics.registry),
                settings.admin_host,
                settings.admin_port,
            )
            sites.push_async_callback(admin.cleanup)
            log.info(
                "listening on http://%s:%d (admin :%d)",
                settings.host,
                settings.port,
                settings.admin_port,
            )
            held = asyncio.create_task(app[ENQUEUER].replies.held(), name="reply queue held")
            await service.wait_for_stop(broker.task, held)
    except (QueueInUse, *BROKER_ERRORS) as exc:  # the broker refused the set-up: one line
        log.error("cannot serve: %s", exc)
        return 1
    finally:
        tracing.shutdown()
    return 0


def main() -> None:
    settings = load(EnqueuerSettings)
    logs.setup(settings.log_level, settings.json_logs)
    tracing.setup("proxymq-enqueuer")
    service.run(serve(settings))


if __name__ == "__main__":
    main()
