"""Flow keys from raw packets: hand-built vectors, the packet builders'
checksums, round trips over random fields, and the parser's only-MalformedError
invariant on random and damaged input."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ground.errors import MalformedError
from paft.flow import FiveTuple, flow_of_packet_untrusted, proto_name, proto_number
from paft.packets import (
    build_icmp_echo,
    build_icmpv6_echo,
    build_ipv4,
    build_ipv6,
    build_ipv6_fragment_header,
    build_ipv6_options_header,
    build_tcp,
    build_udp,
    internet_checksum,
    pack_address,
)

V4A, V4B = "100.64.0.2", "203.0.113.2"
V6A, V6B = "2001:db8::2", "2001:db8:1::99"
GRE = 47
ESP = 50
AH = 51
ROUTING = 43
HOPOPTS = 0
DSTOPTS = 60
FRAGMENT = 44


def key(proto: int, src: str, sport: int, dst: str, dport: int) -> FiveTuple:
    return FiveTuple(proto, pack_address(src), sport, pack_address(dst), dport)


def parse_or_none(packet: bytes) -> FiveTuple | None:
    """The invariant under test: a key, or MalformedError; anything else escapes."""
    try:
        return flow_of_packet_untrusted(packet)
    except MalformedError:
        return None


def udp4(sport: int = 2000, dport: int = 3000, payload: bytes = b"hello") -> bytes:
    return build_ipv4(V4A, V4B, 17, build_udp(sport, dport, payload, V4A, V4B))


def udp6(sport: int = 2000, dport: int = 3000, payload: bytes = b"hello") -> bytes:
    return build_ipv6(V6A, V6B, 17, build_udp(sport, dport, payload, V6A, V6B))


def reference_checksum(data: bytes) -> int:
    """RFC 1071 written out byte by byte, independent of the builder's version."""
    total = 0
    for i in range(0, len(data), 2):
        high = data[i]
        low = data[i + 1] if i + 1 < len(data) else 0
        total += (high << 8) | low
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --- checksums and builders -------------------------------------------------


def test_ipv4_header_checksum_vector() -> None:
    # The worked example of the IPv4 header checksum (checksum b861).
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(header) == 0xB861
    packet = build_ipv4("192.168.0.1", "192.168.0.199", 17, b"\x00" * 95, flags_frag=0x4000)
    assert packet[:20].hex() == "45000073000040004011b861c0a80001c0a800c7"


def test_icmp_echo_vector() -> None:
    assert build_icmp_echo(1, 1).hex() == "0800f7fd00010001"
    assert build_icmp_echo(1, 1, reply=True).hex() == "0000fffd00010001"


def test_udp_checksum_zero_is_sent_as_ones() -> None:
    # A payload word equal to the checksum of the datagram without it brings the
    # sum to 0xffff, so the computed checksum is 0 and must go out as 0xffff.
    src = dst = "0.0.0.0"
    (word,) = struct.unpack("!H", build_udp(0, 0, b"\x00\x00", src, dst)[6:8])
    datagram = build_udp(0, 0, struct.pack("!H", word), src, dst)
    assert datagram[6:8] == b"\xff\xff"
    assert reference_checksum(pack_address(src) * 2 + b"\x00\x11\x00\x0a" + datagram) == 0


@given(payload=st.binary(max_size=64), sport=st.integers(0, 65535), dport=st.integers(0, 65535))
def test_transport_checksums_verify(payload: bytes, sport: int, dport: int) -> None:
    for src, dst in ((V4A, V4B), (V6A, V6B)):
        s, d = pack_address(src), pack_address(dst)
        for proto, segment in (
            (17, build_udp(sport, dport, payload, src, dst)),
            (6, build_tcp(sport, dport, src, dst, payload=payload)),
        ):
            if len(s) == 4:
                pseudo = s + d + struct.pack("!xBH", proto, len(segment))
            else:
                pseudo = s + d + struct.pack("!I3xB", len(segment), proto)
            assert reference_checksum(pseudo + segment) == 0
    icmp = build_icmp_echo(sport, dport, payload=payload)
    assert reference_checksum(icmp) == 0
    s, d = pack_address(V6A), pack_address(V6B)
    icmp6 = build_icmpv6_echo(sport, dport, V6A, V6B, payload=payload)
    assert reference_checksum(s + d + struct.pack("!I3xB", len(icmp6), 58) + icmp6) == 0


