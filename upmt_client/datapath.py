"""The client's data path: TUN `upmt0` ↔ one UDP tunnel socket per interface.

Upstream, every packet the applications send is keyed by its 5-tuple and
looked up in the PAFT with one dict access; a new flow asks `choose_tunnel`
(the policy) once and is learnt. Downstream, DATA frames go to the TUN as
they are; every other frame (SIGNAL, PROBE-ACK) is handed to the control
plane through `on_control`. Runs in its own thread (`upmt.pump.Pump`); the
control plane changes the tunnel set and moves flows, and holds `lock` while
it walks the table, since only inserting a new flow here takes the lock too.
"""

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from paft.flow import FiveTuple, flow_of_packet_untrusted
from paft.table import FlowEntry, Paft
from upmt.errors import MalformedError
from upmt.pump import Pump

MAX_PACKET = 65535


@dataclass(slots=True)
class ClientCounters:
    tun_packets: int = 0
    tun_bytes: int = 0
    tun_malformed: int = 0
    no_tunnel: int = 0
    send_dropped: int = 0
    tunnel_packets: int = 0
    tunnel_bytes: int = 0
    tunnel_malformed: int = 0
    control_frames: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class ClientDataPath:
    def __init__(
        self,
        tun_fd: int,
        paft: Paft[str],
        lock: threading.Lock,
        choose_tunnel: Callable[[FiveTuple], str | None],
        on_control: Callable[[str, bytes], None],
    ) -> None:
        self.tun_fd = tun_fd
        self.paft = paft
        self.lock = lock
        self.choose_tunnel = choose_tunnel
        self.on_control = on_control
        self.sockets: dict[str, socket.socket] = {}
        self.counters = ClientCounters()
        self._pump = Pump("upmt-client-data")
        self._pump.add(tun_fd, self._drain_tun)

    def start(self) -> None:
        self._pump.start()

    def stop(self) -> None:
        self._pump.stop()

    @property
    def crashed(self) -> BaseException | None:
        return self._pump.crashed

    def attach(self, ifname: str, sock: socket.socket) -> None:
        """Start carrying traffic on `sock` (connected to the anchor)."""
        self.sockets[ifname] = sock
        self._pump.add(sock.fileno(), lambda: self._drain_tunnel(ifname, sock))

    def detach(self, ifname: str) -> None:
        sock = self.sockets.pop(ifname, None)
        if sock is not None:
            self._pump.remove(sock.fileno())

    # -- hot path ----------------------------------------------------------
    def _drain_tun(self) -> None:
        read = os.read
        fd = self.tun_fd
        entries = self.paft.entries
        sockets = self.sockets
        c = self.counters
        now = time.monotonic()
        while True:
            try:
                packet = read(fd, MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                c.tun_malformed += 1
                return
            size = len(packet)
            c.tun_packets += 1
            c.tun_bytes += size
            try:
                key = flow_of_packet_untrusted(packet)
            except MalformedError:
                c.tun_malformed += 1
                continue
            entry = entries.get(key)
            if entry is None:
                entry = self._new_flow(key, now)
                if entry is None:
                    c.no_tunnel += 1
                    continue
            sock = sockets.get(entry.tunnel)
            if sock is None:
                c.no_tunnel += 1
                continue
            entry.packets_up += 1
            entry.bytes_up += size
            entry.last_seen = now
            try:
                sock.send(packet)
            except OSError:
                # Full socket buffer or a link that just went away: UDP semantics, drop.
                c.send_dropped += 1

    def _new_flow(self, key: FiveTuple, now: float) -> FlowEntry[str] | None:
        tunnel = self.choose_tunnel(key)
        if tunnel is None:
            return None
        with self.lock:
            return self.paft.learn(key, tunnel, now)

    def _drain_tunnel(self, ifname: str, sock: socket.socket) -> None:
        recv = sock.recv
        write = os.write
        fd = self.tun_fd
        entries = self.paft.entries
        c = self.counters
        now = time.monotonic()
        while True:
            try:
                data = recv(MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                # ICMP errors surface as ECONNREFUSED and the like on a connected socket.
                c.tunnel_malformed += 1
                continue
            if not data:
                c.tunnel_malformed += 1
                continue
            version = data[0] >> 4
            if version == 4 or version == 6:
                c.tunnel_packets += 1
                c.tunnel_bytes += len(data)
                try:
                    entry = entries.get(flow_of_packet_untrusted(data).reversed())
                except MalformedError:
                    c.tunnel_malformed += 1
                    continue
                if entry is not None:
                    entry.packets_down += 1
                    entry.bytes_down += len(data)
                    entry.last_seen = now
                try:
                    write(fd, data)
                except OSError:
                    c.tunnel_malformed += 1
            else:
                c.control_frames += 1
                self.on_control(ifname, data)
