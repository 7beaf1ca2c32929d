"""Flow keys and their extraction from raw IP packets.

`flow_of_packet_untrusted` runs once per packet on both data paths (TUN → tunnel
on the client, tunnel → TUN on the anchor), so it works on the buffer with
`struct.unpack_from` and slices only; the only objects it allocates are the two
address slices and the key itself. It reads untrusted bytes and raises only
`MalformedError`.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final, NamedTuple

from ground.errors import MalformedError

__all__ = [
    "PROTO_ICMP",
    "PROTO_ICMPV6",
    "PROTO_TCP",
    "PROTO_UDP",
    "FiveTuple",
    "flow_of_packet_untrusted",
    "proto_name",
    "proto_number",
]

# IANA "Assigned Internet Protocol Numbers".
PROTO_HOPOPTS: Final = 0  # RFC 8200 §4.3
PROTO_ICMP: Final = 1  # RFC 792
PROTO_TCP: Final = 6  # RFC 9293
PROTO_UDP: Final = 17  # RFC 768
PROTO_ROUTING: Final = 43  # RFC 8200 §4.4
PROTO_FRAGMENT: Final = 44  # RFC 8200 §4.5
PROTO_AH: Final = 51  # RFC 4302 §2.2 (length in 4-octet units, minus 2)
PROTO_ICMPV6: Final = 58  # RFC 4443
PROTO_DSTOPTS: Final = 60  # RFC 8200 §4.6

ICMP_ECHO_REPLY: Final = 0  # RFC 792
ICMP_ECHO_REQUEST: Final = 8
ICMPV6_ECHO_REQUEST: Final = 128  # RFC 4443 §4.1
ICMPV6_ECHO_REPLY: Final = 129  # RFC 4443 §4.2

IPV4_MIN_HEADER: Final = 20  # RFC 791 §3.1
IPV6_HEADER: Final = 40  # RFC 8200 §3
IPV4_FRAGMENT_MASK: Final = 0x3FFF  # MF flag | 13-bit fragment offset
IPV6_FRAGMENT_HEADER: Final = 8

# A legitimate packet carries a handful of extension headers; the bound keeps a
# crafted chain of empty headers from costing more than a few steps.
MAX_IPV6_EXTENSION_HEADERS: Final = 8

_PROTO_NAMES: Final[dict[int, str]] = {
    PROTO_TCP: "tcp",
    PROTO_UDP: "udp",
    PROTO_ICMP: "icmp",
    PROTO_ICMPV6: "icmpv6",
}
_PROTO_NUMBERS: Final[dict[str, int]] = {name: num for num, name in _PROTO_NAMES.items()}

# Module-level sets: `x in frozenset` is one hash probe and builds nothing per call.
_PORTED: Final = frozenset({PROTO_TCP, PROTO_UDP})
_ICMP_ECHO_TYPES: Final = frozenset({ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY})
_ICMPV6_ECHO_TYPES: Final = frozenset({ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY})
# Extension headers whose length is in 8-octet units, not counting the first 8.
_IPV6_OPTION_HEADERS: Final = frozenset({PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS})

_IPV4_FIXED: Final = struct.Struct("!BxHxxHxB")  # version/IHL, total length, flags/offset, proto
_IPV6_FIXED: Final = struct.Struct("!BxxxHB")  # version/class, payload length, next header
_PORTS: Final = struct.Struct("!HH")
_U16: Final = struct.Struct("!H")


class FiveTuple(NamedTuple):
    """The key of one flow, as seen in the packets the local side sends.

    A NamedTuple so that hashing and equality, done per packet as a dict key,
    run in C. Ports are 0 where the protocol has none (or the packet is a
    fragment); ICMP echo puts its identifier in both ports so that the reply's
    `reversed()` key equals the request's key.
    """

    proto: int
    src: bytes
    sport: int
    dst: bytes
    dport: int

    def reversed(self) -> FiveTuple:
        """The key of the same flow in the opposite direction."""
        return FiveTuple(self.proto, self.dst, self.dport, self.src, self.sport)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form (control socket, status output)."""
        return {
            "proto": proto_name(self.proto),
            "src": str(ipaddress.ip_address(self.src)),
            "sport": self.sport,
            "dst": str(ipaddress.ip_address(self.dst)),
            "dport": self.dport,
        }

    def __str__(self) -> str:
        return (
            f"{proto_name(self.proto)} {_endpoint(self.src, self.sport)}"
            f" -> {_endpoint(self.dst, self.dport)}"
        )


def _endpoint(address: bytes, port: int) -> str:
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        return f"[{ip}]:{port}"
    return f"{ip}:{port}"


def proto_name(num: int) -> str:
    """ "tcp", "udp", "icmp", "icmpv6", or the number in decimal for any other protocol."""
    return _PROTO_NAMES.get(num) or str(num)


def proto_number(name: str) -> int:
    """Inverse of `proto_name`; also accepts a decimal number 0..255.

    Raises `MalformedError` for anything else, since names arrive in control
    requests and signalling bodies.
    """
    num = _PROTO_NUMBERS.get(name.lower())
    if num is not None:
        return num
    # isdecimal() alone would accept non-ASCII digits that int() also takes.
    if name.isascii() and name.isdecimal() and len(name) <= 3:
        value = int(name)
        if value <= 255:
            return value
    raise MalformedError(f"unknown IP protocol {name!r}")


