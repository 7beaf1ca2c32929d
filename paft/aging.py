"""How long an idle flow is kept, by protocol and TCP state (pure).

The defaults follow the NAT behaviour RFCs, so that the PAFT never forgets a
flow the NAT behind it still keeps: an established TCP flow at least 2 h 4 min
(RFC 5382 REQ-5), UDP at least 2 min (RFC 4787 REQ-5; 5 min here), anything
else 1 min. A TCP flow that has seen FIN or RST lingers only a little, to
carry the last segments of the close.
"""

from dataclasses import dataclass
from typing import Any

from paft.flow import PROTO_TCP, PROTO_UDP, FiveTuple
from paft.table import FlowEntry

TCP_FIN = 0x01
TCP_RST = 0x04


@dataclass(frozen=True, slots=True)
class Aging:
    tcp_idle: float = 7440.0
    udp_idle: float = 300.0
    other_idle: float = 60.0
    closed_linger: float = 10.0

    def timeout(self, key: FiveTuple, entry: FlowEntry[Any]) -> float:
        if key.proto == PROTO_TCP:
            return self.closed_linger if entry.closed_at is not None else self.tcp_idle
        if key.proto == PROTO_UDP:
            return self.udp_idle
        return self.other_idle


def tcp_flags(packet: bytes) -> int:
    """The TCP flags byte of an IPv4/IPv6 TCP packet without extension headers, else 0.

    Called on the data path only for packets already keyed as TCP, so the
    header has been validated; the length checks guard the rest.
    """
    version = packet[0] >> 4
    if version == 4:
        offset = (packet[0] & 0x0F) * 4 + 13
    elif version == 6 and packet[6] == PROTO_TCP:
        offset = 40 + 13
    else:
        return 0
    return packet[offset] if len(packet) > offset else 0
