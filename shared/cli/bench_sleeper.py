"""A microservice with a fixed latency for the partition benchmarks:
`python -m shared.cli.bench_sleeper --port P --latency-ms 20`.

Each call sleeps `latency`, so throughput measures how many calls a dequeuer keeps in flight,
not CPU. `GET /_stats` tells how many calls came and when each arrived, so a benchmark can time
a drain from the microservice's side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence

from aiohttp import web

from shared import service

STATS = web.AppKey("stats", dict)


def create_app(latency: float) -> web.Application:
    app = web.Application()
    arrivals: list[float] = []
    app[STATS] = {"arrivals": arrivals}

    async def call(request: web.Request) -> web.Response:
        await request.read()
        arrivals.append(time.time())
        await asyncio.sleep(latency)
        return web.Response(text="ok")

    async def get_stats(_: web.Request) -> web.Response:
        body = {"count": len(arrivals), "arrivals": arrivals}
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def reset(_: web.Request) -> web.Response:
        arrivals.clear()
        return web.Response(text="reset")

    app.router.add_get("/_stats", get_stats)
    app.router.add_post("/_reset", reset)
    app.router.add_route("*", "/{tail:.*}", call)
    return app


async def serve(port: int, latency: float) -> int:
    runner = await service.start_site(create_app(latency), "127.0.0.1", port)
    try:
        await service.wait_for_stop()
    finally:
        await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.cli.bench_sleeper",
        description="A microservice whose every call takes a fixed "
        "time, for proxymq bench --scenario ordering/scaling.",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="time per call")
    args = parser.parse_args(argv)
    service.run(serve(args.port, args.latency_ms / 1000))


if __name__ == "__main__":
    main()