@given(payload=st.binary(max_size=64), options=st.binary(max_size=40))
def test_ipv4_header_checksum_verifies(payload: bytes, options: bytes) -> None:
    packet = build_ipv4(V4A, V4B, 17, payload, options=options)
    ihl = (packet[0] & 0x0F) * 4
    assert reference_checksum(packet[:ihl]) == 0
    assert struct.unpack("!H", packet[2:4])[0] == len(packet)


# --- vectors ----------------------------------------------------------------


def test_ipv4_udp() -> None:
    k = flow_of_packet_untrusted(udp4())
    assert k == key(17, V4A, 2000, V4B, 3000)
    assert str(k) == "udp 100.64.0.2:2000 -> 203.0.113.2:3000"
    assert k.to_json() == {
        "proto": "udp",
        "src": "100.64.0.2",
        "sport": 2000,
        "dst": "203.0.113.2",
        "dport": 3000,
    }


def test_ipv4_tcp_with_options() -> None:
    segment = build_tcp(40000, 443, V4A, V4B)
    packet = build_ipv4(V4A, V4B, 6, segment, options=b"\x01\x01\x01\x00")  # NOPs, EOL
    assert packet[0] == 0x46
    assert flow_of_packet_untrusted(packet) == key(6, V4A, 40000, V4B, 443)


def test_ipv6_tcp_and_udp() -> None:
    tcp = build_ipv6(V6A, V6B, 6, build_tcp(1234, 80, V6A, V6B))
    assert flow_of_packet_untrusted(tcp) == key(6, V6A, 1234, V6B, 80)
    k = flow_of_packet_untrusted(udp6())
    assert k == key(17, V6A, 2000, V6B, 3000)
    assert str(k) == "udp [2001:db8::2]:2000 -> [2001:db8:1::99]:3000"
    assert k.to_json()["src"] == "2001:db8::2"


def test_icmp_echo_request_and_reply_share_the_key() -> None:
    request = build_ipv4(V4A, V4B, 1, build_icmp_echo(0x1234, 7))
    reply = build_ipv4(V4B, V4A, 1, build_icmp_echo(0x1234, 7, reply=True))
    k = flow_of_packet_untrusted(request)
    assert k == key(1, V4A, 0x1234, V4B, 0x1234)
    assert flow_of_packet_untrusted(reply).reversed() == k
    assert str(k) == "icmp 100.64.0.2:4660 -> 203.0.113.2:4660"


def test_icmpv6_echo_request_and_reply_share_the_key() -> None:
    request = build_ipv6(V6A, V6B, 58, build_icmpv6_echo(99, 1, V6A, V6B))
    reply = build_ipv6(V6B, V6A, 58, build_icmpv6_echo(99, 1, V6B, V6A, reply=True))
    k = flow_of_packet_untrusted(request)
    assert k == key(58, V6A, 99, V6B, 99)
    assert flow_of_packet_untrusted(reply).reversed() == k
    assert k.to_json()["proto"] == "icmpv6"


def test_other_icmp_types_have_no_ports() -> None:
    unreachable = bytes((3, 1, 0, 0, 0, 0, 0, 0)) + udp4()[:28]
    assert flow_of_packet_untrusted(build_ipv4(V4A, V4B, 1, unreachable)) == key(1, V4A, 0, V4B, 0)
    too_big = bytes((2, 0, 0, 0, 0, 0, 5, 0x00))
    assert flow_of_packet_untrusted(build_ipv6(V6A, V6B, 58, too_big)) == key(58, V6A, 0, V6B, 0)
    # A non-echo ICMP needs its 4-byte header only.
    short = bytes((11, 0, 0, 0))
    assert flow_of_packet_untrusted(build_ipv4(V4A, V4B, 1, short)) == key(1, V4A, 0, V4B, 0)


@pytest.mark.parametrize(
    "flags_frag",
    [0x2000, 0x2000 | 185, 185, 0x4000 | 3],
    ids=["first-MF", "middle", "last", "DF-with-offset"],
)
def test_ipv4_fragments_have_no_ports(flags_frag: int) -> None:
    payload = build_udp(2000, 3000, b"x" * 16, V4A, V4B)
    packet = build_ipv4(V4A, V4B, 17, payload, ident=77, flags_frag=flags_frag)
    assert flow_of_packet_untrusted(packet) == key(17, V4A, 0, V4B, 0)


def test_ipv4_fragment_too_short_for_ports_is_still_keyed() -> None:
    packet = build_ipv4(V4A, V4B, 6, b"\x01", flags_frag=100)
    assert flow_of_packet_untrusted(packet) == key(6, V4A, 0, V4B, 0)


