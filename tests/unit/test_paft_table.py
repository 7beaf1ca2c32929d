"""The PAFT against a naive list-of-pairs reference on random operations, plus
selector matching (prefixes, globs, JSON), the size bound and the counters."""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ground.errors import MalformedError
from paft.flow import FiveTuple
from paft.table import FlowEntry, FlowSelector, Paft, PaftStats


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def udp(src: str, sport: int, dst: str, dport: int) -> FiveTuple:
    return FiveTuple(17, ip(src), sport, ip(dst), dport)


# --- the reference ----------------------------------------------------------


@dataclass
class RefEntry:
    tunnel: str
    created: float
    last_seen: float
    app: str | None
    movable: bool = True
    packets_up: int = 0
    bytes_up: int = 0
    packets_down: int = 0
    bytes_down: int = 0


def ref_matches(sel: FlowSelector, key: FiveTuple, entry: RefEntry) -> bool:
    """Selector semantics written with ipaddress networks, independent of the masks."""

    def address_ok(want: bytes | None, prefix: int | None, have: bytes) -> bool:
        if want is None:
            return True
        if len(want) != len(have):
            return False
        network = ipaddress.ip_network((want, len(want) * 8 if prefix is None else prefix), False)
        return ipaddress.ip_address(have) in network

    return (
        (sel.proto is None or sel.proto == key.proto)
        and (sel.sport is None or sel.sport == key.sport)
        and (sel.dport is None or sel.dport == key.dport)
        and address_ok(sel.src, sel.src_prefix, key.src)
        and address_ok(sel.dst, sel.dst_prefix, key.dst)
        and (sel.app is None or (entry.app is not None and fnmatch.fnmatchcase(entry.app, sel.app)))
    )


class NaiveTable:
    """Linear scans over a list kept in insertion order, like a dict."""

    def __init__(self, max_entries: int | None, evict_batch: int) -> None:
        self.pairs: list[tuple[FiveTuple, RefEntry]] = []
        self.max_entries = max_entries
        self.evict_batch = evict_batch

    def find(self, key: FiveTuple) -> RefEntry | None:
        for k, e in self.pairs:
            if k == key:
                return e
        return None

    def learn(self, key: FiveTuple, tunnel: str, now: float, app: str | None) -> None:
        entry = self.find(key)
        if entry is not None:
            entry.tunnel = tunnel
            entry.last_seen = now
            if app is not None:
                entry.app = app
            return
        if self.max_entries is not None and len(self.pairs) >= self.max_entries:
            count = len(self.pairs) - self.max_entries + self.evict_batch
            order = sorted(range(len(self.pairs)), key=lambda i: self.pairs[i][1].last_seen)
            victims = set(order[:count])
            self.pairs = [p for i, p in enumerate(self.pairs) if i not in victims]
        self.pairs.append((key, RefEntry(tunnel, now, now, app)))

    def move(self, sel: FlowSelector, tunnel: str, movable_only: bool) -> list[FiveTuple]:
        moved = []
        for k, e in self.pairs:
            if ref_matches(sel, k, e) and e.tunnel != tunnel and (e.movable or not movable_only):
                e.tunnel = tunnel
                moved.append(k)
        return moved

    def remove(self, key: FiveTuple) -> bool:
        before = len(self.pairs)
        self.pairs = [(k, e) for k, e in self.pairs if k != key]
        return len(self.pairs) != before

    def remove_tunnel(self, tunnel: str) -> int:
        before = len(self.pairs)
        self.pairs = [(k, e) for k, e in self.pairs if e.tunnel != tunnel]
        return before - len(self.pairs)

    def expire(self, now: float, timeout: float) -> list[FiveTuple]:
        gone = [k for k, e in self.pairs if now - e.last_seen > timeout]
        self.pairs = [(k, e) for k, e in self.pairs if not now - e.last_seen > timeout]
        return gone

    def flows_on(self, tunnel: str) -> list[FiveTuple]:
        return [k for k, e in self.pairs if e.tunnel == tunnel]


