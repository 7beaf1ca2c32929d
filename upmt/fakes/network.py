"""A UDP network in memory: hosts, NAT boxes in front of some of them, a virtual clock.

`FakeNetwork.send(src, dst, data)` queues a datagram; `deliver()` hands the
queued datagrams to the handler bound at their destination, which may send
more. A host behind a `NatBox` is seen from outside by the box's public
address and a port the box allocates per inside address (address- and
port-dependent mapping: the usual home or carrier NAT); the box forwards an
answer only from the remote the mapping was made for, and forgets a mapping
that carried nothing for `timeout` seconds, so the next datagram gets a new
port (a rebinding, as a real NAT does after its UDP timeout). `loss` drops
that share of datagrams each way, chosen by the injected random source; a
blackholed box drops everything ("Wi-Fi associated, no Internet").
`FakeDatagramIO` is a socket of this network as the data-path engine sees
one (`upmt.engine.DatagramIO`).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ground.constants import Addr
from tunnel.crypto import Sealer
from tunnel.offload import Segments

__all__ = ["FakeDatagramIO", "FakeNetwork", "NatBox", "VirtualClock"]

Handler = Callable[[bytes, Addr], None]


@dataclass
class VirtualClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class _Mapping:
    public: Addr
    remote: Addr
    used: float


@dataclass
class NatBox:
    public_ip: str
    rng: random.Random
    timeout: float = 30.0
    loss: float = 0.0
    blackhole: bool = False
    next_port: int = 40000
    _out: dict[tuple[Addr, Addr], _Mapping] = field(default_factory=dict)
    _in: dict[Addr, tuple[Addr, Addr]] = field(default_factory=dict)
    translated: int = 0
    dropped: int = 0

    def outbound(self, inside: Addr, remote: Addr, now: float) -> Addr | None:
        """The source the remote sees for a datagram from `inside`, or None (dropped)."""
        if self._lost():
            return None
        mapping = self._out.get((inside, remote))
        if mapping is not None and now - mapping.used > self.timeout:
            self._forget(inside, remote)
            mapping = None
        if mapping is None:
            mapping = _Mapping((self.public_ip, self.next_port), remote, now)
            self.next_port += 1
            self._out[(inside, remote)] = mapping
            self._in[mapping.public] = (inside, remote)
        mapping.used = now
        self.translated += 1
        return mapping.public

    def inbound(self, public: Addr, remote: Addr, now: float) -> Addr | None:
        """The inside address an answer from `remote` to `public` goes to, or None (dropped)."""
        if self._lost():
            return None
        found = self._in.get(public)
        if found is None or found[1] != remote:
            self.dropped += 1
            return None
        inside = found[0]
        mapping = self._out[(inside, remote)]
        if now - mapping.used > self.timeout:
            self._forget(inside, remote)
            self.dropped += 1
            return None
        mapping.used = now
        self.translated += 1
        return inside

    def rebind(self) -> None:
        """Forget every mapping now (a NAT reboot, or a carrier moving the flow)."""
        self._out.clear()
        self._in.clear()

    def _forget(self, inside: Addr, remote: Addr) -> None:
        mapping = self._out.pop((inside, remote))
        self._in.pop(mapping.public, None)

    def _lost(self) -> bool:
        if self.blackhole or (self.loss and self.rng.random() < self.loss):
            self.dropped += 1
            return True
        return False


class FakeNetwork:
    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._handlers: dict[Addr, Handler] = {}
        self._nat_of: dict[str, NatBox] = {}  # inside IP -> its NAT
        self._nat_by_public: dict[str, NatBox] = {}
        self._queue: deque[tuple[Addr, Addr, bytes]] = deque()  # (src as seen, dst, data)
        self.delivered = 0
        self.undeliverable = 0

    def behind(self, inside_ip: str, nat: NatBox) -> None:
        """Put host `inside_ip` behind `nat`."""
        self._nat_of[inside_ip] = nat
        self._nat_by_public[nat.public_ip] = nat

    def bind(self, addr: Addr, handler: Handler) -> None:
        self._handlers[addr] = handler

    def unbind(self, addr: Addr) -> None:
        self._handlers.pop(addr, None)

    def send(self, src: Addr, dst: Addr, data: bytes) -> None:
        nat = self._nat_of.get(src[0])
        seen: Addr | None = src
        if nat is not None:
            seen = nat.outbound(src, dst, self.clock.now)
        if seen is not None:
            self._queue.append((seen, dst, data))

    def deliver(self, limit: int = 100_000) -> int:
        """Hand every queued datagram to its destination (answers included); how many."""
        done = 0
        while self._queue and done < limit:
            src, dst, data = self._queue.popleft()
            done += 1
            nat = self._nat_by_public.get(dst[0])
            target: Addr | None = dst
            if nat is not None:
                target = nat.inbound(dst, src, self.clock.now)
            handler = self._handlers.get(target) if target is not None else None
            if handler is None:
                self.undeliverable += target is not None
                continue
            self.delivered += 1
            handler(data, src)
        return done


class FakeDatagramIO:
    """A socket of the fake network, as the data-path engine sees one (`DatagramIO`).

    Bound at `local`; with `peer` it is connected (sends with `addr` None go
    there, as the client's tunnel sockets do). What arrives waits in `inbox`
    until the engine drains the channel; `on_readable` (if set) is called on
    each arrival, as epoll would wake the engine.
    """

    def __init__(self, network: FakeNetwork, local: Addr, peer: Addr | None = None) -> None:
        self.network = network
        self.local = local
        self.peer = peer
        self.inbox: deque[tuple[bytes, Addr]] = deque()
        self.on_readable: Callable[[], None] | None = None
        self.sent = 0
        network.bind(local, self._arrived)

    def _arrived(self, data: bytes, source: Addr) -> None:
        self.inbox.append((data, source))
        if self.on_readable is not None:
            self.on_readable()

    def close(self) -> None:
        self.network.unbind(self.local)

    def fileno(self) -> int:
        return -1  # never polled: the caller drives the engine

    def receive(self) -> tuple[Sequence[bytes | memoryview], Addr]:
        if not self.inbox:
            raise BlockingIOError
        data, source = self.inbox.popleft()
        return [data], source

    def send(self, item: bytes | Segments, addr: Addr | None, sealer: Sealer | None) -> int:
        datagrams: list[bytes]
        if isinstance(item, bytes):
            datagrams = [item]
        else:
            joined = b"".join(item.buffers)
            datagrams = [joined[at : at + item.size] for at in range(0, len(joined), item.size)]
        target = addr if addr is not None else self.peer
        if target is None:
            return len(datagrams)  # not connected: nowhere to go
        for datagram in datagrams:
            self.network.send(self.local, target, sealer.seal(datagram) if sealer else datagram)
            self.sent += 1
        return 0
