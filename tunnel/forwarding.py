"""What the data-path engine and the forwarders agree on (pure): items, routes, protocols.

`upmt.engine.Engine` drives a role's `Forwarder` (`upmt_client.forwarder`,
`anchor_node.forwarder`) over a `TunIO` and `DatagramIO`s; see
docs/architecture.md, "The data path".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Final, Protocol

from ground.constants import Addr
from tunnel.crypto import Sealer
from tunnel.offload import Segments

__all__ = [
    "DROP_INNER",
    "DROP_SOCKET",
    "DROP_TUN",
    "DROP_TUN_WRITE",
    "DatagramIO",
    "EngineCounters",
    "Forwarder",
    "Outbound",
    "Release",
    "Route",
    "TunIO",
    "TunRead",
    "TunWrite",
    "count_drop",
]

# What goes up a tunnel: one datagram, or the segments of one TUN read.
Outbound = bytes | Segments
# One TUN read: its IP packet (for the flow key), what to send, inner packets, bytes.
TunRead = tuple[bytes, Outbound, int, int]
# One TUN write: the frame, its IP packet, inner packets and bytes it stands for.
TunWrite = tuple[bytes, bytes, int, int]
# Where a packet goes: the channel (socket), the address on it (None: connected), the key.
Route = tuple[str, Addr | None, Sealer | None]
# Packets a forwarder lets go later (held flows): where, and what.
Release = tuple[Route, Sequence[Outbound]]

# Why the engine dropped something; each forwarder counts them under its own names.
DROP_TUN: Final = "tun"  # a TUN read that failed or held no packet
DROP_SOCKET: Final = "socket"  # a socket error, a truncated receive, an empty datagram
DROP_INNER: Final = "inner"  # a received inner packet that cannot go to the TUN
DROP_TUN_WRITE: Final = "tun_write"  # the TUN refused a write


@dataclass(slots=True)
class EngineCounters:
    """What the engine counts itself; each role's counters add their own."""

    tun_packets: int = 0
    tun_bytes: int = 0
    send_dropped: int = 0
    gso_reads: int = 0  # TUN reads that were super-packets
    gro_batches: int = 0  # receives that held more than one inner packet

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


def count_drop(counters: EngineCounters, names: Mapping[str, str], reason: str, count: int) -> None:
    """Count one of the engine's drop reasons under the role's name for it (`names`)."""
    field = names[reason]
    setattr(counters, field, getattr(counters, field) + count)


class TunIO(Protocol):
    def fileno(self) -> int: ...

    def read(self) -> TunRead:
        """One read; BlockingIOError when none is queued, MalformedError for junk."""
        ...

    def writes(self, packets: list[bytes], partial: list[bool]) -> tuple[list[TunWrite], int]:
        """The TUN frames for one receive's inner packets, and how many were unusable."""
        ...

    @property
    def write(self) -> Callable[[bytes], object]:
        """Write one TUN frame."""
        ...

    @property
    def write_packet(self) -> Callable[[bytes], object]:
        """Write one complete IP packet (the common receive: one datagram, DATA)."""
        ...


class DatagramIO(Protocol):
    def fileno(self) -> int: ...

    def receive(self) -> tuple[Sequence[bytes | memoryview], Addr]:
        """One receive; BlockingIOError when none is queued; no datagrams if truncated."""
        ...

    def send(self, item: Outbound, addr: Addr | None, sealer: Sealer | None) -> int:
        """Send `item` (each datagram sealed by `sealer`); returns how many were dropped."""
        ...


class Forwarder(Protocol):
    """A role's per-packet decisions (pure): `upmt_client.forwarder`, `anchor_node.forwarder`."""

    @property
    def counters(self) -> EngineCounters: ...

    @property
    def pending(self) -> list[Release]:
        """What `from_tun` sends otherwise than by one route (a redundant flow's copies).

        The engine sends and empties it whenever `from_tun` answers None.
        """
        ...

    def from_tun(
        self, packet: bytes, item: Outbound, count: int, size: int, now: float
    ) -> Route | None:
        """Where `item` (`count` inner packets of one flow) goes; None: see `pending`,
        or held or dropped."""
        ...

    def open(
        self, channel: str, datagrams: Sequence[bytes | memoryview], addr: Addr
    ) -> Sequence[bytes]:
        """The frames of one receive that may be read (decrypted); the rest counted."""
        ...

    def control(self, channel: str, frame: bytes, addr: Addr, now: float) -> bytes | None:
        """A frame that is not an inner packet; returns a datagram to answer with, if any."""
        ...

    def answered(self, sent: bool) -> None:
        """Whether the answer `control` returned went out."""
        ...

    def admit(self, channel: str, addr: Addr, count: int) -> bool:
        """Whether the `count` inner packets of a receive from `addr` are merged at all.

        `from_tunnel` must check the same for each packet: a lone one skips this.
        """
        ...

    def from_tunnel(
        self, channel: str, addr: Addr, packet: bytes, now: float, count: int, size: int
    ) -> bool:
        """Whether `count` received inner packets of one flow go to the TUN."""
        ...

    def expire(self, now: float) -> list[Release]:
        """Packets whose hold ended with time."""
        ...

    def drop(self, reason: str, count: int) -> None: ...
