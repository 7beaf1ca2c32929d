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
"""

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from paft.aging import TCP_FIN, TCP_RST, tcp_flags
from paft.flow import PROTO_TCP, flow_of_packet_untrusted
from paft.table import Paft
from tunnel.frames import FrameType, Probe, ProbeAck, decode_frame_untrusted, encode_frame
from tunnel.offload import (
    VNET_HDR_LEN,
    checksum_partial_fill,
    tunnel_datagram_untrusted,
    tunnel_segments_untrusted,
)
from upmt.errors import MalformedError
from upmt.offload import (
    GRO_BUFFER,
    TUN_READ_SIZE,
    GsoSender,
    receive_batches,
    tun_writes,
)
from upmt.pump import Pump

Addr = tuple[str, int]
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

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class AnchorDataPath:
    def __init__(
        self,
        tun_fd: int,
        sock: socket.socket,
        paft: Paft[Addr],
        lock: threading.Lock,
        on_control: Callable[[Addr, bytes], None],
        *,
        max_flows_per_terminal: int = 65536,
        offload: bool = False,
        mtu: int = 1500,
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
        # Flows per VIPA: counted up here as flows are learnt, recounted exactly by
        # the control plane after every expiry; a terminal at its limit learns no
        # new flow (its packets are dropped and counted).
        self.max_flows_per_terminal = max_flows_per_terminal
        self.flow_count: dict[bytes, int] = {}
        self.counters = AnchorCounters()
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
            version = data[0] >> 4
            if version != 4 and version != 6:
                if data[0] != FrameType.DATA_CSUM_PARTIAL:
                    self._control_frame(data, addr, now)
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
        for batch in receive_batches(self.sock, self._buffer):
            if batch is None:
                c.malformed_frames += 1
                continue
            packets, partial, other, malformed, addr = batch
            c.malformed_frames += malformed
            for data in other:
                self._control_frame(data, addr, now)
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
            flow_count = self.flow_count
            known = flow_count.get(vipa, 0)
            if known >= self.max_flows_per_terminal:
                c.flow_limit += count
                return False
            flow_count[vipa] = known + 1
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

    def _control_frame(self, data: bytes, addr: Addr, now: float) -> None:
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
            try:
                self.sock.sendto(encode_frame(ack), addr)
                c.probes_answered += 1
            except OSError:
                c.send_dropped += 1
            return
        c.control_frames += 1
        self.on_control(addr, data)

    def _drain_tun(self) -> None:
        read = os.read
        fd = self.tun_fd
        sendto = self.sock.sendto
        route = self._route_downstream
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
            if addr is not None:
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
                if addr is not None:
                    try:
                        sendto(datagram, addr)
                    except OSError:
                        c.send_dropped += 1
                continue
            if segments.count > 1:
                c.gso_reads += 1
            addr = route(packet, now, segments.count, segments.inner_bytes)
            if addr is not None:
                c.send_dropped += send(segments, addr)

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