def snapshot(entry: FlowEntry[str] | RefEntry) -> tuple[object, ...]:
    return (
        entry.tunnel,
        entry.created,
        entry.last_seen,
        entry.app,
        entry.movable,
        entry.packets_up,
        entry.bytes_up,
        entry.packets_down,
        entry.bytes_down,
    )


# A small universe, so that keys collide and selectors match often.
ADDRESSES_V4 = ["100.64.0.2", "100.127.1.1", "100.128.0.1", "203.0.113.2"]
ADDRESSES_V6 = ["2001:db8::1", "2001:db8:ffff::2", "fd00::1"]
TUNNELS = ["wlan0", "eth0", "wwan0"]
APPS = [None, "firefox", "firefox-esr", "curl", "backup"]
GLOBS = ["firefox*", "curl", "*", "?ackup", "[bc]*"]


def random_key(rng: random.Random) -> FiveTuple:
    family = ADDRESSES_V4 if rng.random() < 0.7 else ADDRESSES_V6
    return FiveTuple(
        rng.choice([6, 17, 1]),
        ip(rng.choice(family)),
        rng.randint(1, 3),
        ip(rng.choice(family)),
        rng.randint(1, 3),
    )


def random_selector(rng: random.Random) -> FlowSelector:
    def address() -> tuple[bytes | None, int | None]:
        if rng.random() < 0.5:
            return None, None
        raw = ip(rng.choice(ADDRESSES_V4 + ADDRESSES_V6))
        prefix = rng.choice([None, 0, rng.randint(0, len(raw) * 8), 10, 8 * len(raw)])
        return raw, prefix

    src, src_prefix = address()
    dst, dst_prefix = address()
    return FlowSelector(
        proto=rng.choice([None, None, 6, 17, 1]),
        src=src,
        src_prefix=src_prefix,
        sport=rng.choice([None, None, 1, 2, 3]),
        dst=dst,
        dst_prefix=dst_prefix,
        dport=rng.choice([None, None, 1, 2, 3]),
        app=rng.choice([None, None, *GLOBS]),
    )


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(
    ("max_entries", "evict_batch"), [(None, None), (12, None), (12, 4), (1, None)]
)
def test_against_naive_reference(
    seed: int, max_entries: int | None, evict_batch: int | None
) -> None:
    rng = random.Random(seed)
    table: Paft[str] = Paft(max_entries, evict_batch=evict_batch)
    ref = NaiveTable(max_entries, evict_batch or 1)
    now = 0.0
    for _ in range(2500):
        # Integer times: equal last_seen values are common, exercising eviction ties.
        now += rng.choice([0, 0, 1, 2])
        op = rng.random()
        key = random_key(rng)
        if op < 0.35:
            tunnel, app = rng.choice(TUNNELS), rng.choice(APPS)
            entry = table.learn(key, tunnel, now, app=app)
            ref.learn(key, tunnel, now, app)
            assert table.lookup(key) is entry
        elif op < 0.5:
            got, want = table.lookup(key), ref.find(key)
            assert (got is None) == (want is None)
            if got is not None and want is not None:
                nbytes = rng.randint(20, 1500)
                if rng.random() < 0.5:
                    Paft.account_up(got, nbytes, now)
                    want.packets_up, want.bytes_up = want.packets_up + 1, want.bytes_up + nbytes
                else:
                    Paft.account_down(got, nbytes, now)
                    want.packets_down += 1
                    want.bytes_down += nbytes
                want.last_seen = now
                if rng.random() < 0.2:
                    got.movable = want.movable = not got.movable
        elif op < 0.7:
            sel, tunnel = random_selector(rng), rng.choice(TUNNELS)
            movable_only = rng.random() < 0.5
            only = (lambda k, e: e.movable) if movable_only else None
            assert table.move(sel, tunnel, only=only) == ref.move(sel, tunnel, movable_only)
        elif op < 0.8:
            removed = table.remove(key)
            assert (removed is not None) == ref.remove(key)
        elif op < 0.85:
            tunnel = rng.choice(TUNNELS)
            assert table.flows_on(tunnel) == ref.flows_on(tunnel)
            if rng.random() < 0.3:
                assert table.remove_tunnel(tunnel) == ref.remove_tunnel(tunnel)
        elif op < 0.92:
            timeout = rng.choice([0.0, 1.0, 5.0, 30.0])
            assert table.expire(now, timeout) == ref.expire(now, timeout)
        else:
            assert (key in table) == (ref.find(key) is not None)
        # Full state, order included (the eviction tie-break depends on it).
        assert [(k, snapshot(e)) for k, e in table] == [(k, snapshot(e)) for k, e in ref.pairs]
        assert len(table) == len(ref.pairs)
        if max_entries is not None:
            assert len(table) <= max_entries