def flow_of_packet_untrusted(packet: bytes) -> FiveTuple:
    """The flow key of one raw IPv4 or IPv6 packet (as read from a TUN device).

    Raises `MalformedError` (with the reason) and nothing else. A buffer longer
    than the IP length field is accepted and its tail ignored; a shorter one is
    malformed. Fragments get the address pair and protocol with ports 0, so
    that every fragment of one datagram maps to the same key.
    """
    if not packet:
        raise MalformedError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        return _flow_of_ipv4(packet)
    if version == 6:
        return _flow_of_ipv6(packet)
    raise MalformedError(f"IP version {version}")


def _flow_of_ipv4(packet: bytes) -> FiveTuple:
    if len(packet) < IPV4_MIN_HEADER:
        raise MalformedError("IPv4 header truncated")
    vihl, total, frag, proto = _IPV4_FIXED.unpack_from(packet)
    ihl = (vihl & 0x0F) * 4
    if ihl < IPV4_MIN_HEADER:
        raise MalformedError(f"IPv4 header length {ihl}")
    if total < ihl:
        raise MalformedError(f"IPv4 total length {total} below header length {ihl}")
    if len(packet) < total:
        raise MalformedError(f"IPv4 total length {total} beyond buffer of {len(packet)}")
    src = packet[12:16]
    dst = packet[16:20]
    if frag & IPV4_FRAGMENT_MASK:
        return FiveTuple(proto, src, 0, dst, 0)
    if proto in _PORTED:
        if ihl + 4 > total:
            raise MalformedError("IPv4 transport header truncated")
        sport, dport = _PORTS.unpack_from(packet, ihl)
        return FiveTuple(proto, src, sport, dst, dport)
    if proto == PROTO_ICMP:
        if ihl + 4 > total:
            raise MalformedError("ICMP header truncated")
        icmp_type = packet[ihl]
        if icmp_type in _ICMP_ECHO_TYPES:
            if ihl + 8 > total:
                raise MalformedError("ICMP echo header truncated")
            (ident,) = _U16.unpack_from(packet, ihl + 4)
            return FiveTuple(proto, src, ident, dst, ident)
    return FiveTuple(proto, src, 0, dst, 0)


def _flow_of_ipv6(packet: bytes) -> FiveTuple:
    if len(packet) < IPV6_HEADER:
        raise MalformedError("IPv6 header truncated")
    _, payload_length, nh = _IPV6_FIXED.unpack_from(packet)
    # A jumbogram (payload length 0 plus a hop-by-hop option, RFC 2675) cannot
    # cross a TUN device or a UDP tunnel, so it fails the bound checks below.
    end = IPV6_HEADER + payload_length
    if len(packet) < end:
        raise MalformedError(f"IPv6 payload length {payload_length} beyond buffer")
    src = packet[8:24]
    dst = packet[24:40]
    off = IPV6_HEADER
    for _ in range(MAX_IPV6_EXTENSION_HEADERS + 1):
        if nh in _PORTED:
            if off + 4 > end:
                raise MalformedError("IPv6 transport header truncated")
            sport, dport = _PORTS.unpack_from(packet, off)
            return FiveTuple(nh, src, sport, dst, dport)
        if nh == PROTO_ICMPV6:
            if off + 4 > end:
                raise MalformedError("ICMPv6 header truncated")
            icmp_type = packet[off]
            if icmp_type in _ICMPV6_ECHO_TYPES:
                if off + 8 > end:
                    raise MalformedError("ICMPv6 echo header truncated")
                (ident,) = _U16.unpack_from(packet, off + 4)
                return FiveTuple(nh, src, ident, dst, ident)
            return FiveTuple(nh, src, 0, dst, 0)
        if nh in _IPV6_OPTION_HEADERS:
            if off + 2 > end:
                raise MalformedError(f"IPv6 extension header {nh} truncated")
            nh = packet[off]
            off += (packet[off + 1] + 1) * 8
        elif nh == PROTO_AH:
            if off + 2 > end:
                raise MalformedError("IPv6 AH header truncated")
            nh = packet[off]
            off += (packet[off + 1] + 2) * 4
        elif nh == PROTO_FRAGMENT:
            if off + IPV6_FRAGMENT_HEADER > end:
                raise MalformedError("IPv6 fragment header truncated")
            nh = packet[off]
            (offset_flags,) = _U16.unpack_from(packet, off + 2)
            if offset_flags & 0xFFF9:
                # A real fragment. Its Next Header names the first header of
                # the fragmentable part and is the same in every fragment of
                # the datagram, so the key is the same for all of them.
                return FiveTuple(nh, src, 0, dst, 0)
            # An atomic fragment (offset 0, M clear; RFC 6946) is a whole
            # datagram: read on so that it keys like the flow's other packets.
            off += IPV6_FRAGMENT_HEADER
        else:
            # ESP, No Next Header, or any other upper-layer protocol.
            return FiveTuple(nh, src, 0, dst, 0)
        if off > end:
            raise MalformedError("IPv6 extension header beyond payload")
    raise MalformedError(f"more than {MAX_IPV6_EXTENSION_HEADERS} IPv6 extension headers")
