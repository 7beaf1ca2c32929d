"""TUN segmentation offloads: split super-packets, coalesce segments (pure).

With ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD(CSUM|TSO4|TSO6|USO4|USO6)`` a TUN read
returns one ``struct virtio_net_hdr`` and then an IP packet of up to 64 KB whose
TCP (or UDP) payload the kernel left for the device to cut. `split_untrusted`
does that cut, so the tunnel can send MTU-sized inner packets in one
``sendmsg`` with ``UDP_SEGMENT``. In the other direction `coalesce` merges the
consecutive TCP segments that ``UDP_GRO`` hands over into one GSO packet per
run, so the TUN is written once per run instead of once per segment.
`checksum_partial_fill` completes the checksum of a DATA-CSUM-PARTIAL frame
(docs/architecture.md, "Wire format", frame 0x04).

`tunnel_segments_untrusted` is the cut the tunnel sends: when the kernel
left the checksum to the device (NEEDS_CSUM), every segment goes out as a
DATA-CSUM-PARTIAL frame holding only its pseudo-header sum, so the payload is
neither summed nor copied (the outer UDP checksum covers it on the way), and
`coalesce` hands such segments back to the receiving kernel with NEEDS_CSUM,
which completes the checksum wherever the packet goes next.

``struct virtio_net_hdr`` (include/uapi/linux/virtio_net.h), 10 bytes, the
variant without ``num_buffers``. TUN uses the host's byte order unless
``TUNSETVNETLE``/``TUNSETVNETBE`` says otherwise; on x86 that is little-endian::

    offset 0  flags        u8   NEEDS_CSUM (1): checksum from csum_start to the end,
                                store it at csum_start + csum_offset; DATA_VALID (2)
    offset 1  gso_type     u8   NONE 0, TCPV4 1, UDP 3 (UFO), TCPV6 4, UDP_L4 5,
                                | ECN 0x80 (the TCP packet carries CWR)
    offset 2  hdr_len      u16  bytes of headers (on TUN reads: the skb's linear
                                length, so only an upper bound)
    offset 4  gso_size     u16  payload bytes per segment (the MSS)
    offset 6  csum_start   u16  offset of the transport header from the IP header
    offset 8  csum_offset  u16  offset of the checksum field from csum_start
                                (16 for TCP, 6 for UDP)

Rules followed, as the kernel's software segmentation applies them
(``inet_gso_segment``, ``ipv6_gso_segment``, ``tcp_gso_segment``,
``__udp_gso_segment``):

* every segment gets a copy of the IP and transport headers, IP options and
  TCP options included;
* IPv4: total length set, the identification incremented by one per segment
  (TUN advertises no ``TSO_MANGLEID``, so no fixed-ID packets reach it), the
  header checksum recomputed; IPv6: payload length set;
* TCP: the sequence number advanced by the bytes before the segment; FIN and PSH
  kept only on the last segment, CWR only on the first; the checksum computed
  over pseudo-header, header and data, and written as computed (a 0 stays 0);
* UDP (USO): each segment is a datagram with its own length and checksum; a
  computed 0 is sent as 0xFFFF (RFC 768 reserves 0 for "no checksum");
* a packet completed without segmentation (``gso_type`` NONE with NEEDS_CSUM)
  follows ``skb_checksum_help``: a computed 0 is written as 0xFFFF.

Coalescing follows the kernel's TCP GRO (``tcp_gro_receive``,
``inet_gro_receive``, ``ipv6_gro_receive``): segments of one flow merge when
their sequence numbers are contiguous, ACK number, window, TCP options, TOS/TTL
(traffic class, flow label, hop limit) and DF are equal, every segment but the
last carries exactly ``gso_size`` bytes, and each one's checksums verify. The
merged packet is handed over with NEEDS_CSUM, which the receiving stack takes
as "checksum verified"; checking each segment before merging keeps the
end-to-end TCP checksum meaningful. CWR may open a run (the kernel's GRO marks
such a run ``SKB_GSO_TCP_ECN``), PSH may close one; SYN, RST, FIN and URG never
merge.

Checksums are computed with ``int.from_bytes(..., "little") % 0xFFFF``: since
2**16 = 1 (mod 0xFFFF), that is the one's-complement sum of the 16-bit words
(RFC 1071) with both bytes swapped, and the byte order does not change a
one's-complement sum (RFC 1071 §2(B)). It runs in C over the whole buffer,
about 1 ns per byte, and an odd trailing byte falls into place without padding.
Everything below stays in that swapped domain and is written with ``"<H"``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import repeat
from typing import Final

from ground.errors import MalformedError
from tunnel.frames import FrameType

__all__ = [
    "VIRTIO_NET_HDR_F_DATA_VALID",
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_GSO_ECN",
    "VNET_HDR_LEN",
    "GsoType",
    "Segments",
    "VnetHdr",
    "checksum_partial_fill",
    "coalesce",
    "lone_frame",
    "split_untrusted",
    "tunnel_datagram_untrusted",
    "tunnel_segments_untrusted",
]

VNET_HDR_LEN: Final = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_F_DATA_VALID: Final = 2  # set by the kernel on reads; says nothing to a writer
VIRTIO_NET_HDR_GSO_ECN: Final = 0x80
_KNOWN_FLAGS: Final = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID


class GsoType(IntEnum):
    """``VIRTIO_NET_HDR_GSO_*``, without the ECN bit (see `VnetHdr.ecn`)."""

    NONE = 0
    TCPV4 = 1
    UDP = 3  # UFO: IP fragmentation of one datagram; not negotiated here
    TCPV6 = 4
    UDP_L4 = 5  # USO: one datagram per segment


_VNET: Final = struct.Struct("<BBHHHH")
_GSO_TYPES: Final = {int(t): t for t in GsoType}
_TCP_TYPES: Final = frozenset({GsoType.TCPV4, GsoType.TCPV6})


@dataclass(frozen=True, slots=True)
class VnetHdr:
    """One ``struct virtio_net_hdr``; `ecn` is the ``VIRTIO_NET_HDR_GSO_ECN`` bit."""

    flags: int = 0
    gso_type: GsoType = GsoType.NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    ecn: bool = False

    def pack(self) -> bytes:
        """The 10 bytes in host (little-endian) order; ValueError if a field does not fit."""
        gso = int(self.gso_type) | (VIRTIO_NET_HDR_GSO_ECN if self.ecn else 0)
        try:
            return _VNET.pack(
                self.flags, gso, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset
            )
        except struct.error as exc:
            raise ValueError(f"virtio_net_hdr field out of range: {self}") from exc

    @classmethod
    def unpack_untrusted(cls, data: bytes) -> VnetHdr:
        """Decode the first 10 bytes of `data`; MalformedError on anything unknown."""
        if len(data) < VNET_HDR_LEN:
            raise MalformedError(f"virtio_net_hdr needs {VNET_HDR_LEN} bytes, got {len(data)}")
        flags, raw, hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(data)
        if flags & ~_KNOWN_FLAGS:
            raise MalformedError(f"unknown virtio_net_hdr flags {flags:#x}")
        gso_type = _GSO_TYPES.get(raw & ~VIRTIO_NET_HDR_GSO_ECN)
        if gso_type is None:
            raise MalformedError(f"unknown gso_type {raw:#x}")
        ecn = bool(raw & VIRTIO_NET_HDR_GSO_ECN)
        if ecn and gso_type not in _TCP_TYPES:
            raise MalformedError(f"ECN bit on gso_type {gso_type.name}")
        return cls(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, ecn)


# IANA protocol numbers and RFC 9293 §3.1 control bits.
_PROTO_TCP: Final = 6
_PROTO_UDP: Final = 17
_FIN: Final = 0x01
_SYN: Final = 0x02
_RST: Final = 0x04
_PSH: Final = 0x08
_ACK: Final = 0x10
_URG: Final = 0x20
_CWR: Final = 0x80
_NEVER_MERGED: Final = _SYN | _RST | _FIN | _URG

_IPV4_MF_OFFSET: Final = 0x3FFF  # MF flag and fragment offset: any of them means a fragment
_IPV4_DF: Final = 0x4000
_TCP_CSUM_OFFSET: Final = 16
_UDP_CSUM_OFFSET: Final = 6
_MAX_IP_LEN: Final = 0xFFFF

# IPv6 next headers after which a packet certainly holds no TCP (RFC 8200 §4:
# the rest of the chain is an upper layer or "no next header"). Anything else may
# be an extension header in front of TCP, so `coalesce` treats it as a barrier.
_IPV6_FINAL_NON_TCP: Final = frozenset({_PROTO_UDP, 58, 59, 132, 136})

_U16: Final = struct.Struct("!H")
_U16_LE: Final = struct.Struct("<H")  # a checksum from the swapped domain, see the docstring
_U32: Final = struct.Struct("!I")
_IPV4_FIELDS: Final = struct.Struct("!BxHHHxB")  # ver/IHL, total length, id, flags/offset, proto
_IPV6_FIELDS: Final = struct.Struct("!BxxxHB")  # version, payload length, next header
_TCP_FIELDS: Final = struct.Struct("!4xI4xBB")  # seq, data offset, flags

_NONE_HDR: Final = VnetHdr().pack()
_CSUM_FIELDS: Final = struct.Struct("<HH")  # csum_start, csum_offset at offset 6
_IPV4_PLAIN: Final = struct.Struct("!H2xH1xB")  # total length, flags/offset, proto at 2
_TCP4_LAYOUT: Final = (20, 16)
_UDP4_LAYOUT: Final = (20, 6)


def _swap16(value: int) -> int:
    """A 16-bit value moved into (or out of) the byte-swapped checksum domain."""
    return ((value & 0xFF) << 8) | (value >> 8)


def _sum(data: bytes | bytearray | memoryview) -> int:
    """The byte-swapped one's-complement sum of `data`, not yet reduced mod 0xFFFF."""
    return int.from_bytes(data, "little")


