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

With `offload` (a TUN opened with IFF_VNET_HDR) a TUN read may be a 64 KB
TCP super-packet: it is classified once (all its segments share the
5-tuple), cut into MTU-sized inner packets and sent with one UDP_SEGMENT
sendmsg; a UDP_GRO receive is merged per flow and written to the TUN as GSO
packets. Accounting counts every inner packet either way.

With `encrypted` every datagram a tunnel sends is sealed under the tunnel's
current key (one by one inside GSO runs) and every datagram it receives must
open under one of its keys; nothing travels, in or out, without one.
"""

import contextlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

from ground.constants import Addr
from ground.errors import MalformedError
from paft.flow import FiveTuple, flow_of_packet_untrusted
from paft.table import FlowEntry, Paft
from tunnel.batch import tun_writes
from tunnel.crypto import KeyExhausted, Sealer, TunnelKeys
from tunnel.frames import FrameType
from tunnel.offload import (
    VNET_HDR_LEN,
    Segments,
    checksum_partial_fill,
    tunnel_datagram_untrusted,
    tunnel_segments_untrusted,
)
from upmt.offload import (
    GRO_BUFFER,
    TUN_READ_SIZE,
    GsoSender,
    receive_batches,
    set_udp_gro,
)
from upmt.pump import Pump

_NO_ADDR: Addr = ("", 0)  # a connected tunnel socket: the sender is the anchor
MAX_PACKET = 65535
MAX_HELD_PACKETS = 64
MAX_HELD_FLOWS = 4096
TICK = 0.02

# What goes up a tunnel: one datagram, or the segments of one TUN read.
Outbound = bytes | Segments


class _Held:
    """What a flow waiting for its owner has sent so far: items, inner packets and bytes."""

    __slots__ = ("items", "packets", "since", "size")

    def __init__(self, since: float, item: Outbound, packets: int, size: int) -> None:
        self.since = since
        self.items = [item]
        self.packets = packets
        self.size = size

    def add(self, item: Outbound, packets: int, size: int) -> None:
        self.items.append(item)
        self.packets += packets
        self.size += size


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
    gso_reads: int = 0  # TUN reads that were super-packets
    gro_batches: int = 0  # receives that held more than one inner packet
    tunnel_unauthenticated: int = 0  # received datagrams that did not open under a key
    no_key: int = 0  # packets for a tunnel without keys (not sent)

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
        offload: bool = False,
        mtu: int = 1500,
        encrypted: bool = False,
    ) -> None:
        self.tun_fd = tun_fd
        self.encrypted = encrypted
        self.paft = paft
        self.lock = lock
        self.decide = decide
        self.fallback = fallback
        self.on_control = on_control
        self.blocked = blocked
        self.hold_timeout = hold_timeout
        self.offload = offload
        self.mtu = mtu
        self.sockets: dict[str, socket.socket] = {}
        self.senders: dict[str, GsoSender] = {}
        self.keys: dict[str, TunnelKeys] = {}
        self.gro: dict[str, str] = {}
        self.counters = ClientCounters()
        self._buffer = bytearray(GRO_BUFFER)
        self._held: dict[FiveTuple, _Held] = {}
        self._resolved: queue.SimpleQueue[tuple[FiveTuple, FlowChoice]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pump = Pump("upmt-client-data", tick=self._tick, tick_interval=TICK)
        self._pump.add(tun_fd, self._drain_tun_offload if offload else self._drain_tun)
        self._pump.add(self._wake_r, self._drain_resolved)

    def start(self) -> None:
        self._pump.start()

    def stop(self) -> None:
        self._pump.stop()
        wake_r, wake_w = self._wake_r, self._wake_w
        # A late `resolve` from the classifier must not write to a reused fd number.
        self._wake_r = self._wake_w = -1
        for fd in (wake_r, wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def crashed(self) -> BaseException | None:
        return self._pump.crashed

    @property
    def held_flows(self) -> int:
        return len(self._held)

    def attach(self, ifname: str, sock: socket.socket, keys: TunnelKeys | None = None) -> None:
        """Start carrying traffic on `sock` (connected to the anchor), under `keys`."""
        if self.encrypted and keys is None:
            raise ValueError(f"{ifname}: an encrypted data path needs the tunnel's keys")
        # Set both ways: a socket handed over by exec keeps the option, and a
        # plain receive loop would take a GRO batch for one datagram.
        refused = set_udp_gro(sock, self.offload)
        self.gro[ifname] = "off" if not self.offload else f"off ({refused})" if refused else "on"
        if keys is not None:
            self.keys[ifname] = keys
        self.senders[ifname] = GsoSender(sock, gso=self.offload)
        self.sockets[ifname] = sock
        drain = self._drain_tunnel_offload if self.offload else self._drain_tunnel
        self._pump.add(sock.fileno(), lambda: drain(ifname, sock))

    def offload_json(self) -> dict[str, dict[str, str]]:
        """Per tunnel: UDP GRO and GSO "on", or "off (why)"."""
        return {
            name: {
                "udp_gro": self.gro.get(name, "off"),
                "udp_gso": sender.state,
            }
            for name, sender in list(self.senders.items())
        }

    def detach(self, ifname: str) -> None:
        self.senders.pop(ifname, None)
        self.keys.pop(ifname, None)
        sock = self.sockets.pop(ifname, None)
        if sock is not None:
            self._pump.remove(sock.fileno())

    def resolve(self, key: FiveTuple, choice: FlowChoice) -> None:
        """The classifier's answer for a held flow (from any thread)."""
        self._resolved.put((key, choice))
        # A full pipe is already a pending wakeup.
        wake = self._wake_w
        if wake >= 0:
            with contextlib.suppress(OSError):
                os.write(wake, b"x")

    # -- hot path ----------------------------------------------------------
    def _drain_tun(self) -> None:
        read = os.read
        fd = self.tun_fd
        forward = self._forward
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
            forward(key, packet, 1, size, now)

    def _drain_tun_offload(self) -> None:
        """Like `_drain_tun`, for vnet-header reads: one decision per super-packet."""
        read = os.read
        fd = self.tun_fd
        forward = self._forward
        mtu = self.mtu
        c = self.counters
        now = time.monotonic()
        while True:
            try:
                frame = read(fd, TUN_READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                c.tun_malformed += 1
                return
            packet = frame[VNET_HDR_LEN:]
            try:
                key = flow_of_packet_untrusted(packet)
                datagram = tunnel_datagram_untrusted(frame, mtu)
                if datagram is None:
                    segments = tunnel_segments_untrusted(frame, mtu)
            except MalformedError:
                c.tun_malformed += 1
                continue
            if datagram is not None:
                c.tun_packets += 1
                c.tun_bytes += len(packet)
                forward(key, datagram, 1, len(packet), now)
                continue
            count = segments.count
            c.tun_packets += count
            c.tun_bytes += segments.inner_bytes
            if count > 1:
                c.gso_reads += 1
            forward(key, segments, count, segments.inner_bytes, now)

    def _forward(self, key: FiveTuple, item: Outbound, count: int, size: int, now: float) -> None:
        """Send `count` inner packets of flow `key` where its PAFT entry says, or hold them."""
        c = self.counters
        entry = self.paft.entries.get(key)
        if entry is None:
            held = self._held
            waiting = held.get(key)
            if waiting is not None:
                if waiting.packets + count <= MAX_HELD_PACKETS:
                    waiting.add(item, count, size)
                    c.held_packets += count
                else:
                    c.held_dropped += count
                return
            choice = self.decide(key)
            if choice is None:
                if len(held) < MAX_HELD_FLOWS:
                    held[key] = _Held(now, item, count, size)
                    c.held_packets += count
                    return
                choice = self.fallback(key)
            if choice.tunnel is None:
                c.no_tunnel += count
                return
            entry = self._learn(key, choice, now)
        self._send(entry, (item,), count, size, now)

    def _send(
        self, entry: FlowEntry[str], items: Sequence[Outbound], count: int, size: int, now: float
    ) -> None:
        """Send `items` (`count` inner packets, `size` bytes) on the tunnel of `entry`."""
        c = self.counters
        sender = self.senders.get(entry.tunnel)
        if sender is None:
            if entry.tunnel == self.blocked:
                c.blocked += count
            else:
                c.no_tunnel += count
            return
        sealer: Sealer | None = None
        if self.encrypted:
            keys = self.keys.get(entry.tunnel)
            if keys is None:
                c.no_key += count
                return
            sealer = keys.sealer
        entry.packets_up += count
        entry.bytes_up += size
        entry.last_seen = now
        for item in items:
            c.send_dropped += _transmit(sender, item, sealer)

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
                self._release(key, choice, waiting, now)

    def _tick(self) -> None:
        if not self._held:
            return
        now = time.monotonic()
        expired = [k for k, h in self._held.items() if now - h.since >= self.hold_timeout]
        for key in expired:
            waiting = self._held.pop(key)
            self.counters.hold_timeouts += 1
            self._release(key, self.fallback(key), waiting, now)

    def _release(self, key: FiveTuple, choice: FlowChoice, held: _Held, now: float) -> None:
        if choice.tunnel is None:
            self.counters.no_tunnel += held.packets
            return
        entry = self._learn(key, choice, now)
        self._send(entry, held.items, held.packets, held.size, now)

    def _opener(
        self, ifname: str
    ) -> Callable[[Sequence[bytes | memoryview], Addr], list[bytes]] | None:
        """Decryption for the datagrams of tunnel `ifname` (None: plain), counting failures."""
        if not self.encrypted:
            return None
        c = self.counters

        def open_batch(datagrams: Sequence[bytes | memoryview], _addr: Addr) -> list[bytes]:
            keys = self.keys.get(ifname)
            if keys is None:
                c.tunnel_unauthenticated += len(datagrams)
                return []
            frames, failed = keys.open_many(datagrams)
            c.tunnel_unauthenticated += failed
            return frames

        return open_batch

    def _drain_tunnel(self, ifname: str, sock: socket.socket) -> None:
        recv = sock.recv
        write = os.write
        fd = self.tun_fd
        account = self._account_down
        open_batch = self._opener(ifname)
        c = self.counters
        now = time.monotonic()
        while True:
            try:
                data = recv(MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                # ICMP errors surface as ECONNREFUSED and the like on a connected
                # socket, EBADF (for ever) on one closed under the loop: stop, epoll
                # wakes the loop again while datagrams are queued.
                c.tunnel_malformed += 1
                return
            if not data:
                c.tunnel_malformed += 1
                continue
            if open_batch is not None:
                opened = open_batch([data], _NO_ADDR)
                if not opened:
                    continue
                data = opened[0]
            version = data[0] >> 4
            if version != 4 and version != 6:
                if data[0] != FrameType.DATA_CSUM_PARTIAL:
                    c.control_frames += 1
                    self.on_control(ifname, data)
                    continue
                try:
                    data = checksum_partial_fill(data[1:])
                except MalformedError:
                    c.tunnel_malformed += 1
                    continue
            if account(data, now, 1, len(data)):
                try:
                    write(fd, data)
                except OSError:
                    c.tunnel_malformed += 1

    def _drain_tunnel_offload(self, ifname: str, sock: socket.socket) -> None:
        """Like `_drain_tunnel`, for GRO batches in and vnet-header frames out."""
        write = os.write
        fd = self.tun_fd
        account = self._account_down
        c = self.counters
        now = time.monotonic()
        for batch in receive_batches(sock, self._buffer, self._opener(ifname)):
            if batch is None:
                c.tunnel_malformed += 1
                continue
            packets, partial, other, malformed, _addr = batch
            c.tunnel_malformed += malformed
            for data in other:
                c.control_frames += 1
                self.on_control(ifname, data)
            if len(packets) > 1:
                c.gro_batches += 1
            for frame, packet, count, size in tun_writes(packets, partial):
                if account(packet, now, count, size):
                    try:
                        write(fd, frame)
                    except OSError:
                        c.tunnel_malformed += count

    def _account_down(self, packet: bytes, now: float, count: int, size: int) -> bool:
        """Count `count` inner packets of one flow against its PAFT entry; False if malformed."""
        c = self.counters
        try:
            key = flow_of_packet_untrusted(packet).reversed()
        except MalformedError:
            c.tunnel_malformed += count
            return False
        c.tunnel_packets += count
        c.tunnel_bytes += size
        entry = self.paft.entries.get(key)
        if entry is not None:
            entry.packets_down += count
            entry.bytes_down += size
            entry.last_seen = now
        return True


def _transmit(sender: GsoSender, item: Outbound, sealer: Sealer | None) -> int:
    """Send one packet or one read's segments (sealed); returns the datagrams dropped."""
    if isinstance(item, Segments):
        return sender.send(item, None, sealer)
    try:
        sender.sock.send(item if sealer is None else sealer.seal(item))
    except (OSError, KeyExhausted):
        # Full socket buffer or a link that just went away: UDP semantics, drop.
        return 1
    return 0
