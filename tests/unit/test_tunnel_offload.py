"""TUN offloads: split against a naive segmenter, coalesce against a reference grouping.

The DATA-CSUM-PARTIAL path is checked against the complete-checksum one: its
datagrams, once completed, are the packets `split_untrusted` makes, and
`coalesce` merges them as it merges complete segments.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ground.errors import MalformedError
from paft.flow import PROTO_TCP, PROTO_UDP
from paft.packets import (
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    build_ipv4,
    build_ipv6,
    build_ipv6_options_header,
    build_tcp,
    build_udp,
    internet_checksum,
    pack_address,
)
from tunnel.frames import Data, DataCsumPartial, decode_frame_untrusted
from tunnel.offload import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET_HDR_LEN,
    GsoType,
    Segments,
    VnetHdr,
    _partial_layout,
    _partial_layout_general,
    checksum_partial_fill,
    coalesce,
    split_untrusted,
    tunnel_datagram_untrusted,
    tunnel_segments_untrusted,
)

TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80
SRC4, DST4 = "192.0.2.1", "198.51.100.2"
SRC6, DST6 = "2001:db8::1", "2001:db8::2"
BIG_MTU = 70000
NONE_HDR = VnetHdr().pack()


# --- packet construction for the tests ---------------------------------------------


def pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = pack_address(src), pack_address(dst)
    if len(s) == 4:
        return s + d + struct.pack("!xBH", proto, length)
    return s + d + struct.pack("!I3xB", length, proto)


def partial_sum(src: str, dst: str, proto: int, length: int) -> int:
    """The folded, uncomplemented pseudo-header sum the kernel leaves for NEEDS_CSUM."""
    return ~internet_checksum(pseudo_header(src, dst, proto, length)) & 0xFFFF


def with_checksum(segment: bytes, at: int, value: int) -> bytes:
    return segment[:at] + struct.pack("!H", value) + segment[at + 2 :]


def tcp_segment(
    src: str,
    dst: str,
    *,
    sport: int = 40000,
    dport: int = 80,
    seq: int = 0,
    ack: int = 0,
    flags: int = TCP_ACK,
    window: int = 65535,
    payload: bytes = b"",
    options: bytes = b"",
) -> bytes:
    """`build_tcp`, or the same by hand when TCP options are wanted."""
    if not options:
        return build_tcp(
            sport, dport, src, dst, seq=seq, ack=ack, flags=flags, window=window, payload=payload
        )
    assert len(options) % 4 == 0
    doff = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0)
    segment = header + options + payload
    pseudo = pseudo_header(src, dst, PROTO_TCP, len(segment))
    return with_checksum(segment, 16, internet_checksum(pseudo + segment))


@dataclass(frozen=True)
class Seg:
    """One TCP packet, described by the fields the tests vary."""

    v6: bool = False
    sport: int = 40000
    dport: int = 80
    seq: int = 1000
    ack: int = 5000
    flags: int = TCP_ACK
    window: int = 65535
    payload: bytes = b""
    ident: int = 0
    df: bool = True
    ttl: int = 64
    ip_options: bytes = b""
    tcp_options: bytes = b""
    traffic_class: int = 0
    flow_label: int = 0
    bad_checksum: bool = False

    @property
    def src(self) -> str:
        return SRC6 if self.v6 else SRC4

    @property
    def dst(self) -> str:
        return DST6 if self.v6 else DST4

    @property
    def ip_header_len(self) -> int:
        return 40 if self.v6 else 20 + len(self.ip_options)

    @property
    def header_len(self) -> int:
        return self.ip_header_len + 20 + len(self.tcp_options)

    def tcp(self) -> bytes:
        segment = tcp_segment(
            self.src,
            self.dst,
            sport=self.sport,
            dport=self.dport,
            seq=self.seq,
            ack=self.ack,
            flags=self.flags,
            window=self.window,
            payload=self.payload,
            options=self.tcp_options,
        )
        if self.bad_checksum:
            (check,) = struct.unpack_from("!H", segment, 16)
            segment = with_checksum(segment, 16, check ^ 0x0101)
        return segment

    def ip(self, transport: bytes) -> bytes:
        if self.v6:
            return build_ipv6(
                self.src,
                self.dst,
                PROTO_TCP,
                transport,
                hop_limit=self.ttl,
                traffic_class=self.traffic_class,
                flow_label=self.flow_label,
            )
        return build_ipv4(
            self.src,
            self.dst,
            PROTO_TCP,
            transport,
            ident=self.ident,
            flags_frag=0x4000 if self.df else 0,
            ttl=self.ttl,
            options=self.ip_options,
        )

    def packet(self) -> bytes:
        return self.ip(self.tcp())

    def super_frame(self, mss: int) -> bytes:
        """A TUN read of this segment as a TSO super-packet (pseudo-header sum in the field)."""
        transport = with_checksum(
            self.tcp(), 16, partial_sum(self.src, self.dst, PROTO_TCP, len(self.tcp()))
        )
        hdr = VnetHdr(
            flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type=GsoType.TCPV6 if self.v6 else GsoType.TCPV4,
            hdr_len=self.header_len,
            gso_size=mss,
            csum_start=self.ip_header_len,
            csum_offset=16,
            ecn=bool(self.flags & TCP_CWR),
        )
        return hdr.pack() + self.ip(transport)


def reference_split(seg: Seg, mss: int, mtu: int) -> list[bytes]:
    """Naive TSO: rebuild every segment from scratch with the paft builders."""
    size = seg.header_len + len(seg.payload)
    if seg.header_len + mss > mtu:
        mss = max(len(seg.payload), 1) if size <= mtu else mtu - seg.header_len
    chunks = [seg.payload[i : i + mss] for i in range(0, len(seg.payload), mss)] or [b""]
    out = []
    for index, chunk in enumerate(chunks):
        flags = seg.flags
        if index != len(chunks) - 1:
            flags &= ~(TCP_FIN | TCP_PSH)
        if index != 0:
            flags &= ~TCP_CWR
        piece = replace(
            seg,
            seq=(seg.seq + index * mss) & 0xFFFFFFFF,
            flags=flags,
            payload=chunk,
            ident=(seg.ident + index) & 0xFFFF,
        )
        out.append(piece.packet())
    return out


def reference_merged(segs: list[Seg]) -> bytes:
    """The GSO frame a run of segments should become, built from the first one's fields."""
    head = segs[0]
    flags = head.flags | (segs[-1].flags & TCP_PSH)
    whole = replace(head, flags=flags, payload=b"".join(s.payload for s in segs))
    tcp = whole.tcp()
    tcp = with_checksum(tcp, 16, partial_sum(whole.src, whole.dst, PROTO_TCP, len(tcp)))
    hdr = VnetHdr(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type=GsoType.TCPV6 if head.v6 else GsoType.TCPV4,
        hdr_len=head.header_len,
        gso_size=len(head.payload),
        csum_start=head.ip_header_len,
        csum_offset=16,
        ecn=bool(head.flags & TCP_CWR),
    )
    return hdr.pack() + whole.ip(tcp)


