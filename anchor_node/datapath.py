"""The anchor's data path: UDP :1800 ↔ TUN `upmt-an`.

Upstream, a DATA frame is accepted only from a known tunnel (TID = observed
source address and port) and only if its inner source is the VIPA that
tunnel belongs to (anti-spoofing); its flow is then learnt on that tunnel
(paper §V: upstream traffic alone moves a flow) and the packet goes to the
TUN, where the kernel forwards and NATs it. Downstream, a packet from the
TUN is looked up by its reversed 5-tuple; a flow not learnt yet goes on the
terminal's last-heard tunnel. PROBEs from known tunnels are answered here,
so that the RTT the client measures is the path's, not the control plane's;
every other frame goes to the control plane through `on_control`.

With `offload` (a TUN opened with IFF_VNET_HDR) both directions move whole
batches: a TUN read may be a 64 KB TCP super-packet, cut into MTU-sized
inner packets and sent with one UDP_SEGMENT sendmsg (frame 0x04 when the
kernel left the checksum to the device); a UDP_GRO receive may hold dozens of
datagrams, whose TCP segments are merged per flow and written to the TUN as
one GSO packet. Learning, anti-spoofing and accounting apply to every inner
packet: a merged frame only ever holds segments of one 5-tuple.

With `sessions` (tunnel encryption, the default) every datagram must be an
ENCRYPTED frame that authenticates under a known receiver index, and only
one from the address its tunnel slot is bound to counts: that alone may
refresh a tunnel, be learnt, answered or change a default tunnel. A SIGNAL
from another address (a tunnel being set up, or moved by a NAT) goes to the
control plane with its key, which decides. Everything else is dropped and
counted; plaintext frames are never accepted. Downstream, every datagram is
sealed under the tunnel's current key, one by one inside GSO runs.
"""

import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from anchor_node.sessions import Receiver, TunnelSessions
from ground.constants import Addr
from ground.errors import MalformedError
from paft.aging import TCP_FIN, TCP_RST, tcp_flags
from paft.flow import PROTO_TCP, flow_of_packet_untrusted
from paft.table import Paft
from tunnel.batch import tun_writes
from tunnel.crypto import ENCRYPTED, OVERHEAD, KeyExhausted, Sealer
from tunnel.frames import FrameType, Probe, ProbeAck, decode_frame_untrusted, encode_frame
from tunnel.offload import (
    VNET_HDR_LEN,
    checksum_partial_fill,
    tunnel_datagram_untrusted,
    tunnel_segments_untrusted,
)
from upmt.offload import (
    GRO_BUFFER,
    TUN_READ_SIZE,
    GsoSender,
    receive_batches,
)
from upmt.pump import Pump

# What travels with a control frame: where it came from, and under which key.
Origin = tuple[Addr, Receiver | None]
MAX_PACKET = 65535
CLOSING = TCP_FIN | TCP_RST


