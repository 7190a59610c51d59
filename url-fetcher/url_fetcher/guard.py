"""SSRF guard: keep url-fetcher from reaching loopback, private and other non-public addresses.

Two checks, because aiohttp only calls the resolver for host *names*:

* `TargetGuard.check_url` runs before every request and every redirect hop. It refuses other
  schemes, `localhost` names and IP literals in any spelling (`127.1`, `0x7f000001`,
  `2130706433`, `[::ffff:127.0.0.1]`, `[::1%25]`, ...), read as aiohttp connects to them.
* `GuardedResolver` wraps the real resolver and drops refused addresses from what DNS returns, so
  the address checked is the address connected to (DNS rebinding cannot swap it afterwards).
"""

from __future__ import annotations

import re
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

IPAddress = IPv4Address | IPv6Address

ALLOWED_SCHEMES = frozenset({"http", "https"})

_NAT64_WELL_KNOWN = IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_USE = IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = IPv6Network("::/96")
_SHARED_ADDRESS_SPACE = IPv4Network("100.64.0.0/10")
# IETF protocol assignments: not globally reachable but for two anycast addresses (IANA).
_PROTOCOL_ASSIGNMENTS = IPv4Network("192.0.0.0/24")
_GLOBAL_ANYCAST = frozenset({IPv4Address("192.0.0.9"), IPv4Address("192.0.0.10")})

# inet_aton() spellings: 1 to 4 dot-separated parts, each decimal, octal (leading 0) or hex (0x).
_LEGACY_IPV4 = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.I)


class ForbiddenTarget(Exception):
    """The target is one url-fetcher will not connect to; `detail` says which address and why."""

    def __init__(self, detail: str, *, private: bool = True) -> None:
        super().__init__(detail)
        self.detail = detail
        self.private = private

    def message_for(self, url: str, redirected_from: str | None = None) -> str:
        """The full sentence for the caller, naming the URL and, for addresses, the way out."""
        via = f" (redirected from {redirected_from})" if redirected_from else ""
        hint = " (start url-fetcher with --allow-private to allow it)" if self.private else ""
        return f"refusing to fetch {url}{via}: {self.detail}{hint}"


def refusal_reason(ip: IPAddress) -> str | None:
    """Why `ip` must not be fetched without --allow-private (e.g. "a loopback address"), or None.

    IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4, Teredo, NAT64) are judged by
    the IPv4 address they lead to, because that is where the packets end up. Where Python's
    tables changed in a patch release (3.11.10: 192.0.0.0/24, 2002::/16), the guard decides
    itself, so that its verdict does not depend on the interpreter it runs on.
    """
    if isinstance(ip, IPv6Address):
        for form, embedded in _embedded_ipv4(ip):
            inner = refusal_reason(embedded)
            if inner is not None:
                return f"{form} form of {embedded}, {inner}"
        if ip.ipv4_mapped is not None or ip in _NAT64_WELL_KNOWN or ip.sixtofour is not None:
            # Public IPv4 behind a mapped, NAT64 or 6to4 address: Python calls these "reserved"
            # or "private", yet they reach an ordinary public host.
            return None
        if ip in _NAT64_LOCAL_USE:
            return "a local-use NAT64 address"
        if ip.is_site_local:
            return "a site-local address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, IPv4Address):
        if ip in _SHARED_ADDRESS_SPACE:
            return "a shared (carrier-grade NAT) address"
        if ip in _PROTOCOL_ASSIGNMENTS and ip not in _GLOBAL_ANYCAST:
            return "a private address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-public address"
    return None