def assert_checksums_valid(packet: bytes) -> None:
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        assert internet_checksum(packet[:ihl]) == 0
        src, dst, start = packet[12:16], packet[16:20], ihl
        proto = packet[9]
        pseudo = src + dst + struct.pack("!xBH", proto, len(packet) - start)
    else:
        src, dst, start = packet[8:24], packet[24:40], 40
        proto = packet[6]
        pseudo = src + dst + struct.pack("!I3xB", len(packet) - start, proto)
    assert internet_checksum(pseudo + packet[start:]) == 0


# --- virtio_net_hdr -------------------------------------------------------------------


def test_vnet_hdr_layout_is_little_endian() -> None:
    hdr = VnetHdr(1, GsoType.TCPV4, 0x0034, 0x05A8, 0x0014, 0x0010)
    assert hdr.pack().hex() == "0101" + "3400" + "a805" + "1400" + "1000"
    assert VnetHdr(0, GsoType.TCPV6, ecn=True).pack()[1] == 0x84
    assert VnetHdr.unpack_untrusted(hdr.pack() + b"trailing") == hdr
    assert len(hdr.pack()) == VNET_HDR_LEN


@given(
    st.sampled_from([0, 1, 2, 3]),
    st.sampled_from(list(GsoType)),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.booleans(),
)
def test_vnet_hdr_round_trip(
    flags: int, gso: GsoType, hdr_len: int, size: int, start: int, offset: int, ecn: bool
) -> None:
    ecn = ecn and gso in (GsoType.TCPV4, GsoType.TCPV6)
    hdr = VnetHdr(flags, gso, hdr_len, size, start, offset, ecn)
    assert VnetHdr.unpack_untrusted(hdr.pack()) == hdr


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x00" * 9, b"\x04" + b"\x00" * 9, b"\x00\x02" + b"\x00" * 8, b"\x00\x85" + b"\x00" * 8],
    ids=["empty", "short", "unknown-flag", "unknown-gso", "ecn-on-udp"],
)
def test_vnet_hdr_rejects(raw: bytes) -> None:
    with pytest.raises(MalformedError):
        VnetHdr.unpack_untrusted(raw)


def test_vnet_hdr_pack_out_of_range() -> None:
    with pytest.raises(ValueError):
        VnetHdr(gso_size=0x10000).pack()


# --- split ----------------------------------------------------------------------------

FLAG_SETS = [
    TCP_ACK,
    TCP_ACK | TCP_PSH,
    TCP_ACK | TCP_FIN,
    TCP_ACK | TCP_PSH | TCP_FIN,
    TCP_ACK | TCP_CWR,
    TCP_ACK | TCP_CWR | TCP_ECE | TCP_PSH,
    TCP_ACK | TCP_ECE,
]