def _ip_layout(packet: bytes | memoryview) -> tuple[int, int, int]:
    """(IP version, transport offset, transport protocol) of a whole, unfragmented packet."""
    size = len(packet)
    if size < 20:
        raise MalformedError(f"IP packet of {size} bytes")
    version = packet[0] >> 4
    if version == 4:
        first, total, _ident, frag, proto = _IPV4_FIELDS.unpack_from(packet)
        ihl = (first & 0x0F) * 4
        if ihl < 20 or ihl > size:
            raise MalformedError(f"IPv4 header length {ihl} in a {size}-byte packet")
        if total != size:
            raise MalformedError(f"IPv4 total length {total} but {size} bytes")
        if frag & _IPV4_MF_OFFSET:
            raise MalformedError("IPv4 fragment")
        return 4, ihl, proto
    if version == 6:
        if size < 40:
            raise MalformedError(f"IPv6 packet of {size} bytes")
        _first, payload, next_header = _IPV6_FIELDS.unpack_from(packet)
        if payload + 40 != size:
            raise MalformedError(f"IPv6 payload length {payload} but {size - 40} bytes")
        if next_header not in (_PROTO_TCP, _PROTO_UDP):
            # Extension headers: rare on offloaded traffic, and a routing header
            # would change the pseudo-header's destination.
            raise MalformedError(f"IPv6 next header {next_header} is not TCP or UDP")
        return 6, 40, next_header
    raise MalformedError(f"IP version {version}")