def test_ipv4_dont_fragment_is_not_a_fragment() -> None:
    packet = build_ipv4(V4A, V4B, 17, build_udp(5, 6, b"", V4A, V4B), flags_frag=0x4000)
    assert flow_of_packet_untrusted(packet) == key(17, V4A, 5, V4B, 6)


@pytest.mark.parametrize(("offset", "more"), [(0, True), (3, True), (3, False)])
def test_ipv6_fragment_header_has_no_ports(offset: int, more: bool) -> None:
    frag = build_ipv6_fragment_header(17, offset, more, ident=0xDEADBEEF)
    packet = build_ipv6(V6A, V6B, FRAGMENT, frag + build_udp(1, 2, b"x" * 8, V6A, V6B))
    assert flow_of_packet_untrusted(packet) == key(17, V6A, 0, V6B, 0)


def test_ipv6_atomic_fragment_keys_like_the_whole_datagram() -> None:
    frag = build_ipv6_fragment_header(17, 0, False, ident=1)
    packet = build_ipv6(V6A, V6B, FRAGMENT, frag + build_udp(1, 2, b"", V6A, V6B))
    assert flow_of_packet_untrusted(packet) == key(17, V6A, 1, V6B, 2)


def test_ipv6_fragment_of_an_extension_header_chain() -> None:
    # Every fragment names the same first fragmentable header, so one key for all.
    first = build_ipv6_fragment_header(DSTOPTS, 0, True) + build_ipv6_options_header(17)
    later = build_ipv6_fragment_header(DSTOPTS, 2, False) + b"\x00" * 8
    k1 = flow_of_packet_untrusted(build_ipv6(V6A, V6B, FRAGMENT, first))
    k2 = flow_of_packet_untrusted(build_ipv6(V6A, V6B, FRAGMENT, later))
    assert k1 == k2 == key(DSTOPTS, V6A, 0, V6B, 0)


def test_gre_is_an_address_pair() -> None:
    gre = b"\x00\x00\x08\x00" + udp4()
    assert flow_of_packet_untrusted(build_ipv4(V4A, V4B, GRE, gre)) == key(GRE, V4A, 0, V4B, 0)
    assert flow_of_packet_untrusted(build_ipv6(V6A, V6B, GRE, gre)) == key(GRE, V6A, 0, V6B, 0)
    assert str(key(GRE, V4A, 0, V4B, 0)) == "47 100.64.0.2:0 -> 203.0.113.2:0"


def test_ipv6_hop_by_hop_and_destination_options_before_udp() -> None:
    router_alert = b"\x05\x02\x00\x00"  # RFC 2711
    payload = (
        build_ipv6_options_header(DSTOPTS, router_alert)
        + build_ipv6_options_header(17, b"\x01\x0c" + b"\x00" * 12)  # a long PadN
        + build_udp(5353, 5353, b"q", V6A, V6B)
    )
    packet = build_ipv6(V6A, V6B, HOPOPTS, payload)
    assert flow_of_packet_untrusted(packet) == key(17, V6A, 5353, V6B, 5353)


def test_ipv6_routing_and_ah_before_tcp() -> None:
    routing = bytes((AH, 2, 4, 0, 0, 0, 0, 0)) + pack_address(V6B)  # 24 bytes: length 2
    ah = bytes((6, 4, 0, 0)) + b"\x00" * 20  # (4 + 2) * 4 = 24 bytes
    payload = routing + ah + build_tcp(22, 50000, V6A, V6B)
    packet = build_ipv6(V6A, V6B, ROUTING, payload)
    assert flow_of_packet_untrusted(packet) == key(6, V6A, 22, V6B, 50000)


def test_ipv6_esp_and_no_next_header() -> None:
    esp = build_ipv6(V6A, V6B, ESP, b"\x00\x00\x01\x00" + b"\x00" * 20)
    assert flow_of_packet_untrusted(esp) == key(ESP, V6A, 0, V6B, 0)
    empty = build_ipv6(V6A, V6B, 59, b"")
    assert flow_of_packet_untrusted(empty) == key(59, V6A, 0, V6B, 0)


def test_ipv6_extension_header_bound() -> None:
    def chain(count: int) -> bytes:
        # Each options header points at the next; the last one at UDP.
        headers = b"".join(
            build_ipv6_options_header(DSTOPTS if i < count - 1 else 17) for i in range(count)
        )
        return build_ipv6(V6A, V6B, DSTOPTS, headers + build_udp(1, 2, b"", V6A, V6B))

    assert flow_of_packet_untrusted(chain(8)) == key(17, V6A, 1, V6B, 2)
    with pytest.raises(MalformedError, match="extension headers"):
        flow_of_packet_untrusted(chain(9))


