"""The fetcher in-process: redirect hops re-checked by the guard, limits, reports.

With no public address reachable here, a test guard treats 127.0.0.1 as "public" and everything
else by the real rules, and a stub resolver stands in for DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from tests.conftest import serving
from tests.url_fetcher.support import BIG_SIZE, PAGE, free_port, silent_dns_server
from url_fetcher.fetch import Fetcher, FetchError, FetchLimits, create_session
from url_fetcher.guard import TargetGuard
from url_fetcher.title import TitleScanner


class OnlyLoopbackOneIsPublic(TargetGuard):
    """The real rules, except 127.0.0.1 counts as a public address, to have something to fetch."""

    def refusal(self, ip: IPv4Address | IPv6Address) -> str | None:
        if ip == IPv4Address("127.0.0.1"):
            return None
        return super().refusal(ip)


class StubDNS(AbstractResolver):
    """Fixed answers instead of DNS: names are how rebinding attacks arrive."""

    TABLE: ClassVar[dict[str, list[str]]] = {
        "public.test": ["127.0.0.1"],
        "mixed.test": ["10.0.0.1", "127.0.0.1"],
        "rebind.test": ["169.254.169.254"],
    }

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.TABLE:
            raise OSError(f"{host}: no such name")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.TABLE[host]
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    guard = OnlyLoopbackOneIsPublic()
    limits = FetchLimits(max_bytes=10_000, timeout=2, max_redirects=3)
    async with create_session(guard, limits, StubDNS()) as session:
        yield Fetcher(session, guard, limits)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def test_page_is_reported(fetcher: Fetcher, site: str) -> None:
    result = await fetcher.fetch(f"{site}/page")
    assert result.status == 200
    assert result.title == "Caf\u00e9 au lait"
    assert result.size == len(PAGE)
    assert result.content_type == "text/html; charset=utf-8"
    assert result.final_url == f"{site}/page"
    assert (result.redirects, result.truncated) == (0, False)


async def test_elapsed_time_includes_finding_the_title(
    fetcher: Fetcher, site: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    title = TitleScanner.title

    def slow_title(scanner: TitleScanner) -> str | None:
        time.sleep(0.05)
        return title(scanner)

    monkeypatch.setattr(TitleScanner, "title", slow_title)
    result = await fetcher.fetch(f"{site}/page")
    assert result.title == "Caf\u00e9 au lait"
    assert result.elapsed_ms >= 50


async def test_name_is_resolved_through_the_guard(fetcher: Fetcher, site: str) -> None:
    result = await fetcher.fetch(f"http://public.test:{_port(site)}/page")
    assert result.title == "Caf\u00e9 au lait"


async def test_refused_addresses_of_a_name_are_skipped(fetcher: Fetcher, site: str) -> None:
    result = await fetcher.fetch(f"http://mixed.test:{_port(site)}/page")
    assert result.status == 200


@pytest.mark.parametrize(
    "host", ["2130706433", "127.1", "0x7f.1", "0177.0.0.1", "127.000.0.1", "127.0.0.1."]
)
async def test_legacy_ipv4_spellings_are_fetched_as_their_dotted_quad(
    fetcher: Fetcher, site: str, host: str
) -> None:
    # What browsers do (the URL standard); aiohttp refuses to connect to most of these as written.
    result = await fetcher.fetch(f"http://{host}:{_port(site)}/page")
    assert (result.status, result.final_url) == (200, f"{site}/page")
    hop = f"http://{host}:{_port(site)}/page"
    result = await fetcher.fetch(f"{site}/redirect-to?location={hop}")
    assert (result.status, result.final_url) == (200, f"{site}/page")


async def test_redirects_are_followed_and_counted(fetcher: Fetcher, site: str) -> None:
    result = await fetcher.fetch(f"{site}/redirect/2")
    assert (result.status, result.redirects) == (200, 3)
    assert result.final_url == f"{site}/page"


async def test_redirect_to_a_private_literal_is_refused(fetcher: Fetcher, site: str) -> None:
    hop = f"http://127.0.0.2:{_port(site)}/page"
    with pytest.raises(FetchError) as caught:
        await fetcher.fetch(f"{site}/redirect-to?location={hop}")
    assert caught.value.code == "forbidden_target"
    assert caught.value.http_status == 403
    origin = f"{site}/redirect-to?location={hop}"
    assert caught.value.message == (
        f"refusing to fetch {hop} (redirected from {origin}): 127.0.0.2 is a loopback address "
        "(start url-fetcher with --allow-private to allow it)"
    )


@pytest.mark.parametrize(
    "location",
    ["http://localhost:{port}/", "http://0x7f000002:{port}/", "http://[::ffff:10.0.0.1]/"],
)
async def test_redirect_to_other_private_spellings_is_refused(
    fetcher: Fetcher, site: str, location: str
) -> None:
    hop = location.format(port=_port(site))
    with pytest.raises(FetchError) as caught:
        await fetcher.fetch(f"{site}/redirect-to?location={hop}")
    assert caught.value.code == "forbidden_target"


async def test_redirect_to_a_name_resolving_privately_is_refused(
    fetcher: Fetcher, site: str
) -> None:
    hop = f"http://rebind.test:{_port(site)}/"
    with pytest.raises(FetchError) as caught:
        await fetcher.fetch(f"{site}/redirect-to?location={hop}")
    assert caught.value.code == "forbidden_target"
    assert "rebind.test resolves only to refused addresses: 169.254.169.254 is a link-local" in (
        caught.value.message
    )


async def test_redirect_to_another_scheme_is_refused(fetcher: Fetcher, site: str) -> None:
    with pytest.raises(FetchError) as caught:
        await fetcher.fetch(f"{site}/redirect-to?location=file:///etc/passwd")
    assert caught.value.code == "forbidden_target"
    assert "only http and https" in caught.value.message


@pytest.mark.parametrize("location", ["http://a..b/", "http://xn--a/"])
async def test_redirect_to_a_host_dns_cannot_take_is_fetch_failed(
    fetcher: Fetcher, site: str, location: str
) -> None:
    with pytest.raises(FetchError) as caught:
        await fetcher.fetch(f"{site}/redirect-to?location={location}")
    assert (caught.value.code, caught.value.http_status) == ("fetch_failed", 502)
    assert "redirected to an invalid location" in caught.value.message


async def test_too_many_redirects(fetcher: Fetcher, site: str) -> None:
    with pytest.raises(FetchError) as caught:
        await fetcher.fetch(f"{site}/redirect/5")
    assert (caught.value.code, caught.value.http_status) == ("too_many_redirects", 502)


@pytest.mark.parametrize("location", ["http://", "HTTPS://", "//", "http://?a=1", "http://#top"])
async def test_redirect_to_a_location_without_host_fails_at_once(
    fetcher: Fetcher, site: str, location: str
) -> None:
    """yarl resolved `http://` (an empty host) against the URL that sent it, which is that URL:
    the fetch went round until too_many_redirects."""
    with pytest.raises(FetchError) as caught:
        await fetcher.fetch(f"{site}/redirect-to?location={quote(location)}")
    assert (caught.value.code, caught.value.http_status) == ("fetch_failed", 502)
    assert caught.value.message.endswith(f" redirected to {location!r}, a URL with no host")


async def test_more_fetches_at_once_than_aiohttps_default_pool(site: str) -> None:
    """aiohttp's default connector opens 100 connections: the 101st fetch waited for one and
    timed out behind slow targets."""
    wanted = 150
    arrived = 0
    everyone = asyncio.Event()
    waited_in_vain = 0

    async def held(request: web.Request) -> web.Response:
        """Answers once all fetches are in at once (or, failing that, after 5 s)."""
        nonlocal arrived, waited_in_vain
        arrived += 1
        if arrived == wanted:
            everyone.set()
        try:
            await asyncio.wait_for(everyone.wait(), 5)
        except TimeoutError:
            waited_in_vain += 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/held", held)
    guard = OnlyLoopbackOneIsPublic()
    limits = FetchLimits(timeout=30)
    async with serving(app) as base, create_session(guard, limits) as session:
        fetcher = Fetcher(session, guard, limits)
        results = await asyncio.gather(*(fetcher.fetch(f"{base}/held") for _ in range(wanted)))
    assert [result.status for result in results] == [200] * wanted
    assert waited_in_vain == 0


async def test_body_is_capped_and_marked_truncated(fetcher: Fetcher, site: str) -> None:
    result = await fetcher.fetch(f"{site}/big")
    assert (result.size, result.truncated, result.title) == (10_000, True, "Big")
    assert BIG_SIZE > 10_000


async def test_charset_and_non_html(fetcher: Fetcher, site: str) -> None:
    latin1 = await fetcher.fetch(f"{site}/latin1")
    assert latin1.title == "Cr\u00e8me br\u00fbl\u00e9e"
    data = await fetcher.fetch(f"{site}/data")
    assert (data.title, data.content_type) == (None, "application/octet-stream")


async def test_a_body_its_charset_cannot_decode_is_fetched_without_title(
    fetcher: Fetcher, site: str
) -> None:
    result = await fetcher.fetch(f"{site}/utf32")
    assert (result.status, result.size, result.title) == (200, 64, None)


async def test_target_errors_are_reported_not_raised(fetcher: Fetcher, site: str) -> None:
    result = await fetcher.fetch(f"{site}/missing")
    assert (result.status, result.title) == (404, "Not here")


async def test_connection_refused_and_unknown_names_are_fetch_failed(fetcher: Fetcher) -> None:
    port = free_port()
    for url in [f"http://127.0.0.1:{port}/", f"http://nowhere.test:{port}/"]:
        with pytest.raises(FetchError) as caught:
            await fetcher.fetch(url)
        assert (caught.value.code, caught.value.http_status) == ("fetch_failed", 502)


async def test_passwords_in_urls_are_not_logged(
    fetcher: Fetcher, site: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The per-fetch log line named the caller's URL whole, credentials included."""
    caplog.set_level(logging.INFO)
    host = site.removeprefix("http://")
    result = await fetcher.fetch(f"http://user:s3cret@{host}/page")
    assert result.status == 200
    with pytest.raises(FetchError):
        await fetcher.fetch(f"http://user:s3cret@127.0.0.1:{free_port()}/")
    with pytest.raises(FetchError):
        await fetcher.fetch("http://user:s3cret@[::1")  # not even a URL
    assert caplog.text.count("user:***@") >= 3
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize("userinfo", ["user:s3@cret", "us@er:s3cret", "user:s3@c@ret"])
async def test_passwords_holding_an_at_sign_are_not_logged(
    fetcher: Fetcher, site: str, caplog: pytest.LogCaptureFixture, userinfo: str
) -> None:
    """The userinfo ends at the host's `@`, its last: the log showed what followed an earlier one
    (`user:***@cret@host`), or the whole password after a username with an `@`."""
    caplog.set_level(logging.INFO)
    host = site.removeprefix("http://")
    result = await fetcher.fetch(f"http://{userinfo}@{host}/page")
    assert result.status == 200
    with pytest.raises(FetchError):
        await fetcher.fetch(f"http://{userinfo}@127.0.0.1:{free_port()}/")
    assert caplog.text.count(":***@127.0.0.1:") == 3
    assert "cret" not in caplog.text