def _pseudo_sum(
    packet: bytes | bytearray | memoryview, version: int, proto: int, length: int
) -> int:
    """Swapped-domain sum of the pseudo-header (RFC 9293 §3.1, RFC 8200 §8.1)."""
    addrs = packet[12:20] if version == 4 else packet[8:40]
    return _sum(addrs) + _swap16(proto) + _swap16(length)


def split_untrusted(frame: bytes, mtu: int) -> list[bytes]:
    """Cut one TUN read (virtio_net_hdr + IP packet) into IP packets of at most `mtu` bytes.

    GSO NONE gives the packet itself, its checksum completed if NEEDS_CSUM asks
    for it. TCPV4/TCPV6 and UDP_L4 give the segments the kernel would send (see
    the module docstring). A TCP stream is cut smaller than ``gso_size`` when
    the headers and ``gso_size`` bytes would exceed `mtu`, as a TSO engine with
    a smaller MSS would; UDP datagram boundaries cannot move, so a USO packet
    whose datagrams do not fit is malformed, as is a non-GSO packet over `mtu`.
    Raises only MalformedError.
    """
    hdr = VnetHdr.unpack_untrusted(frame)
    packet = memoryview(frame)[VNET_HDR_LEN:]
    size = len(packet)
    if hdr.hdr_len > size:
        raise MalformedError(f"hdr_len {hdr.hdr_len} beyond a {size}-byte packet")
    if hdr.gso_type is GsoType.NONE:
        if size > mtu:
            raise MalformedError(f"{size}-byte packet without GSO over MTU {mtu}")
        if not hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return [bytes(packet)]
        return [_fill_checksum(packet, hdr.csum_start, hdr.csum_offset, mangle_zero=True)]
    version, start, proto, headers, piece = _plan(hdr, packet, mtu)
    if proto == _PROTO_TCP:
        return _split_tcp(packet, version, start, headers, piece)
    return _split_udp(packet, version, start, piece)


def _plan(hdr: VnetHdr, packet: memoryview, mtu: int) -> tuple[int, int, int, int, int]:
    """Check a GSO packet against its header; (version, start, proto, headers, piece).

    `headers` is the length of the IP and transport headers every segment
    repeats, `piece` the payload bytes per segment once `mtu` is applied.
    """
    size = len(packet)
    gso_type = hdr.gso_type
    if gso_type is GsoType.UDP:
        raise MalformedError("UFO (gso_type UDP) is not negotiated on this TUN")
    if hdr.gso_size == 0:
        raise MalformedError(f"gso_size 0 with gso_type {gso_type.name}")

    version, start, proto = _ip_layout(packet)
    if gso_type is GsoType.UDP_L4:
        if proto != _PROTO_UDP:
            raise MalformedError(f"UDP_L4 on protocol {proto}")
        csum_offset = _UDP_CSUM_OFFSET
        headers = start + 8
        if size < headers:
            raise MalformedError("UDP header truncated")
        if _U16.unpack_from(packet, start + 4)[0] != size - start:
            raise MalformedError("UDP length does not match the packet")
    else:
        wanted = 4 if gso_type is GsoType.TCPV4 else 6
        if version != wanted:
            raise MalformedError(f"{gso_type.name} on an IPv{version} packet")
        if proto != _PROTO_TCP:
            raise MalformedError(f"{gso_type.name} on protocol {proto}")
        csum_offset = _TCP_CSUM_OFFSET
        if size < start + 20:
            raise MalformedError("TCP header truncated")
        headers = start + (packet[start + 12] >> 4) * 4
        if headers < start + 20 or headers > size:
            raise MalformedError("TCP data offset out of range")
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and (
        hdr.csum_start != start or hdr.csum_offset != csum_offset
    ):
        raise MalformedError(
            f"csum_start/offset {hdr.csum_start}/{hdr.csum_offset}, transport header at {start}"
        )

    piece = hdr.gso_size
    if headers + piece > mtu:
        if size <= mtu:
            piece = max(size - headers, 1)  # one segment holds it all
        elif proto == _PROTO_UDP:
            raise MalformedError(f"USO datagrams of {headers + piece} bytes over MTU {mtu}")
        elif mtu - headers < 1:
            raise MalformedError(f"{headers} bytes of headers leave no room in MTU {mtu}")
        else:
            piece = mtu - headers
    return version, start, proto, headers, piece


def _segment_template(
    packet: memoryview, version: int, start: int, headers: int, csum_offset: int
) -> tuple[bytearray, int]:
    """The headers with both checksums zeroed, and the swapped sum of the addresses."""
    template = bytearray(packet[:headers])
    template[start + csum_offset : start + csum_offset + 2] = b"\x00\x00"
    if version == 4:
        template[10:12] = b"\x00\x00"
        return template, _sum(packet[12:20])
    return template, _sum(packet[8:40])


def _finish_ip(h: bytearray, version: int, start: int, length: int, ident: int) -> None:
    """Set the IP length (and for IPv4 the id and header checksum) of one segment."""
    if version == 4:
        _U16.pack_into(h, 2, length)
        _U16.pack_into(h, 4, ident)
        h[10] = h[11] = 0
        _U16_LE.pack_into(h, 10, -_sum(h[:start]) % 0xFFFF)
    else:
        _U16.pack_into(h, 4, length - 40)


