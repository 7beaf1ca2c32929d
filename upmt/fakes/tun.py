"""A TUN device in memory, as the data-path engine sees one (`upmt.engine.TunIO`).

Plain (no virtio-net header): `inject` queues an IP packet as if an
application (client) or the Internet behind the NAT (anchor) had sent it,
for the engine's `drain_tun`; everything the engine writes lands in
`written`, in order. Like wireguard-go's `tun/tuntest`.
"""

from __future__ import annotations

from collections import deque

from tunnel.forwarding import TunRead, TunWrite
from upmt.tun_io import packet_writes

__all__ = ["FakeTunIO"]


class FakeTunIO:
    def __init__(self) -> None:
        self.pending: deque[bytes] = deque()
        self.written: list[bytes] = []

    def inject(self, packet: bytes) -> None:
        self.pending.append(packet)

    def take(self) -> list[bytes]:
        """What was written since the last call."""
        out, self.written = self.written, []
        return out

    def fileno(self) -> int:
        return -1  # never polled: the caller drives the engine

    def read(self) -> TunRead:
        if not self.pending:
            raise BlockingIOError
        packet = self.pending.popleft()
        return packet, packet, 1, len(packet)

    def writes(self, packets: list[bytes], partial: list[bool]) -> tuple[list[TunWrite], int]:
        return packet_writes(packets, partial)

    def write(self, frame: bytes) -> None:
        self.written.append(frame)

    write_packet = write
