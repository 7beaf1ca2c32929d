"""Builders of well-formed IP packets, for tests and benchmarks.

Small and exact rather than fast: every length and checksum is filled in as a
kernel would accept it, so that packets built here can be written to a real TUN
device as well as fed to the parsers. Addresses are given as text ("192.0.2.1",
"2001:db8::1"); the family of a transport header's pseudo-header follows them.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

from paft.flow import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
)

__all__ = [
    "TCP_ACK",
    "TCP_FIN",
    "TCP_PSH",
    "TCP_RST",
    "TCP_SYN",
    "build_icmp_echo",
    "build_icmpv6_echo",
    "build_ipv4",
    "build_ipv6",
    "build_ipv6_fragment_header",
    "build_ipv6_options_header",
    "build_tcp",
    "build_udp",
    "internet_checksum",
    "pack_address",
]

# RFC 9293 §3.1 control bits.
TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10

IPV4_DONT_FRAGMENT: Final = 0x4000
IPV4_MORE_FRAGMENTS: Final = 0x2000

_IPV4_HEADER: Final = struct.Struct("!BBHHHBBH4s4s")
_IPV6_HEADER: Final = struct.Struct("!IHBB16s16s")
_UDP_HEADER: Final = struct.Struct("!HHHH")
_TCP_HEADER: Final = struct.Struct("!HHIIBBHHH")
_ICMP_ECHO: Final = struct.Struct("!BBHHH")


def internet_checksum(data: bytes) -> int:
    """The one's-complement sum of RFC 1071, complemented."""
    if len(data) % 2:
        data += b"\x00"
    words: tuple[int, ...] = struct.unpack(f"!{len(data) // 2}H", data)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pack_address(address: str) -> bytes:
    """4 bytes for an IPv4 address, 16 for IPv6."""
    return ipaddress.ip_address(address).packed


def _pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = pack_address(src), pack_address(dst)
    if len(s) != len(d):
        raise ValueError(f"address families differ: {src} and {dst}")
    if len(s) == 4:
        return s + d + struct.pack("!xBH", proto, length)  # RFC 768
    return s + d + struct.pack("!I3xB", length, proto)  # RFC 8200 §8.1


def build_ipv4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    ident: int = 0,
    flags_frag: int = 0,
    ttl: int = 64,
    options: bytes = b"",
) -> bytes:
    """An IPv4 packet with a correct header checksum; `options` is padded to 4 bytes."""
    options += b"\x00" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    if ihl > 15:
        raise ValueError("IPv4 options longer than 40 bytes")
    total = ihl * 4 + len(payload)
    if total > 0xFFFF:
        raise ValueError("IPv4 packet longer than 65535 bytes")
    fields = (0x40 | ihl, 0, total, ident, flags_frag, ttl, proto)
    addrs = (ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = _IPV4_HEADER.pack(*fields, 0, *addrs) + options
    checksum = internet_checksum(header)
    return _IPV4_HEADER.pack(*fields, checksum, *addrs) + options + payload


def build_ipv6(
    src: str,
    dst: str,
    next_header: int,
    payload: bytes,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """An IPv6 packet; `payload` includes any extension headers."""
    if len(payload) > 0xFFFF:
        raise ValueError("IPv6 payload longer than 65535 bytes (jumbograms unsupported)")
    first = (6 << 28) | (traffic_class << 20) | flow_label
    return (
        _IPV6_HEADER.pack(
            first,
            len(payload),
            next_header,
            hop_limit,
            ipaddress.IPv6Address(src).packed,
            ipaddress.IPv6Address(dst).packed,
        )
        + payload
    )


def build_ipv6_options_header(next_header: int, options: bytes = b"") -> bytes:
    """A hop-by-hop or destination options header (RFC 8200 §4.3), PadN-padded."""
    pad = -(2 + len(options)) % 8
    if pad == 1:
        padding = b"\x00"  # Pad1
    elif pad:
        padding = bytes((1, pad - 2)) + b"\x00" * (pad - 2)  # PadN
    else:
        padding = b""
    body = options + padding
    length = (2 + len(body)) // 8 - 1
    if length > 255:
        raise ValueError("IPv6 options header too long")
    return bytes((next_header, length)) + body


def build_ipv6_fragment_header(next_header: int, offset: int, more: bool, ident: int = 0) -> bytes:
    """A fragment header (RFC 8200 §4.5); `offset` is in 8-octet units."""
    return struct.pack("!BxHI", next_header, (offset << 3) | int(more), ident)


def build_udp(sport: int, dport: int, payload: bytes, src: str, dst: str) -> bytes:
    """A UDP datagram with its checksum over the pseudo-header of `src`/`dst`."""
    length = 8 + len(payload)
    datagram = _UDP_HEADER.pack(sport, dport, length, 0) + payload
    checksum = internet_checksum(_pseudo_header(src, dst, PROTO_UDP, length) + datagram)
    # RFC 768: a computed 0 is sent as all ones, 0 meaning "no checksum".
    return _UDP_HEADER.pack(sport, dport, length, checksum or 0xFFFF) + payload


def build_tcp(
    sport: int,
    dport: int,
    src: str,
    dst: str,
    *,
    seq: int = 0,
    ack: int = 0,
    flags: int = TCP_SYN,
    window: int = 65535,
    payload: bytes = b"",
) -> bytes:
    """A TCP segment with a 20-byte header (no options) and its checksum."""
    fields = (sport, dport, seq, ack, 5 << 4, flags, window)
    segment = _TCP_HEADER.pack(*fields, 0, 0) + payload
    checksum = internet_checksum(_pseudo_header(src, dst, PROTO_TCP, len(segment)) + segment)
    return _TCP_HEADER.pack(*fields, checksum, 0) + payload


def build_icmp_echo(ident: int, seq: int, reply: bool = False, payload: bytes = b"") -> bytes:
    """An ICMPv4 echo request or reply (RFC 792) with its checksum."""
    kind = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
    message = _ICMP_ECHO.pack(kind, 0, 0, ident, seq) + payload
    return _ICMP_ECHO.pack(kind, 0, internet_checksum(message), ident, seq) + payload


def build_icmpv6_echo(
    ident: int, seq: int, src: str, dst: str, reply: bool = False, payload: bytes = b""
) -> bytes:
    """An ICMPv6 echo request or reply (RFC 4443 §4), checksummed over the pseudo-header."""
    kind = ICMPV6_ECHO_REPLY if reply else ICMPV6_ECHO_REQUEST
    message = _ICMP_ECHO.pack(kind, 0, 0, ident, seq) + payload
    checksum = internet_checksum(_pseudo_header(src, dst, PROTO_ICMPV6, len(message)) + message)
    return _ICMP_ECHO.pack(kind, 0, checksum, ident, seq) + payload