@st.composite
def streams(draw: st.DrawFn) -> tuple[Seg, int, int]:
    v6 = draw(st.booleans())
    # The length drawn on its own: `st.binary` favours short strings, which would
    # leave most streams a single segment.
    payload = random.Random(draw(st.integers(0, 2**32))).randbytes(draw(st.integers(0, 4000)))
    mss = draw(st.integers(24, 1460))
    seg = Seg(
        v6=v6,
        sport=draw(st.integers(1, 0xFFFF)),
        dport=draw(st.integers(1, 0xFFFF)),
        seq=draw(st.integers(0, 0xFFFFFFFF)),
        ack=draw(st.integers(0, 0xFFFFFFFF)),
        flags=draw(st.sampled_from(FLAG_SETS)),
        window=draw(st.integers(0, 0xFFFF)),
        payload=payload,
        ident=draw(st.integers(0, 0xFFFF)),
        df=draw(st.booleans()),
        ttl=draw(st.integers(1, 255)),
        ip_options=b"" if v6 else draw(st.sampled_from([b"", b"\x01\x01\x01\x00"])),
        traffic_class=draw(st.integers(0, 255)),
        flow_label=draw(st.integers(0, 0xFFFFF)),
    )
    # Usually the MTU the kernel chose the MSS for; sometimes smaller, to force a re-cut.
    shrink = draw(st.sampled_from([0, 0, 0, 1, 7, mss // 2]))
    return seg, mss, seg.header_len + mss - shrink


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_split_tcp_matches_naive_segmenter(case: tuple[Seg, int, int]) -> None:
    seg, mss, mtu = case
    segments = split_untrusted(seg.super_frame(mss), mtu)
    assert segments == reference_split(seg, mss, mtu)
    for packet in segments:
        assert len(packet) <= mtu
        assert_checksums_valid(packet)


def test_split_tcp_copies_tcp_options_and_ip_options() -> None:
    seg = Seg(
        payload=bytes(range(256)) * 12,
        tcp_options=b"\x01\x01\x08\x0a" + bytes(range(8)),
        ip_options=b"\x01\x01\x01\x00",
        flags=TCP_ACK | TCP_PSH,
        seq=0xFFFFFF00,
        ident=0xFFFE,
    )
    segments = split_untrusted(seg.super_frame(1000), 1500)
    assert len(segments) == 4
    assert segments == reference_split(seg, 1000, 1500)
    assert [p[1] for p in segments] == [0] * 4  # TOS untouched
    assert [struct.unpack_from("!H", p, 4)[0] for p in segments] == [0xFFFE, 0xFFFF, 0, 1]


def udp_super_frame(v6: bool, payload: bytes, gso: int, ident: int = 7) -> bytes:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", 5000, 6000, length, partial_sum(src, dst, PROTO_UDP, length))
    if v6:
        packet = build_ipv6(src, dst, PROTO_UDP, udp + payload)
    else:
        packet = build_ipv4(src, dst, PROTO_UDP, udp + payload, ident=ident, flags_frag=0x4000)
    start = 40 if v6 else 20
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GsoType.UDP_L4, start + 8, gso, start, 6)
    return hdr.pack() + packet


@settings(max_examples=100)
@given(st.booleans(), st.binary(min_size=1, max_size=3000), st.integers(1, 1400))
def test_split_udp_l4_gives_one_datagram_per_segment(v6: bool, payload: bytes, gso: int) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    mtu = (48 if v6 else 28) + gso
    datagrams = split_untrusted(udp_super_frame(v6, payload, gso), mtu)
    chunks = [payload[i : i + gso] for i in range(0, len(payload), gso)]
    expected = []
    for index, chunk in enumerate(chunks):
        udp = build_udp(5000, 6000, chunk, src, dst)
        if v6:
            expected.append(build_ipv6(src, dst, PROTO_UDP, udp))
        else:
            expected.append(
                build_ipv4(src, dst, PROTO_UDP, udp, ident=7 + index, flags_frag=0x4000)
            )
    assert datagrams == expected
    for packet in datagrams:
        assert len(packet) <= mtu
        assert_checksums_valid(packet)


def test_split_udp_l4_refuses_datagrams_over_mtu() -> None:
    with pytest.raises(MalformedError):
        split_untrusted(udp_super_frame(False, b"x" * 3000, 1400), 1000)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("proto", [PROTO_TCP, PROTO_UDP])
def test_split_none_completes_a_partial_checksum(v6: bool, proto: int) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    payload = b"hello, world!"  # odd length on purpose
    if proto == PROTO_TCP:
        full = build_tcp(1, 2, src, dst, seq=9, flags=TCP_ACK | TCP_PSH, payload=payload)
        at = 16
    else:
        full = build_udp(1, 2, payload, src, dst)
        at = 6
    partial = with_checksum(full, at, partial_sum(src, dst, proto, len(full)))
    build = build_ipv6 if v6 else build_ipv4
    start = 40 if v6 else 20
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GsoType.NONE, start + 20, 0, start, at)
    assert split_untrusted(hdr.pack() + build(src, dst, proto, partial), 1500) == [
        build(src, dst, proto, full)
    ]
    assert checksum_partial_fill(build(src, dst, proto, partial)) == build(src, dst, proto, full)
    # Without NEEDS_CSUM the packet is passed on as it is.
    plain = VnetHdr().pack() + build(src, dst, proto, full)
    assert split_untrusted(plain, 1500) == [build(src, dst, proto, full)]


def test_checksum_partial_fill_rejects() -> None:
    icmp = build_ipv4(SRC4, DST4, 1, b"\x08\x00\x00\x00\x00\x00\x00\x00")
    for bad in (b"", b"\x45" * 19, icmp, build_ipv4(SRC4, DST4, PROTO_TCP, b"short")):
        with pytest.raises(MalformedError):
            checksum_partial_fill(bad)


def rehead(frame: bytes, **changes: object) -> bytes:
    """`frame` with some virtio_net_hdr fields changed."""
    return replace(VnetHdr.unpack_untrusted(frame), **changes).pack() + frame[VNET_HDR_LEN:]  # type: ignore[arg-type]


def _malformed_frames() -> list[tuple[str, bytes, int]]:
    good = Seg(payload=b"y" * 3000).super_frame(1000)
    v6 = Seg(v6=True, payload=b"y" * 3000).super_frame(1000)
    hdr = VnetHdr.unpack_untrusted(good)

    body = bytearray(good[VNET_HDR_LEN:])
    body[2:4] = b"\x00\x30"  # total length lies
    return [
        ("hdr_len-beyond", rehead(good, hdr_len=5000), 1500),
        ("csum_start-wrong", rehead(good, csum_start=24), 1500),
        ("csum_offset-wrong", rehead(good, csum_offset=6), 1500),
        ("gso_size-0", rehead(good, gso_size=0), 1500),
        ("tcpv6-on-v4", rehead(good, gso_type=GsoType.TCPV6), 1500),
        ("tcpv4-on-v6", rehead(v6, gso_type=GsoType.TCPV4), 1500),
        ("udp_l4-on-tcp", rehead(good, gso_type=GsoType.UDP_L4), 1500),
        ("ufo", rehead(good, gso_type=GsoType.UDP), 1500),
        ("unknown-gso", bytes([1, 2]) + good[2:], 1500),
        ("truncated", good[:-1], 1500),
        ("ip-length", hdr.pack() + bytes(body), 1500),
        ("none-over-mtu", VnetHdr().pack() + good[VNET_HDR_LEN:], 1500),
        ("none-csum-outside", rehead(good, gso_type=GsoType.NONE, csum_start=4000), BIG_MTU),
        ("mtu-below-headers", good, 40),
        ("not-ip", hdr.pack() + b"\x00" * 60, 1500),
    ]


MALFORMED = _malformed_frames()


@pytest.mark.parametrize(
    ("frame", "mtu"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_split_rejects_inconsistent_frames(frame: bytes, mtu: int) -> None:
    with pytest.raises(MalformedError):
        split_untrusted(frame, mtu)


@settings(max_examples=500)
@given(st.binary(max_size=200), st.integers(1, 2000))
def test_split_random_bytes_raise_only_malformed(frame: bytes, mtu: int) -> None:
    try:
        segments = split_untrusted(frame, mtu)
    except MalformedError:
        return
    assert all(len(p) <= mtu for p in segments)


@settings(max_examples=500)
@given(st.data())
def test_split_mutated_frames_raise_only_malformed(data: st.DataObject) -> None:
    seg = Seg(v6=data.draw(st.booleans()), payload=b"z" * 900, flags=TCP_ACK | TCP_FIN)
    frame = bytearray(seg.super_frame(200))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, 80))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    mtu = data.draw(st.integers(1, 1500))
    try:
        segments = split_untrusted(bytes(frame[:cut] if cut < 100 else frame), mtu)
    except MalformedError:
        return
    assert all(len(p) <= mtu for p in segments)


# --- tunnel segments ------------------------------------------------------------------


def to_partial(packet: bytes) -> bytes:
    """A complete TCP/UDP packet with its checksum field cut back to the pseudo-header sum."""
    if packet[0] >> 4 == 4:
        start, proto = (packet[0] & 0x0F) * 4, packet[9]
        pseudo = packet[12:20] + struct.pack("!xBH", proto, len(packet) - start)
    else:
        start, proto = 40, packet[6]
        pseudo = packet[8:40] + struct.pack("!I3xB", len(packet) - start, proto)
    at = start + (16 if proto == PROTO_TCP else 6)
    return with_checksum(packet, at, ~internet_checksum(pseudo) & 0xFFFF)


def zero_as_ffff(packet: bytes) -> bytes:
    """`packet` as a CHECKSUM_PARTIAL completion writes it: a TCP checksum of 0 becomes 0xFFFF.

    `split_untrusted` writes a computed 0 as 0 on TCP segments, as the kernel's
    software TSO does; completing a partial checksum writes 0xFFFF, as
    ``skb_checksum_help`` does. Both are the same one's-complement value.
    """
    start = 40 if packet[0] >> 4 == 6 else (packet[0] & 0x0F) * 4
    proto = packet[6] if packet[0] >> 4 == 6 else packet[9]
    if proto == PROTO_TCP and packet[start + 16 : start + 18] == b"\x00\x00":
        return with_checksum(packet, start + 16, 0xFFFF)
    return packet


def datagrams(segments: Segments) -> list[bytes]:
    """What ``UDP_SEGMENT`` makes of the gather list: `size`-byte cuts of the whole."""
    data = b"".join(segments.buffers)
    if not segments.size:
        return [data] * segments.count
    return [data[i : i + segments.size] for i in range(0, len(data), segments.size)]


def assert_partial_datagrams(
    segments: Segments, reference: list[bytes], frame: bytes, headers: int
) -> None:
    """`segments` carries `reference` as DATA-CSUM-PARTIAL frames, payload never copied."""
    assert segments.count == len(reference)
    assert segments.inner_bytes == sum(len(p) for p in reference)
    assert b"".join(segments.buffers) == b"".join(b"\x04" + to_partial(p) for p in reference)
    sent = datagrams(segments)
    assert len(sent) == segments.count
    assert all(len(d) == segments.size for d in sent[:-1])
    assert 0 < len(sent[-1]) <= segments.size
    for datagram, packet in zip(sent, reference, strict=True):
        assert decode_frame_untrusted(datagram) == DataCsumPartial(datagram[1:])
        assert checksum_partial_fill(datagram[1:]) == zero_as_ffff(packet)
    # Fresh bytes hold the frame byte and headers alone; payload is sliced from the frame.
    copied = [b for b in segments.buffers if not isinstance(b, memoryview)]
    assert [len(b) for b in copied] == [1 + headers] * segments.count
    for buffer in segments.buffers:
        if isinstance(buffer, memoryview):
            assert buffer.obj is frame


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_tunnel_segments_tcp_are_split_with_partial_checksums(case: tuple[Seg, int, int]) -> None:
    seg, mss, mtu = case
    frame = seg.super_frame(mss)
    segments = tunnel_segments_untrusted(frame, mtu)
    reference = split_untrusted(frame, mtu)
    assert_partial_datagrams(segments, reference, frame, seg.header_len)
    assert all(len(d) - 1 <= mtu for d in datagrams(segments))


@settings(max_examples=100)
@given(st.booleans(), st.binary(max_size=3000), st.integers(1, 1400))
def test_tunnel_segments_udp_l4_are_split_with_partial_checksums(
    v6: bool, payload: bytes, gso: int
) -> None:
    headers = 48 if v6 else 28
    frame = udp_super_frame(v6, payload, gso)
    segments = tunnel_segments_untrusted(frame, headers + gso)
    reference = split_untrusted(frame, headers + gso)
    assert_partial_datagrams(segments, reference, frame, headers)


def test_tunnel_segments_sizes_of_a_super_packet() -> None:
    seg = Seg(payload=b"d" * 10000, flags=TCP_ACK | TCP_PSH)
    segments = tunnel_segments_untrusted(seg.super_frame(1448), 1500)
    assert (segments.size, segments.count) == (1 + 40 + 1448, 7)
    assert segments.inner_bytes == 7 * 40 + 10000
    assert [len(d) for d in datagrams(segments)] == [1489] * 6 + [1 + 40 + 10000 - 6 * 1448]
    # A payload that fits one segment gives one datagram of its own size.
    single = tunnel_segments_untrusted(Seg(payload=b"d" * 10).super_frame(1448), 1500)
    assert (single.size, single.count, single.inner_bytes) == (1 + 40 + 10, 1, 50)


def test_tunnel_segments_pseudo_sum_folding_to_zero_is_written_ffff() -> None:
    mss = 1000
    tcp_length = 20 + mss
    # A destination that makes the full segments' pseudo-header sum 0 modulo 0xFFFF.
    low = -(0xC000 + 0x0201 + 0xC633 + PROTO_TCP + tcp_length) % 0xFFFF
    dst = f"198.51.{low >> 8}.{low & 0xFF}"
    assert partial_sum(SRC4, dst, PROTO_TCP, tcp_length) == 0xFFFF
    tcp = tcp_segment(SRC4, dst, payload=b"p" * (2 * mss + 10))
    tcp = with_checksum(tcp, 16, partial_sum(SRC4, dst, PROTO_TCP, len(tcp)))
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GsoType.TCPV4, 40, mss, 20, 16)
    frame = hdr.pack() + build_ipv4(SRC4, dst, PROTO_TCP, tcp)
    sent = datagrams(tunnel_segments_untrusted(frame, 1500))
    assert [struct.unpack_from("!H", d, 1 + 20 + 16)[0] for d in sent] == [
        0xFFFF,
        0xFFFF,
        partial_sum(SRC4, dst, PROTO_TCP, 30),
    ]
    reference = split_untrusted(frame, 1500)
    assert [checksum_partial_fill(d[1:]) for d in sent] == [zero_as_ffff(p) for p in reference]


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_tunnel_segments_without_needs_csum_are_split_untrusted(case: tuple[Seg, int, int]) -> None:
    seg, mss, mtu = case
    frame = rehead(seg.super_frame(mss), flags=0)
    segments = tunnel_segments_untrusted(frame, mtu)
    reference = split_untrusted(frame, mtu)
    assert segments.buffers == reference
    assert (segments.size, segments.count) == (len(reference[0]), len(reference))
    assert segments.inner_bytes == sum(len(p) for p in reference)
    assert datagrams(segments) == reference
    assert all(decode_frame_untrusted(p) == Data(p) for p in reference)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("proto", [PROTO_TCP, PROTO_UDP])
