"""The VIPA lease store: allocation order, stickiness, persistence, reclaim, pool checks."""

from __future__ import annotations

import ipaddress
import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anchor_node.leases import (
    LeaseStore,
    PoolExhausted,
    PrefixCapReached,
    anchor_address,
    parse_pool,
)
from ground.errors import ConfigError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LeaseStore]:
    s = LeaseStore(tmp_path / "leases.sqlite", parse_pool("100.64.0.0/10"))
    yield s
    s.close()


@pytest.fixture
def small(tmp_path: Path) -> Iterator[LeaseStore]:
    """A /29: .1 is the anchor's, .2-.6 go to terminals."""
    s = LeaseStore(tmp_path / "small.sqlite", parse_pool("10.9.0.0/29"))
    yield s
    s.close()


def test_anchor_keeps_first_host() -> None:
    """The anchor's own address is the pool's first host."""
    assert anchor_address(parse_pool("100.64.0.0/10")) == ipaddress.IPv4Address("100.64.0.1")
    assert anchor_address(parse_pool("10.9.0.8/29")) == ipaddress.IPv4Address("10.9.0.9")


def test_first_lease_is_second_host(store: LeaseStore) -> None:
    """The first terminal gets .2: .0 is the network, .1 the anchor."""
    assert store.acquire("alice", now=1.0) == "100.64.0.2"


def test_lease_is_sticky(store: LeaseStore) -> None:
    """The same terminal id always gets the same address back."""
    first = store.acquire("alice", now=1.0)
    store.acquire("bob", now=2.0)
    assert store.acquire("alice", now=3.0) == first
    assert store.lookup("alice") == first


def test_distinct_terminals_get_distinct_addresses(store: LeaseStore) -> None:
    """Ten terminals, ten different addresses, handed out in order."""
    got = [store.acquire(f"t{i}", now=float(i)) for i in range(10)]
    assert got == [f"100.64.0.{i}" for i in range(2, 12)]
    assert store.all() == {f"t{i}": got[i] for i in range(10)}


def test_lookup_unknown_is_none(store: LeaseStore) -> None:
    """An id that never associated has no lease."""
    assert store.lookup("nobody") is None


def test_leases_survive_reopening(tmp_path: Path) -> None:
    """Closing and reopening the same file (an anchor restart) keeps every lease."""
    path = tmp_path / "leases.sqlite"
    pool = parse_pool("100.64.0.0/10")
    first = LeaseStore(path, pool)
    a = first.acquire("alice", now=1.0)
    b = first.acquire("bob", now=2.0)
    first.close()
    second = LeaseStore(path, pool)
    try:
        assert second.acquire("bob", now=3.0) == b
        assert second.acquire("alice", now=4.0) == a
        assert second.acquire("carol", now=5.0) not in (a, b)
    finally:
        second.close()


def fill(store: LeaseStore, count: int = 5) -> list[str]:
    return [store.acquire(f"t{i}", now=float(i)) for i in range(count)]


def test_small_pool_fills_then_reclaims_least_recently_seen(small: LeaseStore) -> None:
    """A full pool reclaims the lease seen longest ago that is not in use."""
    got = fill(small)
    assert got == [f"10.9.0.{i}" for i in range(2, 7)]
    small.acquire("t0", now=10.0)  # t0 seen again: t1 is now the oldest
    new = small.acquire("newcomer", now=11.0)
    assert new == "10.9.0.3"
    assert small.lookup("t1") is None
    assert small.lookup("t0") == "10.9.0.2"


def test_reclaim_skips_leases_in_use(small: LeaseStore) -> None:
    """Leases whose terminal is associated are never reclaimed."""
    fill(small)
    busy = {"t0", "t1", "t2"}
    new = small.acquire("newcomer", now=10.0, in_use=lambda tid: tid in busy)
    assert new == "10.9.0.5"
    assert small.lookup("t3") is None
    assert {small.lookup(t) for t in busy} == {"10.9.0.2", "10.9.0.3", "10.9.0.4"}


def test_pool_exhausted_when_all_in_use(small: LeaseStore) -> None:
    """Every lease in use: PoolExhausted, and no lease changes."""
    fill(small)
    before = small.all()
    with pytest.raises(PoolExhausted):
        small.acquire("newcomer", now=10.0, in_use=lambda _tid: True)
    assert small.all() == before
    assert small.lookup("newcomer") is None


def test_gaps_are_reused(tmp_path: Path) -> None:
    """Addresses freed below the top (stale leases dropped) are handed out again."""
    path = tmp_path / "gaps.sqlite"
    wide = LeaseStore(path, parse_pool("10.9.0.0/28"))
    for i in range(13):  # .2 .. .14
        wide.acquire(f"t{i}", now=float(i))
    wide.close()
    # Shrink to the /29: t5..t12 (.7 .. .14) fall outside; t0..t4 stay.
    narrow = LeaseStore(path, parse_pool("10.9.0.0/29"))
    try:
        assert narrow.all() == {f"t{i}": f"10.9.0.{i + 2}" for i in range(5)}
        # Full now: reclaim t0 (oldest) for a newcomer...
        assert narrow.acquire("n1", now=20.0) == "10.9.0.2"
        # ...and t5, whose old lease is outside the pool, gets a fresh in-pool one.
        assert narrow.acquire("t5", now=21.0) == "10.9.0.3"
    finally:
        narrow.close()


