"""Link and IPv4 address events from the kernel, for one tunnel per access interface.

The client must react at once when an access interface goes down or up, or
gains or loses its IPv4 address. This module turns rtnetlink multicast
datagrams (RTMGRP_LINK, RTMGRP_IPV4_IFADDR) into frozen events.

Theory of operation
-------------------
- `parse_messages_untrusted` is pure: one datagram in, raw events out, one per
  RTM_NEWLINK / RTM_DELLINK / RTM_NEWADDR / RTM_DELADDR message. It parses the
  wire format by hand with `struct` so that the "only MalformedError" invariant
  holds for any input (pyroute2's decoders are used by the tests to build
  vectors, not here).
- The kernel sends RTM_NEWLINK for many reasons (statistics, IPv6 setup,
  promiscuity...). `LinkTracker` keeps the last known state per interface and
  lets an event through only when it changes what a consumer cares about: up
  (usable), MTU, name, or the set of IPv4 addresses.
- Netlink multicast is lossy: when the socket's receive queue overflows the
  kernel drops messages and the next recv fails with ENOBUFS. Then there is no
  way to know what was lost, so `NetlinkMonitor` discards what is still
  queued (it predates the dump and would replay stale changes), re-dumps links
  and addresses, resets the tracker and yields `Resynced` with the whole
  picture. It does the same at start, and for a datagram that does not parse
  (the rule: a malformed datagram is dropped as a whole, and the state is
  rebuilt from a dump, so no event that shared the datagram with the bad
  message is silently lost).

The socket is a raw trio netlink socket read directly: pyroute2's own event
API buffers internally and, driven from `wait_readable`, loses events.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol, Self

import trio

from ground.errors import MalformedError, SetupError

# <linux/netlink.h>
NLMSG_HDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4
NETLINK_ROUTE: Final = 0
# <asm-generic/socket.h>; Python's socket module does not export it.
SO_RCVBUFFORCE: Final = 33

# <linux/rtnetlink.h>
RTM_NEWLINK: Final = 16
RTM_DELLINK: Final = 17
RTM_NEWADDR: Final = 20
RTM_DELADDR: Final = 21
RTMGRP_LINK: Final = 0x1
RTMGRP_IPV4_IFADDR: Final = 0x10
RTA_HDR: Final = struct.Struct("=HH")  # len, type
NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

# <linux/rtnetlink.h> struct ifinfomsg, <linux/if_link.h>
IFINFOMSG: Final = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFLA_IFNAME: Final = 3
IFLA_MTU: Final = 4

# <linux/if_addr.h> struct ifaddrmsg
IFADDRMSG: Final = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
IFA_ADDRESS: Final = 1
IFA_LOCAL: Final = 2
IFA_LABEL: Final = 3

# <linux/if.h>
IFF_UP: Final = 0x1
IFF_LOWER_UP: Final = 0x10000

AF_UNSPEC: Final = 0
AF_INET: Final = 2

# Large enough that a burst of changes (a handover touches several links and
# addresses at once) fits; SO_RCVBUFFORCE lets root exceed rmem_max.
DEFAULT_RCVBUF: Final = 8 << 20
# rtnetlink messages are built in NLMSG_GOODSIZE (<= 8 KiB) buffers; a datagram
# longer than this one is reported as truncated and handled like an overrun.
RECV_SIZE: Final = 1 << 16
# Bound on datagrams discarded before a re-dump, so a flood cannot hold the
# monitor in its drain; anything left is applied after the dump, which only
# risks a transient stale event, not a lasting one.
MAX_DRAIN: Final = 100_000


# --- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkState:
    """What a consumer needs to know about one link."""

    index: int
    ifname: str
    up: bool  # IFF_UP and IFF_LOWER_UP: administratively up and with carrier
    mtu: int


@dataclass(frozen=True, slots=True)
class LinkChanged:
    """A link appeared, or its usability, MTU or name changed."""

    index: int
    ifname: str
    up: bool
    mtu: int


@dataclass(frozen=True, slots=True)
class LinkRemoved:
    index: int
    ifname: str


@dataclass(frozen=True, slots=True)
class AddressAdded:
    """An IPv4 address on an interface (the local one, IFA_LOCAL)."""

    index: int
    ifname: str
    address: str
    prefixlen: int


@dataclass(frozen=True, slots=True)
class AddressRemoved:
    index: int
    ifname: str
    address: str
    prefixlen: int


@dataclass(frozen=True, slots=True)
class Resynced:
    """The whole picture after a re-dump: reconcile against it, not against deltas.

    `links` is keyed by interface name; `addresses` maps an interface name to
    its IPv4 addresses in interface notation ("10.9.9.1/24"), sorted.
    Interfaces without an address have no key in `addresses`.
    """

    links: dict[str, LinkState]
    addresses: dict[str, list[str]]


Event = LinkChanged | LinkRemoved | AddressAdded | AddressRemoved | Resynced


class LinkView(Protocol):
    """What a watcher knows of one interface: `link_updates` applies events to it."""

    up: bool
    addresses: set[str]


def interface_usable(state: LinkState | LinkChanged) -> bool:
    """Whether a tunnel can be built on the link: up, with carrier."""
    return state.up


def flags_usable(flags: int) -> bool:
    return flags & (IFF_UP | IFF_LOWER_UP) == (IFF_UP | IFF_LOWER_UP)


# --- parsing ------------------------------------------------------------------


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _attributes_untrusted(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """Top-level rtattrs of one message; the last of a repeated type wins."""
    attrs: dict[int, bytes] = {}
    offset = start
    while offset + RTA_HDR.size <= end:
        length, kind = RTA_HDR.unpack_from(data, offset)
        if length < RTA_HDR.size or offset + length > end:
            raise MalformedError(f"rtattr length {length} at offset {offset} overruns message")
        attrs[kind & NLA_TYPE_MASK] = data[offset + RTA_HDR.size : offset + length]
        offset += _align4(length)
    return attrs


def _string(value: bytes) -> str:
    # Interface names are bytes to the kernel, like file names: decode them the
    # way os.fsdecode does so any name round-trips.
    return value.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _u32(value: bytes, what: str) -> int:
    if len(value) != 4:
        raise MalformedError(f"{what} has {len(value)} bytes, want 4")
    result: int = struct.unpack("=I", value)[0]
    return result


def _parse_link(kind: int, data: bytes, start: int, end: int) -> LinkChanged | LinkRemoved | None:
    if end - start < IFINFOMSG.size:
        raise MalformedError("link message shorter than ifinfomsg")
    family, _type, index, flags, _change = IFINFOMSG.unpack_from(data, start)
    # AF_BRIDGE link messages describe bridge ports; an AF_BRIDGE RTM_DELLINK
    # means "left the bridge", not "gone".
    if family != AF_UNSPEC:
        return None
    if index <= 0:
        raise MalformedError(f"link index {index}")
    attrs = _attributes_untrusted(data, start + IFINFOMSG.size, end)
    if IFLA_IFNAME not in attrs:
        raise MalformedError("link message without IFLA_IFNAME")
    ifname = _string(attrs[IFLA_IFNAME])
    if kind == RTM_DELLINK:
        return LinkRemoved(index, ifname)
    if IFLA_MTU not in attrs:
        raise MalformedError("RTM_NEWLINK without IFLA_MTU")
    return LinkChanged(index, ifname, flags_usable(flags), _u32(attrs[IFLA_MTU], "IFLA_MTU"))


def _parse_address(
    kind: int, data: bytes, start: int, end: int
) -> AddressAdded | AddressRemoved | None:
    if end - start < IFADDRMSG.size:
        raise MalformedError("address message shorter than ifaddrmsg")
    family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack_from(data, start)
    if family != AF_INET:
        return None
    if prefixlen > 32:
        raise MalformedError(f"IPv4 prefix length {prefixlen}")
    if index <= 0 or index > 0x7FFFFFFF:
        raise MalformedError(f"address index {index}")
    attrs = _attributes_untrusted(data, start + IFADDRMSG.size, end)
    # On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is ours.
    raw = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
    if raw is None:
        raise MalformedError("address message without IFA_LOCAL or IFA_ADDRESS")
    if len(raw) != 4:
        raise MalformedError(f"IPv4 address of {len(raw)} bytes")
    address = socket.inet_ntoa(raw)
    # The label is the interface name (or an alias such as "eth0:1"); the
    # tracker replaces it with the link's name when it knows the link.
    ifname = _string(attrs[IFA_LABEL]) if IFA_LABEL in attrs else ""
    cls = AddressAdded if kind == RTM_NEWADDR else AddressRemoved
    return cls(index, ifname, address, prefixlen)


def parse_messages_untrusted(
    data: bytes,
) -> list[LinkChanged | LinkRemoved | AddressAdded | AddressRemoved]:
    """Raw events of one rtnetlink datagram, in order; raises only MalformedError.

    Every RTM_NEWLINK gives a LinkChanged, changed or not (filter with
    `LinkTracker`). Messages of other types (NLMSG_NOOP/DONE, other RTM_*) and
    non-IPv4 addresses are skipped as irrelevant; any malformed message makes
    the whole datagram malformed, because a consumer that silently misses one
    state change is worse off than one told to resynchronise.
    """
    events: list[LinkChanged | LinkRemoved | AddressAdded | AddressRemoved] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < NLMSG_HDR.size:
            raise MalformedError(f"{len(data) - offset} trailing bytes, not a netlink header")
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        end = offset + length
        if length < NLMSG_HDR.size or end > len(data):
            raise MalformedError(f"netlink message length {length} at offset {offset}")
        body = offset + NLMSG_HDR.size
        event: LinkChanged | LinkRemoved | AddressAdded | AddressRemoved | None = None
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            event = _parse_link(kind, data, body, end)
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            event = _parse_address(kind, data, body, end)
        elif kind in (NLMSG_ERROR, NLMSG_OVERRUN):
            raise MalformedError(f"netlink message type {kind} on an event socket")
        if event is not None:
            events.append(event)
        offset = _align4(end)
    return events


# --- state --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Links and IPv4 addresses as dumped from the kernel."""

    links: list[LinkState]
    # (interface index, address, prefix length)
    addresses: list[tuple[int, str, int]]


