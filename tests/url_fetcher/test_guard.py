"""The SSRF guard: every spelling of a non-public address is refused, public ones pass."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, ip_address

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from url_fetcher.guard import (
    ForbiddenTarget,
    GuardedResolver,
    TargetGuard,
    parse_ip_literal,
    refusal_reason,
)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.255.255.254", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.1.1", "a private address"),
        ("169.254.169.254", "a link-local address"),
        ("0.0.0.0", "an unspecified address"),
        ("0.1.2.3", "a private address"),
        ("100.64.0.1", "a shared (carrier-grade NAT) address"),
        ("224.0.0.1", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
        ("192.0.2.1", "a private address"),
        # IETF protocol assignments, not globally reachable: Pythons before 3.11.10 call all but
        # 192.0.0.0/29 and 192.0.0.170/31 global, so the guard must know them itself.
        ("192.0.0.8", "a private address"),
        ("192.0.0.255", "a private address"),
        ("198.18.0.1", "a private address"),
        ("240.0.0.1", "a private address"),
        ("255.255.255.255", "a private address"),
        ("::1", "a loopback address"),
        ("::", "an unspecified address"),
        ("fe80::1", "a link-local address"),
        ("fe80::1%eth0", "a link-local address"),
        ("fc00::1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("fec0::1", "a site-local address"),
        ("ff02::1", "a multicast address"),
        ("2001:db8::1", "a private address"),
        ("100::1", "a private address"),
        ("::ffff:127.0.0.1", "an IPv4-mapped form of 127.0.0.1, a loopback address"),
        ("::ffff:10.0.0.1", "an IPv4-mapped form of 10.0.0.1, a private address"),
        ("::ffff:169.254.169.254", "an IPv4-mapped form of 169.254.169.254, a link-local address"),
        ("::127.0.0.1", "an IPv4-compatible form of 127.0.0.1, a loopback address"),
        ("::8.8.8.8", "a reserved address"),
        ("64:ff9b::7f00:1", "a NAT64 form of 127.0.0.1, a loopback address"),
        ("64:ff9b::a00:1", "a NAT64 form of 10.0.0.1, a private address"),
        ("64:ff9b:1::1", "a local-use NAT64 address"),
        ("2002:7f00:1::", "a 6to4 form of 127.0.0.1, a loopback address"),
        ("2002:a9fe:a9fe::1", "a 6to4 form of 169.254.169.254, a link-local address"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a Teredo form of 192.0.2.45, a private address"),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "a private address"),  # Teredo to 8.8.8.8
    ],
)
def test_non_public_addresses_are_refused_with_their_class(address: str, reason: str) -> None:
    assert refusal_reason(ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",  # 6to4 to 8.8.8.8; Pythons from 3.11.10 on call all of 2002::/16 private
        "192.0.0.9",  # the globally reachable anycast addresses of 192.0.0.0/24
        "192.0.0.10",
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal_reason(ip_address(address)) is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.000.000.001", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("167772161", "10.0.0.1"),
        ("4294967295", "255.255.255.255"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("::ffff:7f00:1", "::ffff:7f00:1"),
    ],
)
def test_ip_literals_in_every_spelling_are_recognised(host: str, expected: str) -> None:
    assert parse_ip_literal(host) == ip_address(expected)


@pytest.mark.parametrize(
    "host",
    ["example.com", "1.2.3.4.5", "256.1.1.1", "4294967296", "1.16777216", "08.0.0.1", "0x1g", ""],
)
def test_non_literals_are_left_to_the_resolver(host: str) -> None:
    assert parse_ip_literal(host) is None


def test_legacy_forms_match_what_inet_aton_accepts() -> None:
    # The parser exists because socket APIs accept these; it must agree with them.
    for host in ["127.1", "0x7f000001", "2130706433", "017700000001", "0x7f.1", "10.0x10.1"]:
        expected = IPv4Address(socket.inet_aton(host))
        assert parse_ip_literal(host) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.0.0.1:8000/admin",
        "https://127.0.0.1/",
        "http://localhost/",
        "http://LOCALHOST./",
        "http://api.localhost/",
        "http://127.1/",
        "http://0x7f000001/",
        "http://2130706433/",
        "http://017700000001/",
        "http://127.000.000.001/",
        "http://0/",
        "http://0.0.0.0:8000/",
        "http://[::1]/",
        "http://[::]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[0:0:0:0:0:ffff:7f00:1]/",
        "http://[::ffff:a00:1]/",
        "http://[fe80::1%25eth0]/",
        # An empty zone id: yarl's .host is "::1%", no address to ipaddress, but aiohttp
        # connects to the raw host "::1%25", which getaddrinfo() reads as ::1 on interface 25.
        "http://[::1%25]/",
        "http://[::ffff:127.0.0.1%25]/",
        "http://[::1%25%25]/",  # no address getaddrinfo() takes either: refused, not guessed
        "http://[64:ff9b::7f00:1]/",
        "http://10.0.0.1/",
        "http://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://user:pass@127.0.0.1/",
        "http://\u2460\u2461\u2466.0.0.1/",  # circled digits, which IDNA folds into 127.0.0.1
    ],
)
def test_check_url_refuses_private_targets(url: str) -> None:
    with pytest.raises(ForbiddenTarget) as caught:
        TargetGuard().check_url(URL(url))
    assert caught.value.private
    assert "--allow-private" in caught.value.message_for(url)


def test_refusal_message_names_url_address_and_class() -> None:
    with pytest.raises(ForbiddenTarget) as caught:
        TargetGuard().check_url(URL("http://10.0.0.1/"))
    assert caught.value.message_for("http://10.0.0.1/") == (
        "refusing to fetch http://10.0.0.1/: 10.0.0.1 is a private address "
        "(start url-fetcher with --allow-private to allow it)"
    )


@pytest.mark.parametrize(
    "url", ["http://8.8.8.8/", "https://example.com/page", "http://[2606:4700::1]:8080/"]
)
def test_check_url_lets_public_targets_through(url: str) -> None:
    TargetGuard().check_url(URL(url))


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://x/"])
def test_check_url_refuses_other_schemes_even_with_allow_private(url: str) -> None:
    with pytest.raises(ForbiddenTarget) as caught:
        TargetGuard(allow_private=True).check_url(URL(url))
    assert not caught.value.private
    assert "only http and https" in caught.value.detail


def test_allow_private_lets_private_targets_through() -> None:
    guard = TargetGuard(allow_private=True)
    for url in ["http://127.0.0.1/", "http://localhost/", "http://[::1]/", "http://10.0.0.1/"]:
        guard.check_url(URL(url))


def _result(host: str, address: str) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return ResolveResult(
        hostname=host, host=address, port=80, family=family, proto=0, flags=socket.AI_NUMERICHOST
    )


class StubResolver(AbstractResolver):
    """Answers from a fixed table, standing in for DNS (there is no network here)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [_result(host, address) for address in self.table[host]]

    async def close(self) -> None:
        self.closed = True