def test_tunnel_segments_gso_none(v6: bool, proto: int) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    payload = b"hello, world!"
    if proto == PROTO_TCP:
        transport = build_tcp(1, 2, src, dst, seq=9, flags=TCP_ACK | TCP_PSH, payload=payload)
    else:
        transport = build_udp(1, 2, payload, src, dst)
    full = (build_ipv6 if v6 else build_ipv4)(src, dst, proto, transport)
    partial = to_partial(full)
    start = 40 if v6 else 20
    offset = 16 if proto == PROTO_TCP else 6
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GsoType.NONE, start + 8, 0, start, offset)
    frame = hdr.pack() + partial
    segments = tunnel_segments_untrusted(frame, 1500)
    assert b"".join(segments.buffers) == b"\x04" + partial
    assert (segments.size, segments.count, segments.inner_bytes) == (
        1 + len(full),
        1,
        len(full),
    )
    assert not any(isinstance(b, bytes) and len(b) > 1 for b in segments.buffers)  # no copy
    # Without NEEDS_CSUM: the packet as it is, as DATA.
    plain = tunnel_segments_untrusted(NONE_HDR + full, 1500)
    assert (plain.buffers, plain.size, plain.count, plain.inner_bytes) == (
        [full],
        len(full),
        1,
        len(full),
    )
    # The same MTU rule as split_untrusted.
    with pytest.raises(MalformedError):
        tunnel_segments_untrusted(frame, len(full) - 1)
    assert tunnel_segments_untrusted(frame, len(full)).count == 1


def test_tunnel_segments_gso_none_unknown_layout_is_completed_as_data() -> None:
    # IPv6 with a destination options header in front of TCP: csum_start past it.
    tcp = tcp_segment(SRC6, DST6, payload=b"behind an extension header")
    ext = build_ipv6_options_header(PROTO_TCP)
    full = build_ipv6(SRC6, DST6, 60, ext + tcp)
    partial_tcp = with_checksum(tcp, 16, partial_sum(SRC6, DST6, PROTO_TCP, len(tcp)))
    start = 40 + len(ext)
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GsoType.NONE, 0, 0, start, 16)
    segments = tunnel_segments_untrusted(
        hdr.pack() + build_ipv6(SRC6, DST6, 60, ext + partial_tcp), 1500
    )
    assert segments.buffers == [full]
    assert (segments.size, segments.count, segments.inner_bytes) == (len(full), 1, len(full))
    # ICMP, whose checksum has no pseudo-header: the kernel leaves 0 in the field.
    echo = b"\x08\x00\x00\x00\x12\x34\x00\x01" + b"ping"
    icmp = build_ipv4(SRC4, DST4, 1, echo)
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GsoType.NONE, 0, 0, 20, 2)
    completed = tunnel_segments_untrusted(hdr.pack() + icmp, 1500).buffers
    assert completed == [icmp[:22] + struct.pack("!H", internet_checksum(echo)) + icmp[24:]]
    # A checksum position outside the packet cannot be completed.
    hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GsoType.NONE, 0, 0, 20, len(echo))
    with pytest.raises(MalformedError):
        tunnel_segments_untrusted(hdr.pack() + icmp, 1500)


