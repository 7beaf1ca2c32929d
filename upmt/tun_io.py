"""The TUN side of the data-path engine (`upmt.engine.TunIO`): plain and offload.

`PlainTunIO` reads and writes bare IP packets. `OffloadTunIO` is for a TUN
opened with IFF_VNET_HDR: every frame starts with a virtio_net_hdr, a read
may be a 64 KB TCP (or UDP) super-packet, cut into MTU-sized tunnel
datagrams (`tunnel.offload.tunnel_segments_untrusted`), and the inner packets
of one receive are merged per flow into GSO frames (`tunnel.batch.tun_writes`).
Both work on a non-blocking fd: an empty queue is BlockingIOError.
"""

from __future__ import annotations

import functools
import os

from ground.errors import MalformedError
from tunnel.batch import tun_writes
from tunnel.forwarding import TunRead, TunWrite
from tunnel.offload import (
    VNET_HDR_LEN,
    checksum_partial_fill,
    tunnel_datagram_untrusted,
    tunnel_segments_untrusted,
)
from upmt.offload import TUN_READ_SIZE

__all__ = ["MAX_PACKET", "OffloadTunIO", "PlainTunIO", "packet_writes"]

MAX_PACKET = 65535
_NO_OFFLOAD = bytes(VNET_HDR_LEN)  # a virtio_net_hdr asking for nothing: GSO_NONE, no flags


class PlainTunIO:
    __slots__ = ("fd", "write", "write_packet")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # C-level callables: one Python frame less per packet.
        self.write = self.write_packet = functools.partial(os.write, fd)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> TunRead:
        packet = os.read(self.fd, MAX_PACKET)
        return packet, packet, 1, len(packet)

    def writes(self, packets: list[bytes], partial: list[bool]) -> tuple[list[TunWrite], int]:
        return packet_writes(packets, partial)


class OffloadTunIO:
    __slots__ = ("fd", "mtu", "write")

    def __init__(self, fd: int, mtu: int) -> None:
        self.fd = fd
        self.mtu = mtu
        self.write = functools.partial(os.write, fd)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> TunRead:
        """One vnet-header read: one tunnel datagram, or the segments of a super-packet."""
        frame = os.read(self.fd, TUN_READ_SIZE)
        packet = frame[VNET_HDR_LEN:]
        datagram = tunnel_datagram_untrusted(frame, self.mtu)
        if datagram is not None:
            return packet, datagram, 1, len(packet)
        segments = tunnel_segments_untrusted(frame, self.mtu)
        return packet, segments, segments.count, segments.inner_bytes

    def writes(self, packets: list[bytes], partial: list[bool]) -> tuple[list[TunWrite], int]:
        return tun_writes(packets, partial), 0

    def write_packet(self, packet: bytes) -> None:
        os.write(self.fd, _NO_OFFLOAD + packet)


def packet_writes(packets: list[bytes], partial: list[bool]) -> tuple[list[TunWrite], int]:
    """Each packet as it is; a DATA-CSUM-PARTIAL one gets its checksum completed first."""
    if len(packets) == 1 and not partial[0]:
        packet = packets[0]
        return [(packet, packet, 1, len(packet))], 0
    out: list[TunWrite] = []
    unusable = 0
    for packet, needs_sum in zip(packets, partial, strict=True):
        if needs_sum:
            try:
                packet = checksum_partial_fill(packet)
            except MalformedError:
                unusable += 1
                continue
        out.append((packet, packet, 1, len(packet)))
    return out, unusable