def _embedded_ipv4(ip: IPv6Address) -> list[tuple[str, IPv4Address]]:
    """The IPv4 addresses an IPv6 address stands for, with the name of the form."""
    found: list[tuple[str, IPv4Address]] = []
    if ip.ipv4_mapped is not None:
        found.append(("an IPv4-mapped", ip.ipv4_mapped))
    elif ip in _IPV4_COMPATIBLE and int(ip) > 1:
        found.append(("an IPv4-compatible", IPv4Address(int(ip) & 0xFFFFFFFF)))
    elif ip in _NAT64_WELL_KNOWN:
        found.append(("a NAT64", IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip.sixtofour is not None:
        found.append(("a 6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found.extend([("a Teredo", server), ("a Teredo", client)])
    return found


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a URL host names literally, in any spelling socket APIs accept, or None.

    Beyond dotted quads this covers the inet_aton() forms (`127.1`, `0x7f000001`, `2130706433`,
    `0177.0.0.1`) that getaddrinfo() quietly maps onto addresses, and IPv6 with a zone id.
    """
    host = host.strip("[]")
    if ":" in host:
        try:
            return IPv6Address(host)
        except ValueError:
            return None
    if not _LEGACY_IPV4.match(host):
        return None
    parts = host.rstrip(".").split(".")
    try:
        numbers = [_int_c(part) for part in parts]
    except ValueError:
        return None
    # The last part fills all remaining bytes: 127.1 is 127.0.0.1, 2130706433 is 127.0.0.1.
    last_bits = 8 * (5 - len(numbers))
    if any(n > 0xFF for n in numbers[:-1]) or numbers[-1] >= 1 << last_bits:
        return None
    value = 0
    for n in numbers[:-1]:
        value = value << 8 | n
    return IPv4Address(value << last_bits | numbers[-1])


def _int_c(part: str) -> int:
    """Parse a number the way inet_aton() does: 0x means hex (bare 0x is 0), leading 0 octal."""
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8)
    return int(part, 10)


def _is_localhost_name(host: str) -> bool:
    """`localhost` and `*.localhost` always mean this machine (RFC 6761), whatever DNS says."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


class TargetGuard:
    """Decides which URLs and addresses may be fetched; one per process, shared by all fetches."""

    def __init__(self, *, allow_private: bool = False) -> None:
        self.allow_private = allow_private

    def refusal(self, ip: IPAddress) -> str | None:
        """Why `ip` is refused, or None; the single policy point both checks go through."""
        if self.allow_private:
            return None
        return refusal_reason(ip)

    def check_url(self, url: URL) -> None:
        """Refuse `url` before connecting: bad scheme, `localhost` or a refused IP literal."""
        if url.scheme not in ALLOWED_SCHEMES:
            raise ForbiddenTarget(
                f"only http and https URLs are fetched, not {url.scheme or 'scheme-less'} ones",
                private=False,
            )
        # The host aiohttp connects to: `.host` decodes a zone id's escapes (`[::1%25]` is
        # "::1%", no address), while the socket API gets "::1%25" and connects to ::1.
        host = url.raw_host
        if not host:
            raise ForbiddenTarget("the URL has no host", private=False)
        if self.allow_private:
            return
        literal = parse_ip_literal(host)
        if literal is not None:
            reason = self.refusal(literal)
            if reason is not None:
                raise ForbiddenTarget(f"{host} is {reason}")
        elif ":" in host:
            # aiohttp hands a host with a colon to the socket API as an address, never to the
            # resolver: one the guard cannot read is one it cannot vouch for.
            raise ForbiddenTarget(f"{host} is not an IPv6 address the guard can judge")
        elif _is_localhost_name(host):
            raise ForbiddenTarget(f"{host} is a loopback name")

    def filter(self, host: str, results: list[ResolveResult]) -> list[ResolveResult]:
        """Keep the resolved addresses that may be connected to; raise if none is left."""
        if self.allow_private:
            return results
        allowed: list[ResolveResult] = []
        refused: list[str] = []
        for result in results:
            try:
                ip = ip_address(result["host"])
            except ValueError:
                refused.append(f"{result['host']} is not an IP address")
                continue
            reason = self.refusal(ip)
            if reason is None:
                allowed.append(result)
            else:
                refused.append(f"{result['host']} is {reason}")
        if not allowed:
            summary = "; ".join(dict.fromkeys(refused)) or "no addresses"
            raise ForbiddenTarget(f"{host} resolves only to refused addresses: {summary}")
        return allowed


class GuardedResolver(AbstractResolver):
    """A resolver that never hands aiohttp an address the guard refuses.

    Passed to `TCPConnector(resolver=...)`; aiohttp connects only to what this returns, so the
    check cannot be bypassed by a name that resolves differently the second time.
    """

    def __init__(self, inner: AbstractResolver, guard: TargetGuard) -> None:
        self._inner = inner
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve with the wrapped resolver, then drop refused addresses."""
        return self._guard.filter(host, await self._inner.resolve(host, port, family))

    async def close(self) -> None:
        """Close the wrapped resolver."""
        await self._inner.close()