async def test_what_a_target_sends_is_not_echoed_whole_in_an_error(
    fetcher: Fetcher, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's parse errors quote the bytes they could not parse, up to a whole read: a target
    sending 100 KB past its Content-Length got each fetch answered, and logged, 100 KB long."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + b"z" * 100_000)
        await writer.drain()
        writer.close()

    caplog.set_level(logging.INFO, logger="url_fetcher")
    async with await asyncio.start_server(answer, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(FetchError) as caught:
            await fetcher.fetch(f"http://127.0.0.1:{port}/")
    assert caught.value.code == "fetch_failed"
    assert caught.value.message.startswith(f"fetching http://127.0.0.1:{port}/ failed: ")
    assert len(caught.value.message) < 500
    assert [len(r.getMessage()) < 700 for r in caplog.records] == [True]


async def test_slow_target_times_out(site: str) -> None:
    guard = OnlyLoopbackOneIsPublic()
    limits = FetchLimits(timeout=0.3)
    async with create_session(guard, limits) as session:
        with pytest.raises(FetchError) as caught:
            await Fetcher(session, guard, limits).fetch(f"{site}/slow")
    assert (caught.value.code, caught.value.http_status) == ("fetch_timeout", 504)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, '"url" must be a string, not null'),
        (5, '"url" must be a string, not a number'),
        (["http://x/"], '"url" must be a string, not an array'),
        ("example.com", "is not an http:// or https:// URL"),
        ("ftp://example.com/", "is not an http:// or https:// URL"),
        ("http://", "has no host"),
        ("http://[::1/", "is not a valid URL"),
        ("http://x/" + "a" * 9000, "longer than 8192 characters"),
        ("http://a..b/", "is not a valid URL"),
        ("http://xn--a/", "is not a valid URL"),
        ("http://xn--/", "is not a valid URL"),
        (f"http://{'a' * 64}.example/", "is not a valid URL"),
    ],
)
async def test_malformed_urls_are_bad_requests(fetcher: Fetcher, raw: object, message: str) -> None:
    with pytest.raises(FetchError) as caught:
        await fetcher.fetch(raw)
    assert (caught.value.code, caught.value.http_status) == ("bad_request", 400)
    assert message in caught.value.message