@pytest.mark.parametrize(
    ("frame", "mtu"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_tunnel_segments_reject_inconsistent_frames(frame: bytes, mtu: int) -> None:
    with pytest.raises(MalformedError):
        tunnel_segments_untrusted(frame, mtu)


def assert_within_mtu(segments: Segments, mtu: int) -> None:
    sent = datagrams(segments)
    assert len(sent) == segments.count
    for datagram in sent:
        inner = datagram[1:] if datagram[:1] == b"\x04" else datagram
        assert len(inner) <= mtu
    assert segments.inner_bytes == sum(len(d) - (d[:1] == b"\x04") for d in sent)


@settings(max_examples=500)
@given(st.binary(max_size=200), st.integers(1, 2000))
def test_tunnel_segments_random_bytes_raise_only_malformed(frame: bytes, mtu: int) -> None:
    try:
        segments = tunnel_segments_untrusted(frame, mtu)
    except MalformedError:
        return
    assert_within_mtu(segments, mtu)


@settings(max_examples=500)
@given(st.data())
def test_tunnel_segments_mutated_frames_raise_only_malformed(data: st.DataObject) -> None:
    v6 = data.draw(st.booleans())
    if data.draw(st.booleans()):
        frame = bytearray(Seg(v6=v6, payload=b"z" * 900, flags=TCP_ACK | TCP_FIN).super_frame(200))
    else:
        frame = bytearray(udp_super_frame(v6, b"u" * 900, 200))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, 80))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    mtu = data.draw(st.integers(1, 1500))
    try:
        segments = tunnel_segments_untrusted(bytes(frame[:cut] if cut < 100 else frame), mtu)
    except MalformedError:
        return
    assert_within_mtu(segments, mtu)


def gso_none_frames() -> list[bytes]:
    """TUN reads without GSO: partial TCP/UDP over IPv4/IPv6, complete ones, odd layouts."""
    frames = []
    for v6 in (False, True):
        src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
        start = 40 if v6 else 20
        for proto in (PROTO_TCP, PROTO_UDP):
            if proto == PROTO_TCP:
                transport = build_tcp(1, 2, src, dst, seq=9, flags=TCP_ACK, payload=b"abc")
            else:
                transport = build_udp(1, 2, b"abc", src, dst)
            full = (build_ipv6 if v6 else build_ipv4)(src, dst, proto, transport)
            offset = 16 if proto == PROTO_TCP else 6
            hdr = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GsoType.NONE, 0, 0, start, offset)
            frames += [hdr.pack() + to_partial(full), NONE_HDR + full]
    echo = build_ipv4(SRC4, DST4, 1, b"\x08\x00\x00\x00\x12\x34\x00\x01ping")
    frames.append(VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GsoType.NONE, 0, 0, 20, 2).pack() + echo)
    return frames


@pytest.mark.parametrize("frame", gso_none_frames())
def test_tunnel_datagram_fast_path_agrees_with_tunnel_segments(frame: bytes) -> None:
    datagram = tunnel_datagram_untrusted(frame, 1500)
    segments = tunnel_segments_untrusted(frame, 1500)
    assert segments.count == 1
    if frame[0] == 0:
        assert datagram == frame[VNET_HDR_LEN:]
    elif frame[VNET_HDR_LEN] == 0x45 and frame[VNET_HDR_LEN + 9] == 1:
        assert datagram is None  # ICMP: completed by the general path
    else:
        assert datagram == b"\x04" + frame[VNET_HDR_LEN:]
    if datagram is not None:
        assert datagram == b"".join(segments.buffers)


def test_tunnel_datagram_leaves_gso_and_oversize_to_the_general_path() -> None:
    seg = Seg(payload=b"z" * 3000, flags=TCP_ACK)
    assert tunnel_datagram_untrusted(seg.super_frame(1000), 1500) is None
    small = gso_none_frames()[1]
    assert tunnel_datagram_untrusted(small, len(small) - VNET_HDR_LEN - 1) is None
    assert tunnel_datagram_untrusted(NONE_HDR + b"\x45", 1500) is None


@settings(max_examples=500)
@given(st.data())
def test_tunnel_datagram_on_mutated_frames_agrees_or_defers(data: st.DataObject) -> None:
    frame = bytearray(data.draw(st.sampled_from(gso_none_frames())))
    for _ in range(data.draw(st.integers(1, 3))):
        frame[data.draw(st.integers(0, 40))] = data.draw(st.integers(0, 255))
    datagram = tunnel_datagram_untrusted(bytes(frame), 1500)
    if datagram is None:
        return
    segments = tunnel_segments_untrusted(bytes(frame), 1500)
    assert b"".join(segments.buffers) == datagram


