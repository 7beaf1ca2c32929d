"""The client's data path on real loopback sockets, drained by hand (no pump thread).

The TUN is a SOCK_SEQPACKET socket pair: one `os.read` is one TUN frame. The
tunnel is a UDP socket connected to an "anchor" socket; the anchor side sends
downstream batches with one UDP_SEGMENT send, which reaches the client's
UDP_GRO socket as one receive on loopback.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ground.constants import Addr
from paft.flow import PROTO_TCP, FiveTuple
from paft.packets import TCP_SYN, pack_address
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
    read_tun,
    receive,
    tcp_packet,
)
from tunnel.frames import FrameType, ProbeAck, encode_frame
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
from upmt_client.datapath import ClientDataPath
from upmt_client.forwarder import ClientCounters, FlowChoice

MSS = 1400
PAYLOAD = 1000  # TCP payload per downstream segment: 1040-byte inner packets
IF0 = "if0"
BLOCKED = "!blocked"


# --- packets ------------------------------------------------------------------------


def vnet(**fields: Any) -> VnetHdr:
    """The header of a TCPV4 frame whose checksum the kernel completes."""
    base: dict[str, Any] = {
        "flags": VIRTIO_NET_HDR_F_NEEDS_CSUM,
        "gso_type": GsoType.TCPV4,
        "hdr_len": 40,
        "csum_start": 20,
        "csum_offset": 16,
    }
    return VnetHdr(**{**base, **fields})


def super_frame(*, sport: int = 40000, seq: int = 0, payload: bytes, mss: int = MSS) -> bytes:
    """A TUN read of an upstream TSO4 super-packet: NEEDS_CSUM, pseudo-header sum in the field."""
    packet = tcp_packet(VIPA, SERVER, sport=sport, seq=seq, payload=payload, ident=9, partial=True)
    return vnet(gso_size=mss).pack() + packet


def key_up(sport: int = 40000, dport: int = 80) -> FiveTuple:
    return FiveTuple(PROTO_TCP, pack_address(VIPA), sport, pack_address(SERVER), dport)


def counters(**changes: int) -> dict[str, int]:
    """A counter snapshot: all zero but `changes`."""
    expected = ClientCounters().snapshot()
    assert set(changes) <= set(expected)
    expected.update(changes)
    return expected


# --- sockets --------------------------------------------------------------------------


class EioSocket(socket.socket):
    """A UDP socket whose egress device "cannot offload checksums": sendmsg fails with EIO."""

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:
        self.refused = getattr(self, "refused", 0) + 1
        raise OSError(errno.EIO, os.strerror(errno.EIO))


class Decide:
    """`decide`: records every call, answers `choice`."""

    def __init__(self, choice: FlowChoice | None) -> None:
        self.choice = choice
        self.calls: list[FiveTuple] = []

    def __call__(self, key: FiveTuple) -> FlowChoice | None:
        self.calls.append(key)
        return self.choice


@dataclass
class Client:
    dp: ClientDataPath
    decide: Decide
    tun: socket.socket  # the kernel's end of the emulated TUN
    sock: socket.socket  # the tunnel socket on "if0"
    anchor: socket.socket  # what the tunnel is connected to
    control: list[tuple[str, bytes]] = field(default_factory=list)
    fallbacks: list[FiveTuple] = field(default_factory=list)

    @property
    def sock_addr(self) -> Addr:
        name: Addr = self.sock.getsockname()
        return name


def _socket(kind: type[socket.socket] = socket.socket) -> socket.socket:
    sock = kind(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    sock.setblocking(False)
    return sock


def make_client(
    sockets: list[socket.socket],
    made: list[ClientDataPath],
    *,
    offload: bool = True,
    choice: FlowChoice | None = None,
    sock_kind: type[socket.socket] = socket.socket,
) -> Client:
    tun_end, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (tun_end, peer):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        end.setblocking(False)
    anchor = _socket()
    if offload:
        assert set_udp_gro(anchor, True) is None
    sock = _socket(sock_kind)
    sock.connect(anchor.getsockname())
    sockets.extend((tun_end, peer, anchor, sock))
    decide = Decide(choice)
    control: list[tuple[str, bytes]] = []
    fallbacks: list[FiveTuple] = []

    def fallback(key: FiveTuple) -> FlowChoice:
        fallbacks.append(key)
        return FlowChoice(None, None, True)

    dp = ClientDataPath(
        tun_end.fileno(),
        Paft[str](),
        threading.Lock(),
        decide,
        fallback,
        lambda ifname, frame: control.append((ifname, frame)),
        blocked=BLOCKED,
        offload=offload,
        mtu=MTU,
    )
    made.append(dp)
    dp.attach(IF0, sock)
    return Client(dp, decide, peer, sock, anchor, control, fallbacks)


@pytest.fixture
def made() -> Iterator[list[ClientDataPath]]:
    paths: list[ClientDataPath] = []
    yield paths
    for dp in paths:
        dp.stop()


@pytest.fixture
def client(sockets: list[socket.socket], made: list[ClientDataPath]) -> Client:
    return make_client(sockets, made, choice=FlowChoice(IF0, "curl", True))


def expected_datagrams(frame: bytes) -> list[bytes]:
    """The tunnel datagrams of one TUN read, as `tunnel_segments_untrusted` lays them out."""
    segments = tunnel_segments_untrusted(frame, MTU)
    joined = b"".join(bytes(b) for b in segments.buffers)
    return [joined[at : at + segments.size] for at in range(0, len(joined), segments.size)]


# --- upstream -------------------------------------------------------------------------


@needs_udp_offload
def test_super_packet_is_decided_once_and_sent_as_partial_frames(client: Client) -> None:
    frame = super_frame(seq=500, payload=data(20000))
    packets = split_untrusted(frame, MTU)
    assert len(packets) == 15
    client.tun.send(frame)

    client.dp.engine.drain_tun()

    assert client.decide.calls == [key_up()]
    got, calls = receive(client.anchor)
    assert calls == 1  # one UDP_SEGMENT send
    assert got == expected_datagrams(frame)
    assert all(d[0] == FrameType.DATA_CSUM_PARTIAL for d in got)
    assert [checksum_partial_fill(d[1:]) for d in got] == packets
    inner = sum(map(len, packets))
    assert client.dp.counters.snapshot() == counters(tun_packets=15, tun_bytes=inner, gso_reads=1)
    entry = client.dp.forwarder.paft.entries[key_up()]
    assert (entry.tunnel, entry.app, entry.movable) == (IF0, "curl", True)
    assert (entry.packets_up, entry.bytes_up) == (15, inner)

    # The next read of the flow finds its entry: no second decision.
    client.tun.send(super_frame(seq=20500, payload=data(3000, 2)))
    client.dp.engine.drain_tun()
    assert client.decide.calls == [key_up()]
    got, _calls = receive(client.anchor)
    assert len(got) == 3
    assert client.dp.forwarder.paft.entries[key_up()].packets_up == 18
    assert client.dp.counters.gso_reads == 2


@needs_udp_offload
def test_held_super_packet_is_sent_whole_when_resolved(
    sockets: list[socket.socket], made: list[ClientDataPath]
) -> None:
    client = make_client(sockets, made, choice=None)
    frame = super_frame(seq=0, payload=data(20000))
    # A small read of the same flow (no GSO, checksum complete), held behind it.
    tail = VnetHdr().pack() + tcp_packet(VIPA, SERVER, seq=20000, payload=b"tail")
    client.tun.send(frame)
    client.tun.send(tail)

    client.dp.engine.drain_tun()

    assert client.decide.calls == [key_up()]
    assert client.dp.held_flows == 1
    assert receive(client.anchor) == ([], 0)
    assert client.dp.counters.snapshot() == counters(
        tun_packets=16,
        tun_bytes=sum(map(len, split_untrusted(frame, MTU))) + 44,
        gso_reads=1,
        held_packets=16,
    )
    assert len(client.dp.forwarder.paft) == 0

    client.dp.resolve(key_up(), FlowChoice(IF0, "wget", False))
    client.dp.drain_resolved()

    assert client.dp.held_flows == 0
    got, _calls = receive(client.anchor)
    assert got == [*expected_datagrams(frame), tail[VNET_HDR_LEN:]]
    entry = client.dp.forwarder.paft.entries[key_up()]
    assert (entry.tunnel, entry.app, entry.movable) == (IF0, "wget", False)
    assert entry.packets_up == 16
    assert entry.bytes_up == client.dp.counters.tun_bytes
    assert client.decide.calls == [key_up()]
    assert client.fallbacks == []


@needs_udp_offload
def test_held_partial_packet_is_accounted_by_its_inner_size(
    sockets: list[socket.socket], made: list[ClientDataPath]
) -> None:
    client = make_client(sockets, made, choice=None)
    syn = tcp_packet(VIPA, SERVER, flags=TCP_SYN, partial=True)
    client.tun.send(vnet(gso_type=GsoType.NONE, hdr_len=0).pack() + syn)
    client.dp.engine.drain_tun()
    assert client.dp.held_flows == 1
    assert client.dp.counters.tun_bytes == len(syn)

    client.dp.resolve(key_up(), FlowChoice(IF0, "curl", True))
    client.dp.drain_resolved()

    assert receive(client.anchor)[0] == [partial_frame(syn)]
    entry = client.dp.forwarder.paft.entries[key_up()]
    assert (entry.packets_up, entry.bytes_up) == (1, len(syn))


@needs_udp_offload
def test_held_super_packet_resolved_to_blocked_sends_nothing(
    sockets: list[socket.socket], made: list[ClientDataPath]
) -> None:
    client = make_client(sockets, made, choice=None)
    client.tun.send(super_frame(seq=0, payload=data(20000)))
    client.dp.engine.drain_tun()
    assert client.dp.held_flows == 1

    client.dp.resolve(key_up(), FlowChoice(BLOCKED, "evil", False))
    client.dp.drain_resolved()

    assert client.dp.held_flows == 0
    assert receive(client.anchor) == ([], 0)
    c = client.dp.counters
    assert (c.blocked, c.held_packets, c.send_dropped, c.no_tunnel) == (15, 15, 0, 0)
    entry = client.dp.forwarder.paft.entries[key_up()]
    assert (entry.tunnel, entry.packets_up) == (BLOCKED, 0)

    # Later reads of the flow are blocked too, per inner packet.
    client.tun.send(super_frame(seq=20000, payload=data(3000, 2)))
    client.dp.engine.drain_tun()
    assert receive(client.anchor) == ([], 0)
    assert client.dp.counters.blocked == 18
    assert client.decide.calls == [key_up()]


# --- downstream -----------------------------------------------------------------------


def down_packet(
    seq: int, payload: bytes, *, sport: int = 80, dport: int = 40000, **kw: Any
) -> bytes:
    return tcp_packet(SERVER, VIPA, sport=sport, dport=dport, seq=seq, payload=payload, **kw)


@needs_udp_offload
def test_gro_batch_is_merged_per_flow_in_order(client: Client) -> None:
    client.dp.forwarder.paft.learn(key_up(), IF0, 0.0)
    seq0 = 3_000_000
    stream = data(5 * PAYLOAD, 7)
    a = [
        down_packet(
            seq0 + i * PAYLOAD,
            stream[i * PAYLOAD : (i + 1) * PAYLOAD],
            ident=50 + i,
            partial=i < 4,
        )
        for i in range(5)
    ]
    # Another flow, DATA frames of the same datagram size, with a gap: two lone packets.
    b = [
        down_packet(9000, data(PAYLOAD + 1, 8), sport=443, dport=40001),
        down_packet(9000 + 5 * PAYLOAD, data(PAYLOAD + 1, 9), sport=443, dport=40001),
    ]
    batch = [partial_frame(a[0]), b[0], partial_frame(a[1]), partial_frame(a[2]), b[1]]
    batch += [partial_frame(a[3]), a[4]]  # the last, DATA, is the short datagram
    gso_send(client.anchor, batch, client.sock_addr)

    client.dp.engine.drain_channel(IF0)

    frames = read_tun(client.tun)
    assert len(frames) == 3
    merged, lone_b0, lone_b1 = frames
    assert VnetHdr.unpack_untrusted(merged) == vnet(gso_size=PAYLOAD)
    assert merged[VNET_HDR_LEN + 40 :] == stream
    whole = down_packet(seq0, stream, ident=50)
    assert checksum_partial_fill(merged[VNET_HDR_LEN:]) == whole
    assert checksums_valid(whole)
    none = VnetHdr().pack()
    assert (lone_b0, lone_b1) == (none + b[0], none + b[1])

    assert client.dp.counters.snapshot() == counters(
        tunnel_packets=7, tunnel_bytes=5 * 1040 + 2 * 1041, gro_batches=1
    )
    entry = client.dp.forwarder.paft.entries[key_up()]
    assert (entry.packets_down, entry.bytes_down) == (5, sum(map(len, a)))
    assert client.control == []


@needs_udp_offload
def test_probe_ack_in_a_gro_batch_goes_to_the_control_plane(client: Client) -> None:
    stream = data(3 * PAYLOAD, 10)
    a = [
        down_packet(i * PAYLOAD, stream[i * PAYLOAD : (i + 1) * PAYLOAD], ident=i, partial=True)
        for i in range(3)
    ]
    ack = encode_frame(ProbeAck(7, 99, 123456789, 0, client.sock_addr))
    gso_send(client.anchor, [*map(partial_frame, a), ack], client.sock_addr)

    client.dp.engine.drain_channel(IF0)

    assert client.control == [(IF0, ack)]
    (frame,) = read_tun(client.tun)
    assert VnetHdr.unpack_untrusted(frame) == vnet(gso_size=PAYLOAD)
    assert frame[VNET_HDR_LEN + 40 :] == stream
    assert client.dp.counters.snapshot() == counters(
        tunnel_packets=3, tunnel_bytes=3 * 1040, control_frames=1, gro_batches=1
    )


def test_plain_client_completes_partial_checksums(
    sockets: list[socket.socket], made: list[ClientDataPath]
) -> None:
    client = make_client(sockets, made, offload=False)
    assert client.dp.offload_json()[IF0]["udp_gro"] == "off"
    full = [down_packet(i * 700, data(700, 30 + i), ident=i) for i in range(3)]
    for i in range(3):
        packet = down_packet(i * 700, data(700, 30 + i), ident=i, partial=True)
        assert not checksums_valid(packet)
        client.anchor.sendto(partial_frame(packet), client.sock_addr)

    client.dp.engine.drain_channel(IF0)

    assert read_tun(client.tun) == full  # no virtio_net_hdr, checksums completed
    assert client.dp.counters.snapshot() == counters(
        tunnel_packets=3, tunnel_bytes=sum(map(len, full))
    )


# --- GSO fallback ---------------------------------------------------------------------


@needs_udp_offload
def test_eio_on_udp_segment_falls_back_to_one_send_per_datagram(
    sockets: list[socket.socket], made: list[ClientDataPath]
) -> None:
    client = make_client(sockets, made, choice=FlowChoice(IF0, None, True), sock_kind=EioSocket)
    assert client.dp.offload_json() == {IF0: {"udp_gro": "on", "udp_gso": "on"}}
    frame = super_frame(seq=0, payload=data(20000))
    client.tun.send(frame)

    client.dp.engine.drain_tun()

    got, calls = receive(client.anchor)
    assert got == expected_datagrams(frame)
    assert calls == 15  # datagram by datagram
    assert isinstance(client.sock, EioSocket) and client.sock.refused == 1
    assert client.dp.offload_json() == {
        IF0: {"udp_gro": "on", "udp_gso": "off (UDP_SEGMENT: EIO from the egress device)"}
    }
    assert client.dp.counters.send_dropped == 0
    assert client.dp.forwarder.paft.entries[key_up()].packets_up == 15

    # And it stays off: the next super-packet does not try UDP_SEGMENT again.
    client.tun.send(super_frame(seq=20000, payload=data(3000, 2)))
    client.dp.engine.drain_tun()
    got, calls = receive(client.anchor)
    assert (len(got), calls) == (3, 3)
    assert client.sock.refused == 1


@pytest.mark.parametrize("offload", [True, False])
def test_drain_of_a_socket_closed_under_it_returns(
    sockets: list[socket.socket], made: list[ClientDataPath], offload: bool
) -> None:
    """A tunnel closed while its drain runs gives EBADF for ever: the drain must end."""
    if offload and set_udp_gro(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), True):
        pytest.skip("this kernel has no UDP_GRO")
    c = make_client(sockets, made, offload=offload, choice=FlowChoice(IF0, "curl", True))
    c.sock.close()
    done = threading.Event()

    def run() -> None:
        c.dp.engine.drain_channel(IF0)
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert done.wait(5), "the drain spins on the closed socket"
    assert c.dp.counters.tunnel_malformed == 1
