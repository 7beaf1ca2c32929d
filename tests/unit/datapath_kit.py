"""Packets, constants and I/O helpers shared by the data-path unit tests."""

from __future__ import annotations

import os
import random
import socket
import struct

from ground.constants import Addr
from paft.flow import PROTO_TCP
from paft.packets import TCP_ACK, build_ipv4, build_tcp, internet_checksum, pack_address
from tunnel.frames import FrameType
from tunnel.offload import Segments
from upmt.offload import GRO_BUFFER, GsoSender, recv_batch

VIPA = "10.200.0.5"
SERVER = "198.51.100.7"
MTU = 1471
DF = 0x4000
BUFFER = 4 << 20


def pseudo_sum(src: str, dst: str, proto: int, length: int) -> int:
    """The folded, uncomplemented pseudo-header sum the kernel leaves for CHECKSUM_PARTIAL."""
    pseudo = pack_address(src) + pack_address(dst) + struct.pack("!xBH", proto, length)
    return ~internet_checksum(pseudo) & 0xFFFF


def tcp_packet(
    src: str,
    dst: str,
    *,
    sport: int = 40000,
    dport: int = 80,
    seq: int = 0,
    payload: bytes = b"",
    ident: int = 0,
    flags: int = TCP_ACK,
    partial: bool = False,
) -> bytes:
    """An IPv4 TCP packet (DF set); with `partial` its checksum holds the pseudo-header sum."""
    segment = build_tcp(sport, dport, src, dst, seq=seq, ack=7000, flags=flags, payload=payload)
    if partial:
        check = pseudo_sum(src, dst, PROTO_TCP, len(segment))
        segment = segment[:16] + struct.pack("!H", check) + segment[18:]
    return build_ipv4(src, dst, PROTO_TCP, segment, ident=ident, flags_frag=DF)


def partial_frame(packet: bytes) -> bytes:
    """A DATA-CSUM-PARTIAL (0x04) datagram."""
    return bytes((FrameType.DATA_CSUM_PARTIAL,)) + packet


def checksums_valid(packet: bytes) -> bool:
    """Recompute the IPv4 header and TCP/UDP checksums of `packet` from scratch."""
    ihl = (packet[0] & 0x0F) * 4
    pseudo = packet[12:20] + struct.pack("!xBH", packet[9], len(packet) - ihl)
    return internet_checksum(packet[:ihl]) == 0 and internet_checksum(pseudo + packet[ihl:]) == 0


def data(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def read_tun(peer: socket.socket) -> list[bytes]:
    """Every frame written to the TUN so far."""
    frames: list[bytes] = []
    while True:
        try:
            frames.append(os.read(peer.fileno(), 0x20000))
        except BlockingIOError:
            return frames


def receive(sock: socket.socket) -> tuple[list[bytes], int]:
    """Every datagram queued on `sock`, and how many receives it took."""
    buf = bytearray(GRO_BUFFER)
    got: list[bytes] = []
    calls = 0
    while True:
        try:
            batch, _addr = recv_batch(sock, buf)
        except BlockingIOError:
            return got, calls
        got += batch
        calls += 1


def gso_send(tx: socket.socket, datagrams: list[bytes], addr: Addr) -> None:
    """Send `datagrams` with one UDP_SEGMENT sendmsg: one GRO batch at the receiver."""
    size = len(datagrams[0])
    assert all(len(d) == size for d in datagrams[:-1]) and len(datagrams[-1]) <= size
    sender = GsoSender(tx)
    assert sender.gso, sender.fallback_reason
    buffers: list[bytes | memoryview] = list(datagrams)
    total = sum(map(len, datagrams))
    assert sender.send(Segments(buffers, size, len(datagrams), total), addr) == 0
    assert sender.gso  # no fallback: it went out as one send
