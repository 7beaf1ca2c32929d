"""The data-path engine: one driver for both roles, behind two small I/O protocols.

Both daemons move packets the same way (docs/architecture.md, "The data
path"): a TUN read becomes one send on a tunnel socket, a tunnel receive
(one datagram, or a UDP GRO batch) becomes writes to the TUN. What differs
between the roles is the decision for each packet: the client looks a flow
up in its PAFT, holds it while its owner is traced and seals under the
tunnel's key; the anchor checks that a datagram comes from a known tunnel
and carries that terminal's VIPA, learns the flow and answers PROBEs. Those
decisions live in a `Forwarder` (pure: packets, addresses and `now` in,
routes, verdicts and counters out); this module only moves bytes.

How bytes move is behind two protocols (`tunnel.forwarding`, with the
forwarder's), each with a plain and an offload
implementation (`upmt.tun_io`, `upmt.udp_io`) and an in-memory fake
(`upmt.fakes`):

* `TunIO`: `read()` gives one inner packet, or a TCP/UDP super-packet cut
  into tunnel datagrams (`Segments`); `writes()` turns a receive's inner
  packets into TUN frames (merged per flow with a virtio-net header on an
  offload TUN); `write()` writes one.
* `DatagramIO`: `receive()` gives one datagram or a GRO batch and its sender;
  `send()` sends one datagram or a run of segments (sealed, with
  UDP_SEGMENT where the kernel takes it).

`Engine.start` runs the drain loops in one thread over epoll (`upmt.pump`);
without it (system tests on the fakes) a caller drives `drain_tun` and
`drain_channel` itself, on its own clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from ground.errors import MalformedError
from tunnel.batch import sort_batch
from tunnel.forwarding import (
    DROP_INNER,
    DROP_SOCKET,
    DROP_TUN,
    DROP_TUN_WRITE,
    DatagramIO,
    Forwarder,
    Release,
    TunIO,
)
from tunnel.offload import Segments
from upmt.pump import Pump

_IP_VERSIONS: Final = (4, 6)

__all__ = ["Engine"]


class Engine:
    """The drain loops of one data path, over one TUN and any number of channels."""

    def __init__(
        self,
        name: str,
        tun: TunIO,
        forwarder: Forwarder,
        *,
        clock: Callable[[], float] = time.monotonic,
        tick_interval: float | None = None,
    ) -> None:
        self.name = name
        self.tun = tun
        self.forwarder = forwarder
        self.clock = clock
        self.channels: dict[str, DatagramIO] = {}
        self._tick_interval = tick_interval
        self._watched: dict[int, Callable[[], None]] = {}
        self._pump: Pump | None = None

    # -- wiring --------------------------------------------------------------
    def add_channel(self, name: str, sock: DatagramIO) -> None:
        self.channels[name] = sock
        if self._pump is not None:
            self._pump.add(sock.fileno(), self._drainer(name))

    def remove_channel(self, name: str) -> None:
        sock = self.channels.pop(name, None)
        if sock is not None and self._pump is not None:
            self._pump.remove(sock.fileno())

    def watch(self, fd: int, drain: Callable[[], None]) -> None:
        """Run `drain` in the engine's thread when `fd` is readable (a wake-up pipe)."""
        self._watched[fd] = drain
        if self._pump is not None:
            self._pump.add(fd, drain)

    def start(self) -> None:
        interval = self._tick_interval
        pump = Pump(
            self.name,
            tick=self.tick if interval is not None else None,
            tick_interval=interval if interval is not None else 1.0,
        )
        pump.add(self.tun.fileno(), self.drain_tun)
        for fd, drain in self._watched.items():
            pump.add(fd, drain)
        for name, sock in list(self.channels.items()):
            pump.add(sock.fileno(), self._drainer(name))
        self._pump = pump
        pump.start()

    def stop(self) -> None:
        if self._pump is not None:
            self._pump.stop()

    def _drainer(self, name: str) -> Callable[[], None]:
        return lambda: self.drain_channel(name)

    @property
    def crashed(self) -> BaseException | None:
        return None if self._pump is None else self._pump.crashed

    # -- the loops -------------------------------------------------------------
    def drain_tun(self) -> None:
        """Every queued TUN read, forwarded where the forwarder routes it."""
        read = self.tun.read
        forwarder = self.forwarder
        from_tun = forwarder.from_tun
        pending = forwarder.pending
        channels = self.channels
        c = forwarder.counters
        now = self.clock()
        while True:
            try:
                packet, item, count, size = read()
            except BlockingIOError:
                return
            except MalformedError:
                forwarder.drop(DROP_TUN, 1)
                continue
            except OSError:
                forwarder.drop(DROP_TUN, 1)
                return
            c.tun_packets += count
            c.tun_bytes += size
            if count > 1:
                c.gso_reads += 1
            route = from_tun(packet, item, count, size, now)
            if route is None:
                if pending:  # a redundant flow's copies
                    self.release(pending[:])
                    pending.clear()
                continue
            channel, addr, sealer = route
            sock = channels.get(channel)
            if sock is None:  # detached under the loop
                c.send_dropped += count
                continue
            c.send_dropped += sock.send(item, addr, sealer)

    def drain_channel(self, name: str) -> None:
        """Every queued receive on channel `name`: inner packets to the TUN, the rest on."""
        sock = self.channels.get(name)
        if sock is None:
            return
        receive = sock.receive
        forwarder = self.forwarder
        open_frames = forwarder.open
        from_tunnel = forwarder.from_tunnel
        tun = self.tun
        write = tun.write
        write_packet = tun.write_packet
        c = forwarder.counters
        now = self.clock()
        while True:
            try:
                datagrams, addr = receive()
            except BlockingIOError:
                return
            except OSError:
                # ICMP errors surface as ECONNREFUSED and the like on a connected
                # socket, EBADF (for ever) on one closed under the loop: stop, epoll
                # is level-triggered and wakes the loop again while datagrams are queued.
                forwarder.drop(DROP_SOCKET, 1)
                return
            if not datagrams:
                forwarder.drop(DROP_SOCKET, 1)  # longer than any GRO batch
                continue
            frames = open_frames(name, datagrams, addr)
            if not frames:
                continue
            if len(frames) == 1:
                # The common receive, one datagram: an IP packet goes without sorting.
                packet = frames[0]
                if packet and packet[0] >> 4 in _IP_VERSIONS:
                    # (`from_tunnel` checks the sender itself: no `admit` for one packet.)
                    if from_tunnel(name, addr, packet, now, 1, len(packet)):
                        try:
                            write_packet(packet)
                        except OSError:
                            forwarder.drop(DROP_TUN_WRITE, 1)
                    continue
            packets, partial, other, malformed = sort_batch(frames)
            if malformed:
                forwarder.drop(DROP_SOCKET, malformed)
            for frame in other:
                answer = forwarder.control(name, frame, addr, now)
                if answer is not None:
                    forwarder.answered(not sock.send(answer, addr, None))
            if not packets or not forwarder.admit(name, addr, len(packets)):
                continue
            if len(packets) > 1:
                c.gro_batches += 1
            writes, unusable = tun.writes(packets, partial)
            if unusable:
                forwarder.drop(DROP_INNER, unusable)
            for frame, packet, count, size in writes:
                if from_tunnel(name, addr, packet, now, count, size):
                    try:
                        write(frame)
                    except OSError:
                        forwarder.drop(DROP_TUN_WRITE, count)

    def release(self, releases: list[Release]) -> None:
        """Send what a forwarder let go (held flows that got their answer)."""
        channels = self.channels
        c = self.forwarder.counters
        for (channel, addr, sealer), items in releases:
            sock = channels.get(channel)
            for item in items:
                if sock is not None:
                    c.send_dropped += sock.send(item, addr, sealer)
                else:  # detached while the flow was held
                    c.send_dropped += item.count if isinstance(item, Segments) else 1

    def tick(self) -> None:
        released = self.forwarder.expire(self.clock())
        if released:
            self.release(released)
