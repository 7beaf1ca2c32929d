"""The UPMT-MIB's object identifiers and a snapshot of its instances (pure).

The module text (`upmt/mibs/UPMT-MIB.txt`, printed by `anchor-node mib` and
`upmt-client mib`) and the names here are one definition: the tests walk
the agent and check every instance against the module's columns.

A `MibSnapshot` is the daemon's state as SNMP sees it at one moment: instance
OIDs in order, each with its syntax and value, so GET is a dictionary lookup
and GETNEXT a binary search. The role modules (`anchor_node.snmp`,
`upmt_client.snmp`) build them from `status`; `upmt.snmp_agent` serves them.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

__all__ = [
    "ENTERPRISE",
    "UPMT_MIB",
    "MibSnapshot",
    "Notification",
    "Oid",
    "Syntax",
    "Var",
    "ip_index",
    "mib_text",
    "node_variables",
    "string_index",
]

Oid = tuple[int, ...]
Syntax = Literal[
    "integer", "string", "ip", "counter32", "counter64", "gauge32", "unsigned32", "timeticks"
]
Var = tuple[Oid, Syntax, int | str]

# RFC 5612's enterprise number for documentation; the module's DESCRIPTION says why.
ENTERPRISE: Oid = (1, 3, 6, 1, 4, 1, 32473)
UPMT_MIB: Oid = (*ENTERPRISE, 1)
NOTIFICATIONS: Oid = (*UPMT_MIB, 0)
OBJECTS: Oid = (*UPMT_MIB, 1)

NODE: Oid = (*OBJECTS, 1)  # scalars: role, version, uptime, flows, drops
NODE_ROLE, NODE_VERSION, NODE_UPTIME, FLOW_COUNT, DROPPED = ((*NODE, n) for n in range(1, 6))
COUNTER_ENTRY: Oid = (*OBJECTS, 2, 1)  # name (index), group, drop, value
ANCHOR: Oid = (*OBJECTS, 3)  # scalars: terminals, tunnels
TERMINAL_ENTRY: Oid = (*OBJECTS, 4, 1)  # vipa (index), id, tunnels, flows, expires, up, down, from
TERMINAL_TUNNEL_ENTRY: Oid = (*OBJECTS, 5, 1)  # index, address, interface, default, encrypted
CLIENT: Oid = (*OBJECTS, 6)  # scalars: id, vipa, anchor, expires, handovers
TUNNEL_ENTRY: Oid = (*OBJECTS, 7, 1)  # index, interface, address, local, state, rtt, ...
APP_ENTRY: Oid = (*OBJECTS, 8, 1)  # name, interface (index), flows, up, down, today
HANDOVER_INFO: Oid = (*OBJECTS, 9)  # app, from, to, reason, flows (for notifications)

ROLE_ANCHOR, ROLE_CLIENT = 1, 2
COUNTER_GROUPS = {"datapath": 1, "sip": 2, "registrar": 3, "control": 4}
TRUE, FALSE = 1, 2  # SNMPv2-TC TruthValue

# Notifications (upmtNotifications n)
TUNNEL_UP: Oid = (*NOTIFICATIONS, 1)
TUNNEL_DOWN: Oid = (*NOTIFICATIONS, 2)
HANDOVER: Oid = (*NOTIFICATIONS, 3)
TERMINAL_TUNNEL_UP: Oid = (*NOTIFICATIONS, 4)
TERMINAL_TUNNEL_DOWN: Oid = (*NOTIFICATIONS, 5)

MAX_STRING = 255  # the longest DisplayString a column may hold


def mib_text() -> str:
    """The UPMT-MIB module, as shipped in the package."""
    return resources.files("upmt").joinpath("mibs/UPMT-MIB.txt").read_text(encoding="ascii")


def string_index(text: str, size: int) -> Oid:
    """A DisplayString index (not IMPLIED): its length, then its characters (RFC 2578 §7.7).

    Cut to `size` characters, non-ASCII replaced by '?', as the column's SIZE allows.
    """
    data = text.encode("ascii", "replace")[:size]
    return (len(data), *data)


def implied_index(text: str, size: int) -> Oid:
    """An IMPLIED DisplayString index: its characters only."""
    return tuple(text.encode("ascii", "replace")[:size])


def ip_index(address: str) -> Oid:
    """An IpAddress index: its four octets."""
    return tuple(ipaddress.IPv4Address(address).packed)


def display(text: object, size: int = 64) -> str:
    """A value for a DisplayString column: ASCII, at most `size` characters."""
    return str(text).encode("ascii", "replace").decode("ascii")[:size]


@dataclass(frozen=True, slots=True)
class Notification:
    """A notification to send: its OID and the instances it carries."""

    oid: Oid
    varbinds: tuple[Var, ...]


class MibSnapshot:
    """Instances in OID order; GET and GETNEXT answered without the daemon."""

    __slots__ = ("_oids", "_values")

    def __init__(self, variables: Iterable[Var]) -> None:
        values: dict[Oid, tuple[Syntax, int | str]] = {}
        for oid, syntax, value in variables:
            values[oid] = (syntax, value)
        self._values = values
        self._oids: Sequence[Oid] = sorted(values)

    def __len__(self) -> int:
        return len(self._oids)

    def get(self, oid: Oid) -> tuple[Syntax, int | str] | None:
        return self._values.get(oid)

    def next_after(self, oid: Oid) -> Var | None:
        """The first instance after `oid` in lexicographic order (GETNEXT), or None."""
        i = bisect.bisect_right(self._oids, oid)
        if i == len(self._oids):
            return None
        found = self._oids[i]
        syntax, value = self._values[found]
        return found, syntax, value

    def oids(self) -> Sequence[Oid]:
        return self._oids


def node_variables(
    st: Mapping[str, Any], role: int, version: str, drops: frozenset[str]
) -> Iterator[Var]:
    """The scalars both roles answer and the counter table (also the anchor's)."""
    counters = {k: int(v) for k, v in st["counters"].items() if _is_count(v)}
    yield (*NODE_ROLE, 0), "integer", role
    yield (*NODE_VERSION, 0), "string", display(version)
    yield (*NODE_UPTIME, 0), "timeticks", int(st["uptime_s"] * 100) & 0xFFFFFFFF
    yield (*FLOW_COUNT, 0), "gauge32", len(st["flows"])
    yield (*DROPPED, 0), "counter64", sum(v for k, v in counters.items() if k in drops)
    e = COUNTER_ENTRY
    for name, value in counters.items():
        index = implied_index(name, 64)
        yield (*e, 2, *index), "integer", counter_group(name)
        yield (*e, 3, *index), "integer", TRUE if name in drops else FALSE
        yield (*e, 4, *index), "counter64", value


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def counter_group(name: str) -> int:
    """upmtCounterGroup of a status counter, by the prefix of its name."""
    if name.startswith("sip_"):
        return COUNTER_GROUPS["sip"]
    if name.startswith("registrar_"):
        return COUNTER_GROUPS["registrar"]
    if name.startswith("control_queue"):
        return COUNTER_GROUPS["control"]
    return COUNTER_GROUPS["datapath"]
