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
from upmt.errors import MalformedError
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
        self._pump = Pump("anchor-data")
        self._pump.add(sock.fileno(), self._drain_socket)
        self._pump.add(tun_fd, self._drain_tun)

    def start(self) -> None:
        self._pump.start()

    def stop(self) -> None:
        self._pump.stop()

    @property
    def crashed(self) -> BaseException | None:
        return self._pump.crashed

    # -- hot path ----------------------------------------------------------
    def _drain_socket(self) -> None:
        recvfrom = self.sock.recvfrom
        write = os.write
        fd = self.tun_fd
        entries = self.paft.entries
        tunnel_vipa = self.tunnel_vipa
        default_tunnel = self.default_tunnel
        last_heard = self.last_heard
        flow_count = self.flow_count
        limit = self.max_flows_per_terminal
        c = self.counters
        now = time.monotonic()
        while True:
            try:
                data, addr = recvfrom(MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                c.malformed_frames += 1
                continue
            if not data:
                c.malformed_frames += 1
                continue
            version = data[0] >> 4
            if version != 4 and version != 6:
                self._control_frame(data, addr, now)
                continue
            vipa = tunnel_vipa.get(addr)
            if vipa is None:
                c.unknown_tunnel += 1
                continue
            try:
                key = flow_of_packet_untrusted(data)
            except MalformedError:
                c.malformed_packets += 1
                continue
            if key.src != vipa:
                c.spoofed_source += 1
                continue
            entry = entries.get(key)
            if entry is None:
                count = flow_count.get(vipa, 0)
                if count >= limit:
                    c.flow_limit += 1
                    continue
                flow_count[vipa] = count + 1
                with self.lock:
                    entry = self.paft.learn(key, addr, now)
            elif entry.tunnel != addr:
                entry.tunnel = addr
            if key.proto == PROTO_TCP and tcp_flags(data) & CLOSING:
                entry.closed_at = now
            size = len(data)
            entry.packets_up += 1
            entry.bytes_up += size
            entry.last_seen = now
            c.tunnel_packets += 1
            c.tunnel_bytes += size
            last_heard[addr] = now
            if default_tunnel.get(vipa) != addr:
                default_tunnel[vipa] = addr
            try:
                write(fd, data)
            except OSError:
                c.send_dropped += 1

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
        entries = self.paft.entries
        default_tunnel = self.default_tunnel
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
            size = len(packet)
            c.tun_packets += 1
            c.tun_bytes += size
            try:
                key = flow_of_packet_untrusted(packet).reversed()
            except MalformedError:
                c.malformed_packets += 1
                continue
            entry = entries.get(key)
            if entry is not None:
                addr = entry.tunnel
                if key.proto == PROTO_TCP and tcp_flags(packet) & CLOSING:
                    entry.closed_at = now
                entry.packets_down += 1
                entry.bytes_down += size
                entry.last_seen = now
            else:
                found = default_tunnel.get(key.src)
                if found is None:
                    c.no_route += 1
                    continue
                addr = found
            try:
                sendto(packet, addr)
            except OSError:
                c.send_dropped += 1