def test_counters() -> None:
    table: Paft[str] = Paft()
    a, b = udp("100.64.0.2", 1, "192.0.2.1", 53), udp("100.64.0.2", 2, "192.0.2.1", 53)
    table.learn(a, "wlan0", 0.0)
    table.learn(b, "wlan0", 0.0)
    table.learn(a, "wlan0", 1.0)  # same tunnel: not a relearn
    table.learn(a, "eth0", 2.0)
    assert table.move(FlowSelector(), "eth0") == [b]
    assert table.move(FlowSelector(), "eth0") == []
    assert table.expire(10.0, 8.5) == [b]
    assert table.remove(a) is not None
    assert table.remove(a) is None
    c = udp("100.64.0.2", 3, "192.0.2.1", 53)
    table.learn(c, "wwan0", 11.0)
    assert table.remove_tunnel("wwan0") == 1
    assert table.statistics() == PaftStats(
        entries=0, learned=3, relearned=1, moved=1, expired=1, evicted=0, removed=2
    )


def test_learn_keeps_counters_and_app_unless_given() -> None:
    table: Paft[tuple[str, int]] = Paft()
    key = udp("100.64.0.2", 1, "192.0.2.1", 53)
    entry = table.learn(key, ("198.18.0.2", 40000), 1.0, app="firefox")
    table.account_up(entry, 100, 2.0)
    again = table.learn(key, ("198.19.0.2", 50000), 3.0)
    assert again is entry
    assert entry.app == "firefox" and entry.bytes_up == 100 and entry.packets_up == 1
    assert entry.created == 1.0 and entry.last_seen == 3.0
    assert entry.tunnel == ("198.19.0.2", 50000)
    table.learn(key, ("198.19.0.2", 50000), 4.0, app="curl")
    assert entry.app == "curl"


def test_eviction_drops_the_least_recently_seen() -> None:
    table: Paft[str] = Paft(3)
    keys = [udp("100.64.0.2", port, "192.0.2.1", 53) for port in range(5)]
    for i, key in enumerate(keys[:3]):
        table.learn(key, "wlan0", float(i))
    table.account_up(table.entries[keys[0]], 60, 10.0)  # the oldest is active again
    table.learn(keys[3], "wlan0", 11.0)
    assert keys[1] not in table
    assert set(table.entries) == {keys[0], keys[2], keys[3]}
    table.learn(keys[4], "wlan0", 12.0)
    assert keys[2] not in table
    assert table.statistics().evicted == 2
    # Learning an existing key never evicts.
    table.learn(keys[0], "eth0", 13.0)
    assert table.statistics().evicted == 2 and len(table) == 3


def test_eviction_in_batches() -> None:
    table: Paft[str] = Paft(10, evict_batch=4)
    for port in range(10):
        table.learn(udp("100.64.0.2", port, "192.0.2.1", 53), "wlan0", float(port))
    table.learn(udp("100.64.0.2", 99, "192.0.2.1", 53), "wlan0", 20.0)
    assert len(table) == 7
    assert sorted(k.sport for k in table.entries) == [4, 5, 6, 7, 8, 9, 99]
    assert table.statistics().evicted == 4


def test_default_batch_is_a_fraction_of_the_bound() -> None:
    table: Paft[str] = Paft(640)
    for port in range(641):
        table.learn(udp("100.64.0.2", port, "192.0.2.1", 53), "wlan0", float(port))
    assert len(table) == 640 - 10 + 1