def test_buffer_longer_than_the_ip_length_is_accepted() -> None:
    assert flow_of_packet_untrusted(udp4() + b"trailer") == key(17, V4A, 2000, V4B, 3000)
    assert flow_of_packet_untrusted(udp6() + b"\x00" * 3) == key(17, V6A, 2000, V6B, 3000)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "empty"),
        (b"\x45", "truncated"),
        (b"\x15" + b"\x00" * 40, "version 1"),
        (b"\x60" + b"\x00" * 20, "truncated"),
        (build_ipv4(V4A, V4B, 17, b"")[:19], "truncated"),
        (bytes([0x44]) + build_ipv4(V4A, V4B, 17, b"1234")[1:], "header length 16"),
        (build_ipv4(V4A, V4B, 17, b"1234")[:2] + b"\x00\x10" + b"\x00" * 20, "below"),
        (udp4()[:-1], "beyond buffer"),
        (build_ipv4(V4A, V4B, 17, b"123"), "transport header truncated"),
        (build_ipv4(V4A, V4B, 1, b"\x08\x00\x00"), "ICMP header truncated"),
        (build_ipv4(V4A, V4B, 1, b"\x08\x00\x00\x00\x00"), "echo header truncated"),
        (udp6()[:-1], "beyond buffer"),
        (build_ipv6(V6A, V6B, 6, b"\x00\x01"), "transport header truncated"),
        (build_ipv6(V6A, V6B, 58, b"\x80\x00\x00\x00\x00\x01"), "echo header truncated"),
        (build_ipv6(V6A, V6B, 58, b"\x80"), "ICMPv6 header truncated"),
        (build_ipv6(V6A, V6B, HOPOPTS, b"\x11"), "extension header 0 truncated"),
        (build_ipv6(V6A, V6B, HOPOPTS, b"\x11\x01" + b"\x00" * 6), "beyond payload"),
        (build_ipv6(V6A, V6B, AH, b"\x11"), "AH header truncated"),
        (build_ipv6(V6A, V6B, FRAGMENT, b"\x11\x00\x00\x08"), "fragment header truncated"),
    ],
)
def test_malformed_vectors(packet: bytes, reason: str) -> None:
    with pytest.raises(MalformedError, match=reason):
        flow_of_packet_untrusted(packet)


# --- protocol names ---------------------------------------------------------


def test_proto_names() -> None:
    for name, number in (("tcp", 6), ("udp", 17), ("icmp", 1), ("icmpv6", 58)):
        assert proto_number(name) == number
        assert proto_name(number) == name
    assert proto_number("TCP") == 6
    assert proto_number("47") == 47
    assert proto_number("0") == 0
    assert proto_name(47) == "47"
    for bad in ("", "gre", "256", "-1", "1e3", "٣", "0047", " 6"):
        with pytest.raises(MalformedError):
            proto_number(bad)


@given(st.integers(0, 255))
def test_proto_name_round_trip(number: int) -> None:
    assert proto_number(proto_name(number)) == number


# --- properties -------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
ipv4_text = st.binary(min_size=4, max_size=4).map(lambda b: str(ipaddress.IPv4Address(b)))
ipv6_text = st.binary(min_size=16, max_size=16).map(lambda b: str(ipaddress.IPv6Address(b)))


@st.composite
def ipv4_packets(draw: st.DrawFn) -> tuple[bytes, FiveTuple]:
    src, dst = draw(ipv4_text), draw(ipv4_text)
    payload = draw(st.binary(max_size=32))
    options = draw(st.binary(max_size=40))
    flags = draw(st.sampled_from([0, 0x4000]))  # never a fragment here
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "other"]))
    sport, dport = draw(ports), draw(ports)
    if kind == "tcp":
        proto, body = 6, build_tcp(sport, dport, src, dst, payload=payload)
    elif kind == "udp":
        proto, body = 17, build_udp(sport, dport, payload, src, dst)
    elif kind == "icmp":
        proto = 1
        body = build_icmp_echo(sport, dport, reply=draw(st.booleans()), payload=payload)
        dport = sport
    else:
        proto = draw(st.integers(0, 255).filter(lambda p: p not in (1, 6, 17)))
        body, sport, dport = payload, 0, 0
    packet = build_ipv4(src, dst, proto, body, ident=draw(ports), flags_frag=flags, options=options)
    return packet, key(proto, src, sport, dst, dport)


