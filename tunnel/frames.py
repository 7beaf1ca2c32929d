"""The tunnel wire format (docs/architecture.md, "Wire format"): one UDP payload, one frame.

The first byte of the payload says what it carries. DATA has no header at all:
the inner IP packet travels unchanged, so its own first byte (version nibble 4
or 6) is the discriminator and the tunnel costs only the outer IPv4 + UDP
headers (28 bytes). Every other frame starts with a type byte below 0x40.

Byte layouts, all integers in network byte order::

    DATA               | 0x45..0x4f or 0x60..0x6f ... the inner IP packet   |
    SIGNAL             | 0x01 | SIP message, 1..65536 bytes                 |
    PROBE        (19)  | 0x02 | tunnel_id u32 | seq u32 | timestamp_ns u64 | flags u16 |
    PROBE-ACK (26/38)  | 0x03 | tunnel_id u32 | seq u32 | timestamp_ns u64 | flags u16 |
                       |      family u8 (4|6) | address (4|16 bytes) | port u16       |
    DATA-CSUM-PARTIAL  | 0x04 | inner IP packet (same first-byte rule as DATA)   |

A PROBE-ACK echoes the probe's four fields, so the sender computes the RTT
from its own clock, and adds the source address and port the AN saw the probe
come from (the tunnel's TID after every NAT on the way).

Decoding is the trust boundary: `decode_frame_untrusted` returns a frame or
raises `MalformedError`, nothing else. Lengths are exact, because a frame
with trailing bytes is as likely a different protocol as a sloppy peer.
Encoding trusts its input only as far as the types go: a value that cannot be
represented raises `ValueError`, since it is a bug on this side, not bad input.

This module is pure (no sockets, no clock) and sits on the data path, so the
DATA checks are table look-ups on one byte.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from ground.errors import MalformedError

__all__ = [
    "DEFAULT_AN_PORT",
    "MAX_SIGNAL_SIZE",
    "PROBE_ACK_SIZE_V4",
    "PROBE_ACK_SIZE_V6",
    "PROBE_SIZE",
    "Data",
    "DataCsumPartial",
    "Frame",
    "FrameType",
    "Probe",
    "ProbeAck",
    "Signal",
    "ack_probe",
    "decode_frame_untrusted",
    "encode_frame",
    "is_data",
    "is_ip_packet_start",
    "pull_address",
    "pull_probe",
    "pull_probe_ack",
    "push_address",
    "push_probe",
    "push_probe_ack",
]

# The AN listens on one UDP port.
DEFAULT_AN_PORT: Final = 1800

# A SIGNAL carries at most 64 KiB of SIP, which is more than any
# UDP datagram can hold anyway; the bound exists so the decoder never needs to
# trust the datagram size for its allocation.
MAX_SIGNAL_SIZE: Final = 64 * 1024


class FrameType(IntEnum):
    """Type byte of the non-DATA frames (docs/architecture.md, "Wire format")."""

    SIGNAL = 0x01
    PROBE = 0x02
    PROBE_ACK = 0x03
    DATA_CSUM_PARTIAL = 0x04


class _Family(IntEnum):
    """Address family byte inside a PROBE-ACK: the IP version number."""

    IPV4 = 4
    IPV6 = 6


@dataclass(frozen=True, slots=True)
class Data:
    """An inner IP packet, carried as the whole UDP payload."""

    packet: bytes


@dataclass(frozen=True, slots=True)
class DataCsumPartial:
    """An inner IP packet whose L4 checksum holds only the pseudo-header sum.

    Used by the offload data path (docs/architecture.md, "Wire format"): the
    receiver completes the checksum or passes the packet to the TUN with ``NEEDS_CSUM``.
    """

    packet: bytes


@dataclass(frozen=True, slots=True)
class Signal:
    """A complete SIP message sent inside the tunnel."""

    message: bytes


@dataclass(frozen=True, slots=True)
class Probe:
    """Keepalive / liveness probe, MH → AN.

    ``timestamp_ns`` is the sender's own clock; only the sender interprets it.
    ``flags`` are reserved: sent as 0 and echoed unchanged in the ack.
    """

    tunnel_id: int
    seq: int
    timestamp_ns: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class ProbeAck:
    """The AN's answer to a `Probe`.

    ``observed`` is the probe's source (IP string, port) as the AN received
    it: the tunnel's TID, i.e. the MH's address after every NAT.
    """

    tunnel_id: int
    seq: int
    timestamp_ns: int
    flags: int
    observed: tuple[str, int]


Frame = Data | DataCsumPartial | Signal | Probe | ProbeAck

# type u8, tunnel_id u32, seq u32, timestamp_ns u64, flags u16
_PROBE: Final = struct.Struct("!BIIQH")
_PORT: Final = struct.Struct("!H")
PROBE_SIZE: Final = _PROBE.size
PROBE_ACK_SIZE_V4: Final = PROBE_SIZE + 1 + 4 + 2
PROBE_ACK_SIZE_V6: Final = PROBE_SIZE + 1 + 16 + 2

_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

# 0x40..0x44 carry version 4 but an IHL below the 20-byte minimum, so they are
# not IPv4 and must not be taken for DATA (the wire format lists 0x45..0x4f).
_IP_FIRST_BYTE: Final[tuple[bool, ...]] = tuple(
    0x45 <= b <= 0x4F or 0x60 <= b <= 0x6F for b in range(256)
)


def is_ip_packet_start(first_byte: int) -> bool:
    """Whether ``first_byte`` may start an IPv4 (IHL ≥ 5) or IPv6 packet."""
    return _IP_FIRST_BYTE[first_byte]


def is_data(datagram: bytes) -> bool:
    """The data path's one-byte check: is this datagram a DATA frame?

    Deliberately shallow: the inner header is validated where it is parsed
    (`paft`), so the common case pays for one index and one table look-up.
    """
    return bool(datagram) and _IP_FIRST_BYTE[datagram[0]]


# --- codecs: push_x turns a value into bytes, pull_x the reverse -----------


def _check_uint(name: str, value: int, maximum: int) -> None:
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} {value} does not fit in {maximum.bit_length()} bits")


def _check_probe_fields(tunnel_id: int, seq: int, timestamp_ns: int, flags: int) -> None:
    _check_uint("tunnel_id", tunnel_id, _U32_MAX)
    _check_uint("seq", seq, _U32_MAX)
    _check_uint("timestamp_ns", timestamp_ns, _U64_MAX)
    _check_uint("flags", flags, _U16_MAX)


def push_address(addr: tuple[str, int]) -> bytes:
    """Encode ``(ip, port)`` as family byte + packed address + u16 port.

    An IPv4-mapped IPv6 address (what a dual-stack socket reports for an IPv4
    peer) is sent as family 4: the MH compares it with IPv4 addresses.
    """
    host, port = addr
    _check_uint("port", port, _U16_MAX)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = _Family.IPV4 if ip.version == 4 else _Family.IPV6
    return bytes((family,)) + ip.packed + _PORT.pack(port)


def pull_address(data: bytes, offset: int) -> tuple[tuple[str, int], int]:
    """Decode an address written by `push_address`; returns it and the next offset."""
    if offset >= len(data):
        raise MalformedError("address: missing family byte")
    family = data[offset]
    if family == _Family.IPV4:
        size = 4
    elif family == _Family.IPV6:
        size = 16
    else:
        raise MalformedError(f"address: unknown family {family}")
    end = offset + 1 + size + _PORT.size
    if end > len(data):
        raise MalformedError("address: truncated")
    packed = data[offset + 1 : offset + 1 + size]
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ip = ipaddress.IPv4Address(packed) if size == 4 else ipaddress.IPv6Address(packed)
    (port,) = _PORT.unpack_from(data, offset + 1 + size)
    return (str(ip), port), end


def push_probe(probe: Probe) -> bytes:
    """Encode a PROBE frame."""
    _check_probe_fields(probe.tunnel_id, probe.seq, probe.timestamp_ns, probe.flags)
    return _PROBE.pack(FrameType.PROBE, probe.tunnel_id, probe.seq, probe.timestamp_ns, probe.flags)


def pull_probe(data: bytes) -> Probe:
    """Decode a PROBE frame (type byte included); the length must be exact."""
    if len(data) != PROBE_SIZE:
        raise MalformedError(f"PROBE: {len(data)} bytes, expected {PROBE_SIZE}")
    _, tunnel_id, seq, timestamp_ns, flags = _PROBE.unpack(data)
    return Probe(tunnel_id, seq, timestamp_ns, flags)


def push_probe_ack(ack: ProbeAck) -> bytes:
    """Encode a PROBE-ACK frame."""
    _check_probe_fields(ack.tunnel_id, ack.seq, ack.timestamp_ns, ack.flags)
    head = _PROBE.pack(FrameType.PROBE_ACK, ack.tunnel_id, ack.seq, ack.timestamp_ns, ack.flags)
    return head + push_address(ack.observed)


def pull_probe_ack(data: bytes) -> ProbeAck:
    """Decode a PROBE-ACK frame (type byte included); the length must be exact."""
    if len(data) < PROBE_SIZE:
        raise MalformedError(f"PROBE-ACK: {len(data)} bytes, truncated")
    _, tunnel_id, seq, timestamp_ns, flags = _PROBE.unpack_from(data)
    observed, end = pull_address(data, PROBE_SIZE)
    if end != len(data):
        raise MalformedError(f"PROBE-ACK: {len(data) - end} trailing bytes")
    return ProbeAck(tunnel_id, seq, timestamp_ns, flags, observed)


def ack_probe(probe: Probe, observed: tuple[str, int]) -> ProbeAck:
    """The AN's answer to ``probe``, received from ``observed``."""
    return ProbeAck(probe.tunnel_id, probe.seq, probe.timestamp_ns, probe.flags, observed)


