"""The client's per-packet decisions (sans-IO), driven by `upmt.engine.Engine`.

From the TUN, every packet the applications send is keyed by its 5-tuple
and looked up in the PAFT with one dict access. The first packet of a new
flow asks `decide` where it goes; when the owning application is not known
yet (its socket must be traced to a process, which takes milliseconds),
`decide` answers None and the flow's packets are held — bounded in number
and time — until `resolve` delivers the answer from the classifier, or until
`hold_timeout`, when `fallback` (the default policy) decides. So no flow
leaks onto the wrong network or past a block, and no other flow waits.

From a tunnel, inner packets go to the TUN and are counted against their
flow; every other frame (SIGNAL, PROBE-ACK) goes to the control plane
through `on_control`. With `encrypted` every datagram a tunnel sends is
sealed under the tunnel's current key and every datagram it receives must
open under one of its keys; nothing travels, in or out, without one.

A redundant flow (`FlowChoice.twin`, policy ``redundant``) goes on two
tunnels at once: each of its packets as a DUP frame (`tunnel.dedup`) on its
tunnel and on its twin, handed to the engine through `pending`. The
anchor's copies of its answers arrive the same way, and `open` lets the
first copy of each through and drops the other, so the application never
sees a duplicate.

The control plane moves flows and holds `lock` while it walks the table,
since learning a flow here takes it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Final, NamedTuple

from ground.constants import BYPASS_PREFIX, Addr
from ground.errors import MalformedError
from paft.flow import FiveTuple, flow_of_packet_untrusted
from paft.table import FlowEntry, Paft
from tunnel.crypto import TunnelKeys
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

__all__ = ["ClientCounters", "ClientForwarder", "FlowChoice", "TunnelTraffic"]

MAX_HELD_PACKETS: Final = 64
MAX_HELD_FLOWS: Final = 4096


class FlowChoice(NamedTuple):
    tunnel: str | None  # None: nowhere to send it now (dropped, counted)
    app: str | None
    movable: bool
    twin: str | None = None  # a redundant flow's second tunnel


@dataclass(slots=True)
class ClientCounters(EngineCounters):
    tun_malformed: int = 0
    no_tunnel: int = 0
    blocked: int = 0
    held_packets: int = 0
    held_dropped: int = 0
    hold_timeouts: int = 0
    tunnel_packets: int = 0
    tunnel_bytes: int = 0
    tunnel_malformed: int = 0
    control_frames: int = 0
    tunnel_unauthenticated: int = 0  # received datagrams that did not open under a key
    no_key: int = 0  # packets for a tunnel without keys (not sent)
    duplicates: int = 0  # second copies of a redundant flow's packets (dropped)


# The engine's drop reasons, under the client's counter names.
_DROPS: Final = {
    DROP_TUN: "tun_malformed",
    DROP_SOCKET: "tunnel_malformed",
    DROP_INNER: "tunnel_malformed",
    DROP_TUN_WRITE: "tunnel_malformed",
}


class TunnelTraffic:
    """One attached tunnel: its keys and what the data path moved on it (read by the core)."""

    __slots__ = ("bytes_down", "bytes_up", "keys", "packets_down", "packets_up")

    def __init__(self, keys: TunnelKeys | None) -> None:
        self.keys = keys
        self.packets_up = self.bytes_up = self.packets_down = self.bytes_down = 0

    @property
    def packets(self) -> int:
        return self.packets_up + self.packets_down

    @property
    def bytes(self) -> int:
        return self.bytes_up + self.bytes_down


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


class ClientForwarder:
    def __init__(
        self,
        paft: Paft[str],
        lock: AbstractContextManager[object],
        decide: Callable[[FiveTuple], FlowChoice | None],
        fallback: Callable[[FiveTuple], FlowChoice],
        on_control: Callable[[str, bytes], None],
        *,
        blocked: str = "!blocked",
        hold_timeout: float = 0.2,
        encrypted: bool = False,
    ) -> None:
        self.paft = paft
        self.lock = lock
        self.decide = decide
        self.fallback = fallback
        self.on_control = on_control
        self.blocked = blocked
        self.hold_timeout = hold_timeout
        self.encrypted = encrypted
        # The tunnels that carry traffic: name → keys (None without encryption), counts.
        self.tunnels: dict[str, TunnelTraffic] = {}
        self._counters = ClientCounters()
        self._held: dict[FiveTuple, _Held] = {}
        self._pending: list[Release] = []
        self._dedup = DuplicateFilter()

    @property
    def counters(self) -> ClientCounters:
        return self._counters

    @property
    def pending(self) -> list[Release]:
        return self._pending

    @property
    def held_flows(self) -> int:
        return len(self._held)

    def attach(self, name: str, keys: TunnelKeys | None) -> None:
        if self.encrypted and keys is None and not name.startswith(BYPASS_PREFIX):
            raise ValueError(f"{name}: an encrypted data path needs the tunnel's keys")
        self.tunnels[name] = TunnelTraffic(keys)

    def detach(self, name: str) -> None:
        self.tunnels.pop(name, None)

    def drop(self, reason: str, count: int) -> None:
        count_drop(self._counters, _DROPS, reason, count)

    # -- from the TUN ----------------------------------------------------------
    def from_tun(
        self, packet: bytes, item: Outbound, count: int, size: int, now: float
    ) -> Route | None:
        """Where `count` inner packets of one flow go by its PAFT entry; None: held or dropped."""
        c = self._counters
        try:
            key = flow_of_packet_untrusted(packet)
        except MalformedError:
            c.tun_malformed += 1
            return None
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
                return None
            choice = self.decide(key)
            if choice is None:
                if len(held) < MAX_HELD_FLOWS:
                    held[key] = _Held(now, item, count, size)
                    c.held_packets += count
                    return None
                choice = self.fallback(key)
            if choice.tunnel is None:
                c.no_tunnel += count
                return None
            entry = self._learn(key, choice, now)
        if entry.twin is not None:
            self._pending += self._copies(entry, [item], count, size, now)
            return None
        return self._route(entry, count, size, now)

    def _route(self, entry: FlowEntry[str], count: int, size: int, now: float) -> Route | None:
        """The tunnel of `entry` for `count` inner packets (accounted), or None (counted)."""
        c = self._counters
        name = entry.tunnel
        tunnel = self.tunnels.get(name)
        if tunnel is None:
            if name == self.blocked:
                c.blocked += count
            else:
                c.no_tunnel += count
            return None
        keys = tunnel.keys
        if keys is None and self.encrypted and not name.startswith(BYPASS_PREFIX):
            c.no_key += count
            return None
        entry.packets_up += count
        entry.bytes_up += size
        entry.last_seen = now
        tunnel.packets_up += count
        tunnel.bytes_up += size
        return name, None, None if keys is None else keys.sealer

    def _copies(
        self, entry: FlowEntry[str], items: list[Outbound], count: int, size: int, now: float
    ) -> list[Release]:
        """A redundant flow's items as DUP frames on its tunnel and its twin (each attached)."""
        if entry.tunnel[0] == "!":  # parked: nothing goes (counted by `_route`)
            self._route(entry, count, size, now)
            return []
        frames: list[Outbound] = []
        seq = entry.dup_seq
        for item in items:
            wrapped = dup_datagrams(entry.dup_id, seq, item)
            seq += len(wrapped)
            frames += wrapped
        entry.dup_seq = seq & 0xFFFFFFFF
        out: list[Release] = []
        for name in (entry.tunnel, entry.twin if entry.twin != entry.tunnel else None):
            tunnel = None if name is None else self.tunnels.get(name)
            if name is None or tunnel is None or (tunnel.keys is None and self.encrypted):
                continue
            tunnel.packets_up += count
            tunnel.bytes_up += size
            keys = tunnel.keys
            out.append(((name, None, None if keys is None else keys.sealer), frames))
        if not out:  # neither can send: `_route` counts why (the tunnel has no route)
            self._route(entry, count, size, now)
            return []
        entry.packets_up += count
        entry.bytes_up += size
        entry.last_seen = now
        return out

    def _learn(self, key: FiveTuple, choice: FlowChoice, now: float) -> FlowEntry[str]:
        assert choice.tunnel is not None
        with self.lock:
            entry = self.paft.learn(key, choice.tunnel, now, app=choice.app)
        entry.movable = choice.movable
        if choice.twin is not None and choice.twin != choice.tunnel:
            self.paft.set_twin(entry, choice.twin)
        return entry

    # -- held flows ------------------------------------------------------------
    def resolve(self, key: FiveTuple, choice: FlowChoice, now: float) -> list[Release]:
        """The classifier's answer for flow `key`: its held packets, if any, go."""
        waiting = self._held.pop(key, None)
        entry = self.paft.entries.get(key)
        if entry is not None:
            # Decided by the timeout already: record the owner; the control
            # plane moves the flow if the application's policy says so.
            if choice.app is not None:
                entry.app = choice.app
            return []
        if waiting is None:
            return []
        return self._release(key, choice, waiting, now)

    def expire(self, now: float) -> list[Release]:
        """Flows held for `hold_timeout`: the default policy decides for them."""
        if not self._held:
            return []
        expired = [k for k, h in self._held.items() if now - h.since >= self.hold_timeout]
        released: list[Release] = []
        for key in expired:
            waiting = self._held.pop(key)
            self._counters.hold_timeouts += 1
            released += self._release(key, self.fallback(key), waiting, now)
        return released

    def _release(
        self, key: FiveTuple, choice: FlowChoice, held: _Held, now: float
    ) -> list[Release]:
        if choice.tunnel is None:
            self._counters.no_tunnel += held.packets
            return []
        entry = self._learn(key, choice, now)
        if entry.twin is not None:
            return self._copies(entry, held.items, held.packets, held.size, now)
        route = self._route(entry, held.packets, held.size, now)
        return [] if route is None else [(route, held.items)]

    # -- from a tunnel ---------------------------------------------------------
    def open(
        self, channel: str, datagrams: Sequence[bytes | memoryview], addr: Addr
    ) -> Sequence[bytes]:
        """Decrypted under the tunnel's keys (counting failures), or as they came.

        DUP frames come out as their inner frames, the first copy of each only.
        """
        frames: Sequence[bytes]
        if not self.encrypted:
            frames = datagrams  # type: ignore[assignment]  # in clear: copies, bytes
        else:
            tunnel = self.tunnels.get(channel)
            keys = None if tunnel is None else tunnel.keys
            if keys is None:
                self._counters.tunnel_unauthenticated += len(datagrams)
                return []
            frames, failed = keys.open_many(datagrams)
            self._counters.tunnel_unauthenticated += failed
        for frame in frames:
            if frame and frame[0] == DUP:
                opened, malformed = unwrap_dups(frames, self._first_copy)
                self._counters.tunnel_malformed += malformed
                return opened
        return frames

    def _first_copy(self, flow_id: int, seq: int) -> bool:
        if self._dedup.accept(flow_id, seq):
            return True
        self._counters.duplicates += 1
        return False

    def control(self, channel: str, frame: bytes, addr: Addr, now: float) -> bytes | None:
        self._counters.control_frames += 1
        self.on_control(channel, frame)
        return None

    def answered(self, sent: bool) -> None:
        pass  # the client answers nothing in the data path

    def admit(self, channel: str, addr: Addr, count: int) -> bool:
        return True  # a connected socket: only the anchor's datagrams arrive

    def from_tunnel(
        self, channel: str, addr: Addr, packet: bytes, now: float, count: int, size: int
    ) -> bool:
        """Count `count` inner packets of one flow against its PAFT entry; False if malformed."""
        c = self._counters
        try:
            key = flow_of_packet_untrusted(packet).reversed()
        except MalformedError:
            c.tunnel_malformed += count
            return False
        c.tunnel_packets += count
        c.tunnel_bytes += size
        tunnel = self.tunnels.get(channel)
        if tunnel is not None:
            tunnel.packets_down += count
            tunnel.bytes_down += size
        entry = self.paft.entries.get(key)
        if entry is not None:
            if entry.tunnel[0] == "!":  # blocked or parked by a cap: the app gets nothing
                c.blocked += count
                return False
            entry.packets_down += count
            entry.bytes_down += size
            entry.last_seen = now
        return True
