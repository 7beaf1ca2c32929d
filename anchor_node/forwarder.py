"""The anchor's per-packet decisions (sans-IO), driven by `upmt.engine.Engine`.

From a tunnel, an inner packet is accepted only from a known tunnel (TID =
observed source address and port) and only if its inner source is the VIPA
that tunnel belongs to (anti-spoofing); its flow is then learnt on that
tunnel (paper §V: upstream traffic alone moves a flow) and the packet goes
to the TUN, where the kernel forwards and NATs it. From the TUN, a packet is
looked up by its reversed 5-tuple; a flow not learnt yet goes on the
terminal's last-heard tunnel. PROBEs from known tunnels are answered here,
so that the RTT the client measures is the path's, not the control plane's;
every other frame goes to the control plane through `on_control`.
Learning, anti-spoofing and accounting apply to every inner packet: a
merged GSO frame only ever holds segments of one 5-tuple.

With `sessions` (tunnel encryption, the default) every datagram must be an
ENCRYPTED frame that authenticates under a known receiver index, and only
one from the address its tunnel slot is bound to counts: that alone may
refresh a tunnel, be learnt, answered or change a default tunnel. A SIGNAL
from another address (a tunnel being set up, or moved by a NAT) goes to the
control plane with its key, which decides. Everything else is dropped and
counted; plaintext frames are never accepted. Towards a tunnel, every
datagram is sealed under the tunnel's current key.

A flow the terminal made redundant (a HandoverRequest with
``redundantWith``: the entry's `twin`) goes down on both its tunnels, each
packet as a DUP frame (`tunnel.dedup`) handed to the engine through
`pending`; arriving on either of them, it stays where it is. DUP frames from
a terminal come out of `open` as their inner frames, the first copy of each
only (one duplicate filter per terminal), and are then checked like any
other packet.

The control plane writes `tunnel_vipa` and `default_tunnel` (the terminal
table's dicts, shared) and reads `last_heard`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Final

from anchor_node.sessions import Receiver, TunnelSessions
from ground.constants import Addr
from ground.errors import MalformedError
from paft.aging import TCP_FIN, TCP_RST, tcp_flags
from paft.flow import PROTO_TCP, flow_of_packet_untrusted
from paft.table import FlowEntry, Paft
from tunnel.crypto import ENCRYPTED, OVERHEAD, KeyExhausted
from tunnel.dedup import DUP, DuplicateFilter, dup_datagrams, unwrap_dups
from tunnel.forwarding import (
    DROP_INNER,
    DROP_SOCKET,
    DROP_TUN,
    DROP_TUN_WRITE,
    EngineCounters,
    Outbound,
    Release,
    Route,
    count_drop,
)
from tunnel.frames import FrameType, Probe, ProbeAck, decode_frame_untrusted, encode_frame

__all__ = ["CHANNEL", "AnchorCounters", "AnchorForwarder", "Origin"]

# What travels with a control frame: where it came from, and under which key.
Origin = tuple[Addr, Receiver | None]
CLOSING: Final = TCP_FIN | TCP_RST
CHANNEL: Final = "tunnels"  # the anchor's one tunnel socket
# Duplicate filters: one per terminal, of this many redundant flows each (a
# window is under 1 KB); the terminals that sent DUP frames least recently lose
# theirs beyond `MAX_DEDUP_TERMINALS` (at worst, a copy in flight then passes).
DEDUP_FLOWS_PER_TERMINAL: Final = 64
MAX_DEDUP_TERMINALS: Final = 4096


@dataclass(slots=True)
class AnchorCounters(EngineCounters):
    tunnel_packets: int = 0
    tunnel_bytes: int = 0
    malformed_frames: int = 0
    malformed_packets: int = 0
    unknown_tunnel: int = 0
    spoofed_source: int = 0
    control_frames: int = 0
    probes_answered: int = 0
    no_route: int = 0
    flow_limit: int = 0
    plaintext_dropped: int = 0  # not ENCRYPTED while encryption is on
    auth_failed: int = 0  # ENCRYPTED for a known index that did not open (or a replay)
    wrong_endpoint: int = 0  # authentic, but not from its tunnel's address
    no_key: int = 0  # downstream packets for a tunnel with no key (yet)
    duplicates: int = 0  # second copies of a redundant flow's packets (dropped)


# The engine's drop reasons, under the anchor's counter names.
_DROPS: Final = {
    DROP_TUN: "malformed_packets",
    DROP_SOCKET: "malformed_frames",
    DROP_INNER: "malformed_packets",
    DROP_TUN_WRITE: "send_dropped",
}


class AnchorForwarder:
    def __init__(
        self,
        paft: Paft[Addr],
        lock: AbstractContextManager[object],
        on_control: Callable[[Origin, bytes], None],
        *,
        max_flows_per_terminal: int = 65536,
        sessions: TunnelSessions | None = None,
    ) -> None:
        self.paft = paft
        self.lock = lock
        self.on_control = on_control
        # Written by the control plane, read here: tunnel → packed VIPA it serves,
        # packed VIPA → last tunnel heard from; written here: tunnel → time last heard.
        self.tunnel_vipa: dict[Addr, bytes] = {}
        self.default_tunnel: dict[bytes, Addr] = {}
        self.last_heard: dict[Addr, float] = {}
        # A terminal at its limit of flows (the PAFT's per-VIPA count) learns no
        # new flow: its packets are dropped and counted.
        self.max_flows_per_terminal = max_flows_per_terminal
        self.sessions = sessions
        self.receivers = sessions.receivers if sessions is not None else {}
        self.senders = sessions.senders if sessions is not None else {}
        self._counters = AnchorCounters()
        self._batch_rx: Receiver | None = None  # the key of the receive being read
        self._pending: list[Release] = []
        self._dedup: OrderedDict[bytes, DuplicateFilter] = OrderedDict()

    @property
    def counters(self) -> AnchorCounters:
        return self._counters

    @property
    def pending(self) -> list[Release]:
        return self._pending

    def drop(self, reason: str, count: int) -> None:
        count_drop(self._counters, _DROPS, reason, count)

    def expire(self, now: float) -> list[Release]:
        return []  # the anchor holds nothing

    # -- towards a tunnel ------------------------------------------------------
    def from_tun(
        self, packet: bytes, item: Outbound, count: int, size: int, now: float
    ) -> Route | None:
        """The tunnel and key for `count` inner packets of one flow (accounted), or None."""
        c = self._counters
        try:
            key = flow_of_packet_untrusted(packet).reversed()
        except MalformedError:
            c.malformed_packets += count
            return None
        entry = self.paft.entries.get(key)
        if entry is None:
            addr = self.default_tunnel.get(key.src)
            if addr is None:
                c.no_route += count
                return None
        else:
            if key.proto == PROTO_TCP and tcp_flags(packet) & CLOSING:
                entry.closed_at = now
            entry.packets_down += count
            entry.bytes_down += size
            entry.last_seen = now
            addr = entry.tunnel
            if entry.twin is not None:
                self._copies(entry, key.src, item)
                return None
        if self.sessions is None:
            return CHANNEL, addr, None
        sealer = self.senders.get(addr)
        if sealer is None:
            c.no_key += count
            return None
        return CHANNEL, addr, sealer

    def _copies(self, entry: FlowEntry[Addr], vipa: bytes, item: Outbound) -> None:
        """A redundant flow's item as DUP frames on both its tunnels (those with a key).

        The twin must still be a tunnel of the flow's terminal (`vipa`).
        """
        frames: list[Outbound] = list(dup_datagrams(entry.dup_id, entry.dup_seq, item))
        entry.dup_seq = (entry.dup_seq + len(frames)) & 0xFFFFFFFF
        sent = False
        twin = entry.twin
        if twin is not None and self.tunnel_vipa.get(twin) != vipa:
            twin = None  # no longer the terminal's (dropped, its address reused)
        for addr in (entry.tunnel, twin):
            if addr is None:
                continue
            if self.sessions is None:
                self._pending.append(((CHANNEL, addr, None), frames))
                sent = True
            elif (sealer := self.senders.get(addr)) is not None:
                self._pending.append(((CHANNEL, addr, sealer), frames))
                sent = True
        if not sent:
            self._counters.no_key += len(frames)

    # -- from a tunnel ---------------------------------------------------------
    def admit(self, channel: str, addr: Addr, count: int) -> bool:
        """Inner packets only from a known tunnel: a stranger's cost no merging."""
        if addr in self.tunnel_vipa:
            return True
        self._counters.unknown_tunnel += count
        return False

    def from_tunnel(
        self, channel: str, addr: Addr, packet: bytes, now: float, count: int, size: int
    ) -> bool:
        """Anti-spoofing, learning and accounting of `count` inner packets of one flow."""
        c = self._counters
        vipa = self.tunnel_vipa.get(addr)
        if vipa is None:
            c.unknown_tunnel += count
            return False
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
        elif entry.tunnel != addr and entry.twin != addr:
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

    def open(
        self, channel: str, datagrams: Sequence[bytes | memoryview], addr: Addr
    ) -> Sequence[bytes]:
        """The frames that authenticate under a known key from their tunnel (all in clear).

        One receive comes from one sender, so almost always under one key;
        it is remembered for the receive's control frames.
        """
        self._batch_rx = None
        frames: Sequence[bytes]
        if self.sessions is None:
            frames = datagrams  # type: ignore[assignment]  # in clear: copies, bytes
        elif len(datagrams) == 1:
            opened = self._open(datagrams[0], addr)
            if opened is None:
                return []
            self._batch_rx = opened[1]
            frames = [opened[0]]
        else:
            frames = self._open_batch(datagrams, addr)
        for frame in frames:
            if frame and frame[0] == DUP:
                return self._unwrap(frames, addr)
        return frames

    def _unwrap(self, frames: Sequence[bytes], addr: Addr) -> list[bytes]:
        """DUP frames as their inner frames, the first copy of each: a known terminal's only."""
        c = self._counters
        vipa = self.tunnel_vipa.get(addr)
        if vipa is None:
            c.unknown_tunnel += sum(1 for f in frames if f and f[0] == DUP)
            return [f for f in frames if not f or f[0] != DUP]
        dedup = self._dedup.get(vipa)
        if dedup is None:
            dedup = self._dedup[vipa] = DuplicateFilter(DEDUP_FLOWS_PER_TERMINAL)
            if len(self._dedup) > MAX_DEDUP_TERMINALS:
                self._dedup.popitem(last=False)
        else:
            self._dedup.move_to_end(vipa)

        def first_copy(flow_id: int, seq: int) -> bool:
            if dedup.accept(flow_id, seq):
                return True
            c.duplicates += 1
            return False

        opened, malformed = unwrap_dups(frames, first_copy)
        c.malformed_frames += malformed
        return opened

    def control(self, channel: str, frame: bytes, addr: Addr, now: float) -> bytes | None:
        """A PROBE from a known tunnel is answered (the answer returned); the rest goes on."""
        c = self._counters
        if frame[0] != FrameType.PROBE:
            c.control_frames += 1
            self.on_control((addr, self._batch_rx), frame)
            return None
        if addr not in self.tunnel_vipa:
            c.unknown_tunnel += 1
            return None
        try:
            probe = decode_frame_untrusted(frame)
        except MalformedError:
            c.malformed_frames += 1
            return None
        if not isinstance(probe, Probe):
            c.malformed_frames += 1
            return None
        self.last_heard[addr] = now
        ack = ProbeAck(probe.tunnel_id, probe.seq, probe.timestamp_ns, probe.flags, addr)
        return self._seal(encode_frame(ack), addr)

    def answered(self, sent: bool) -> None:
        if sent:
            self._counters.probes_answered += 1
        else:
            self._counters.send_dropped += 1

    def _seal(self, frame: bytes, addr: Addr) -> bytes | None:
        """`frame` as it goes out to `addr`: sealed with encryption on, None without a key."""
        if self.sessions is None:
            return frame
        sealer = self.senders.get(addr)
        if sealer is None:
            self._counters.no_key += 1
            return None
        try:
            return sealer.seal(frame)
        except KeyExhausted:
            self._counters.send_dropped += 1
            return None

    # -- decryption ------------------------------------------------------------
    def _open(self, data: bytes | memoryview, addr: Addr) -> tuple[bytes, Receiver] | None:
        """The inner frame of an ENCRYPTED datagram from its tunnel, and its key; else None.

        Counted and dropped: plaintext, unknown index, a frame that does not
        authenticate (or a replay), an authentic one from another address than
        its tunnel's — except a SIGNAL, which goes to the control plane with
        its key (a set-up of that slot from a new address).
        """
        c = self._counters
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
            self._counters.control_frames += 1
            self.on_control((addr, rx), frame)
        else:
            self._counters.wrong_endpoint += 1

    def _confirm(self, rx: Receiver, addr: Addr) -> None:
        if rx.current and self.senders.get(addr) is not rx.sealer:
            # The first frame under a new key: the terminal has it, answer under it.
            self.senders[addr] = rx.sealer

    def _open_batch(self, datagrams: Sequence[bytes | memoryview], addr: Addr) -> list[bytes]:
        """`_open` over one receive's datagrams, opened together where they share a key."""
        c = self._counters
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