@dataclass
class LinkTracker:
    """Last known links and addresses; passes on only events that change them.

    Pure and synchronous. The monitor feeds it every raw event; a consumer can
    also use it to replay a recorded stream.
    """

    links: dict[int, LinkState] = field(default_factory=dict)
    addresses: dict[int, set[tuple[str, int]]] = field(default_factory=dict)

    def reset(self, snapshot: Snapshot) -> Resynced:
        """Adopt a dump as the truth; the returned event describes it."""
        self.links = {link.index: link for link in snapshot.links}
        self.addresses = {}
        for index, address, prefixlen in snapshot.addresses:
            self.addresses.setdefault(index, set()).add((address, prefixlen))
        return self.resynced()

    def resynced(self) -> Resynced:
        links = {link.ifname: link for link in self.links.values()}
        addresses: dict[str, list[str]] = {}
        for index, found in self.addresses.items():
            if not found:
                continue
            name = self._name(index, "")
            if not name:
                continue
            addresses[name] = sorted(f"{a}/{p}" for a, p in found)
        return Resynced(links, addresses)

    def _name(self, index: int, fallback: str) -> str:
        link = self.links.get(index)
        return link.ifname if link is not None else fallback

    def update(self, event: Event) -> Event | None:
        """The event to pass on, or None when nothing a consumer sees changed."""
        if isinstance(event, Resynced):
            return event
        if isinstance(event, LinkChanged):
            new = LinkState(event.index, event.ifname, event.up, event.mtu)
            if self.links.get(event.index) == new:
                return None
            self.links[event.index] = new
            return event
        if isinstance(event, LinkRemoved):
            known = self.links.pop(event.index, None)
            had_addresses = bool(self.addresses.pop(event.index, None))
            if known is None and not had_addresses:
                return None
            return LinkRemoved(event.index, known.ifname if known else event.ifname)
        key = (event.address, event.prefixlen)
        found = self.addresses.setdefault(event.index, set())
        ifname = self._name(event.index, event.ifname)
        if isinstance(event, AddressAdded):
            if key in found:
                return None
            found.add(key)
            return AddressAdded(event.index, ifname, event.address, event.prefixlen)
        if key not in found:
            return None
        found.discard(key)
        return AddressRemoved(event.index, ifname, event.address, event.prefixlen)

    def feed(self, events: Iterable[Event]) -> list[Event]:
        return [out for event in events if (out := self.update(event)) is not None]