def _check_packet(what: str, packet: bytes) -> None:
    if not packet or not _IP_FIRST_BYTE[packet[0]]:
        raise ValueError(f"{what}: not an IPv4/IPv6 packet (first byte {packet[:1].hex()!r})")


def encode_frame(frame: Frame) -> bytes:
    """Serialise ``frame`` into one UDP payload."""
    # Ordered by frequency: DATA first, it is the data path.
    if isinstance(frame, Data):
        _check_packet("DATA", frame.packet)
        return frame.packet
    if isinstance(frame, Probe):
        return push_probe(frame)
    if isinstance(frame, ProbeAck):
        return push_probe_ack(frame)
    if isinstance(frame, Signal):
        if not 0 < len(frame.message) <= MAX_SIGNAL_SIZE:
            raise ValueError(f"SIGNAL: message of {len(frame.message)} bytes")
        return bytes((FrameType.SIGNAL,)) + frame.message
    if isinstance(frame, DataCsumPartial):
        _check_packet("DATA-CSUM-PARTIAL", frame.packet)
        return bytes((FrameType.DATA_CSUM_PARTIAL,)) + frame.packet
    raise TypeError(f"not a frame: {type(frame).__name__}")


def decode_frame_untrusted(data: bytes) -> Frame:
    """Parse one UDP payload from the network; raises only `MalformedError`."""
    if not data:
        raise MalformedError("empty datagram")
    first = data[0]
    if _IP_FIRST_BYTE[first]:
        return Data(data)
    if first == FrameType.PROBE:
        return pull_probe(data)
    if first == FrameType.PROBE_ACK:
        return pull_probe_ack(data)
    if first == FrameType.SIGNAL:
        size = len(data) - 1
        if size == 0:
            raise MalformedError("SIGNAL: empty message")
        if size > MAX_SIGNAL_SIZE:
            raise MalformedError(f"SIGNAL: {size} bytes, limit {MAX_SIGNAL_SIZE}")
        return Signal(data[1:])
    if first == FrameType.DATA_CSUM_PARTIAL:
        if len(data) < 2 or not _IP_FIRST_BYTE[data[1]]:
            raise MalformedError("DATA-CSUM-PARTIAL: no inner IPv4/IPv6 packet")
        return DataCsumPartial(data[1:])
    raise MalformedError(f"unknown frame type 0x{first:02x}")