@dataclass(slots=True)
class AnchorCounters:
    tunnel_packets: int = 0
    tunnel_bytes: int = 0
    malformed_frames: int = 0
    malformed_packets: int = 0
    unknown_tunnel: int = 0
    spoofed_source: int = 0
    control_frames: int = 0
    probes_answered: int = 0
    tun_packets: int = 0
    tun_bytes: int = 0
    no_route: int = 0
    send_dropped: int = 0
    flow_limit: int = 0
    gso_reads: int = 0  # TUN reads that were super-packets
    gro_batches: int = 0  # receives that held more than one inner packet
    plaintext_dropped: int = 0  # not ENCRYPTED while encryption is on
    auth_failed: int = 0  # ENCRYPTED for a known index that did not open (or a replay)
    wrong_endpoint: int = 0  # authentic, but not from its tunnel's address
    no_key: int = 0  # downstream packets for a tunnel with no key (yet)

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


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
    ) -> None:
        self.tun_fd = tun_fd
        self.sock = sock
        self.paft = paft
        self.lock = lock
        self.on_control = on_control
        # Written by the control plane, read here: tunnel → packed VIPA it serves,
        # packed VIPA → last tunnel heard from, tunnel → time last heard.
        self.tunnel_vipa: dict[Addr, bytes] = {}
        self.default_tunnel: dict[bytes, Addr] = {}
        self.last_heard: dict[Addr, float] = {}
        # A terminal at its limit of flows (the PAFT's per-VIPA count) learns no
        # new flow: its packets are dropped and counted.
        self.max_flows_per_terminal = max_flows_per_terminal
        self.sessions = sessions
        self.receivers = sessions.receivers if sessions is not None else {}
        self.senders = sessions.senders if sessions is not None else {}
        self.counters = AnchorCounters()
        self._batch_rx: Receiver | None = None
        self.offload = offload
        self.mtu = mtu
        self._sender = GsoSender(sock, gso=offload)
        self._buffer = bytearray(GRO_BUFFER)
        self._pump = Pump("anchor-data")
        if offload:
            self._pump.add(sock.fileno(), self._drain_socket_offload)
            self._pump.add(tun_fd, self._drain_tun_offload)
        else:
            self._pump.add(sock.fileno(), self._drain_socket)
            self._pump.add(tun_fd, self._drain_tun)

    def start(self) -> None:
        self._pump.start()

    def stop(self) -> None:
        self._pump.stop()

    @property
    def crashed(self) -> BaseException | None:
        return self._pump.crashed

    @property
    def udp_gso(self) -> str:
        """ "on", "off" on the plain path, or "off (why)" where the kernel refused it."""
        return self._sender.state

    # -- hot path ----------------------------------------------------------
    def _drain_socket(self) -> None:
        recvfrom = self.sock.recvfrom
        write = os.write
        fd = self.tun_fd
        tunnel_vipa = self.tunnel_vipa
        accept = self._accept_upstream
        sessions = self.sessions
        c = self.counters
        now = time.monotonic()
        while True:
            try:
                data, addr = recvfrom(MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                # Stop rather than spin on an error that repeats (EBADF); epoll is
                # level-triggered and wakes the loop again while datagrams are queued.
                c.malformed_frames += 1
                return
            if not data:
                c.malformed_frames += 1
                continue
            rx: Receiver | None = None
            if sessions is not None:
                opened = self._open(data, addr)
                if opened is None:
                    continue
                data, rx = opened
            version = data[0] >> 4
            if version != 4 and version != 6:
                if data[0] != FrameType.DATA_CSUM_PARTIAL:
                    self._control_frame(data, addr, now, rx)
                    continue
                try:
                    data = checksum_partial_fill(data[1:])
                except MalformedError:
                    c.malformed_packets += 1
                    continue
            vipa = tunnel_vipa.get(addr)
            if vipa is None:
                c.unknown_tunnel += 1
                continue
            if accept(data, vipa, addr, now, 1, len(data)):
                try:
                    write(fd, data)
                except OSError:
                    c.send_dropped += 1

    def _drain_socket_offload(self) -> None:
        """Like `_drain_socket`, for GRO batches in and vnet-header frames out."""
        write = os.write
        fd = self.tun_fd
        accept = self._accept_upstream
        c = self.counters
        now = time.monotonic()
        opener = self._open_batch if self.sessions is not None else None
        self._batch_rx = None
        for batch in receive_batches(self.sock, self._buffer, opener):
            if batch is None:
                c.malformed_frames += 1
                continue
            packets, partial, other, malformed, addr = batch
            c.malformed_frames += malformed
            for data in other:
                # Every datagram of one receive comes from one address, hence one key.
                self._control_frame(data, addr, now, self._batch_rx)
            if not packets:
                continue
            vipa = self.tunnel_vipa.get(addr)
            if vipa is None:
                c.unknown_tunnel += len(packets)
                continue
            if len(packets) > 1:
                c.gro_batches += 1
            for frame, packet, count, size in tun_writes(packets, partial):
                if accept(packet, vipa, addr, now, count, size):
                    try:
                        write(fd, frame)
                    except OSError:
                        c.send_dropped += count

    def _accept_upstream(
        self, packet: bytes, vipa: bytes, addr: Addr, now: float, count: int, size: int
    ) -> bool:
        """Anti-spoofing, learning and accounting of `count` inner packets of one flow."""
        c = self.counters
        try:
            key = flow_of_packet_untrusted(packet)
        except MalformedError:
            c.malformed_packets += count
            return False
        if key.src != vipa:
            c.spoofed_source += count
            return False
        entry = self.paft.entries.get(key)
        if entry is None:
            if self.paft.count_of(vipa) >= self.max_flows_per_terminal:
                c.flow_limit += count
                return False
            with self.lock:
                entry = self.paft.learn(key, addr, now)
        elif entry.tunnel != addr:
            entry.tunnel = addr
        if key.proto == PROTO_TCP and tcp_flags(packet) & CLOSING:
            entry.closed_at = now
        entry.packets_up += count
        entry.bytes_up += size
        entry.last_seen = now
        c.tunnel_packets += count
        c.tunnel_bytes += size
        self.last_heard[addr] = now
        default_tunnel = self.default_tunnel
        if default_tunnel.get(vipa) != addr:
            default_tunnel[vipa] = addr
        return True

    def _open(self, data: bytes | memoryview, addr: Addr) -> tuple[bytes, Receiver] | None:
        """The inner frame of an ENCRYPTED datagram from its tunnel, and its key; else None.

        Counted and dropped: plaintext, unknown index, a frame that does not
        authenticate (or a replay), an authentic one from another address than
        its tunnel's — except a SIGNAL, which goes to the control plane with
        its key (a set-up of that slot from a new address).
        """
        c = self.counters
        if len(data) <= OVERHEAD or data[0] != ENCRYPTED:
            c.plaintext_dropped += 1
            return None
        rx = self.receivers.get(int.from_bytes(data[1:5], "big"))
        if rx is None:
            c.unknown_tunnel += 1
            return None
        try:
            frame = rx.opener.open_untrusted(data)
        except MalformedError:
            c.auth_failed += 1
            return None
        if rx.endpoint != addr:
            self._from_elsewhere(frame, addr, rx)
            return None
        self._confirm(rx, addr)
        return frame, rx

    def _from_elsewhere(self, frame: bytes, addr: Addr, rx: Receiver) -> None:
        """An authentic frame from another address than its tunnel's: only a SIGNAL goes on."""
        if frame[0] == FrameType.SIGNAL:
            self.counters.control_frames += 1
            self.on_control((addr, rx), frame)
        else:
            self.counters.wrong_endpoint += 1

    def _confirm(self, rx: Receiver, addr: Addr) -> None:
        if rx.current and self.senders.get(addr) is not rx.sealer:
            # The first frame under a new key: the terminal has it, answer under it.
            self.senders[addr] = rx.sealer

    def _open_batch(self, datagrams: Sequence[bytes | memoryview], addr: Addr) -> list[bytes]:
        """`_open` over one receive's datagrams (one sender, so almost always one key).

        Remembers the key for the batch's control frames.
        """
        c = self.counters
        first = datagrams[0]
        rx = None
        if len(first) > OVERHEAD and first[0] == ENCRYPTED:
            rx = self.receivers.get(int.from_bytes(first[1:5], "big"))
        if rx is None:
            return self._open_each(datagrams, addr)
        frames, failed, others = rx.opener.open_many(datagrams)
        c.auth_failed += failed
        rest = self._open_each(others, addr) if others else []
        if not frames:  # nothing authenticated under this key: it earns nothing
            return rest
        if rx.endpoint != addr:
            for frame in frames:
                self._from_elsewhere(frame, addr, rx)
            return rest
        self._confirm(rx, addr)
        self._batch_rx = rx
        return frames + rest if rest else frames

    def _open_each(self, datagrams: Sequence[bytes | memoryview], addr: Addr) -> list[bytes]:
        out = []
        for datagram in datagrams:
            opened = self._open(datagram, addr)
            if opened is not None:
                out.append(opened[0])
                self._batch_rx = opened[1]
        return out

    def _seal(self, frame: bytes, addr: Addr) -> bytes | None:
        """`frame` as it goes out to `addr`: sealed with encryption on, None without a key."""
        if self.sessions is None:
            return frame
        sealer = self.senders.get(addr)
        if sealer is None:
            self.counters.no_key += 1
            return None
        try:
            return sealer.seal(frame)
        except KeyExhausted:
            self.counters.send_dropped += 1
            return None

    def _control_frame(self, data: bytes, addr: Addr, now: float, rx: Receiver | None) -> None:
        c = self.counters
        if data[0] == FrameType.PROBE:
            if addr not in self.tunnel_vipa:
                c.unknown_tunnel += 1
                return
            try:
                probe = decode_frame_untrusted(data)
            except MalformedError:
                c.malformed_frames += 1
                return
            if not isinstance(probe, Probe):
                c.malformed_frames += 1
                return
            self.last_heard[addr] = now
            ack = ProbeAck(probe.tunnel_id, probe.seq, probe.timestamp_ns, probe.flags, addr)
            datagram = self._seal(encode_frame(ack), addr)
            if datagram is None:
                return
            try:
                self.sock.sendto(datagram, addr)
                c.probes_answered += 1
            except OSError:
                c.send_dropped += 1
            return
        c.control_frames += 1
        self.on_control((addr, rx), data)

    def _drain_tun(self) -> None:
        read = os.read
        fd = self.tun_fd
        sendto = self.sock.sendto
        route = self._route_downstream
        seal = self._seal
        encrypted = self.sessions is not None
        c = self.counters
        now = time.monotonic()
        while True:
            try:
                packet = read(fd, MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                c.malformed_packets += 1
                return
            addr = route(packet, now, 1, len(packet))
            if addr is None:
                continue
            if encrypted:
                sealed = seal(packet, addr)
                if sealed is None:
                    continue
                packet = sealed
            try:
                sendto(packet, addr)
            except OSError:
                c.send_dropped += 1

    def _drain_tun_offload(self) -> None:
        """Like `_drain_tun`, for vnet-header reads sent with UDP_SEGMENT."""
        read = os.read
        fd = self.tun_fd
        route = self._route_downstream
        send = self._sender.send
        sendto = self.sock.sendto
        seal = self._seal
        senders = self.senders
        encrypted = self.sessions is not None
        mtu = self.mtu
        c = self.counters
        now = time.monotonic()
        while True:
            try:
                frame = read(fd, TUN_READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                c.malformed_packets += 1
                return
            packet = frame[VNET_HDR_LEN:]
            try:
                datagram = tunnel_datagram_untrusted(frame, mtu)
                if datagram is None:
                    segments = tunnel_segments_untrusted(frame, mtu)
            except MalformedError:
                c.malformed_packets += 1
                continue
            if datagram is not None:
                addr = route(packet, now, 1, len(packet))
                if addr is None:
                    continue
                if encrypted:
                    sealed = seal(datagram, addr)
                    if sealed is None:
                        continue
                    datagram = sealed
                try:
                    sendto(datagram, addr)
                except OSError:
                    c.send_dropped += 1
                continue
            if segments.count > 1:
                c.gso_reads += 1
            addr = route(packet, now, segments.count, segments.inner_bytes)
            if addr is None:
                continue
            sealer: Sealer | None = None
            if encrypted:
                sealer = senders.get(addr)
                if sealer is None:
                    c.no_key += segments.count
                    continue
            c.send_dropped += send(segments, addr, sealer)

    def _route_downstream(self, packet: bytes, now: float, count: int, size: int) -> Addr | None:
        """The tunnel for `count` inner packets of one flow (accounted), or None."""
        c = self.counters
        c.tun_packets += count
        c.tun_bytes += size
        try:
            key = flow_of_packet_untrusted(packet).reversed()
        except MalformedError:
            c.malformed_packets += count
            return None
        entry = self.paft.entries.get(key)
        if entry is None:
            found = self.default_tunnel.get(key.src)
            if found is None:
                c.no_route += count
            return found
        if key.proto == PROTO_TCP and tcp_flags(packet) & CLOSING:
            entry.closed_at = now
        entry.packets_down += count
        entry.bytes_down += size
        entry.last_seen = now
        return entry.tunnel
