"""The Per-Application Forwarding Table (PAFT): which tunnel each flow uses.

Theory of operation. `entries` is a plain dict from `FiveTuple` to a mutable
`FlowEntry`, so the data path finds a flow with one `dict.get` and updates its
counters in place. Everything that is not per packet — learning a new flow,
moving flows on handover, ageing, dropping a dead tunnel — goes through the
methods, which keep the counters of `statistics()` and an index of the flows
of each source address (a terminal's VIPA at the anchor): a handover or an
unregistration touches only that terminal's flows, never the whole table,
and `count_of` is the one count of a terminal's flows.

The table is generic in the tunnel identifier: the client uses interface
names, the anchor `(ip, port)` tunnel ids. It reads no clock; `now` is passed in.
"""

from __future__ import annotations

import fnmatch
import heapq
import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from ground.errors import MalformedError
from paft.flow import FiveTuple, proto_name, proto_number

__all__ = ["FlowEntry", "FlowSelector", "Paft", "PaftStats"]

T = TypeVar("T")


class _Keep:
    """`Paft.move`'s default for `twin`: leave each flow's twin as it is."""


_KEEP: Final = _Keep()


@dataclass(slots=True)
class FlowEntry(Generic[T]):
    """The state of one flow. Mutable: the data path updates it in place."""

    tunnel: T
    created: float
    last_seen: float
    app: str | None = None
    packets_up: int = 0
    bytes_up: int = 0
    packets_down: int = 0
    bytes_down: int = 0
    # Policy may pin a flow ("a background backup stays on Wi-Fi"); `Paft.move`
    # does not read it, the caller's `only` predicate does.
    movable: bool = True
    # TCP: when a FIN or RST was seen; the flow then ages out quickly.
    closed_at: float | None = None
    # A redundant flow (tunnel.dedup) travels on `tunnel` and `twin` at once, as
    # DUP frames of this sender's flow id `dup_id` numbered from `dup_seq`.
    twin: T | None = None
    dup_id: int = 0
    dup_seq: int = 0


def _prefix_match(address: bytes | None, prefix: int | None) -> tuple[int, int, int]:
    """(length of the address in bytes, mask, masked value) for one side of a selector.

    A length of 0 stands for "any address".
    """
    if address is None:
        if prefix is not None:
            raise MalformedError("a prefix length needs an address")
        return 0, 0, 0
    if len(address) not in (4, 16):
        raise MalformedError(f"address of {len(address)} bytes")
    bits = len(address) * 8
    if prefix is None:
        prefix = bits
    if not 0 <= prefix <= bits:
        raise MalformedError(f"prefix length {prefix} out of 0..{bits}")
    mask = ((1 << prefix) - 1) << (bits - prefix)
    return len(address), mask, int.from_bytes(address, "big") & mask