@settings(max_examples=1000)
@given(st.data())
def test_partial_layout_fast_path_agrees_with_the_general_one(data: st.DataObject) -> None:
    proto = data.draw(st.sampled_from([PROTO_TCP, PROTO_UDP, 1]))
    if proto == PROTO_TCP:
        transport = tcp_segment(SRC4, DST4, payload=data.draw(st.binary(max_size=40)))
    elif proto == PROTO_UDP:
        transport = build_udp(1, 2, data.draw(st.binary(max_size=40)), SRC4, DST4)
    else:
        transport = b"\x08\x00\x00\x00\x12\x34\x00\x01"
    packet = bytearray(build_ipv4(SRC4, DST4, proto, transport))
    for _ in range(data.draw(st.integers(0, 3))):
        packet[data.draw(st.integers(1, len(packet) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(20, len(packet)))
    sample = bytes(packet[:cut])
    assert _partial_layout(sample) == _partial_layout_general(sample)


# --- coalesce ---------------------------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_coalesce_inverts_split(case: tuple[Seg, int, int]) -> None:
    seg, mss, _ = case
    seg = replace(seg, ip_options=b"", flags=seg.flags & ~TCP_FIN)
    mtu = seg.header_len + mss
    segments = split_untrusted(seg.super_frame(mss), mtu)
    frames = coalesce(segments)
    if len(segments) == 1 or not seg.payload:
        assert frames == [NONE_HDR + p for p in segments]
        return
    assert frames == [reference_merged(reference_segs(seg, mss))]
    assert split_untrusted(frames[0], mtu) == segments


def reference_segs(seg: Seg, mss: int) -> list[Seg]:
    chunks = [seg.payload[i : i + mss] for i in range(0, len(seg.payload), mss)]
    out = []
    for index, chunk in enumerate(chunks):
        flags = seg.flags
        if index != len(chunks) - 1:
            flags &= ~(TCP_FIN | TCP_PSH)
        if index != 0:
            flags &= ~TCP_CWR
        out.append(
            replace(
                seg,
                seq=(seg.seq + index * mss) & 0xFFFFFFFF,
                flags=flags,
                payload=chunk,
                ident=(seg.ident + index) & 0xFFFF,
            )
        )
    return out


def run_of(n: int, size: int = 100, **fields: object) -> list[Seg]:
    base = Seg(**fields)  # type: ignore[arg-type]
    return [
        replace(base, seq=base.seq + i * size, ident=base.ident + i, payload=bytes([i]) * size)
        for i in range(n)
    ]


def udp_packet() -> bytes:
    return build_ipv4(SRC4, DST4, PROTO_UDP, build_udp(1, 2, b"dns?", SRC4, DST4))


def frames_for(items: list[Seg | bytes], groups: list[list[int]]) -> list[bytes]:
    out = []
    for group in groups:
        first = items[group[0]]
        if len(group) == 1:
            out.append(NONE_HDR + (first if isinstance(first, bytes) else first.packet()))
        else:
            segs = [items[i] for i in group]
            assert all(isinstance(s, Seg) for s in segs)
            out.append(reference_merged(segs))  # type: ignore[arg-type]
    return out


def packets_of(items: list[Seg | bytes]) -> list[bytes]:
    return [i if isinstance(i, bytes) else i.packet() for i in items]


def test_coalesce_interleaved_flows_merge_per_flow() -> None:
    a = run_of(3)
    b = run_of(3, sport=40001)
    items: list[Seg | bytes] = [a[0], b[0], a[1], b[1], a[2], b[2]]
    assert coalesce(packets_of(items)) == frames_for(items, [[0, 2, 4], [1, 3, 5]])


def test_coalesce_gap_in_sequence_starts_a_new_run() -> None:
    a = run_of(4)
    gapped = replace(a[2], seq=a[2].seq + 1)
    items: list[Seg | bytes] = [a[0], a[1], gapped, a[3]]
    assert coalesce(packets_of(items)) == frames_for(items, [[0, 1], [2], [3]])


def test_coalesce_never_merges_a_fin_and_never_across_it() -> None:
    a = run_of(4)
    items: list[Seg | bytes] = [a[0], a[1], replace(a[2], flags=TCP_ACK | TCP_FIN), a[3]]
    assert coalesce(packets_of(items)) == frames_for(items, [[0, 1], [2], [3]])


def test_coalesce_udp_in_between_does_not_break_a_run() -> None:
    a = run_of(3)
    items: list[Seg | bytes] = [a[0], udp_packet(), a[1], a[2]]
    assert coalesce(packets_of(items)) == frames_for(items, [[0, 2, 3], [1]])


def test_coalesce_ipv4_options_pass_through_and_close_the_run() -> None:
    a = run_of(4)
    items: list[Seg | bytes] = [a[0], a[1], replace(a[2], ip_options=b"\x01\x01\x01\x00"), a[3]]
    assert coalesce(packets_of(items)) == frames_for(items, [[0, 1], [2], [3]])


def test_coalesce_fragment_is_a_barrier_for_every_flow() -> None:
    a = run_of(2)
    b = run_of(2, sport=40001)
    fragment = build_ipv4(SRC4, DST4, PROTO_TCP, b"\x00" * 16, flags_frag=0x0002)
    items: list[Seg | bytes] = [a[0], b[0], fragment, a[1], b[1]]
    assert coalesce(packets_of(items)) == frames_for(items, [[0], [1], [2], [3], [4]])


@pytest.mark.parametrize(
    ("change", "groups"),
    [
        ({"flags": TCP_ACK | TCP_PSH}, [[0, 1, 2], [3]]),  # PSH ends a run
        ({"flags": TCP_ACK | TCP_CWR}, [[0, 1], [2, 3]]),  # CWR opens one
        ({"flags": TCP_ACK | TCP_URG}, [[0, 1], [2], [3]]),
        ({"flags": TCP_ACK | TCP_SYN}, [[0, 1], [2], [3]]),
        ({"flags": TCP_ACK | TCP_RST}, [[0, 1], [2], [3]]),
        ({"flags": TCP_PSH}, [[0, 1], [2], [3]]),  # no ACK
        ({"ack": 1}, [[0, 1], [2, 3]]),
        ({"window": 1}, [[0, 1], [2, 3]]),
        ({"ttl": 1}, [[0, 1], [2, 3]]),
        ({"df": False}, [[0, 1], [2], [3]]),  # DF differs; then ids jump
        ({"ident": 999}, [[0, 1, 2, 3]]),  # DF set: RFC 6864, ids carry no meaning
        ({"tcp_options": b"\x01\x01\x01\x01"}, [[0, 1], [2], [3]]),
        ({"bad_checksum": True}, [[0, 1], [2], [3]]),
        ({"payload": b""}, [[0, 1], [2], [3]]),  # a pure ACK
    ],
)
def test_coalesce_third_segment_differs(change: dict[str, object], groups: list[list[int]]) -> None:
    a = run_of(4)
    third = replace(a[2], **change)  # type: ignore[arg-type]
    if "ack" in change or "window" in change or "ttl" in change or "flags" in change:
        a[3] = replace(a[3], **{k: v for k, v in change.items() if k != "flags"})  # type: ignore[arg-type]
    items: list[Seg | bytes] = [a[0], a[1], third, a[3]]
    frames = coalesce(packets_of(items))
    if change == {"ident": 999}:
        # Merged all the same; the ids of a resplit follow the first one.
        assert len(frames) == 1
        return
    assert frames == frames_for(items, groups)


def test_coalesce_shorter_segment_ends_a_run() -> None:
    a = run_of(4)
    short = replace(a[2], payload=b"s" * 40)
    later = replace(a[3], seq=a[2].seq + 40)
    items: list[Seg | bytes] = [a[0], a[1], short, later]
    assert coalesce(packets_of(items)) == frames_for(items, [[0, 1, 2], [3]])
    longer = replace(a[2], payload=b"l" * 150)
    items = [a[0], a[1], longer]
    assert coalesce(packets_of(items)) == frames_for(items, [[0, 1], [2]])


def test_coalesce_respects_max_size() -> None:
    a = run_of(10, size=1000)
    frames = coalesce(packets_of(list(a)), max_size=3100)
    assert [len(f) - VNET_HDR_LEN for f in frames] == [3040, 3040, 3040, 1040]
    big = packets_of(list(run_of(80, size=1000)))
    assert all(len(f) - VNET_HDR_LEN <= 65535 for f in coalesce(big, max_size=10**6))
    assert all(len(f) - VNET_HDR_LEN <= 65535 for f in coalesce(packets_of(list(run_of(80, 1000)))))


def test_coalesce_ipv6_run() -> None:
    a = run_of(5, v6=True, flow_label=0x12345, traffic_class=8)
    items: list[Seg | bytes] = list(a)
    assert coalesce(packets_of(items)) == frames_for(items, [[0, 1, 2, 3, 4]])
    other_label = replace(a[2], flow_label=1)
    items = [a[0], a[1], other_label]
    assert coalesce(packets_of(items)) == frames_for(items, [[0, 1], [2]])


# Random mixes of three flows, against a grouping computed from the fields alone.

PERTURBATIONS = ["none"] * 8 + ["gap", "bad", "opts", "fin", "ack0", "psh", "cwr", "short", "ack"]


@dataclass
class FlowState:
    base: Seg
    seq: int
    ident: int
    ack: int


def mergeable(s: Seg) -> bool:
    return (
        not s.ip_options
        and bool(s.payload)
        and not s.flags & (TCP_SYN | TCP_RST | TCP_FIN | TCP_URG)
        and bool(s.flags & TCP_ACK)
        and not s.bad_checksum
    )


def payload_len(item: Seg | bytes) -> int:
    assert isinstance(item, Seg)
    return len(item.payload)


def reference_groups(items: list[Seg | bytes]) -> list[list[int]]:
    groups: list[list[int]] = []
    open_runs: dict[tuple[bool, int], list[int]] = {}
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            groups.append([i])
            continue
        key = (item.v6, item.sport)
        if not mergeable(item):
            open_runs.pop(key, None)
            groups.append([i])
            continue
        run = open_runs.get(key)
        if run is not None:
            head, last = items[run[0]], items[run[-1]]
            assert isinstance(head, Seg) and isinstance(last, Seg)
            total = head.header_len + sum(payload_len(items[j]) for j in run)
            if (
                item.seq == (last.seq + len(last.payload)) & 0xFFFFFFFF
                and (item.ack, item.window, item.tcp_options)
                == (head.ack, head.window, head.tcp_options)
                and not item.flags & TCP_CWR
                and len(item.payload) <= len(head.payload)
                and total + len(item.payload) <= 65535
            ):
                run.append(i)
                if item.flags & TCP_PSH or len(item.payload) < len(head.payload):
                    del open_runs[key]
                continue
        open_runs.pop(key, None)
        groups.append([i])
        if not item.flags & TCP_PSH:
            open_runs[key] = groups[-1]
    return groups


def mix_items(script: list[tuple[int, str]]) -> list[Seg | bytes]:
    """Three flows and some UDP, each step perturbed as the script says."""
    flows = [
        FlowState(Seg(sport=1), 100, 10, 7),
        FlowState(Seg(sport=2, df=False), 0xFFFFFF80, 0xFFFE, 7),
        FlowState(Seg(v6=True, sport=3), 5, 0, 7),
    ]
    items: list[Seg | bytes] = []
    for which, perturb in script:
        if which == 3:
            items.append(udp_packet())
            continue
        flow = flows[which]
        size = 40 if perturb == "short" else 0 if perturb == "ack0" else 64
        if perturb == "gap":
            flow.seq += 1
        if perturb == "ack":
            flow.ack += 1
        flags = {"fin": TCP_ACK | TCP_FIN, "psh": TCP_ACK | TCP_PSH, "cwr": TCP_ACK | TCP_CWR}
        seg = replace(
            flow.base,
            seq=flow.seq & 0xFFFFFFFF,
            ack=flow.ack,
            ident=flow.ident & 0xFFFF,
            flags=flags.get(perturb, TCP_ACK),
            payload=bytes([len(items) & 0xFF]) * size,
            bad_checksum=perturb == "bad",
            ip_options=b"\x01\x01\x01\x00" if perturb == "opts" and not flow.base.v6 else b"",
        )
        items.append(seg)
        flow.seq += size
        flow.ident += 1
    return items


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(PERTURBATIONS)),
        max_size=40,
    )
)
def test_coalesce_random_mix_matches_reference_grouping(script: list[tuple[int, str]]) -> None:
    items = mix_items(script)
    packets = packets_of(items)
    frames = coalesce(packets)
    assert frames == frames_for(items, reference_groups(items))
    # Resplitting gives back every input packet, in its flow's order.
    resplit = [p for f in frames for p in split_untrusted(f, BIG_MTU)]
    assert sorted(resplit) == sorted(packets)
    for port in (1, 2, 3):
        assert [p for p in resplit if tcp_sport(p) == port] == [
            p for p in packets if tcp_sport(p) == port
        ]


