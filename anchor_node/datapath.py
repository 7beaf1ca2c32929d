"""The anchor's data path: UDP :1800 ↔ TUN `upmt-an`.

Wiring only: the per-packet decisions (anti-spoofing, learning, PROBE
answers, decryption) are `anchor_node.forwarder`'s, the drain loops
`upmt.engine`'s (one thread over epoll), the I/O `upmt.tun_io`'s and
`upmt.udp_io`'s. With `offload` (a TUN opened with IFF_VNET_HDR) both
directions move whole batches: a TUN read may be a 64 KB TCP super-packet,
cut into MTU-sized inner packets and sent with one UDP_SEGMENT sendmsg
(frame 0x04 when the kernel left the checksum to the device); a UDP_GRO
receive may hold dozens of datagrams, whose TCP segments are merged per flow
and written to the TUN as one GSO packet.
"""

import socket
import threading
from collections.abc import Callable

from anchor_node.forwarder import CHANNEL, AnchorCounters, AnchorForwarder, Origin
from anchor_node.sessions import TunnelSessions
from ground.constants import Addr
from paft.table import Paft
from upmt.engine import Engine
from upmt.tun_io import OffloadTunIO, PlainTunIO
from upmt.udp_io import OffloadUdpIO, PlainUdpIO

__all__ = ["AnchorDataPath", "Origin"]


class AnchorDataPath:
    def __init__(
        self,
        tun_fd: int,
        sock: socket.socket,
        paft: Paft[Addr],
        lock: threading.Lock,
        on_control: Callable[[Origin, bytes], None],
        *,
        max_flows_per_terminal: int = 65536,
        offload: bool = False,
        mtu: int = 1500,
        sessions: TunnelSessions | None = None,
        tunnel_vipa: dict[Addr, bytes] | None = None,
        default_tunnel: dict[bytes, Addr] | None = None,
    ) -> None:
        self.forwarder = AnchorForwarder(
            paft,
            lock,
            on_control,
            max_flows_per_terminal=max_flows_per_terminal,
            sessions=sessions,
        )
        if tunnel_vipa is not None:
            self.forwarder.tunnel_vipa = tunnel_vipa
        if default_tunnel is not None:
            self.forwarder.default_tunnel = default_tunnel
        self.socket = (
            OffloadUdpIO(sock, views=sessions is not None) if offload else PlainUdpIO(sock)
        )
        tun = OffloadTunIO(tun_fd, mtu) if offload else PlainTunIO(tun_fd)
        self.engine = Engine("anchor-data", tun, self.forwarder)
        self.engine.add_channel(CHANNEL, self.socket)

    @property
    def counters(self) -> AnchorCounters:
        return self.forwarder.counters

    @property
    def tunnel_vipa(self) -> dict[Addr, bytes]:
        return self.forwarder.tunnel_vipa

    @property
    def last_heard(self) -> dict[Addr, float]:
        return self.forwarder.last_heard

    @property
    def crashed(self) -> BaseException | None:
        return self.engine.crashed

    @property
    def udp_gso(self) -> str:
        """ "on", "off" on the plain path, or "off (why)" where the kernel refused it."""
        return self.socket.gso_state

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
