"""The client's data path: TUN `upmt0` ↔ one UDP tunnel socket per interface.

Wiring only: the per-packet decisions are `upmt_client.forwarder`'s, the
drain loops `upmt.engine`'s (one thread over epoll), the I/O `upmt.tun_io`'s
and `upmt.udp_io`'s, plain or offload as the TUN was opened. With `offload`
(a TUN opened with IFF_VNET_HDR) a TUN read may be a 64 KB TCP super-packet:
it is classified once (all its segments share the 5-tuple), cut into
MTU-sized inner packets and sent with one UDP_SEGMENT sendmsg; a UDP_GRO
receive is merged per flow and written to the TUN as GSO packets.
Accounting counts every inner packet either way.

The classifier's answers for held flows arrive from its own thread through
`resolve`: a queue and a wake-up pipe the engine watches.
"""

import contextlib
import os
import queue
import socket
import threading
from collections.abc import Callable

from paft.flow import FiveTuple
from paft.table import Paft
from tunnel.crypto import TunnelKeys
from tunnel.forwarding import TunIO
from upmt.engine import Engine
from upmt.tun_io import OffloadTunIO, PlainTunIO
from upmt.udp_io import OffloadUdpIO, PlainUdpIO
from upmt_client.bypass import BypassIO
from upmt_client.forwarder import ClientCounters, ClientForwarder, FlowChoice

__all__ = ["ClientDataPath", "FlowChoice"]

TICK = 0.02  # how often held flows are checked for their timeout


class ClientDataPath:
    def __init__(
        self,
        tun_fd: int,
        paft: Paft[str],
        lock: threading.Lock,
        decide: Callable[[FiveTuple], FlowChoice | None],
        fallback: Callable[[FiveTuple], FlowChoice],
        on_control: Callable[[str, bytes], None],
        *,
        blocked: str = "!blocked",
        hold_timeout: float = 0.2,
        offload: bool = False,
        mtu: int = 1500,
        encrypted: bool = False,
    ) -> None:
        self.offload = offload
        self.encrypted = encrypted
        self.forwarder = ClientForwarder(
            paft,
            lock,
            decide,
            fallback,
            on_control,
            blocked=blocked,
            hold_timeout=hold_timeout,
            encrypted=encrypted,
        )
        tun: TunIO = OffloadTunIO(tun_fd, mtu) if offload else PlainTunIO(tun_fd)
        self.engine = Engine("upmt-client-data", tun, self.forwarder, tick_interval=TICK)
        self.sockets: dict[str, PlainUdpIO | OffloadUdpIO] = {}
        self.bypasses: dict[str, BypassIO] = {}
        self._resolved: queue.SimpleQueue[tuple[FiveTuple, FlowChoice]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.engine.watch(self._wake_r, self.drain_resolved)

    @property
    def counters(self) -> ClientCounters:
        return self.forwarder.counters

    @property
    def held_flows(self) -> int:
        return self.forwarder.held_flows

    @property
    def crashed(self) -> BaseException | None:
        return self.engine.crashed

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        wake_r, wake_w = self._wake_r, self._wake_w
        # A late `resolve` from the classifier must not write to a reused fd number.
        self._wake_r = self._wake_w = -1
        for fd in (wake_r, wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def attach(self, ifname: str, sock: socket.socket, keys: TunnelKeys | None = None) -> None:
        """Start carrying traffic on `sock` (connected to the anchor), under `keys`."""
        self.forwarder.attach(ifname, keys)
        io = OffloadUdpIO(sock, views=self.encrypted) if self.offload else PlainUdpIO(sock)
        self.sockets[ifname] = io
        self.engine.add_channel(ifname, io)

    def attach_bypass(self, name: str, io: BypassIO) -> None:
        """Carry the bypass flows of one interface (`name` is its pseudo-tunnel) on `io`."""
        self.forwarder.attach(name, None)
        self.bypasses[name] = io
        self.engine.add_channel(name, io)

    def detach(self, ifname: str) -> None:
        self.forwarder.detach(ifname)
        self.sockets.pop(ifname, None)
        self.engine.remove_channel(ifname)

    def offload_json(self) -> dict[str, dict[str, str]]:
        """Per tunnel: UDP GRO and GSO "on", or "off (why)"."""
        return {
            name: {"udp_gro": io.gro_state, "udp_gso": io.gso_state}
            for name, io in list(self.sockets.items())
        }

    def resolve(self, key: FiveTuple, choice: FlowChoice) -> None:
        """The classifier's answer for a held flow (from any thread)."""
        self._resolved.put((key, choice))
        # A full pipe is already a pending wakeup.
        wake = self._wake_w
        if wake >= 0:
            with contextlib.suppress(OSError):
                os.write(wake, b"x")

    def drain_resolved(self) -> None:
        """In the engine's thread: the answers that arrived, their held packets sent."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass
        now = self.engine.clock()
        while True:
            try:
                key, choice = self._resolved.get_nowait()
            except queue.Empty:
                return
            self.engine.release(self.forwarder.resolve(key, choice, now))
