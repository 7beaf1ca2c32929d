"""A received batch of tunnel datagrams, sorted and turned into TUN writes (pure).

One receive (a UDP GRO batch, or one datagram) yields inner packets, control
frames and junk; `sort_batch` separates them, `tun_writes` turns the inner
packets into what a virtio-net-header TUN takes (runs of one flow merged by
`tunnel.offload.coalesce`), and `frame_segments` says how many inner packets
and bytes one such write stands for. The engine's receive loop
(`upmt.engine.Engine.drain_channel`) uses them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from tunnel.frames import FrameType
from tunnel.offload import VNET_HDR_LEN, coalesce, lone_frame

__all__ = ["frame_segments", "sort_batch", "tun_writes"]

_VNET_SIZES: Final = struct.Struct("<HH")  # hdr_len, gso_size at offset 2
_IP_VERSIONS: Final = frozenset(range(0x40, 0x50)) | frozenset(range(0x60, 0x70))
_CSUM_PARTIAL: Final = int(FrameType.DATA_CSUM_PARTIAL)


def sort_batch(datagrams: Sequence[bytes]) -> tuple[list[bytes], list[bool], list[bytes], int]:
    """Split received datagrams into inner packets (with their partial flag), the rest, and junk.

    DATA is the IP packet itself; DATA-CSUM-PARTIAL (0x04) is its type byte and
    an IP packet whose checksum field holds only the pseudo-header sum.
    SIGNAL, PROBE, PROBE-ACK and unknown types go to the control plane as
    they are; empty datagrams and 0x04 frames without an IP packet are only
    counted (the last item), as the plain path counts them.
    """
    packets: list[bytes] = []
    partial: list[bool] = []
    other: list[bytes] = []
    malformed = 0
    versions = _IP_VERSIONS
    for datagram in datagrams:
        if not datagram:
            malformed += 1
            continue
        first = datagram[0]
        if first in versions:
            packets.append(datagram)
            partial.append(False)
        elif first != _CSUM_PARTIAL:
            other.append(datagram)
        elif len(datagram) > 1 and datagram[1] in versions:
            packets.append(datagram[1:])
            partial.append(True)
        else:
            malformed += 1
    return packets, partial, other, malformed


def tun_writes(packets: list[bytes], partial: list[bool]) -> list[tuple[bytes, bytes, int, int]]:
    """What one batch becomes on a vnet-header TUN, a tuple per write.

    Each: the frame to write, its IP packet, and how many inner packets and
    bytes it stands for. A lone packet skips the search for runs; merged
    frames hold segments of one 5-tuple only (`coalesce` checks it), so a
    check of the IP packet holds for each of them.
    """
    if len(packets) == 1:
        packet = packets[0]
        return [(lone_frame(packet, partial[0]), packet, 1, len(packet))]
    return [
        (frame, frame[VNET_HDR_LEN:], *frame_segments(frame))
        for frame in coalesce(packets, partial=partial)
    ]


def frame_segments(frame: bytes) -> tuple[int, int]:
    """(inner packets, their bytes) that one vnet-header TUN frame stands for."""
    size = len(frame) - VNET_HDR_LEN
    if frame[1] == 0:
        return 1, size
    hdr_len, gso_size = _VNET_SIZES.unpack_from(frame, 2)
    if gso_size == 0 or hdr_len >= size:
        return 1, size
    count = -(-(size - hdr_len) // gso_size)
    return count, size + (count - 1) * hdr_len