@pytest.fixture
def dns_never_answers(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, set[str]]]:
    """A DNS server that never answers, and the names asked about (collected in the set).

    url-fetcher's resolver asks a loopback server that swallows queries; the system's
    getaddrinfo() waits as long on every `.test` name, so that no query of the test can leave
    the machine either way.
    """
    asked: set[str] = set()
    with silent_dns_server(asked) as server:
        released = threading.Event()
        system = socket.getaddrinfo

        def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
            if isinstance(host, str) and host.endswith(".test"):
                asked.add(host)
                released.wait(30)
                raise socket.gaierror(socket.EAI_AGAIN, "no answer")
            return system(host, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        yield server, asked
        released.set()


async def test_names_whose_dns_never_answers_hold_up_no_other_fetch(
    site: str, dns_never_answers: tuple[str, set[str]]
) -> None:
    """Names were resolved by getaddrinfo() in the loop's default thread pool (6 threads on 2
    cores): a few dozen fetches of names whose DNS never answered held every thread, and every
    other fetch of a name timed out behind them, still after they had timed out themselves."""
    guard = TargetGuard(allow_private=True)
    limits = FetchLimits(timeout=3)
    server, asked = dns_never_answers
    hung = [f"http://host{i}.hang.test/" for i in range(40)]
    async with create_session(guard, limits, nameservers=[server]) as session:
        fetcher = Fetcher(session, guard, limits)
        waiting = [asyncio.ensure_future(fetcher.fetch(url)) for url in hung]
        with contextlib.suppress(TimeoutError):  # the thread pool let only a few be asked
            async with asyncio.timeout(2):
                while len(asked) < len(hung):
                    await asyncio.sleep(0.01)
        by_name = await fetcher.fetch(f"http://localhost:{_port(site)}/page")  # /etc/hosts
        by_address = await fetcher.fetch(f"{site}/page")
        assert not any(fetch.done() for fetch in waiting)
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert (by_name.status, by_address.status) == (200, 200)
    assert {getattr(outcome, "code", outcome) for outcome in outcomes} == {"fetch_timeout"}


async def test_what_a_target_sends_unasked_is_no_later_fetchs_answer(fetcher: Fetcher) -> None:
    """A target that sent a second response after the first, unasked, had it taken as the
    answer to the next fetch of that host (any caller's): the connection went back to the pool
    with it waiting there."""
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                path = (await reader.readuntil(b"\r\n\r\n")).split(b" ")[1]
                writer.write(_html_response(b"<title>" + path + b"</title>"))
                await writer.drain()
                await asyncio.sleep(0.1)  # after the first response was read
                writer.write(_html_response(b"<title>unasked</title>"))
                await writer.drain()

    async with await asyncio.start_server(answer, "127.0.0.1", 0) as server:
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        assert (await fetcher.fetch(f"{base}/first")).title == "/first"
        await asyncio.sleep(0.3)  # the unasked response is there by now
        assert (await fetcher.fetch(f"{base}/second")).title == "/second"
    assert connections == 2


def _html_response(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body