def tcp_sport(packet: bytes) -> int | None:
    if packet[0] >> 4 == 6:
        return struct.unpack_from("!H", packet, 40)[0] if packet[6] == PROTO_TCP else None
    if packet[9] != PROTO_TCP:
        return None
    return int(struct.unpack_from("!H", packet, (packet[0] & 0x0F) * 4)[0])


@settings(max_examples=300)
@given(st.lists(st.one_of(st.binary(max_size=80), st.sampled_from(packets_of(list(run_of(3)))))))
def test_coalesce_never_raises(packets: list[bytes]) -> None:
    frames = coalesce(packets)
    assert sum(len(f) - VNET_HDR_LEN for f in frames) <= sum(len(p) for p in packets)


def test_coalesce_never_raises_on_mutated_packets() -> None:
    rng = random.Random(4)
    good = packets_of(list(run_of(6))) + packets_of(list(run_of(6, v6=True)))
    for _ in range(2000):
        batch = []
        for packet in rng.sample(good, 6):
            mutated = bytearray(packet)
            for _ in range(rng.randint(0, 3)):
                mutated[rng.randrange(min(len(mutated), 70))] = rng.randrange(256)
            batch.append(bytes(mutated[: rng.choice([len(mutated), rng.randrange(len(mutated))])]))
        for frame in coalesce(batch):
            VnetHdr.unpack_untrusted(frame)


@pytest.mark.parametrize("flag", [TCP_FIN, TCP_SYN, TCP_RST, TCP_URG, TCP_PSH])
def test_coalesce_flag_on_every_segment_never_merges(flag: int) -> None:
    items: list[Seg | bytes] = list(run_of(4, flags=TCP_ACK | flag))
    assert coalesce(packets_of(items)) == frames_for(items, [[0], [1], [2], [3]])


def test_coalesce_ipv6_extension_headers_are_a_barrier() -> None:
    a = run_of(4, v6=True)
    tcp = tcp_segment(SRC6, DST6, sport=a[0].sport, seq=a[2].seq, payload=b"e")
    extended = build_ipv6(SRC6, DST6, 0, build_ipv6_options_header(PROTO_TCP) + tcp)
    items: list[Seg | bytes] = [a[0], a[1], extended, a[2], a[3]]
    assert coalesce(packets_of(items)) == frames_for(items, [[0, 1], [2], [3, 4]])


# --- coalesce with DATA-CSUM-PARTIAL segments -------------------------------------------


def lone_partial_hdr(start: int, offset: int) -> bytes:
    """The header of a packet passed on alone for the kernel to complete its checksum."""
    return VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, GsoType.NONE, 0, 0, start, offset).pack()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_coalesce_partial_inverts_tunnel_segments(case: tuple[Seg, int, int]) -> None:
    seg, mss, _ = case
    seg = replace(seg, ip_options=b"", flags=seg.flags & ~TCP_FIN)
    mtu = seg.header_len + mss
    frame = seg.super_frame(mss)
    parts = [d[1:] for d in datagrams(tunnel_segments_untrusted(frame, mtu))]
    frames = coalesce(parts, partial=[True] * len(parts))
    complete = split_untrusted(frame, mtu)
    if len(parts) == 1:
        assert frames == [lone_partial_hdr(seg.ip_header_len, 16) + parts[0]]
    else:
        assert frames == coalesce(complete)
        assert frames == [reference_merged(reference_segs(seg, mss))]
    # What the kernel makes of the frames: the segments, checksums completed.
    resplit = [p for f in frames for p in split_untrusted(f, BIG_MTU)]
    assert [zero_as_ffff(p) for p in resplit] == [zero_as_ffff(p) for p in complete]


@settings(max_examples=100)
@given(st.lists(st.booleans(), min_size=5, max_size=5), st.booleans())
def test_coalesce_mixes_partial_and_complete_segments(marks: list[bool], v6: bool) -> None:
    items: list[Seg | bytes] = list(run_of(5, v6=v6, flags=TCP_ACK))
    complete = packets_of(items)
    mixed = [to_partial(p) if m else p for p, m in zip(complete, marks, strict=True)]
    expected = frames_for(items, [[0, 1, 2, 3, 4]])
    assert coalesce(mixed, partial=marks) == expected
    assert coalesce(complete, partial=[False] * 5) == coalesce(complete) == expected