def test_bad_bounds() -> None:
    with pytest.raises(ValueError):
        Paft(0)
    with pytest.raises(ValueError):
        Paft(10, evict_batch=0)


def test_iteration_is_a_snapshot() -> None:
    table: Paft[str] = Paft()
    for port in range(5):
        table.learn(udp("100.64.0.2", port, "192.0.2.1", 53), "wlan0", 0.0)
    for key, _ in table:
        table.remove(key)  # would raise "dict changed size" on a live view
    assert len(table) == 0


def test_move_respects_only_and_reports_changes() -> None:
    table: Paft[str] = Paft()
    pinned = udp("100.64.0.2", 1, "192.0.2.1", 873)
    free = udp("100.64.0.2", 2, "192.0.2.1", 443)
    table.learn(pinned, "wlan0", 0.0, app="backup").movable = False
    table.learn(free, "wlan0", 0.0, app="firefox")
    assert table.move(FlowSelector(), "eth0", only=lambda k, e: e.movable) == [free]
    assert table.flows_on("wlan0") == [pinned]
    assert table.move(FlowSelector(app="back*"), "eth0") == [pinned]
    assert table.flows_on("eth0") == [pinned, free]


# --- selectors --------------------------------------------------------------


def test_prefix_slash_10() -> None:
    cgnat = FlowSelector(src=ip("100.64.0.0"), src_prefix=10)
    for inside in ("100.64.0.0", "100.64.0.2", "100.127.255.255"):
        assert cgnat.matches(udp(inside, 1, "192.0.2.1", 2))
    for outside in ("100.63.255.255", "100.128.0.0", "10.64.0.1"):
        assert not cgnat.matches(udp(outside, 1, "192.0.2.1", 2))
    # Host bits set in the selector address are ignored, as with a non-strict network.
    assert FlowSelector(src=ip("100.100.1.1"), src_prefix=10).matches(
        udp("100.64.0.9", 1, "192.0.2.1", 2)
    )


def test_prefix_slash_0_and_host() -> None:
    v4_any = FlowSelector(dst=ip("0.0.0.0"), dst_prefix=0)
    assert v4_any.matches(udp("100.64.0.2", 1, "203.0.113.9", 2))
    assert not v4_any.matches(udp("2001:db8::1", 1, "2001:db8::2", 2))  # other family
    host = FlowSelector(dst=ip("203.0.113.9"))
    assert host.matches(udp("100.64.0.2", 1, "203.0.113.9", 2))
    assert not host.matches(udp("100.64.0.2", 1, "203.0.113.8", 2))
    v6 = FlowSelector(src=ip("2001:db8::"), src_prefix=32)
    assert v6.matches(udp("2001:db8:ffff::1", 1, "2001:db8::2", 2))
    assert not v6.matches(udp("2001:db9::1", 1, "2001:db8::2", 2))
    assert FlowSelector(src=ip("::"), src_prefix=0).matches(udp("fd00::1", 1, "fd00::2", 2))


def test_selector_ports_proto_and_app() -> None:
    key = udp("100.64.0.2", 5000, "192.0.2.1", 53)
    entry: FlowEntry[str] = FlowEntry("wlan0", 0.0, 0.0, app="firefox-esr")
    assert FlowSelector(proto=17, dport=53).matches(key)
    assert not FlowSelector(proto=6).matches(key)
    assert not FlowSelector(sport=53).matches(key)
    assert FlowSelector(app="firefox*").matches(key, entry)
    assert not FlowSelector(app="Firefox*").matches(key, entry)  # case-sensitive
    assert not FlowSelector(app="*").matches(key)  # no entry: app unknown
    assert not FlowSelector(app="*").matches(key, FlowEntry("wlan0", 0.0, 0.0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"src": ip("100.64.0.0"), "src_prefix": 33},
        {"dst": ip("::"), "dst_prefix": 129},
        {"dst": ip("::"), "dst_prefix": -1},
        {"src_prefix": 8},
        {"src": b"\x01\x02\x03"},
        {"sport": 65536},
        {"proto": 256},
    ],
)
def test_bad_selectors(kwargs: dict[str, object]) -> None:
    with pytest.raises(MalformedError):
        FlowSelector(**kwargs)  # type: ignore[arg-type]