@dataclass(frozen=True, slots=True)
class FlowSelector:
    """A set of flows, as named by a handover request or a policy.

    Fields left at None match anything. `src_prefix`/`dst_prefix` turn the
    address into a network (None: the host only); an address matches only keys
    of its own family. `app` is a shell-style glob (`fnmatch.fnmatchcase`)
    against the entry's application, and never matches a flow not yet
    classified. Inconsistent fields raise `MalformedError`, since selectors
    arrive in control requests and signalling bodies.
    """

    proto: int | None = None
    src: bytes | None = None
    src_prefix: int | None = None
    sport: int | None = None
    dst: bytes | None = None
    dst_prefix: int | None = None
    dport: int | None = None
    app: str | None = None
    # Masks computed once, so matching 100k entries costs integer operations only.
    _src_match: tuple[int, int, int] = field(init=False, repr=False, compare=False)
    _dst_match: tuple[int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.proto is not None and not 0 <= self.proto <= 255:
            raise MalformedError(f"IP protocol {self.proto} out of range")
        for port in (self.sport, self.dport):
            if port is not None and not 0 <= port <= 0xFFFF:
                raise MalformedError(f"port {port} out of range")
        object.__setattr__(self, "_src_match", _prefix_match(self.src, self.src_prefix))
        object.__setattr__(self, "_dst_match", _prefix_match(self.dst, self.dst_prefix))

    def matches(self, key: FiveTuple, entry: FlowEntry[Any] | None = None) -> bool:
        """Whether the flow `key` (with its `entry`, needed for `app`) is selected."""
        if self.proto is not None and key.proto != self.proto:
            return False
        if self.sport is not None and key.sport != self.sport:
            return False
        if self.dport is not None and key.dport != self.dport:
            return False
        size, mask, value = self._src_match
        if size and (len(key.src) != size or int.from_bytes(key.src, "big") & mask != value):
            return False
        size, mask, value = self._dst_match
        if size and (len(key.dst) != size or int.from_bytes(key.dst, "big") & mask != value):
            return False
        if self.app is not None:
            if entry is None or entry.app is None:
                return False
            return fnmatch.fnmatchcase(entry.app, self.app)
        return True

    def to_json(self) -> dict[str, object]:
        """The fields that are set, with addresses as text ("198.18.0.0/15")."""
        out: dict[str, object] = {}
        if self.proto is not None:
            out["proto"] = proto_name(self.proto)
        for name, address, prefix, port in (
            ("src", self.src, self.src_prefix, self.sport),
            ("dst", self.dst, self.dst_prefix, self.dport),
        ):
            if address is not None:
                out[name] = _address_text(address, prefix)
            if port is not None:
                out[name[0] + "port"] = port
        if self.app is not None:
            out["app"] = self.app
        return out

    @classmethod
    def from_json_untrusted(cls, obj: object) -> FlowSelector:
        """Inverse of `to_json`; raises `MalformedError` on anything unexpected."""
        if not isinstance(obj, dict):
            raise MalformedError("flow selector is not an object")
        unknown = set(obj) - {"proto", "src", "sport", "dst", "dport", "app"}
        if unknown:
            raise MalformedError(f"unknown flow selector fields {sorted(map(str, unknown))}")
        proto = obj.get("proto")
        if proto is not None and not isinstance(proto, str):
            raise MalformedError("flow selector proto is not a string")
        src, src_prefix = _parse_address(obj.get("src"))
        dst, dst_prefix = _parse_address(obj.get("dst"))
        app = obj.get("app")
        if app is not None and not isinstance(app, str):
            raise MalformedError("flow selector app is not a string")
        return cls(
            proto=None if proto is None else proto_number(proto),
            src=src,
            src_prefix=src_prefix,
            sport=_parse_port(obj.get("sport")),
            dst=dst,
            dst_prefix=dst_prefix,
            dport=_parse_port(obj.get("dport")),
            app=app,
        )


def _address_text(address: bytes, prefix: int | None) -> str:
    text = str(ipaddress.ip_address(address))
    return text if prefix is None else f"{text}/{prefix}"


def _parse_address(value: object) -> tuple[bytes | None, int | None]:
    if value is None:
        return None, None
    if not isinstance(value, str):
        raise MalformedError("flow selector address is not a string")
    text, slash, prefix = value.partition("/")
    try:
        packed = ipaddress.ip_address(text).packed
    except ValueError as exc:
        raise MalformedError(f"bad address {text!r}") from exc
    if not slash:
        return packed, None
    if not (prefix.isascii() and prefix.isdecimal() and len(prefix) <= 3):
        raise MalformedError(f"bad prefix length {prefix!r}")
    return packed, int(prefix)


def _parse_port(value: object) -> int | None:
    if value is None:
        return None
    # bool is an int subclass; `true` is not a port.
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedError("flow selector port is not an integer")
    return value


@dataclass(frozen=True, slots=True)
class PaftStats:
    """Counters since the table was created (`entries` is the current size)."""

    entries: int
    learned: int  # new entries inserted by learn()
    relearned: int  # learn() that changed the tunnel of an existing entry
    moved: int  # entries whose tunnel move() changed
    expired: int
    evicted: int  # entries dropped to make room under max_entries
    removed: int  # by remove() and remove_tunnel()


class Paft(Generic[T]):
    """The flow table of one daemon: its own flows (client), or all terminals' by VIPA (anchor).

    With `max_entries`, learning a new flow into a full table evicts the least
    recently seen entries first (ties: the earliest inserted). Evicting beats
    refusing: an evicted flow is simply learnt again on its next packet, while
    a refused one would leave new flows unforwardable until ageing ran. To keep
    a flood of new flows from costing a full scan per packet, one eviction
    removes `evict_batch` entries at once (default: 1/64 of the bound, at
    least 1), so the O(n) scan is paid once per batch.
    """

    __slots__ = (
        "_dup_ids",
        "_evict_batch",
        "_evicted",
        "_expired",
        "_learned",
        "_moved",
        "_relearned",
        "_removed",
        "by_src",
        "entries",
        "max_entries",
    )

    def __init__(self, max_entries: int | None = None, *, evict_batch: int | None = None) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be positive, not {max_entries}")
        if evict_batch is not None and evict_batch < 1:
            raise ValueError(f"evict_batch must be positive, not {evict_batch}")
        self.entries: dict[FiveTuple, FlowEntry[T]] = {}
        # Source address -> its flows (a dict as an insertion-ordered set).
        self.by_src: dict[bytes, dict[FiveTuple, None]] = {}
        self.max_entries = max_entries
        if evict_batch is None:
            evict_batch = max(1, (max_entries or 0) // 64)
        self._evict_batch = evict_batch
        self._learned = 0
        self._relearned = 0
        self._moved = 0
        self._expired = 0
        self._evicted = 0
        self._removed = 0
        self._dup_ids = 0  # the last `dup_id` handed out

    def lookup(self, key: FiveTuple) -> FlowEntry[T] | None:
        return self.entries.get(key)

    def learn(
        self, key: FiveTuple, tunnel: T, now: float, *, app: str | None = None
    ) -> FlowEntry[T]:
        """Insert the flow on `tunnel`, or put an existing one there; either way seen at `now`.

        `app`, when given, replaces the entry's application; counters are left
        to `account_up`/`account_down`.
        """
        entry = self.entries.get(key)
        if entry is not None:
            if entry.tunnel != tunnel:
                entry.tunnel = tunnel
                self._relearned += 1
            entry.last_seen = now
            if app is not None:
                entry.app = app
            return entry
        if self.max_entries is not None and len(self.entries) >= self.max_entries:
            self._evict(len(self.entries) - self.max_entries + self._evict_batch)
        entry = FlowEntry(tunnel, now, now, app)
        self.entries[key] = entry
        flows = self.by_src.get(key.src)
        if flows is None:
            self.by_src[key.src] = {key: None}
        else:
            flows[key] = None
        self._learned += 1
        return entry

    def _forget(self, key: FiveTuple) -> None:
        """Drop `key` from `entries` and from the index (it must be present)."""
        del self.entries[key]
        flows = self.by_src[key.src]
        del flows[key]
        if not flows:
            del self.by_src[key.src]

    def _evict(self, count: int) -> None:
        # nsmallest is stable for equal keys, so ties go to the earliest inserted.
        victims = heapq.nsmallest(count, self.entries.items(), key=lambda item: item[1].last_seen)
        for key, _ in victims:
            self._forget(key)
        self._evicted += len(victims)

    def count_of(self, src: bytes) -> int:
        """How many flows come from `src` (one dict look-up)."""
        flows = self.by_src.get(src)
        return 0 if flows is None else len(flows)

    def flows_of(self, src: bytes) -> list[FiveTuple]:
        return list(self.by_src.get(src, ()))

    def remove_src(self, src: bytes) -> int:
        """Drop every flow from `src` (a terminal that left); returns how many."""
        keys = self.flows_of(src)
        for key in keys:
            del self.entries[key]
        self.by_src.pop(src, None)
        self._removed += len(keys)
        return len(keys)

    def clear(self) -> None:
        self._removed += len(self.entries)
        self.entries.clear()
        self.by_src.clear()

    @staticmethod
    def account_up(entry: FlowEntry[T], nbytes: int, now: float) -> None:
        entry.packets_up += 1
        entry.bytes_up += nbytes
        entry.last_seen = now

    @staticmethod
    def account_down(entry: FlowEntry[T], nbytes: int, now: float) -> None:
        entry.packets_down += 1
        entry.bytes_down += nbytes
        entry.last_seen = now

    def move(
        self,
        selector: FlowSelector,
        tunnel: T,
        *,
        only: Callable[[FiveTuple, FlowEntry[T]], bool] | None = None,
        twin: T | _Keep | None = _KEEP,
    ) -> list[FiveTuple]:
        """Put every flow matching `selector` (and `only`, if given) on `tunnel`.

        Returns the keys whose tunnel changed, in table order; flows already on
        `tunnel` are not reported. `movable` is not consulted here: handover
        passes `only=lambda k, e: e.movable`, an explicit request may not. A
        selector naming one source host walks only that source's flows.
        With `twin`, the flows' second tunnel is set too (None: none), and a
        flow whose twin changed is reported as well; one that becomes
        redundant gets a new `dup_id`.
        """
        moved: list[FiveTuple] = []
        entries = self.entries
        if selector.src is not None and selector.src_prefix in (None, len(selector.src) * 8):
            keys: Iterable[FiveTuple] = self.by_src.get(selector.src, ())
        else:
            keys = entries
        keep = isinstance(twin, _Keep)
        for key in keys:
            entry = entries[key]
            if (
                (entry.tunnel != tunnel or (not keep and entry.twin != twin))
                and selector.matches(key, entry)
                and (only is None or only(key, entry))
            ):
                entry.tunnel = tunnel
                if not isinstance(twin, _Keep):
                    self.set_twin(entry, twin)
                moved.append(key)
        self._moved += len(moved)
        return moved

    def set_twin(self, entry: FlowEntry[T], twin: T | None) -> None:
        """Make `entry` redundant on `twin` as well (None: on its tunnel alone again).

        A flow that becomes redundant gets a new `dup_id`, so that the
        receiver's window for it starts afresh.
        """
        if twin is not None and entry.twin is None:
            self._dup_ids = (self._dup_ids + 1) & 0xFFFFFFFF or 1
            entry.dup_id, entry.dup_seq = self._dup_ids, 0
        entry.twin = twin

    def remove(self, key: FiveTuple) -> FlowEntry[T] | None:
        entry = self.entries.get(key)
        if entry is not None:
            self._forget(key)
            self._removed += 1
        return entry

    def remove_tunnel(self, tunnel: T) -> int:
        """Drop every flow on `tunnel`; returns how many."""
        keys = self.flows_on(tunnel)
        for key in keys:
            self._forget(key)
        self._removed += len(keys)
        return len(keys)

    def expire(self, now: float, idle_timeout: float) -> list[FiveTuple]:
        """Remove the flows not seen for more than `idle_timeout`; returns their keys.

        A full scan: about 10 ms per 100k entries, acceptable once a second.
        An ordered index would have to be maintained on every packet, which
        costs the data path more than this costs the timer.
        """
        return self.expire_with(now, lambda _key, _entry: idle_timeout)

    def expire_with(
        self, now: float, timeout_of: Callable[[FiveTuple, FlowEntry[T]], float]
    ) -> list[FiveTuple]:
        """Like `expire`, with an idle timeout chosen per flow (e.g. by protocol)."""
        keys = [
            key
            for key, entry in list(self.entries.items())
            if now - entry.last_seen > timeout_of(key, entry)
        ]
        for key in keys:
            self._forget(key)
        self._expired += len(keys)
        return keys

    def flows_on(self, tunnel: T) -> list[FiveTuple]:
        return [key for key, entry in self.entries.items() if entry.tunnel == tunnel]

    def statistics(self) -> PaftStats:
        return PaftStats(
            entries=len(self.entries),
            learned=self._learned,
            relearned=self._relearned,
            moved=self._moved,
            expired=self._expired,
            evicted=self._evicted,
            removed=self._removed,
        )

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[FiveTuple, FlowEntry[T]]]:
        """A snapshot of (key, entry) pairs: the table may change while it is walked."""
        return iter(list(self.entries.items()))

    def __contains__(self, key: object) -> bool:
        return key in self.entries
