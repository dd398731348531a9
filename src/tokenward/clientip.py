"""Who is really asking: the client IP, from the socket or from trusted proxies only.

The peer address of the TCP connection is the client, unless that peer is one of the
configured trusted proxies (``TOKENWARD_TRUSTED_PROXIES``, CIDRs). Then ``X-Forwarded-For`` is
read from the right: each hop that is itself a trusted proxy is skipped, and the first
untrusted hop is the client. Hops to the left of it were written by the client and are
never believed. Without trusted proxies the header is ignored entirely.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidrs(text: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """``"10.0.0.0/8, ::1"`` (or a list of such strings) → networks; raises ``ValueError``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    networks = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IPv4 or IPv6 address or CIDR") from None
    return tuple(networks)


@lru_cache(maxsize=65536)
def parse_ip(text: str) -> IPAddress | None:
    """``text`` as an address (an IPv4-mapped IPv6 address as its IPv4 one), else ``None``."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _address(text: str) -> IPAddress | None:
    """An address as a header may carry it: with a port, IPv6 in brackets."""
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [2001:db8::1]:443
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # 203.0.113.7:5678
        text = text.split(":", 1)[0]
    return parse_ip(text)


class ClientIPResolver:
    """Resolves the client IP of a request from its peer and ``X-Forwarded-For`` values."""

    def __init__(self, trusted: Iterable[IPNetwork] = ()) -> None:
        self.trusted = tuple(trusted)

    def is_trusted(self, address: IPAddress) -> bool:
        return any(address in net for net in self.trusted if net.version == address.version)

    def trusts(self, peer: str | None) -> bool:
        """Whether ``peer`` (a socket peer as the server gives it) is a trusted proxy."""
        if not self.trusted or peer is None:
            return False
        address = _address(peer)
        return address is not None and self.is_trusted(address)

    def resolve(self, peer: str | None, forwarded_for: Iterable[str] = ()) -> str | None:
        if peer is None:
            return None
        if not self.trusted and "." in peer and ":" not in peer:
            return peer  # the server's own IPv4 peer string: nothing to believe or normalise
        peer_address = _address(peer)
        if peer_address is None or not self.trusted or not self.is_trusted(peer_address):
            return str(peer_address) if peer_address is not None else peer
        hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
        client = peer_address
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                # Garbage written by someone: stop at the last hop a trusted proxy vouched for.
                break
            client = address
            if not self.is_trusted(address):
                break
        return str(client)


def scope_client_ip(trusted_proxies: str, scope: Mapping[str, Any]) -> str | None:
    """The client IP of an ASGI request under the ``trusted_proxies`` setting."""
    client = scope.get("client")
    peer = client[0] if client else None
    if not trusted_proxies:
        return peer
    forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
    return resolver_for(trusted_proxies).resolve(peer, forwarded)


@lru_cache(maxsize=16)
def resolver_for(trusted_proxies: str) -> ClientIPResolver:
    """One resolver per distinct setting (cached: the hot path calls this per request)."""
    return ClientIPResolver(parse_cidrs(trusted_proxies))