addresses = st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16))


@st.composite
def address_and_prefix(draw: st.DrawFn) -> tuple[bytes, int | None]:
    raw = draw(addresses)
    return raw, draw(st.one_of(st.none(), st.integers(0, len(raw) * 8)))


@given(address_and_prefix(), addresses)
def test_prefix_matching_agrees_with_ipaddress(
    selector_side: tuple[bytes, int | None], address: bytes
) -> None:
    want, prefix = selector_side
    sel = FlowSelector(src=want, src_prefix=prefix)
    key = FiveTuple(17, address, 1, address, 2)
    assert sel.matches(key) == ref_matches(sel, key, RefEntry("x", 0.0, 0.0, None))


@given(
    st.builds(
        FlowSelector,
        proto=st.one_of(st.none(), st.integers(0, 255)),
        sport=st.one_of(st.none(), st.integers(0, 0xFFFF)),
        dport=st.one_of(st.none(), st.integers(0, 0xFFFF)),
        app=st.one_of(st.none(), st.text(max_size=10)),
    ),
    st.one_of(st.none(), address_and_prefix()),
    st.one_of(st.none(), address_and_prefix()),
)
def test_selector_json_round_trip(
    base: FlowSelector,
    src: tuple[bytes, int | None] | None,
    dst: tuple[bytes, int | None] | None,
) -> None:
    sel = FlowSelector(
        proto=base.proto,
        src=src[0] if src else None,
        src_prefix=src[1] if src else None,
        sport=base.sport,
        dst=dst[0] if dst else None,
        dst_prefix=dst[1] if dst else None,
        dport=base.dport,
        app=base.app,
    )
    assert FlowSelector.from_json_untrusted(sel.to_json()) == sel


def test_selector_json_example() -> None:
    sel = FlowSelector.from_json_untrusted(
        {"proto": "tcp", "dst": "198.18.0.0/15", "dport": 443, "app": "fire*"}
    )
    assert sel == FlowSelector(proto=6, dst=ip("198.18.0.0"), dst_prefix=15, dport=443, app="fire*")
    assert sel.to_json() == {"proto": "tcp", "dst": "198.18.0.0/15", "dport": 443, "app": "fire*"}


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"colour": "red"},
        {"proto": 6},
        {"proto": "gre"},
        {"src": 1},
        {"src": "300.1.1.1"},
        {"src": "10.0.0.0/"},
        {"src": "10.0.0.0/33"},
        {"src": "10.0.0.0/x"},
        {"dport": "53"},
        {"dport": True},
        {"dport": 70000},
        {"app": 3},
    ],
)
def test_selector_json_rejects(obj: object) -> None:
    with pytest.raises(MalformedError):
        FlowSelector.from_json_untrusted(obj)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_selector_json_random_raises_only_malformed(obj: object) -> None:
    with contextlib.suppress(MalformedError):
        FlowSelector.from_json_untrusted(obj)


def test_move_with_a_twin_makes_flows_redundant_and_single_again() -> None:
    table: Paft[str] = Paft()
    voice = udp("100.64.0.2", 1, "192.0.2.1", 5004)
    table.learn(voice, "wlan0", 0.0)
    everything = FlowSelector()
    assert table.move(everything, "wlan0", twin="wwan0") == [voice]  # the twin changed
    entry = table.entries[voice]
    first_id = entry.dup_id
    assert entry.twin == "wwan0" and first_id != 0
    assert table.move(everything, "wlan0", twin="wwan0") == []  # nothing changed
    assert table.move(everything, "eth0") == [voice]  # no twin given: kept
    assert entry.twin == "wwan0"
    assert table.move(everything, "eth0", twin=None) == [voice]
    assert entry.twin is None
    table.move(everything, "eth0", twin="wwan0")
    assert entry.dup_id != first_id  # a new spell, a new id: the receiver starts afresh