# --- kernel side --------------------------------------------------------------


def dump_kernel() -> Snapshot:
    """Links and IPv4 addresses of this network namespace. Blocks: run in a thread."""
    from pyroute2 import IPRoute

    links: list[LinkState] = []
    addresses: list[tuple[int, str, int]] = []
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            links.append(_link_state(msg))
        for msg in ipr.get_addr(family=AF_INET):
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if address:
                addresses.append((int(msg["index"]), str(address), int(msg["prefixlen"])))
    return Snapshot(links, addresses)


def _link_state(msg: Any) -> LinkState:
    return LinkState(
        index=int(msg["index"]),
        ifname=str(msg.get_attr("IFLA_IFNAME")),
        up=flags_usable(int(msg["flags"])),
        mtu=int(msg.get_attr("IFLA_MTU") or 0),
    )


@dataclass(frozen=True, slots=True)
class MonitorStatistics:
    datagrams: int
    events: int  # passed on to the consumer, Resynced included
    overruns: int  # ENOBUFS or truncated datagrams: events were lost
    malformed: int
    resyncs: int


class NetlinkMonitor:
    """Link and IPv4 address events of the current network namespace.

    ::

        async with NetlinkMonitor() as mon:
            async for event in mon.events():
                ...

    The first event is always a `Resynced` with the state at start. The
    socket is bound before that dump, so no change falls between the two.
    `dump` is the (blocking) source of snapshots, replaceable in tests.
    """

    def __init__(
        self, *, rcvbuf: int = DEFAULT_RCVBUF, dump: Callable[[], Snapshot] = dump_kernel
    ) -> None:
        self._rcvbuf = rcvbuf
        self._dump = dump
        self._sock: trio.socket.SocketType | None = None
        self._raw: socket.socket | None = None
        self._tracker = LinkTracker()
        self._initial: Resynced | None = None
        self._buffer = bytearray(RECV_SIZE)
        self._datagrams = 0
        self._events = 0
        self._overruns = 0
        self._malformed = 0
        self._resyncs = 0

    async def __aenter__(self) -> Self:
        try:
            raw = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_ROUTE
            )
        except OSError as exc:
            raise SetupError(f"cannot open a netlink socket: {exc.strerror}") from exc
        # The stdlib object stays reachable for the synchronous drain.
        self._raw = raw
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            try:
                # Root may exceed net.core.rmem_max; others get what rmem_max allows.
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self._rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
            await sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
        except OSError as exc:
            sock.close()
            raise SetupError(f"cannot bind the netlink event socket: {exc.strerror}") from exc
        self._sock = sock
        try:
            self._initial = await self._resync()
        except BaseException:
            self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        self._raw = None
        if sock is not None:
            # Wake a task blocked in recv on this fd before the number is reused.
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def snapshot(self) -> Snapshot:
        """A fresh dump of links and addresses (in a worker thread)."""
        return await trio.to_thread.run_sync(self._dump)

    def state(self) -> Resynced:
        """The monitor's current view, as a consumer that saw every event has it."""
        return self._tracker.resynced()

    def statistics(self) -> MonitorStatistics:
        return MonitorStatistics(
            datagrams=self._datagrams,
            events=self._events,
            overruns=self._overruns,
            malformed=self._malformed,
            resyncs=self._resyncs,
        )

    async def _resync(self) -> Resynced:
        # Whatever is queued now predates the dump below, which reflects it.
        # After an overrun it must go: the queue holds changes from before the
        # kernel dropped some, and replaying them onto the fresh dump would
        # resurrect state (an address added, its removal dropped, then the
        # stale addition re-applied after the dump).
        await self._drain()
        self._resyncs += 1
        return self._tracker.reset(await self.snapshot())

    async def _drain(self) -> None:
        for count in range(1, MAX_DRAIN + 1):
            if self._raw is None:
                return
            try:
                self._raw.recv_into(self._buffer, RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
            if count % 1000 == 0:
                await trio.lowlevel.checkpoint()

    async def events(self) -> AsyncIterator[Event]:
        """Events as they arrive, for as long as the monitor is open."""
        if self._initial is not None:
            initial, self._initial = self._initial, None
            self._events += 1
            yield initial
        while self._sock is not None:
            try:
                n = await self._sock.recv_into(self._buffer, RECV_SIZE, socket.MSG_TRUNC)
            except trio.ClosedResourceError:
                return  # closed by the monitor's owner while we waited
            except OSError as exc:
                if exc.errno != errno.ENOBUFS or self._sock is None:
                    raise
                self._overruns += 1
                self._events += 1
                yield await self._resync()
                continue
            self._datagrams += 1
            if n > RECV_SIZE:
                self._overruns += 1
                self._events += 1
                yield await self._resync()
                continue
            try:
                raw = parse_messages_untrusted(bytes(self._buffer[:n]))
            except MalformedError:
                self._malformed += 1
                self._events += 1
                yield await self._resync()
                continue
            for event in raw:
                out = self._tracker.update(event)
                if out is not None:
                    self._events += 1
                    yield out


def link_updates(event: Event, links: Mapping[str, LinkView]) -> list[tuple[str, bool, set[str]]]:
    """(interface, up, addresses) of the watched `links` that `event` changes (pure).

    A resync gives every watched interface's state; the other events change
    one interface's state as `links` has it now.
    """
    if isinstance(event, Resynced):
        return [
            (
                name,
                bool((state := event.links.get(name)) and state.up),
                {a.split("/")[0] for a in event.addresses.get(name, [])},
            )
            for name in links
        ]
    link = links.get(event.ifname)
    if link is None:
        return []
    up, addresses = link.up, set(link.addresses)
    if isinstance(event, LinkChanged):
        up = event.up
    elif isinstance(event, LinkRemoved):
        up, addresses = False, set()
    elif isinstance(event, AddressAdded):
        addresses.add(event.address)
    elif isinstance(event, AddressRemoved):
        addresses.discard(event.address)
    return [(event.ifname, up, addresses)]
