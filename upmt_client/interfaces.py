"""The access interfaces the client can build tunnels on.

An interface is usable when it exists, is up and has an IPv4 address; its
MTU bounds the TUN's. Unknown names are a configuration error; known but
unusable ones are skipped (they may come up later).
"""

import socket
from dataclasses import dataclass
from typing import Any

from ground.errors import ConfigError

IFF_UP = 0x1


@dataclass(frozen=True)
class Access:
    name: str
    index: int
    address: str
    mtu: int


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def check_interfaces(names: list[str]) -> None:
    """ConfigError naming the first interface that does not exist."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for name in names:
            if not ipr.link_lookup(ifname=name):
                raise ConfigError(f"unknown interface {name!r}")


def default_route_interfaces() -> list[str]:
    """Interfaces that carry a default route in the main table, by metric."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found: list[tuple[int, str]] = []
        for route in ipr.get_routes(family=socket.AF_INET, table=254):
            if route["dst_len"] != 0:
                continue
            oif = _attr(route, "RTA_OIF")
            if oif is None:
                continue
            links = ipr.get_links(oif)
            if links:
                found.append((_attr(route, "RTA_PRIORITY") or 0, _attr(links[0], "IFLA_IFNAME")))
    return [name for _metric, name in sorted(found)]


def usable(names: list[str]) -> list[Access]:
    """The named interfaces that can carry a tunnel now, in the given order."""
    from pyroute2 import IPRoute

    result = []
    with IPRoute() as ipr:
        for name in names:
            found = ipr.link_lookup(ifname=name)
            if not found:
                continue
            link = ipr.get_links(found[0])[0]
            if not link["flags"] & IFF_UP:
                continue
            addrs = ipr.get_addr(index=found[0], family=socket.AF_INET)
            if not addrs:
                continue
            result.append(
                Access(
                    name=name,
                    index=found[0],
                    address=_attr(addrs[0], "IFA_ADDRESS"),
                    mtu=int(_attr(link, "IFLA_MTU")),
                )
            )
    return result
