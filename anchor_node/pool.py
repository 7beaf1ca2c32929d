"""The VIPA pool's arithmetic: parsing it, the anchor's own address, which hosts go out.

Several anchors sharing one store split one shared pool (`--shared-pool`)
into sub-pools (`--pool`): each hands out addresses from its own, while a
terminal keeps a VIPA of any of them, so the routes and the NAT of every
anchor cover the whole shared pool. A single anchor's shared pool is its
pool.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ground.errors import ConfigError

__all__ = ["HostRange", "anchor_address", "parse_pool", "parse_shared_pool", "source_prefix"]


def source_prefix(host: str) -> str:
    """The network a source address is counted in: its /24 (IPv4) or /48 (IPv6)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    length = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{length}", strict=False))


def parse_pool(text: str, option: str = "--pool") -> ipaddress.IPv4Network:
    """The VIPA pool; ConfigError for anything but an IPv4 prefix with room for terminals."""
    try:
        pool = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"{option} {text!r}: {exc}") from None
    if pool.prefixlen > 29:
        raise ConfigError(f"{option} {text!r}: too small, use a /29 or larger")
    return pool


def parse_shared_pool(text: str | None, pool: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """The pool every anchor of a shared store draws from; `pool` must lie inside it."""
    if text is None:
        return pool
    shared = parse_pool(text, "--shared-pool")
    if not pool.subnet_of(shared):
        raise ConfigError(f"--pool {pool} is not inside --shared-pool {shared}")
    return shared


def anchor_address(pool: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The pool address the anchor keeps for itself (the first host)."""
    return pool.network_address + 1


@dataclass(frozen=True, slots=True)
class HostRange:
    """The addresses a pool hands to terminals, as integers: all but the network and
    broadcast addresses and the anchor's own (the first host)."""

    first: int
    last: int

    @classmethod
    def of(cls, pool: ipaddress.IPv4Network) -> HostRange:
        return cls(int(pool.network_address) + 2, int(pool.broadcast_address) - 1)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.first <= value <= self.last
