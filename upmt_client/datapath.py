"""The client's data path: TUN `upmt0` ↔ one UDP tunnel socket per interface.

Upstream, every packet the applications send is keyed by its 5-tuple and
looked up in the PAFT with one dict access. The first packet of a new flow
asks `decide` where it goes; when the owning application is not known yet
(its socket must be traced to a process, which takes milliseconds), `decide`
answers None and the flow's packets are held — bounded in number and time —
until `resolve` delivers the answer from the classifier's thread, or until
`hold_timeout`, when `fallback` (the default policy) decides. So no flow
leaks onto the wrong network or past a block, and no other flow waits.

Downstream, DATA frames go to the TUN as they are; every other frame (SIGNAL,
PROBE-ACK) is handed to the control plane through `on_control`. Runs in its
own thread (`upmt.pump.Pump`); the control plane moves flows and holds
`lock` while it walks the table, since inserting a flow here takes it too.
"""

import contextlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

from paft.flow import FiveTuple, flow_of_packet_untrusted
from paft.table import FlowEntry, Paft
from upmt.errors import MalformedError
from upmt.pump import Pump

MAX_PACKET = 65535
MAX_HELD_PACKETS = 64
MAX_HELD_FLOWS = 4096
TICK = 0.02


class FlowChoice(NamedTuple):
    tunnel: str | None  # None: nowhere to send it now (dropped, counted)
    app: str | None
    movable: bool


@dataclass(slots=True)
class ClientCounters:
    tun_packets: int = 0
    tun_bytes: int = 0
    tun_malformed: int = 0
    no_tunnel: int = 0
    blocked: int = 0
    held_packets: int = 0
    held_dropped: int = 0
    hold_timeouts: int = 0
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
        decide: Callable[[FiveTuple], FlowChoice | None],
        fallback: Callable[[FiveTuple], FlowChoice],
        on_control: Callable[[str, bytes], None],
        *,
        blocked: str = "!blocked",
        hold_timeout: float = 0.2,
    ) -> None:
        self.tun_fd = tun_fd
        self.paft = paft
        self.lock = lock
        self.decide = decide
        self.fallback = fallback
        self.on_control = on_control
        self.blocked = blocked
        self.hold_timeout = hold_timeout
        self.sockets: dict[str, socket.socket] = {}
        self.counters = ClientCounters()
        self._held: dict[FiveTuple, tuple[float, list[bytes]]] = {}
        self._resolved: queue.SimpleQueue[tuple[FiveTuple, FlowChoice]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pump = Pump("upmt-client-data", tick=self._tick, tick_interval=TICK)
        self._pump.add(tun_fd, self._drain_tun)
        self._pump.add(self._wake_r, self._drain_resolved)

    def start(self) -> None:
        self._pump.start()

    def stop(self) -> None:
        self._pump.stop()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def crashed(self) -> BaseException | None:
        return self._pump.crashed

    @property
    def held_flows(self) -> int:
        return len(self._held)

    def attach(self, ifname: str, sock: socket.socket) -> None:
        """Start carrying traffic on `sock` (connected to the anchor)."""
        self.sockets[ifname] = sock
        self._pump.add(sock.fileno(), lambda: self._drain_tunnel(ifname, sock))

    def detach(self, ifname: str) -> None:
        sock = self.sockets.pop(ifname, None)
        if sock is not None:
            self._pump.remove(sock.fileno())

    def resolve(self, key: FiveTuple, choice: FlowChoice) -> None:
        """The classifier's answer for a held flow (from any thread)."""
        self._resolved.put((key, choice))
        # A full pipe is already a pending wakeup.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- hot path ----------------------------------------------------------
    def _drain_tun(self) -> None:
        read = os.read
        fd = self.tun_fd
        entries = self.paft.entries
        sockets = self.sockets
        held = self._held
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
                waiting = held.get(key)
                if waiting is not None:
                    if len(waiting[1]) < MAX_HELD_PACKETS:
                        waiting[1].append(packet)
                        c.held_packets += 1
                    else:
                        c.held_dropped += 1
                    continue
                choice = self.decide(key)
                if choice is None:
                    if len(held) < MAX_HELD_FLOWS:
                        held[key] = (now, [packet])
                        c.held_packets += 1
                        continue
                    choice = self.fallback(key)
                if choice.tunnel is None:
                    c.no_tunnel += 1
                    continue
                entry = self._learn(key, choice, now)
            sock = sockets.get(entry.tunnel)
            if sock is None:
                if entry.tunnel == self.blocked:
                    c.blocked += 1
                else:
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

    def _learn(self, key: FiveTuple, choice: FlowChoice, now: float) -> FlowEntry[str]:
        assert choice.tunnel is not None
        with self.lock:
            entry = self.paft.learn(key, choice.tunnel, now, app=choice.app)
        entry.movable = choice.movable
        return entry

    def _drain_resolved(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        now = time.monotonic()
        while True:
            try:
                key, choice = self._resolved.get_nowait()
            except queue.Empty:
                return
            waiting = self._held.pop(key, None)
            entry = self.paft.entries.get(key)
            if entry is not None:
                # Decided by the timeout already: record the owner; the control
                # plane moves the flow if the application's policy says so.
                if choice.app is not None:
                    entry.app = choice.app
                continue
            if waiting is not None:
                self._release(key, choice, waiting[1], now)

    def _tick(self) -> None:
        if not self._held:
            return
        now = time.monotonic()
        expired = [k for k, (since, _p) in self._held.items() if now - since >= self.hold_timeout]
        for key in expired:
            _since, packets = self._held.pop(key)
            self.counters.hold_timeouts += 1
            self._release(key, self.fallback(key), packets, now)

    def _release(
        self, key: FiveTuple, choice: FlowChoice, packets: list[bytes], now: float
    ) -> None:
        c = self.counters
        if choice.tunnel is None:
            c.no_tunnel += len(packets)
            return
        entry = self._learn(key, choice, now)
        sock = self.sockets.get(entry.tunnel)
        if sock is None:
            if entry.tunnel == self.blocked:
                c.blocked += len(packets)
            else:
                c.no_tunnel += len(packets)
            return
        for packet in packets:
            entry.packets_up += 1
            entry.bytes_up += len(packet)
            try:
                sock.send(packet)
            except OSError:
                c.send_dropped += 1

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