@st.composite
def ipv6_packets(draw: st.DrawFn) -> tuple[bytes, FiveTuple]:
    src, dst = draw(ipv6_text), draw(ipv6_text)
    payload = draw(st.binary(max_size=32))
    kind = draw(st.sampled_from(["tcp", "udp", "icmpv6", "other"]))
    sport, dport = draw(ports), draw(ports)
    if kind == "tcp":
        proto, body = 6, build_tcp(sport, dport, src, dst, payload=payload)
    elif kind == "udp":
        proto, body = 17, build_udp(sport, dport, payload, src, dst)
    elif kind == "icmpv6":
        proto = 58
        body = build_icmpv6_echo(sport, dport, src, dst, draw(st.booleans()), payload)
        dport = sport
    else:
        extension = (HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS, 58, 6, 17)
        proto = draw(st.integers(0, 255).filter(lambda p: p not in extension))
        body, sport, dport = payload, 0, 0
    # A chain of option headers in front, each pointing at the next.
    chain = draw(st.lists(st.binary(max_size=20), max_size=4))
    next_header = proto
    for options in reversed(chain):
        body = build_ipv6_options_header(next_header, options) + body
        next_header = DSTOPTS
    hop_by_hop = draw(st.booleans())  # the first header may as well be hop-by-hop
    first = HOPOPTS if chain and hop_by_hop else next_header
    packet = build_ipv6(src, dst, first, body, flow_label=draw(st.integers(0, 0xFFFFF)))
    return packet, key(proto, src, sport, dst, dport)


packets = st.one_of(ipv4_packets(), ipv6_packets())


@given(packets)
def test_built_packets_parse_back(case: tuple[bytes, FiveTuple]) -> None:
    packet, expected = case
    assert flow_of_packet_untrusted(packet) == expected


@given(packets)
def test_reply_keys_reverse(case: tuple[bytes, FiveTuple]) -> None:
    packet, expected = case
    version = packet[0] >> 4
    swapped = bytearray(packet)
    if version == 4:
        swapped[12:16], swapped[16:20] = packet[16:20], packet[12:16]
    else:
        swapped[8:24], swapped[24:40] = packet[24:40], packet[8:24]
    # Swapping the addresses alone reverses the key when there are no ports.
    if expected.sport == expected.dport:
        assert flow_of_packet_untrusted(bytes(swapped)) == expected.reversed()
    assert expected.reversed().reversed() == expected


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_malformed(data: bytes) -> None:
    parse_or_none(data)


@given(st.binary(max_size=120))
def test_random_bytes_with_an_ip_version_raise_only_malformed(data: bytes) -> None:
    for first in (0x45, 0x4F, 0x60):
        parse_or_none(bytes([first]) + data)


@given(packets, st.data())
def test_truncations_are_malformed(case: tuple[bytes, FiveTuple], data: st.DataObject) -> None:
    packet, _ = case
    cut = data.draw(st.integers(0, len(packet) - 1))
    with pytest.raises(MalformedError):
        flow_of_packet_untrusted(packet[:cut])


@given(packets, st.data())
def test_mutations_raise_only_malformed(case: tuple[bytes, FiveTuple], data: st.DataObject) -> None:
    packet = bytearray(case[0])
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.integers(0, min(len(packet) - 1, 80)))
        packet[where] = data.draw(st.integers(0, 255))
    result = parse_or_none(bytes(packet))
    if result is not None:
        assert len(result.src) == len(result.dst) in (4, 16)
        assert 0 <= result.proto <= 255
        assert 0 <= result.sport <= 0xFFFF and 0 <= result.dport <= 0xFFFF


def test_every_prefix_of_every_vector_raises_only_malformed() -> None:
    vectors = [
        udp4(),
        udp6(),
        build_ipv4(V4A, V4B, 1, build_icmp_echo(1, 2)),
        build_ipv6(V6A, V6B, 58, build_icmpv6_echo(1, 2, V6A, V6B)),
        build_ipv6(
            V6A,
            V6B,
            HOPOPTS,
            build_ipv6_options_header(FRAGMENT)
            + build_ipv6_fragment_header(17, 0, False)
            + build_udp(1, 2, b"", V6A, V6B),
        ),
    ]
    for packet in vectors:
        assert parse_or_none(packet) is not None
        for cut in range(len(packet)):
            assert parse_or_none(packet[:cut]) is None
