"""The tunnel-socket side of the data-path engine (`upmt.engine.DatagramIO`).

`PlainUdpIO` receives one datagram per call. `OffloadUdpIO` turns UDP_GRO
on and receives a whole GRO batch per call (many datagrams of one sender
back to back, `upmt.offload.recv_batch`); with `views` (the datagrams are
decrypted before anything keeps them) it hands out views into its buffer
instead of copies, valid until its next receive. Both send through a
`GsoSender`: one datagram as it is, the segments of a super-packet with
UDP_SEGMENT where the kernel takes it (the plain one never asks for it).
A connected socket (the client's, one per access interface) sends with
`addr` None; the anchor's one socket sends to each tunnel's address.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from ground.constants import Addr
from tunnel.crypto import KeyExhausted, Sealer
from tunnel.forwarding import Outbound
from upmt.offload import GRO_BUFFER, GsoSender, recv_batch, recv_views, set_udp_gro

__all__ = ["OffloadUdpIO", "PlainUdpIO"]

MAX_DATAGRAM = 65535


class _UdpIO:
    __slots__ = ("sender", "sock")

    def __init__(self, sock: socket.socket, *, gso: bool) -> None:
        self.sock = sock
        self.sender = GsoSender(sock, gso=gso)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def gso_state(self) -> str:
        """For status: "on", "off", or "off (why the kernel refused)"."""
        return self.sender.state

    def send(self, item: Outbound, addr: Addr | None, sealer: Sealer | None) -> int:
        if not isinstance(item, bytes):
            return self.sender.send(item, addr, sealer)
        try:
            if sealer is not None:
                item = sealer.seal(item)
            if addr is None:
                self.sock.send(item)
            else:
                self.sock.sendto(item, addr)
        except (OSError, KeyExhausted):
            # A full socket buffer or a link that just went away: UDP semantics, drop.
            return 1
        return 0


class PlainUdpIO(_UdpIO):
    __slots__ = ()
    gro_state = "off"

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, gso=False)
        # Off, explicitly: a socket handed over by exec keeps the option, and a
        # receive of one datagram would take a GRO batch for one.
        set_udp_gro(sock, False)

    def receive(self) -> tuple[Sequence[bytes | memoryview], Addr]:
        data, addr = self.sock.recvfrom(MAX_DATAGRAM)
        return [data], addr


class OffloadUdpIO(_UdpIO):
    __slots__ = ("_buffer", "_gro_refused", "_receive")

    def __init__(self, sock: socket.socket, *, views: bool = False) -> None:
        super().__init__(sock, gso=True)
        self._gro_refused = set_udp_gro(sock, True)  # None: on
        self._buffer = bytearray(GRO_BUFFER)
        self._receive = recv_views if views else recv_batch

    @property
    def gro_state(self) -> str:
        """For status: "on", or "off (why the kernel refused)"."""
        return "on" if self._gro_refused is None else f"off ({self._gro_refused})"

    def receive(self) -> tuple[Sequence[bytes | memoryview], Addr]:
        return self._receive(self.sock, self._buffer)
