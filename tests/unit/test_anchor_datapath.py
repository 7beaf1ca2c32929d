"""The anchor's data path on real loopback sockets, drained by hand (no pump thread).

The TUN is a SOCK_SEQPACKET socket pair: message boundaries hold, so one
`os.read` is one TUN frame, as on the device. Upstream batches are sent with
`GsoSender` from a second UDP socket: on loopback one UDP_SEGMENT send reaches
a UDP_GRO socket as one receive, so each test knows exactly which datagrams
`Engine.drain_channel` sees together.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from anchor_node.datapath import AnchorDataPath
from anchor_node.forwarder import CHANNEL, AnchorCounters
from ground.constants import Addr
from paft.flow import PROTO_TCP, PROTO_UDP, FiveTuple
from paft.packets import build_ipv4, build_udp, pack_address
from paft.table import Paft
from tests.unit.conftest import needs_udp_offload
from tests.unit.datapath_kit import (
    BUFFER,
    MTU,
    SERVER,
    VIPA,
    checksums_valid,
    data,
    gso_send,
    partial_frame,
    pseudo_sum,
    read_tun,
    receive,
    tcp_packet,
)
from tunnel.frames import FrameType, Probe, ProbeAck, decode_frame_untrusted, encode_frame
from tunnel.offload import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET_HDR_LEN,
    GsoType,
    VnetHdr,
    checksum_partial_fill,
    split_untrusted,
    tunnel_segments_untrusted,
)
from upmt.offload import set_udp_gro

SPOOFED = "10.200.0.99"
PAYLOAD = 1000  # TCP payload per upstream segment: 1040-byte inner packets


# --- packets ------------------------------------------------------------------------


def super_frame(
    src: str, dst: str, *, sport: int, dport: int, seq: int, payload: bytes, mss: int
) -> bytes:
    """A TUN read of a TSO4 super-packet: NEEDS_CSUM, pseudo-header sum in the field."""
    packet = tcp_packet(
        src, dst, sport=sport, dport=dport, seq=seq, payload=payload, ident=300, partial=True
    )
    hdr = VnetHdr(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type=GsoType.TCPV4,
        hdr_len=40,
        gso_size=mss,
        csum_start=20,
        csum_offset=16,
    )
    return hdr.pack() + packet


def key_up(src: str = VIPA, sport: int = 40000, dport: int = 80) -> FiveTuple:
    return FiveTuple(PROTO_TCP, pack_address(src), sport, pack_address(SERVER), dport)


def counters(**changes: int) -> dict[str, int]:
    """A counter snapshot: all zero but `changes`."""
    expected = AnchorCounters().snapshot()
    assert set(changes) <= set(expected)
    expected.update(changes)
    return expected


# --- sockets --------------------------------------------------------------------------


def udp_socket(*, gro: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    sock.setblocking(False)
    if gro:
        assert set_udp_gro(sock, True) is None
    return sock


@dataclass
class Anchor:
    dp: AnchorDataPath
    sock: socket.socket  # the anchor's :1800
    tun: socket.socket  # the kernel's end of the emulated TUN
    tx: socket.socket  # a registered client tunnel
    control: list[tuple[Addr, bytes]] = field(default_factory=list)

    @property
    def addr(self) -> Addr:
        name: Addr = self.sock.getsockname()
        return name

    @property
    def tx_addr(self) -> Addr:
        name: Addr = self.tx.getsockname()
        return name


class MakeAnchor(Protocol):
    def __call__(self, *, offload: bool = ..., max_flows: int = ...) -> Anchor: ...


@pytest.fixture
def make_anchor(sockets: list[socket.socket]) -> Iterator[MakeAnchor]:
    """A factory, so that tests choose the mode and the flow limit."""
    made: list[AnchorDataPath] = []

    def make(*, offload: bool = True, max_flows: int = 65536) -> Anchor:
        tun_end, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (tun_end, peer):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
            end.setblocking(False)
        sock = udp_socket(gro=offload)
        tx = udp_socket(gro=False)
        sockets.extend((tun_end, peer, sock, tx))
        control: list[tuple[Addr, bytes]] = []
        dp = AnchorDataPath(
            tun_end.fileno(),
            sock,
            Paft[Addr](),
            threading.Lock(),
            lambda origin, frame: control.append((origin[0], frame)),
            max_flows_per_terminal=max_flows,
            offload=offload,
            mtu=MTU,
        )
        made.append(dp)
        anchor = Anchor(dp, sock, peer, tx, control)
        dp.tunnel_vipa[anchor.tx_addr] = pack_address(VIPA)
        return anchor

    yield make
    for dp in made:
        dp.stop()


@pytest.fixture
def anchor(make_anchor: MakeAnchor) -> Anchor:
    return make_anchor()


# --- upstream, offload mode -----------------------------------------------------------


@needs_udp_offload
def test_gro_batch_merges_the_legit_flow_and_drops_spoofed_segments(anchor: Anchor) -> None:
    seq0 = 1_000_000
    stream = data(5 * PAYLOAD)
    legit = [
        tcp_packet(
            VIPA,
            SERVER,
            seq=seq0 + i * PAYLOAD,
            payload=stream[i * PAYLOAD : (i + 1) * PAYLOAD],
            ident=100 + i,
            partial=i < 4,
        )
        for i in range(5)
    ]
    # 0x04 frames are one byte longer than their packet, so equal datagrams hold
    # 1000-byte payloads as 0x04 and 1001-byte ones as DATA; the last (legit, DATA)
    # datagram is the GSO send's short one.
    spoofed = [
        tcp_packet(SPOOFED, SERVER, seq=5000, payload=data(PAYLOAD + 1, 2), ident=7),
        tcp_packet(SPOOFED, SERVER, seq=5000 + PAYLOAD + 1, payload=data(PAYLOAD, 3), partial=True),
        tcp_packet(SPOOFED, SERVER, seq=5000 + 2 * PAYLOAD + 1, payload=data(PAYLOAD + 1, 4)),
    ]
    batch = [
        partial_frame(legit[0]),
        spoofed[0],
        partial_frame(legit[1]),
        partial_frame(spoofed[1]),
        partial_frame(legit[2]),
        spoofed[2],
        partial_frame(legit[3]),
        legit[4],
    ]
    assert {len(d) for d in batch[:-1]} == {1041} and len(batch[-1]) == 1040
    gso_send(anchor.tx, batch, anchor.addr)

    anchor.dp.engine.drain_channel(CHANNEL)

    frames = read_tun(anchor.tun)
    assert len(frames) == 1
    (frame,) = frames
    assert VnetHdr.unpack_untrusted(frame) == VnetHdr(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type=GsoType.TCPV4,
        hdr_len=40,
        gso_size=PAYLOAD,
        csum_start=20,
        csum_offset=16,
    )
    merged = frame[VNET_HDR_LEN:]
    assert merged[40:] == stream
    # The merged packet is the whole stream in one segment, checksum left to the kernel.
    whole = tcp_packet(VIPA, SERVER, seq=seq0, payload=stream, ident=100)
    assert checksum_partial_fill(merged) == whole
    assert checksums_valid(whole)

    assert anchor.dp.counters.snapshot() == counters(
        tunnel_packets=5, tunnel_bytes=5 * 1040, spoofed_source=3, gro_batches=1
    )
    assert list(anchor.dp.forwarder.paft.entries) == [key_up()]
    entry = anchor.dp.forwarder.paft.entries[key_up()]
    assert entry.tunnel == anchor.tx_addr
    assert (entry.packets_up, entry.bytes_up) == (5, sum(map(len, legit)))
    assert (entry.packets_down, entry.bytes_down) == (0, 0)
    assert anchor.dp.forwarder.paft.count_of(pack_address(VIPA)) == 1
    assert anchor.dp.forwarder.default_tunnel == {pack_address(VIPA): anchor.tx_addr}
    assert set(anchor.dp.forwarder.last_heard) == {anchor.tx_addr}


@needs_udp_offload
def test_unknown_tunnel_counts_every_inner_packet_and_learns_nothing(
    anchor: Anchor, sockets: list[socket.socket]
) -> None:
    stranger = udp_socket(gro=False)
    sockets.append(stranger)
    batch = [
        partial_frame(
            tcp_packet(VIPA, SERVER, seq=i * PAYLOAD, payload=data(PAYLOAD), partial=True)
        )
        for i in range(4)
    ]
    probe = encode_frame(Probe(tunnel_id=9, seq=1, timestamp_ns=123))
    gso_send(stranger, [*batch, probe], anchor.addr)

    anchor.dp.engine.drain_channel(CHANNEL)

    assert read_tun(anchor.tun) == []
    assert receive(stranger) == ([], 0)  # the probe is not answered either
    assert anchor.dp.counters.snapshot() == counters(unknown_tunnel=5)
    assert len(anchor.dp.forwarder.paft) == 0
    assert anchor.dp.forwarder.paft.count_of(pack_address(VIPA)) == 0
    assert anchor.dp.forwarder.last_heard == {}
    assert anchor.control == []


@needs_udp_offload
def test_probe_in_a_data_batch_is_answered_and_the_data_delivered(anchor: Anchor) -> None:
    stream = data(5 * PAYLOAD)
    packets = [
        tcp_packet(
            VIPA,
            SERVER,
            seq=i * PAYLOAD,
            payload=stream[i * PAYLOAD : (i + 1) * PAYLOAD],
            ident=i,
            partial=True,
        )
        for i in range(5)
    ]
    probe = Probe(tunnel_id=0xDEADBEEF, seq=42, timestamp_ns=1_234_567_890, flags=3)
    gso_send(anchor.tx, [*map(partial_frame, packets[:3]), encode_frame(probe)], anchor.addr)

    anchor.dp.engine.drain_channel(CHANNEL)

    acks, _calls = receive(anchor.tx)
    assert [decode_frame_untrusted(a) for a in acks] == [
        ProbeAck(0xDEADBEEF, 42, 1_234_567_890, 3, anchor.tx_addr)
    ]
    (frame,) = read_tun(anchor.tun)
    assert VnetHdr.unpack_untrusted(frame).gso_type is GsoType.TCPV4
    assert frame[VNET_HDR_LEN + 40 :] == stream[: 3 * PAYLOAD]
    assert anchor.control == []
    assert anchor.dp.counters.snapshot() == counters(
        tunnel_packets=3, tunnel_bytes=3 * 1040, probes_answered=1, gro_batches=1
    )

    # A SIGNAL closing the next batch goes to the control plane, the data to the TUN.
    signal = b"\x01REGISTER sip:anchor SIP/2.0\r\n\r\n"
    gso_send(anchor.tx, [*map(partial_frame, packets[3:]), signal], anchor.addr)
    anchor.dp.engine.drain_channel(CHANNEL)

    assert anchor.control == [(anchor.tx_addr, signal)]
    (frame,) = read_tun(anchor.tun)
    assert frame[VNET_HDR_LEN + 40 :] == stream[3 * PAYLOAD :]
    assert anchor.dp.counters.snapshot() == counters(
        tunnel_packets=5,
        tunnel_bytes=5 * 1040,
        probes_answered=1,
        control_frames=1,
        gro_batches=2,
    )
    assert anchor.dp.forwarder.paft.entries[key_up()].packets_up == 5


@needs_udp_offload
def test_flow_limit_applies_to_every_segment_of_a_batch(make_anchor: MakeAnchor) -> None:
    anchor = make_anchor(max_flows=1)
    a = [
        tcp_packet(VIPA, SERVER, sport=40000, seq=i * PAYLOAD, payload=data(PAYLOAD, i))
        for i in range(3)
    ]
    b = [
        tcp_packet(VIPA, SERVER, sport=40001, seq=i * PAYLOAD, payload=data(PAYLOAD, 10 + i))
        for i in range(3)
    ]
    batch = [partial_frame(p) for pair in zip(a, b, strict=True) for p in pair]
    gso_send(anchor.tx, batch, anchor.addr)

    anchor.dp.engine.drain_channel(CHANNEL)

    (frame,) = read_tun(anchor.tun)
    assert frame[VNET_HDR_LEN + 20 : VNET_HDR_LEN + 22] == struct.pack("!H", 40000)
    assert frame[VNET_HDR_LEN + 40 :] == b"".join(p[40:] for p in a)
    assert anchor.dp.counters.snapshot() == counters(
        tunnel_packets=3, tunnel_bytes=3 * 1040, flow_limit=3, gro_batches=1
    )
    assert list(anchor.dp.forwarder.paft.entries) == [key_up(sport=40000)]
    assert anchor.dp.forwarder.paft.count_of(pack_address(VIPA)) == 1

    # The learnt flow still passes; the other one is still refused, segment by segment.
    more_a = tcp_packet(VIPA, SERVER, sport=40000, seq=3 * PAYLOAD, payload=data(PAYLOAD, 3))
    more_b = tcp_packet(VIPA, SERVER, sport=40001, seq=3 * PAYLOAD, payload=data(PAYLOAD, 13))
    gso_send(anchor.tx, [partial_frame(more_b), partial_frame(more_a)], anchor.addr)
    anchor.dp.engine.drain_channel(CHANNEL)
    assert len(read_tun(anchor.tun)) == 1
    assert anchor.dp.counters.flow_limit == 4
    assert anchor.dp.forwarder.paft.entries[key_up(sport=40000)].packets_up == 4


# --- downstream, offload mode ---------------------------------------------------------


@needs_udp_offload
def test_tun_super_packet_goes_out_as_one_gso_send_of_partial_frames(
    anchor: Anchor, sockets: list[socket.socket]
) -> None:
    client = udp_socket(gro=True)
    sockets.append(client)
    client_addr: Addr = client.getsockname()
    key = key_up()
    anchor.dp.forwarder.paft.learn(key, client_addr, time.monotonic())
    frame = super_frame(
        SERVER, VIPA, sport=80, dport=40000, seq=77, payload=data(20000, 5), mss=1400
    )
    anchor.tun.send(frame)

    anchor.dp.engine.drain_tun()

    got, calls = receive(client)
    expected = split_untrusted(frame, MTU)
    assert len(expected) == 15  # 14 x 1400 + 400
    assert calls == 1  # one GSO send, one GRO receive
    assert len(got) == 15
    assert all(d[0] == FrameType.DATA_CSUM_PARTIAL for d in got)
    assert [len(d) for d in got] == [1441] * 14 + [441]
    assert [checksum_partial_fill(d[1:]) for d in got] == expected
    segments = tunnel_segments_untrusted(frame, MTU)
    assert b"".join(got) == b"".join(bytes(b) for b in segments.buffers)

    inner = sum(map(len, expected))
    assert anchor.dp.counters.snapshot() == counters(tun_packets=15, tun_bytes=inner, gso_reads=1)
    entry = anchor.dp.forwarder.paft.entries[key]
    assert (entry.packets_down, entry.bytes_down) == (15, inner)
    assert (entry.packets_up, entry.bytes_up) == (0, 0)


@needs_udp_offload
def test_tun_super_packet_of_an_unknown_flow_is_counted_no_route(anchor: Anchor) -> None:
    frame = super_frame(SERVER, VIPA, sport=80, dport=40000, seq=0, payload=data(3000, 6), mss=1400)
    anchor.tun.send(frame)
    anchor.dp.engine.drain_tun()
    assert anchor.dp.counters.snapshot() == counters(
        tun_packets=3, tun_bytes=3000 + 3 * 40, gso_reads=1, no_route=3
    )
    assert receive(anchor.tx) == ([], 0)


# --- plain mode -----------------------------------------------------------------------


def test_plain_anchor_completes_partial_checksums(make_anchor: MakeAnchor) -> None:
    anchor = make_anchor(offload=False)
    full = [
        tcp_packet(VIPA, SERVER, seq=i * 500, payload=data(500, 20 + i), ident=i) for i in range(3)
    ]
    partial = [
        tcp_packet(VIPA, SERVER, seq=i * 500, payload=data(500, 20 + i), ident=i, partial=True)
        for i in range(3)
    ]
    udp = build_ipv4(VIPA, SERVER, PROTO_UDP, build_udp(5353, 53, b"query", VIPA, SERVER))
    udp_partial = udp[:26] + struct.pack("!H", pseudo_sum(VIPA, SERVER, PROTO_UDP, 13)) + udp[28:]
    assert all(not checksums_valid(p) for p in [*partial, udp_partial])
    for packet in [*partial, udp_partial]:
        anchor.tx.sendto(partial_frame(packet), anchor.addr)

    anchor.dp.engine.drain_channel(CHANNEL)

    written = read_tun(anchor.tun)
    assert written == [*full, udp]  # no virtio_net_hdr, checksums completed
    assert all(checksums_valid(p) for p in written)
    assert anchor.dp.counters.snapshot() == counters(
        tunnel_packets=4, tunnel_bytes=sum(map(len, written))
    )
    entry = anchor.dp.forwarder.paft.entries[key_up()]
    assert (entry.packets_up, entry.bytes_up) == (3, sum(map(len, full)))


@pytest.mark.parametrize("offload", [True, False])
def test_drain_of_a_socket_closed_under_it_returns(make_anchor: MakeAnchor, offload: bool) -> None:
    """A socket closed while its drain runs gives EBADF for ever: the drain must end."""
    anchor = make_anchor(offload=offload)
    anchor.sock.close()
    done = threading.Event()

    def run() -> None:
        anchor.dp.engine.drain_channel(CHANNEL)
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert done.wait(5), "the drain spins on the closed socket"
    assert anchor.dp.counters.malformed_frames == 1