def _split_tcp(
    packet: memoryview, version: int, start: int, headers: int, piece: int
) -> list[bytes]:
    size = len(packet)
    h, base = _segment_template(packet, version, start, headers, _TCP_CSUM_OFFSET)
    base += _swap16(_PROTO_TCP)
    ident = _U16.unpack_from(packet, 4)[0] if version == 4 else 0
    seq, _offset, flags = _TCP_FIELDS.unpack_from(packet, start)
    flags_at = start + 13
    seq_at = start + 4
    csum_at = start + _TCP_CSUM_OFFSET
    tcp_header = headers - start
    middle = flags & ~(_FIN | _PSH | _CWR)
    first = flags & ~(_FIN | _PSH)
    last = flags & ~_CWR
    out: list[bytes] = []
    # An empty payload still makes one segment, as the kernel sends it unsplit.
    offsets = range(headers, size, piece) if size > headers else range(headers, headers + 1)
    final = offsets[-1]
    for index, at in enumerate(offsets):
        end = min(at + piece, size)
        data = packet[at:end]
        _finish_ip(h, version, start, headers + end - at, (ident + index) & 0xFFFF)
        _U32.pack_into(h, seq_at, (seq + at - headers) & 0xFFFFFFFF)
        if at == final:
            h[flags_at] = flags if index == 0 else last
        else:
            h[flags_at] = first if index == 0 else middle
        h[csum_at] = h[csum_at + 1] = 0
        total = base + _swap16(tcp_header + end - at) + _sum(h[start:]) + _sum(data)
        _U16_LE.pack_into(h, csum_at, -total % 0xFFFF)
        out.append(bytes(h) + data)
    return out


def _split_udp(packet: memoryview, version: int, start: int, piece: int) -> list[bytes]:
    size = len(packet)
    headers = start + 8
    h, base = _segment_template(packet, version, start, headers, _UDP_CSUM_OFFSET)
    base += _swap16(_PROTO_UDP)
    ident = _U16.unpack_from(packet, 4)[0] if version == 4 else 0
    csum_at = start + _UDP_CSUM_OFFSET
    out: list[bytes] = []
    offsets = range(headers, size, piece) if size > headers else range(headers, headers + 1)
    for index, at in enumerate(offsets):
        end = min(at + piece, size)
        data = packet[at:end]
        length = 8 + end - at
        _finish_ip(h, version, start, start + length, (ident + index) & 0xFFFF)
        _U16.pack_into(h, start + 4, length)
        h[csum_at] = h[csum_at + 1] = 0
        total = base + _swap16(length) + _sum(h[start:]) + _sum(data)
        _U16_LE.pack_into(h, csum_at, (-total % 0xFFFF) or 0xFFFF)
        out.append(bytes(h) + data)
    return out


@dataclass(frozen=True, slots=True)
class Segments:
    """What one TUN read becomes on the tunnel: datagrams for one ``UDP_SEGMENT`` send.

    `buffers` is a gather list; concatenated, it is the datagrams back to
    back. Every datagram is `size` bytes long except the last, which may be
    shorter; `inner_bytes` adds up the inner IP packets alone (no frame-type
    byte), for accounting.
    """

    buffers: list[bytes | memoryview]
    size: int
    count: int
    inner_bytes: int


_PARTIAL_TYPE: Final = bytes((FrameType.DATA_CSUM_PARTIAL,))


def tunnel_datagram_untrusted(frame: bytes, mtu: int) -> bytes | None:
    """The one tunnel datagram for a TUN read without GSO, or None.

    The fast path for small packets: a read without NEEDS_CSUM is its IP
    packet (DATA); one with NEEDS_CSUM at the TCP/UDP checksum of a whole
    IPv4 or IPv6 packet becomes a DATA-CSUM-PARTIAL frame as it is. None
    for everything else (GSO, other layouts, anything odd), which
    `tunnel_segments_untrusted` decides; where this gives a datagram, it is
    the one that function would give.
    """
    size = len(frame) - VNET_HDR_LEN
    if size < 20 or size > mtu or frame[1]:
        return None
    flags = frame[0]
    if flags & ~_KNOWN_FLAGS or _U16_LE.unpack_from(frame, 2)[0] > size:
        return None
    packet = frame[VNET_HDR_LEN:]
    if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return packet
    if _partial_layout(packet) != _CSUM_FIELDS.unpack_from(frame, 6):
        return None
    return _PARTIAL_TYPE + packet


def tunnel_segments_untrusted(frame: bytes, mtu: int) -> Segments:
    """Turn one TUN read (virtio_net_hdr + IP packet) into tunnel datagrams.

    With NEEDS_CSUM and ``csum_start``/``csum_offset`` pointing at the TCP or
    UDP checksum, every datagram is a DATA-CSUM-PARTIAL frame (0x04 + inner
    packet) whose checksum field holds the folded, uncomplemented
    pseudo-header sum for that segment's own length, as the kernel's
    CHECKSUM_PARTIAL leaves it (a fold of 0 is written as 0xFFFF, the value
    ``csum_fold`` yields for any non-zero sum). No payload byte is read: the
    outer UDP checksum covers the bytes in flight and the receiving kernel
    completes the inner one. The IP and transport headers are finished per
    segment as `split_untrusted` finishes them, checksum aside, and the
    payload travels as `memoryview` slices of `frame`, which must therefore
    not change until the datagrams are sent.

    Without NEEDS_CSUM the datagrams are DATA frames, exactly the packets of
    `split_untrusted`. A GSO NONE packet with NEEDS_CSUM whose checksum does
    not sit where TCP or UDP puts it (an IPv6 extension header, another
    protocol) is completed here and sent as DATA; a GSO packet whose
    checksum position disagrees with its headers is malformed, as in
    `split_untrusted`. `mtu` bounds the inner packets, with the same rules.
    Raises only MalformedError.
    """
    hdr = VnetHdr.unpack_untrusted(frame)
    if not hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return _whole(split_untrusted(frame, mtu))
    packet = memoryview(frame)[VNET_HDR_LEN:]
    size = len(packet)
    if hdr.gso_type is GsoType.NONE:
        if hdr.hdr_len <= size <= mtu and _partial_layout(packet) == (
            hdr.csum_start,
            hdr.csum_offset,
        ):
            return Segments([_PARTIAL_TYPE, packet], size + 1, 1, size)
        return _whole(split_untrusted(frame, mtu))
    if hdr.hdr_len > size:
        raise MalformedError(f"hdr_len {hdr.hdr_len} beyond a {size}-byte packet")
    version, start, proto, headers, piece = _plan(hdr, packet, mtu)
    if proto == _PROTO_TCP:
        return _partial_tcp(packet, version, start, headers, piece)
    return _partial_udp(packet, version, start, piece)


