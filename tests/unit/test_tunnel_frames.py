"""Tunnel wire format (docs/architecture.md, "Wire format"): vectors, round trips, hostile input."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ground.errors import MalformedError
from tunnel.frames import (
    MAX_SIGNAL_SIZE,
    PROBE_ACK_SIZE_V4,
    PROBE_ACK_SIZE_V6,
    PROBE_SIZE,
    Data,
    DataCsumPartial,
    Frame,
    FrameType,
    Probe,
    ProbeAck,
    Signal,
    ack_probe,
    decode_frame_untrusted,
    encode_frame,
    is_data,
)

# A 28-byte IPv4/UDP packet 192.0.2.1:1 -> 198.51.100.2:2 with no payload.
IPV4_PACKET = bytes.fromhex("4500001c0000400040114e9ac0000201c63364020001000200080000")
IPV6_PACKET = bytes.fromhex(
    "6000000000081140"
    "20010db8000000000000000000000001"
    "20010db8000000000000000000000002"
    "0001000200080000"
)

VECTORS: list[tuple[str, Frame]] = [
    (
        "02010203040a0b0c0d1122334455667788beef",
        Probe(tunnel_id=0x01020304, seq=0x0A0B0C0D, timestamp_ns=0x1122334455667788, flags=0xBEEF),
    ),
    (
        "0300000007ffffffff0000000000000001000004cb0071079c40",
        ProbeAck(7, 0xFFFFFFFF, 1, 0, ("203.0.113.7", 40000)),
    ),
    (
        "030000000700000000ffffffffffffffff00010620010db80000000000000000000000010708",
        ProbeAck(7, 0, 0xFFFFFFFFFFFFFFFF, 1, ("2001:db8::1", 1800)),
    ),
    (
        "01" + b"MESSAGE sip:an SIP/2.0\r\n\r\n".hex(),
        Signal(b"MESSAGE sip:an SIP/2.0\r\n\r\n"),
    ),
    (IPV4_PACKET.hex(), Data(IPV4_PACKET)),
    (IPV6_PACKET.hex(), Data(IPV6_PACKET)),
    ("04" + IPV4_PACKET.hex(), DataCsumPartial(IPV4_PACKET)),
]


@pytest.mark.parametrize(("hexdata", "frame"), VECTORS)
def test_vector_encode(hexdata: str, frame: Frame) -> None:
    assert encode_frame(frame).hex() == hexdata


@pytest.mark.parametrize(("hexdata", "frame"), VECTORS)
def test_vector_decode(hexdata: str, frame: Frame) -> None:
    assert decode_frame_untrusted(bytes.fromhex(hexdata)) == frame


def test_sizes() -> None:
    assert PROBE_SIZE == 19
    assert PROBE_ACK_SIZE_V4 == 26
    assert PROBE_ACK_SIZE_V6 == 38
    assert len(encode_frame(Probe(1, 2, 3, 4))) == PROBE_SIZE


def test_frame_type_values() -> None:
    assert [int(t) for t in FrameType] == [1, 2, 3, 4]


@pytest.mark.parametrize("first", range(256))
def test_is_data_matches_design_table(first: int) -> None:
    expected = 0x45 <= first <= 0x4F or 0x60 <= first <= 0x6F
    assert is_data(bytes([first]) + b"\x00" * 19) is expected
    if expected:
        assert isinstance(decode_frame_untrusted(bytes([first])), Data)
    elif first > 0x04 or first == 0:
        with pytest.raises(MalformedError, match="unknown frame type"):
            decode_frame_untrusted(bytes([first]) + b"\x00" * 40)


def test_is_data_empty() -> None:
    assert is_data(b"") is False


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\x01", "empty message"),
        (b"\x01" + b"x" * (MAX_SIGNAL_SIZE + 1), "limit"),
        (b"\x02" + b"\x00" * 17, "expected 19"),
        (b"\x02" + b"\x00" * 19, "expected 19"),
        (b"\x03" + b"\x00" * 17, "truncated"),
        (b"\x03" + b"\x00" * 18, "missing family"),
        (b"\x03" + b"\x00" * 18 + b"\x05" + b"\x00" * 6, "unknown family 5"),
        (b"\x03" + b"\x00" * 18 + b"\x06" + b"\x00" * 6, "address: truncated"),
        (b"\x03" + b"\x00" * 18 + b"\x04" + b"\x00" * 7, "1 trailing"),
        (b"\x04", "no inner"),
        (b"\x04\x44" + b"\x00" * 30, "no inner"),
        (b"\x44" + b"\x00" * 30, "unknown frame type 0x44"),
        (b"\x05", "unknown frame type 0x05"),
    ],
)
def test_malformed_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedError, match=reason):
        decode_frame_untrusted(data)


def test_signal_at_limit() -> None:
    message = b"x" * MAX_SIGNAL_SIZE
    assert decode_frame_untrusted(b"\x01" + message) == Signal(message)


def test_ipv4_mapped_observed_is_sent_as_ipv4() -> None:
    ack = ProbeAck(1, 2, 3, 0, ("::ffff:192.0.2.9", 1800))
    wire = encode_frame(ack)
    assert len(wire) == PROBE_ACK_SIZE_V4
    assert decode_frame_untrusted(wire) == ProbeAck(1, 2, 3, 0, ("192.0.2.9", 1800))


def test_ack_probe_echoes_fields() -> None:
    probe = Probe(9, 8, 7, 6)
    assert ack_probe(probe, ("192.0.2.1", 5)) == ProbeAck(9, 8, 7, 6, ("192.0.2.1", 5))


@pytest.mark.parametrize(
    "frame",
    [
        Probe(-1, 0, 0, 0),
        Probe(0, 1 << 32, 0, 0),
        Probe(0, 0, 1 << 64, 0),
        Probe(0, 0, 0, 1 << 16),
        ProbeAck(0, 0, 0, 0, ("192.0.2.1", 65536)),
        ProbeAck(0, 0, 0, 0, ("an.example.net", 1)),
        Signal(b""),
        Signal(b"x" * (MAX_SIGNAL_SIZE + 1)),
        Data(b""),
        Data(b"\x01SIP"),
        Data(b"\x44" + bytes(19)),
        DataCsumPartial(b"\x02" + bytes(19)),
    ],
)
def test_encode_rejects_unrepresentable(frame: Frame) -> None:
    # A misframed DATA would be decoded as another frame type by the peer.
    with pytest.raises(ValueError):
        encode_frame(frame)


# --- properties -------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
ipv4 = st.ip_addresses(v=4).map(str)


def _not_v4_mapped(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Mapped addresses are normalised to IPv4 on the wire: no round trip.
    return not (isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None)


ipv6 = st.ip_addresses(v=6).filter(_not_v4_mapped).map(str)
addresses = st.tuples(ipv4 | ipv6, u16)
ip_packets = st.builds(
    lambda first, rest: bytes([first]) + rest,
    st.integers(0x45, 0x4F) | st.integers(0x60, 0x6F),
    st.binary(max_size=200),
)

probes = st.builds(Probe, u32, u32, u64, u16)
probe_acks = st.builds(ProbeAck, u32, u32, u64, u16, addresses)
frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Data, ip_packets),
    st.builds(DataCsumPartial, ip_packets),
    st.builds(Signal, st.binary(min_size=1, max_size=300)),
    probes,
    probe_acks,
)


@given(frames)
def test_round_trip(frame: Frame) -> None:
    wire = encode_frame(frame)
    assert decode_frame_untrusted(wire) == frame
    assert is_data(wire) is isinstance(frame, Data)


@given(st.binary(max_size=100))
def test_random_bytes_raise_only_malformed(data: bytes) -> None:
    try:
        frame = decode_frame_untrusted(data)
    except MalformedError:
        return
    # Whatever decodes must encode back to the same bytes: no silent repair.
    assert encode_frame(frame) == data


@given(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=60))
def test_typed_random_bodies_raise_only_malformed(kind: int, body: bytes) -> None:
    data = bytes([kind]) + body
    try:
        frame = decode_frame_untrusted(data)
    except MalformedError:
        return
    assert encode_frame(frame) == data


@given(probes | probe_acks, st.data())
def test_probe_truncation_and_extension_are_malformed(
    frame: Probe | ProbeAck, data: st.DataObject
) -> None:
    wire = encode_frame(frame)
    cut = data.draw(st.integers(0, len(wire) - 1), label="cut")
    with pytest.raises(MalformedError):
        decode_frame_untrusted(wire[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=20), label="extra")
    with pytest.raises(MalformedError):
        decode_frame_untrusted(wire + extra)


@given(addresses)
def test_observed_address_is_canonical(addr: tuple[str, int]) -> None:
    ack = decode_frame_untrusted(encode_frame(ProbeAck(0, 0, 0, 0, addr)))
    assert isinstance(ack, ProbeAck)
    assert ack.observed[0] == str(ipaddress.ip_address(addr[0]))