def test_gap_in_middle_filled_before_reclaiming(tmp_path: Path) -> None:
    """A hole below the top of a full range is used without reclaiming anyone."""
    path = tmp_path / "hole.sqlite"
    s = LeaseStore(path, parse_pool("10.9.0.0/29"))
    fill(s)
    s.close()
    # Move t2's lease out of the pool by hand, as a changed pool would.
    db = sqlite3.connect(str(path))
    outside = int(ipaddress.IPv4Address("192.0.2.7"))
    db.execute("UPDATE leases SET vipa = ? WHERE terminal_id = 't2'", (outside,))
    db.commit()
    db.close()
    s = LeaseStore(path, parse_pool("10.9.0.0/29"))
    try:
        assert s.acquire("n1", now=10.0, in_use=lambda _tid: True) == "10.9.0.4"
    finally:
        s.close()


def test_lease_outside_changed_pool_is_reallocated(tmp_path: Path) -> None:
    """After the pool changes, a terminal's old lease is dropped and a new one allocated."""
    path = tmp_path / "moved.sqlite"
    old = LeaseStore(path, parse_pool("10.1.0.0/24"))
    assert old.acquire("alice", now=1.0) == "10.1.0.2"
    old.close()
    new = LeaseStore(path, parse_pool("10.2.0.0/24"))
    try:
        assert new.lookup("alice") is None
        assert new.all() == {}
        assert new.acquire("alice", now=2.0) == "10.2.0.2"
        assert new.acquire("alice", now=3.0) == "10.2.0.2"
    finally:
        new.close()


def test_full_pool_never_hands_out_stale_out_of_pool_address(tmp_path: Path) -> None:
    """Reclaim considers only leases inside the current pool.

    A stale lease from an older pool, seen longest ago, must not be recycled:
    its address is outside the pool.
    """
    path = tmp_path / "stale.sqlite"
    old = LeaseStore(path, parse_pool("10.1.0.0/29"))
    old.acquire("ghost", now=-1.0)  # 10.1.0.2, never seen again
    old.close()
    new = LeaseStore(path, parse_pool("10.2.0.0/29"))
    try:
        fill(new)
        vipa = new.acquire("newcomer", now=10.0)
        assert ipaddress.IPv4Address(vipa) in new.pool
        assert vipa == "10.2.0.2"  # t0's, the oldest in-pool lease
        assert new.lookup("newcomer") == vipa
    finally:
        new.close()


@pytest.mark.parametrize(
    "text",
    ["foo", "10.0.0.1/8", "10.0.0.0/30", "10.0.0.0/31", "10.0.0.0/32", "2001:db8::/64", ""],
)
def test_bad_pools_raise_config_error(text: str) -> None:
    """Not an IPv4 prefix, host bits set, too small, or IPv6: ConfigError naming the value."""
    with pytest.raises(ConfigError, match="--pool"):
        parse_pool(text)


def test_smallest_pool_accepted() -> None:
    """A /29 is the smallest pool."""
    assert parse_pool("10.0.0.8/29") == ipaddress.IPv4Network("10.0.0.8/29")


# --- against a naive model ---------------------------------------------------

POOL = parse_pool("10.7.0.0/28")
HOSTS = [str(POOL.network_address + i) for i in range(2, 15)]  # .2 .. .14


class Model:
    """dict terminal → address, set of free addresses, last-seen times."""

    def __init__(self) -> None:
        self.lease: dict[str, str] = {}
        self.seen: dict[str, float] = {}
        self.free = set(HOSTS)

    def acquire(self, tid: str, now: float, busy: frozenset[str]) -> str | None:
        if tid in self.lease:
            self.seen[tid] = now
            return self.lease[tid]
        if self.free:
            vipa = min(self.free, key=lambda a: ipaddress.IPv4Address(a))
        else:
            victims = sorted((t for t in self.lease if t not in busy), key=self.seen.__getitem__)
            if not victims:
                return None
            vipa = self.lease.pop(victims[0])
            del self.seen[victims[0]]
            self.free.add(vipa)
        self.free.discard(vipa)
        self.lease[tid] = vipa
        self.seen[tid] = now
        return vipa


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 24), st.frozensets(st.integers(0, 24), max_size=20)),
        max_size=60,
    )
)
def test_against_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[int, frozenset[int]]]
) -> None:
    """Random acquire sequences on a /28 give what a dict + set model gives."""
    path = tmp_path_factory.mktemp("model") / "leases.sqlite"
    store = LeaseStore(path, POOL)
    model = Model()
    clock = itertools.count(1)
    try:
        for tid_n, busy_n in ops:
            tid = f"t{tid_n}"
            busy = frozenset(f"t{n}" for n in busy_n)
            in_use = busy.__contains__
            now = float(next(clock))
            expected = model.acquire(tid, now, busy)
            if expected is None:
                with pytest.raises(PoolExhausted):
                    store.acquire(tid, now, in_use=in_use)
            else:
                assert store.acquire(tid, now, in_use=in_use) == expected
            assert store.all() == model.lease
            assert len(set(store.all().values())) == len(store.all())
    finally:
        store.close()


def test_pins_are_capped_per_prefix_too(tmp_path: Path) -> None:
    """A reclaimed lease frees its address, never its id's pin: pins count on their own."""
    store = LeaseStore(tmp_path / "p.sqlite", parse_pool("10.9.0.0/24"), prefix_cap=2)
    try:
        for tid in ("t1", "t2"):
            store.acquire(tid, 1.0, prefix="192.0.2.0/24", pin=tid.encode() * 16)
        store._db.execute("DELETE FROM leases")  # as reclaiming would
        with pytest.raises(PrefixCapReached, match="pinned terminal keys"):
            store.acquire("t3", 2.0, prefix="192.0.2.0/24", pin=b"k" * 32)
        assert store.lookup("t3") is None and store.pinned_key("t3") is None
        store.acquire("t3", 2.0, prefix="198.51.100.0/24", pin=b"k" * 32)  # another network
        assert store.pinned_key("t1") == b"t1" * 16  # the pins that exist stay
    finally:
        store.close()