def _whole(packets: list[bytes]) -> Segments:
    """DATA datagrams: the inner packets themselves."""
    buffers: list[bytes | memoryview] = list(packets)
    total = sum(map(len, packets))
    return Segments(buffers, len(packets[0]), len(packets), total)


def _partial_layout(packet: bytes | memoryview) -> tuple[int, int] | None:
    """(csum_start, csum_offset) of a whole TCP or UDP packet, None if it is not one."""
    size = len(packet)
    if size >= 28 and packet[0] == 0x45:
        # IPv4 without options, the usual case: the checks of the general path
        # below, spelt out for it.
        total, frag, proto = _IPV4_PLAIN.unpack_from(packet, 2)
        if total != size or frag & _IPV4_MF_OFFSET:
            return None
        if proto == _PROTO_UDP:
            return _UDP4_LAYOUT if _U16.unpack_from(packet, 24)[0] == size - 20 else None
        if proto == _PROTO_TCP and size >= 40:
            tcp_header = (packet[32] >> 4) * 4
            return _TCP4_LAYOUT if tcp_header >= 20 and 20 + tcp_header <= size else None
        return None
    return _partial_layout_general(packet)


def _partial_layout_general(packet: bytes | memoryview) -> tuple[int, int] | None:
    """`_partial_layout` for any IPv4 or IPv6 packet."""
    try:
        _version, start, proto = _ip_layout(packet)
    except MalformedError:
        return None
    size = len(packet)
    if proto == _PROTO_TCP:
        if size < start + 20:
            return None
        tcp_header = (packet[start + 12] >> 4) * 4
        if tcp_header < 20 or start + tcp_header > size:
            return None
        return start, _TCP_CSUM_OFFSET
    if proto == _PROTO_UDP:
        if size < start + 8 or _U16.unpack_from(packet, start + 4)[0] != size - start:
            return None
        return start, _UDP_CSUM_OFFSET
    return None


def _partial_template(
    packet: memoryview, version: int, start: int, headers: int, proto: int
) -> tuple[bytearray, int, int, int]:
    """The frame byte and headers to finish per segment, and the sums that do not change.

    Returns 0x04 + the headers, the IPv4 header's sum without its total
    length, identification and checksum (0 for IPv6), the first
    identification, and the pseudo-header's sum without its length, so that
    each segment adds only its own values. These sums cover headers alone,
    whole 16-bit words at even offsets, so unlike the rest of the module they
    are taken in network byte order (``"big"``) and written with ``"!H"``.
    """
    h = bytearray(_PARTIAL_TYPE)
    h += packet[:headers]
    if version == 4:
        h[3:7] = bytes(4)  # total length, identification (after the frame byte)
        h[11:13] = bytes(2)  # header checksum
        ip_base = int.from_bytes(h[1 : 1 + start], "big")
        ident = _U16.unpack_from(packet, 4)[0]
        addrs = packet[12:20]
    else:
        ip_base = ident = 0
        addrs = packet[8:40]
    return h, ip_base, ident, int.from_bytes(addrs, "big") + proto


# Per-segment fields, each struct starting at a 16-bit word of its header.
_IPV4_MUTABLE: Final = struct.Struct("!HHHBBH")  # bytes 2-11: length, id, frag, TTL, proto, csum
_TCP_MUTABLE: Final = struct.Struct("!IIBBHH")  # bytes 4-17: seq, ack, offset, flags, window, csum
_UDP_MUTABLE: Final = struct.Struct("!HH")  # bytes 4-7: length, checksum