async def test_resolver_drops_refused_addresses_and_keeps_public_ones() -> None:
    inner = StubResolver({"mixed.test": ["10.0.0.1", "93.184.216.34", "::1", "2606:4700::1"]})
    resolver = GuardedResolver(inner, TargetGuard())
    results = await resolver.resolve("mixed.test", 80)
    assert [r["host"] for r in results] == ["93.184.216.34", "2606:4700::1"]


async def test_resolver_refuses_a_name_with_only_private_addresses() -> None:
    # DNS rebinding: a public-looking name that resolves to the metadata service or loopback.
    inner = StubResolver({"rebind.test": ["169.254.169.254", "::ffff:127.0.0.1", "fe80::1%eth0"]})
    resolver = GuardedResolver(inner, TargetGuard())
    with pytest.raises(ForbiddenTarget) as caught:
        await resolver.resolve("rebind.test", 80)
    assert caught.value.detail == (
        "rebind.test resolves only to refused addresses: 169.254.169.254 is a link-local "
        "address; ::ffff:127.0.0.1 is an IPv4-mapped form of 127.0.0.1, a loopback address; "
        "fe80::1%eth0 is a link-local address"
    )


async def test_resolver_passes_everything_with_allow_private_and_closes_inner() -> None:
    inner = StubResolver({"lan.test": ["10.0.0.1", "127.0.0.1"]})
    resolver = GuardedResolver(inner, TargetGuard(allow_private=True))
    assert len(await resolver.resolve("lan.test", 80)) == 2
    await resolver.close()
    assert inner.closed
