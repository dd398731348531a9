"""Temporarily blocked client networks, checked first on the decision path.

Each replica keeps the active blocks in memory (checking one address is a short loop, and
nothing at all when no block is active) and reloads them from the store every few seconds,
so a block made on one replica reaches the others within that interval.

A block is global or scoped to one project (made from a project-bound caller's reports, see
docs/anomaly.md): a scoped block refuses the address only for a verification made for that
project (by a caller bound to it, or on a route that requires it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from datetime import datetime

from tokenward.anomaly.store import IPBlock
from tokenward.clientip import parse_ip

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class IPBlocklist:
    def __init__(self, clock: Callable[[], datetime], never_block: Iterable[str] = ()) -> None:
        self.clock = clock
        self.never_block = [ipaddress.ip_network(n, strict=False) for n in never_block]
        self._blocks: list[tuple[IPNetwork, datetime, str | None]] = []

    def replace(self, blocks: Iterable[IPBlock]) -> None:
        self._blocks = [_entry(b) for b in blocks]

    def add(self, block: IPBlock) -> None:
        self._blocks.append(_entry(block))

    def protected(self, network: str) -> bool:
        """Never block these (loopback by default: a gateway or the admin's own host)."""
        net = ipaddress.ip_network(network, strict=False)
        return any(net.version == p.version and net.overlaps(p) for p in self.never_block)

    def __call__(self, ip: str, project_id: str | None = None) -> bool:
        """Is ``ip`` refused, for a verification made for ``project_id`` (or for none)?"""
        if not self._blocks:
            return False
        address = parse_ip(ip)
        if address is None:
            return False
        now = self.clock()
        return any(
            address.version == net.version
            and address in net
            and now < until
            and (scope is None or scope == project_id)
            for net, until, scope in self._blocks
        )


def _entry(block: IPBlock) -> tuple[IPNetwork, datetime, str | None]:
    return ipaddress.ip_network(block.network, strict=False), block.expires_at, block.project_id