def _partial_tcp(
    packet: memoryview, version: int, start: int, headers: int, piece: int
) -> Segments:
    size = len(packet)
    h, ip_base, ident, pseudo = _partial_template(packet, version, start, headers, _PROTO_TCP)
    frag, ttl = _U16.unpack_from(packet, 6)[0], packet[8]
    seq, ack, offset, flags, window, _check = _TCP_MUTABLE.unpack_from(packet, start + 4)
    tcp_at = start + 5  # TCP byte 4, after the frame byte
    payload = size - headers
    count = max(-(-payload // piece), 1)  # an empty payload still makes one segment
    final = count - 1
    full = headers + piece
    full_partial = (pseudo + full - start) % 0xFFFF or 0xFFFF
    first = flags & ~(_FIN | _PSH)
    middle = first & ~_CWR
    pack_ip = _IPV4_MUTABLE.pack_into
    pack_tcp = _TCP_MUTABLE.pack_into
    buffers: list[bytes | memoryview] = []
    append = buffers.append
    for index in range(count):
        at = headers + index * piece
        if index == final:
            end = size
            length = headers + size - at
            partial = (pseudo + length - start) % 0xFFFF or 0xFFFF
            seg_flags = flags if index == 0 else flags & ~_CWR
        else:
            end = at + piece
            length = full
            partial = full_partial
            seg_flags = first if index == 0 else middle
        if version == 4:
            seg_ident = (ident + index) & 0xFFFF
            check = -(ip_base + length + seg_ident) % 0xFFFF
            pack_ip(h, 3, length, seg_ident, frag, ttl, _PROTO_TCP, check)
        else:
            _U16.pack_into(h, 5, length - 40)
        seg_seq = (seq + at - headers) & 0xFFFFFFFF
        pack_tcp(h, tcp_at, seg_seq, ack, offset, seg_flags, window, partial)
        append(bytes(h))
        if end > at:
            append(packet[at:end])
    datagram = 1 + (full if count > 1 else size)
    return Segments(buffers, datagram, count, count * headers + payload)


def _partial_udp(packet: memoryview, version: int, start: int, piece: int) -> Segments:
    size = len(packet)
    headers = start + 8
    h, ip_base, ident, pseudo = _partial_template(packet, version, start, headers, _PROTO_UDP)
    frag, ttl = _U16.unpack_from(packet, 6)[0], packet[8]
    udp_at = start + 5  # UDP byte 4, after the frame byte
    payload = size - headers
    count = max(-(-payload // piece), 1)
    pack_ip = _IPV4_MUTABLE.pack_into
    pack_udp = _UDP_MUTABLE.pack_into
    buffers: list[bytes | memoryview] = []
    append = buffers.append
    for index in range(count):
        at = headers + index * piece
        end = min(at + piece, size)
        udp_length = 8 + end - at
        if version == 4:
            length = start + udp_length
            seg_ident = (ident + index) & 0xFFFF
            check = -(ip_base + length + seg_ident) % 0xFFFF
            pack_ip(h, 3, length, seg_ident, frag, ttl, _PROTO_UDP, check)
        else:
            _U16.pack_into(h, 5, udp_length)
        pack_udp(h, udp_at, udp_length, (pseudo + udp_length) % 0xFFFF or 0xFFFF)
        append(bytes(h))
        if end > at:
            append(packet[at:end])
    datagram = 1 + (headers + piece if count > 1 else size)
    return Segments(buffers, datagram, count, count * headers + payload)


def _fill_checksum(
    packet: bytes | memoryview, csum_start: int, csum_offset: int, *, mangle_zero: bool
) -> bytes:
    """Complete a checksum whose field holds the pseudo-header sum (CHECKSUM_PARTIAL)."""
    at = csum_start + csum_offset
    if at + 2 > len(packet):
        raise MalformedError(
            f"checksum at {csum_start}+{csum_offset} outside a {len(packet)}-byte packet"
        )
    # The field's current value is the pseudo-header sum and is meant to be
    # summed along with the data, so nothing is zeroed first.
    result = -_sum(packet[csum_start:]) % 0xFFFF
    if mangle_zero and not result:
        result = 0xFFFF
    out = bytearray(packet)
    _U16_LE.pack_into(out, at, result)
    return bytes(out)


def checksum_partial_fill(packet: bytes) -> bytes:
    """Complete the TCP/UDP checksum of a DATA-CSUM-PARTIAL packet (frame 0x04).

    The field holds only the pseudo-header sum, as the kernel leaves it for
    CHECKSUM_PARTIAL. A computed 0 is written as 0xFFFF, as
    ``skb_checksum_help`` does (and RFC 768 requires for UDP). `packet` is
    network input: raises only MalformedError.
    """
    _version, start, proto = _ip_layout(packet)
    if proto not in (_PROTO_TCP, _PROTO_UDP):
        raise MalformedError(f"checksum partial on protocol {proto}")
    offset = _TCP_CSUM_OFFSET if proto == _PROTO_TCP else _UDP_CSUM_OFFSET
    return _fill_checksum(packet, start, offset, mangle_zero=True)


class _Run:
    """Segments of one flow being merged, in sequence order."""

    __slots__ = (
        "df_clear",
        "fast",
        "first",
        "flags",
        "gso_size",
        "headers",
        "ident",
        "key",
        "length",
        "match",
        "next_seq",
        "partial",
        "payloads",
        "psh",
        "start",
        "version",
    )

    def __init__(
        self,
        first: bytes,
        version: int,
        start: int,
        headers: int,
        match: bytes,
        seq: int,
        ident: int,
        df_clear: bool,
        partial: bool,
    ) -> None:
        self.first = first
        self.partial = partial
        self.version = version
        self.start = start
        self.headers = headers
        self.match = match
        self.gso_size = len(first) - headers
        self.next_seq = (seq + self.gso_size) & 0xFFFFFFFF
        self.ident = ident
        self.df_clear = df_clear
        self.length = len(first)
        self.payloads: list[memoryview] = [memoryview(first)[headers:]]
        self.psh = False
        # For `coalesce`'s fast path (IPv4 without options, the common case): the
        # flow (addresses and ports) and what `_classify`'s `match` holds, read
        # straight off a follower at the same offsets; flags apart.
        if version == 4:
            self.key = first[12:24]
            self.fast = first[0:2] + first[6:10] + first[28:33] + first[34:36] + first[40:headers]
            self.flags = first[33] & ~(_PSH | _CWR)
        else:
            self.key = b""
            self.fast = b""
            self.flags = 0

    def extend(self, packet: bytes, payload: int, flags: int) -> bool:
        """Append the next segment (`payload` bytes after the run's headers).

        True when nothing may follow it: a short or pushed segment ends the run.
        """
        self.payloads.append(memoryview(packet)[self.headers :])
        self.length += payload
        self.next_seq = (self.next_seq + payload) & 0xFFFFFFFF
        if flags & _PSH or payload < self.gso_size:
            self.psh = bool(flags & _PSH)
            return True
        return False

    def frame(self) -> bytes:
        """virtio_net_hdr + the packet: a lone segment as it came, a GSO packet otherwise."""
        if len(self.payloads) == 1:
            if self.partial:
                return _partial_vnet(self.start, _TCP_CSUM_OFFSET) + self.first
            return _NONE_HDR + self.first
        version, start = self.version, self.start
        h = bytearray(self.first[: self.headers])
        tcp_length = self.length - start
        if version == 4:
            _U16.pack_into(h, 2, self.length)
            h[10] = h[11] = 0
            _U16_LE.pack_into(h, 10, -_sum(h[:start]) % 0xFFFF)
        else:
            _U16.pack_into(h, 4, tcp_length)
        if self.psh:
            h[start + 13] |= _PSH
        # NEEDS_CSUM wants the folded, uncomplemented pseudo-header sum in the field.
        partial = _pseudo_sum(h, version, _PROTO_TCP, tcp_length) % 0xFFFF or 0xFFFF
        _U16_LE.pack_into(h, start + _TCP_CSUM_OFFSET, partial)
        vnet = VnetHdr(
            flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type=GsoType.TCPV4 if version == 4 else GsoType.TCPV6,
            hdr_len=self.headers,
            gso_size=self.gso_size,
            csum_start=start,
            csum_offset=_TCP_CSUM_OFFSET,
            ecn=bool(h[start + 13] & _CWR),
        )
        return b"".join((vnet.pack(), h, *self.payloads))


# What `_classify` found out about one packet.
_PASS: Final = 0  # cannot hold TCP: pass through, touching no run
_BARRIER: Final = 1  # might be TCP of any flow: pass through and end every run
_FLOW_ONLY: Final = 2  # TCP of a known flow that cannot merge: ends that flow's run
_CANDIDATE: Final = 3


def coalesce(
    packets: Sequence[bytes], max_size: int = 65535, *, partial: Sequence[bool] | None = None
) -> list[bytes]:
    """Merge runs of TCP segments into GSO packets for a TUN opened with IFF_VNET_HDR.

    Returns one frame (virtio_net_hdr + IP packet) per merged run or unmerged
    packet. A run is emitted where its first segment arrived, so packets of
    different flows may swap places but those of one flow never do: a packet
    of a flow that does not join the flow's open run closes it, and a packet
    whose flow cannot be told (a fragment, IPv6 extension headers, garbage)
    closes every run. No merged packet exceeds `max_size` (nor 65535) bytes.
    Never raises on bad packets: what cannot merge passes through unchanged.

    ``partial[i]`` true says that ``packets[i]`` came in a DATA-CSUM-PARTIAL
    frame: its checksum field holds only the pseudo-header sum, and the outer
    UDP checksum covered its bytes in flight. Such a segment is merged under
    the same rules, its TCP checksum aside, and may share a run with complete
    ones, since the merged packet gets a fresh pseudo-header sum and NEEDS_CSUM
    anyway. Left alone, it goes out with NEEDS_CSUM, GSO NONE and the
    checksum position of its TCP or UDP header, so that the kernel completes
    the checksum; one whose layout cannot be parsed goes out with the plain
    header, and the kernel drops it on its checksum. ValueError if `partial`
    and `packets` differ in length.
    """
    if len(packets) == 1 and (partial is None or len(partial) == 1):
        # Nothing to merge with (the common case without GRO): what the loop
        # below gives for a lone packet, without its bookkeeping.
        return [lone_frame(packets[0], bool(partial and partial[0]))]
    marks = _partial_marks(packets, partial)
    limit = min(max_size, _MAX_IP_LEN)
    out: list[bytes | _Run] = []
    runs: dict[bytes, _Run] = {}
    # The run the previous packet joined or opened, if still open: a GRO batch is
    # mostly one flow, whose next segment `_follows` can judge without `_classify`.
    last: _Run | None = None
    for packet, is_partial in zip(packets, marks, strict=False):  # marks may be endless
        if last is not None and is_partial and _follows(last, packet, limit):
            if last.extend(packet, len(packet) - last.headers, packet[33]):
                del runs[last.key]  # `_classify`'s key of an IPv4 flow
                last = None
            continue
        last = None
        kind, key, info = _classify(packet, is_partial)
        if kind != _CANDIDATE:
            if kind == _BARRIER:
                runs.clear()
            elif kind == _FLOW_ONLY:
                runs.pop(key, None)
            out.append((_lone_partial_vnet(packet) if is_partial else _NONE_HDR) + packet)
            continue
        assert info is not None
        version, start, headers, match, seq, ident, df_clear, flags = info
        payload = len(packet) - headers
        run = runs.get(key)
        if (
            run is not None
            and seq == run.next_seq
            and match == run.match
            and payload <= run.gso_size
            and not flags & _CWR
            and run.length + payload <= limit
            and (not df_clear or ident == (run.ident + len(run.payloads)) & 0xFFFF)
        ):
            if run.extend(packet, payload, flags):
                del runs[key]  # nothing may follow a short or pushed segment
            elif version == 4:
                last = run
            continue
        if flags & _PSH:
            runs.pop(key, None)
            vnet = _partial_vnet(start, _TCP_CSUM_OFFSET) if is_partial else _NONE_HDR
            out.append(vnet + packet)
            continue
        run = _Run(packet, version, start, headers, match, seq, ident, df_clear, is_partial)
        runs[key] = run
        out.append(run)
        if version == 4:
            last = run
    return [item if isinstance(item, bytes) else item.frame() for item in out]


def _partial_marks(packets: Sequence[bytes], partial: Sequence[bool] | None) -> Iterable[bool]:
    if partial is None:
        return repeat(False)
    if len(partial) != len(packets):
        raise ValueError(f"{len(partial)} partial marks for {len(packets)} packets")
    return partial


def _follows(run: _Run, packet: bytes, limit: int) -> bool:
    """Whether a DATA-CSUM-PARTIAL IPv4 `packet` extends `run`, by the rules of `_classify`.

    The same checks as `_classify` and `coalesce`'s join, against the run's first
    segment instead of from scratch: same flow, IPv4 without options (the
    version/IHL byte is in `fast`), no fragment (the flags and offset are),
    a correct header checksum and length, the same ACK, data offset, window
    and options, acceptable flags, the next sequence number and IP id. The TCP
    checksum is not checked: a partial segment's field holds the pseudo-header
    sum. A packet this says no to gets the full treatment.
    """
    size = len(packet)
    headers = run.headers
    if size <= headers or packet[12:24] != run.key:
        return False
    if packet[0:2] + packet[6:10] + packet[28:33] + packet[34:36] + packet[40:headers] != run.fast:
        return False
    flags = packet[33]
    if flags & ~(_PSH | _CWR) != run.flags or flags & _CWR:
        return False
    if _U16.unpack_from(packet, 2)[0] != size or _sum(packet[:20]) % 0xFFFF:
        return False
    payload = size - headers
    if (
        int.from_bytes(packet[24:28], "big") != run.next_seq
        or payload > run.gso_size
        or run.length + payload > limit
    ):
        return False
    if run.df_clear:
        ident: int = _U16.unpack_from(packet, 4)[0]
        return ident == (run.ident + len(run.payloads)) & 0xFFFF
    return True


def _partial_vnet(csum_start: int, csum_offset: int) -> bytes:
    """The header for one packet whose checksum the kernel is to complete."""
    return _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, csum_start, csum_offset)


def lone_frame(packet: bytes, partial: bool) -> bytes:
    """The TUN frame for one packet that merges with nothing: what `coalesce` gives for it."""
    if not partial:
        return _NONE_HDR + packet
    return _lone_partial_vnet(packet) + packet


def _lone_partial_vnet(packet: bytes) -> bytes:
    """NEEDS_CSUM at the packet's TCP/UDP checksum, or NONE when there is none to find."""
    layout = _partial_layout(packet)
    return _NONE_HDR if layout is None else _partial_vnet(*layout)


_Info = tuple[int, int, int, bytes, int, int, bool, int]


def _classify(packet: bytes, partial: bool) -> tuple[int, bytes, _Info | None]:
    """Decide what `coalesce` may do with one packet; the key names its TCP flow.

    The TCP checksum is verified unless the packet is `partial` (its field
    holds the pseudo-header sum); every other check applies to both.
    """
    size = len(packet)
    if size < 20:
        return _BARRIER, b"", None
    version = packet[0] >> 4
    if version == 4:
        first, total, ident, frag, proto = _IPV4_FIELDS.unpack_from(packet)
        if proto != _PROTO_TCP:
            return _PASS, b"", None
        start = (first & 0x0F) * 4
        if frag & _IPV4_MF_OFFSET or start < 20 or size < start + 20:
            return _BARRIER, b"", None
        key = packet[12:20] + packet[start : start + 4]
        if start != 20 or total != size or _sum(packet[:20]) % 0xFFFF:
            return _FLOW_ONLY, key, None
        ip_match = packet[0:2] + packet[6:10]
        addrs_at = 12
        df_clear = not frag & _IPV4_DF
    elif version == 6:
        if size < 60:
            return _BARRIER, b"", None
        next_header = packet[6]
        if next_header != _PROTO_TCP:
            return (_PASS if next_header in _IPV6_FINAL_NON_TCP else _BARRIER), b"", None
        start = 40
        key = packet[8:40] + packet[40:44]
        if _U16.unpack_from(packet, 4)[0] + 40 != size:
            return _FLOW_ONLY, key, None
        ip_match = packet[0:4] + packet[7:8]
        addrs_at = 8
        ident, df_clear = 0, False
    else:
        return _BARRIER, b"", None

    seq, offset, flags = _TCP_FIELDS.unpack_from(packet, start)
    headers = start + (offset >> 4) * 4
    if (
        headers < start + 20
        or headers >= size  # pure ACKs carry nothing to merge
        or flags & _NEVER_MERGED
        or not flags & _ACK
        # Checksum over the pseudo-header: the addresses are contiguous with the
        # TCP header here (no IPv4 options, no IPv6 extension headers).
        or (
            not partial
            and (_sum(packet[addrs_at:]) + _swap16(_PROTO_TCP) + _swap16(size - start)) % 0xFFFF
        )
    ):
        return _FLOW_ONLY, key, None
    # Everything that must be equal along a run, PSH and CWR aside (they may
    # close and open one); ports and addresses are already in the key.
    match = (
        ip_match
        + packet[start + 8 : start + 13]
        + bytes((flags & ~(_PSH | _CWR),))
        + packet[start + 14 : start + 16]
        + packet[start + 20 : headers]
    )
    return _CANDIDATE, key, (version, start, headers, match, seq, ident, df_clear, flags)