def test_coalesce_does_not_verify_the_checksum_of_a_partial_segment() -> None:
    a = run_of(4)
    packets = packets_of(list(a))
    packets[2] = with_checksum(packets[2], 20 + 16, 0x1234)  # no complete checksum to verify
    items: list[Seg | bytes] = list(a)
    assert coalesce(packets, partial=[False, False, True, False]) == frames_for(
        items, [[0, 1, 2, 3]]
    )
    # Unmarked, the same bytes fail the check and pass through.
    assert coalesce(packets) == [
        *frames_for(items, [[0, 1]]),
        NONE_HDR + packets[2],
        NONE_HDR + packets[3],
    ]


def _lone_cases() -> list[tuple[str, bytes, int, int]]:
    udp4 = build_ipv4(SRC4, DST4, PROTO_UDP, build_udp(1, 2, b"dns?", SRC4, DST4))
    udp6 = build_ipv6(SRC6, DST6, PROTO_UDP, build_udp(1, 2, b"dns?", SRC6, DST6))
    data = b"x" * 100
    return [
        ("tcp4-run-of-one", Seg(payload=data).packet(), 20, 16),
        ("tcp6-run-of-one", Seg(v6=True, payload=data).packet(), 40, 16),
        ("tcp4-psh", Seg(payload=data, flags=TCP_ACK | TCP_PSH).packet(), 20, 16),
        ("tcp6-syn", Seg(v6=True, flags=TCP_SYN).packet(), 40, 16),
        ("tcp4-pure-ack", Seg().packet(), 20, 16),
        ("tcp4-ip-options", Seg(payload=data, ip_options=b"\x01\x01\x01\x00").packet(), 24, 16),
        ("tcp4-fin", Seg(payload=data, flags=TCP_ACK | TCP_FIN).packet(), 20, 16),
        ("udp4", udp4, 20, 6),
        ("udp6", udp6, 40, 6),
    ]


LONE = _lone_cases()


@pytest.mark.parametrize(
    ("packet", "start", "offset"), [c[1:] for c in LONE], ids=[c[0] for c in LONE]
)
def test_coalesce_lone_partial_packet_asks_the_kernel_for_its_checksum(
    packet: bytes, start: int, offset: int
) -> None:
    partial = to_partial(packet)
    frames = coalesce([partial], partial=[True])
    assert frames == [lone_partial_hdr(start, offset) + partial]
    hdr = VnetHdr.unpack_untrusted(frames[0])
    assert (hdr.flags, hdr.gso_type, hdr.csum_start, hdr.csum_offset) == (
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        GsoType.NONE,
        start,
        offset,
    )
    # Completed as the kernel completes NEEDS_CSUM, it is the original packet.
    assert split_untrusted(frames[0], BIG_MTU) == [zero_as_ffff(packet)]


def _garbage() -> list[tuple[str, bytes]]:
    tcp6 = tcp_segment(SRC6, DST6, payload=b"e")
    icmp = build_ipv4(SRC4, DST4, 1, b"\x08\x00\x00\x00\x00\x01\x00\x01")
    udp = build_ipv4(SRC4, DST4, PROTO_UDP, build_udp(1, 2, b"dns?", SRC4, DST4))
    bad_udp_length = udp[:24] + b"\x00\x09" + udp[26:]
    tcp = Seg(payload=b"x" * 8).packet()
    offset_short, offset_long = (tcp[:32] + bytes((n << 4,)) + tcp[33:] for n in (4, 8))
    return [
        ("empty", b""),
        ("short", b"\x45" * 19),
        ("not-ip", b"\x00" * 60),
        ("icmp", icmp),
        ("ipv6-extension", build_ipv6(SRC6, DST6, 0, build_ipv6_options_header(6) + tcp6)),
        ("fragment", build_ipv4(SRC4, DST4, PROTO_TCP, b"\x00" * 16, flags_frag=0x2000)),
        ("tcp-truncated", build_ipv4(SRC4, DST4, PROTO_TCP, b"\x00" * 10)),
        ("udp-length", bad_udp_length),
        ("tcp-offset-short", offset_short),
        ("tcp-offset-long", offset_long),
        ("ip-length", Seg(payload=b"x" * 50).packet()[:-1]),
    ]


GARBAGE = _garbage()


@pytest.mark.parametrize("packet", [c[1] for c in GARBAGE], ids=[c[0] for c in GARBAGE])
def test_coalesce_unparsable_partial_packet_passes_with_plain_header(packet: bytes) -> None:
    assert coalesce([packet], partial=[True]) == [NONE_HDR + packet]


def test_coalesce_partial_interleaved_flows_keep_their_order() -> None:
    a = run_of(3)
    b = run_of(3, sport=40001)
    c = replace(run_of(1, sport=40002)[0], flags=TCP_ACK | TCP_PSH)
    items: list[Seg | bytes] = [a[0], b[0], a[1], c, b[1], a[2], b[2]]
    packets = [to_partial(p) for p in packets_of(items)]
    frames = coalesce(packets, partial=[True] * len(items))
    expected = frames_for(items, [[0, 2, 5], [1, 4, 6], [3]])
    expected[2] = lone_partial_hdr(20, 16) + packets[3]
    assert frames == expected


def test_coalesce_partial_marks_must_match_the_packets() -> None:
    with pytest.raises(ValueError):
        coalesce(packets_of(list(run_of(2))), partial=[True])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(PERTURBATIONS), st.booleans()),
        max_size=40,
    )
)
def test_coalesce_random_mix_with_partial_segments(script: list[tuple[int, str, bool]]) -> None:
    items = mix_items([(which, perturb) for which, perturb, _ in script])
    marks = [mark for _, _, mark in script]
    packets = []
    for index, mark in enumerate(marks):
        item = items[index]
        if mark and isinstance(item, Seg):
            # A partial segment has no checksum to get wrong.
            item = items[index] = replace(item, bad_checksum=False)
        packet = item if isinstance(item, bytes) else item.packet()
        packets.append(to_partial(packet) if mark else packet)
    groups = reference_groups(items)
    expected = frames_for(items, groups)
    for position, group in enumerate(groups):
        index = group[0]
        if len(group) == 1 and marks[index]:
            item = items[index]
            start, offset = (item.ip_header_len, 16) if isinstance(item, Seg) else (20, 6)
            expected[position] = lone_partial_hdr(start, offset) + packets[index]
    assert coalesce(packets, partial=marks) == expected


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.binary(max_size=80),
                st.sampled_from(packets_of(list(run_of(3)))),
                st.sampled_from([to_partial(p) for p in packets_of(list(run_of(3, v6=True)))]),
            ),
            st.booleans(),
        )
    )
)
def test_coalesce_partial_never_raises(batch: list[tuple[bytes, bool]]) -> None:
    packets = [packet for packet, _ in batch]
    frames = coalesce(packets, partial=[mark for _, mark in batch])
    assert sum(len(f) - VNET_HDR_LEN for f in frames) <= sum(len(p) for p in packets)
    for frame in frames:
        hdr = VnetHdr.unpack_untrusted(frame)
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            assert hdr.csum_start + hdr.csum_offset + 2 <= len(frame) - VNET_HDR_LEN
