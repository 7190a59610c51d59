"""The small website `proxymq demo` fetches, so the demo needs no internet.

A few HTML pages with titles, a redirect, a 404 and a slow page: enough to show every kind of
answer url-fetcher gives, through the queue. Run by the demo as its own process
(`python -m shared.cli.demo_site --port N`) so it is started, probed and stopped like the others.
"""

from __future__ import annotations

import argparse
import asyncio
import html
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

HOME_TITLE = "ProxyMQ demo shop"
ABOUT_TITLE = "About the ProxyMQ demo shop"
SLOW_TITLE = "A slow page"
NOT_FOUND_TITLE = "Not found"
SLOW_SECONDS = 1.5
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def product_title(number: int) -> str:
    return f"Product {number} - {HOME_TITLE}"


def page(title: str, text: str, status: int = 200) -> web.Response:
    body = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    )
    return web.Response(text=body, status=status, content_type="text/html")


async def home(_: web.Request) -> web.Response:
    return page(HOME_TITLE, "Everything here is served from 127.0.0.1.")


async def about(_: web.Request) -> web.Response:
    return page(ABOUT_TITLE, "A website of three pages, one redirect and one slow page.")


async def product(request: web.Request) -> web.Response:
    number = int(request.match_info["number"])
    return page(product_title(number), f"Product number {number}.")


async def old_home(_: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently("/")


async def slow(_: web.Request) -> web.Response:
    await asyncio.sleep(SLOW_SECONDS)
    return page(SLOW_TITLE, f"This page took {SLOW_SECONDS:g} s to come.")


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@web.middleware
async def html_404(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A real site's 404 is a page with a title too; url-fetcher reports both."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPNotFound:
        return page(NOT_FOUND_TITLE, f"There is no {request.path} here.", status=404)
    return response


def create_app() -> web.Application:
    app = web.Application(middlewares=[html_404])
    app.router.add_get("/", home)
    app.router.add_get("/about", about)
    app.router.add_get(r"/products/{number:\d+}", product)
    app.router.add_get("/old-home", old_home)
    app.router.add_get("/slow", slow)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shared.cli.demo_site", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(create_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
