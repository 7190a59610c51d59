"""The echo target of `proxymq bench`: `python -m shared.cli.bench_echo --port P`.

It answers any method and path with 200, the request's body and its Content-Type, and does no
work of its own, so what the benchmark measures is the path to it and back, not the service.
It runs on uvloop when installed, like the sidecars, so no mode gets a faster loop than another.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from aiohttp import hdrs, web

from shared import service


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    content_type = request.headers.get(hdrs.CONTENT_TYPE)
    headers = {hdrs.CONTENT_TYPE: content_type} if content_type else None
    return web.Response(body=body, headers=headers)


def create_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve(host: str, port: int) -> int:
    runner = await service.start_site(create_app(), host, port)
    try:
        await service.wait_for_stop()
    finally:
        await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.cli.bench_echo",
        description="Echo server for proxymq bench: 200 with the request's body and Content-Type.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    args = parser.parse_args(argv)
    service.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
