"""The store contract: the same assertions against SQLite and PostgreSQL.

Every test runs once per implementation (`backend`); two stores opened on
one backend are two anchors sharing it (for SQLite, two connections to one
file). Tests named `_postgres` need what only the shared store has: schema
versions an operator migrates, notifications, a connection to lose.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
from pathlib import Path

import psycopg
import pytest

from anchor_node.pool import parse_pool
from anchor_node.store.api import (
    KeyConflict,
    Moved,
    PoolExhausted,
    PrefixCapReached,
    SchemaMismatch,
    Store,
    StoreUnavailable,
)
from anchor_node.store.location import StoreLocation, migrate_store, open_store, parse_store
from anchor_node.store.pg_schema import SCHEMA_VERSION as PG_VERSION
from anchor_node.store.pg_watch import PostgresMoveWatcher
from anchor_node.store.postgres import connection_parameters
from anchor_node.store.sqlite import SCHEMA_VERSION as SQLITE_VERSION
from ground.errors import SetupError
from tests.unit.store_kit import Backend, wait_for

PREFIX = "192.0.2.0/24"
KEY_A, KEY_B = b"a" * 32, b"b" * 32


def fill(store: Store, count: int = 5) -> list[str]:
    return [store.acquire(f"t{i}", now=float(i)) for i in range(count)]


# -- leases --------------------------------------------------------------------------


def test_leases_go_out_in_order_and_stick(backend: Backend) -> None:
    """.2 first (.0 the network, .1 the anchor), one address per terminal, the same again."""
    store = backend.open("100.64.0.0/10")
    got = [store.acquire(f"t{i}", now=float(i)) for i in range(5)]
    assert got == [f"100.64.0.{i}" for i in range(2, 7)]
    assert store.acquire("t0", now=9.0) == "100.64.0.2"
    assert store.lookup("t3") == "100.64.0.5"
    assert store.lookup("nobody") is None
    assert store.all() == {f"t{i}": got[i] for i in range(5)}


def test_reopening_keeps_everything(backend: Backend) -> None:
    """An anchor restart: leases, keys, registrations and tunnel records are all still there."""
    store = backend.open()
    vipa = store.acquire("alice", 1.0, pin=KEY_A)
    store.register("alice", 100.0, 1.0)
    store.put_tunnel("alice", "192.0.2.9:4000", "wlan0", 1.0)
    store.close()
    again = backend.open()
    assert again.lookup("alice") == vipa
    assert again.pinned_key("alice") == KEY_A
    registration = again.registration("alice", 2.0)
    assert registration is not None and registration.anchor_id == "a1"
    assert [t.tunnel_id for t in again.tunnels("alice")] == ["192.0.2.9:4000"]


def test_a_full_pool_reclaims_the_lease_seen_longest_ago(backend: Backend) -> None:
    store = backend.open()
    fill(store)
    store.acquire("t0", now=10.0)  # seen again: t1 is now the oldest
    assert store.acquire("newcomer", now=11.0) == "10.9.0.3"
    assert store.lookup("t1") is None and store.lookup("t0") == "10.9.0.2"


def test_reclaim_spares_terminals_in_use_here_or_registered_anywhere(backend: Backend) -> None:
    """In use here (the registrar's callback), or registered, unexpired, at any anchor."""
    store, other = backend.open(), backend.open(anchor_id="b1")
    fill(store)
    other.register("t1", expires_at=100.0, now=10.0)
    store.register("t2", expires_at=5.0, now=4.0)  # expired by 10.0: reclaimable
    assert store.acquire("n", now=10.0, in_use=lambda tid: tid == "t0") == "10.9.0.4"
    assert store.lookup("t2") is None
    assert {store.lookup(t) for t in ("t0", "t1")} == {"10.9.0.2", "10.9.0.3"}


def test_pool_exhausted_changes_nothing(backend: Backend) -> None:
    store = backend.open()
    fill(store)
    before = store.all()
    with pytest.raises(PoolExhausted):
        store.acquire("newcomer", now=10.0, in_use=lambda _tid: True)
    assert store.all() == before and store.lookup("newcomer") is None


def test_prefix_caps_count_leases_and_pins(backend: Backend) -> None:
    """One /24 creates at most `prefix_cap` leases, and pins as many ids (counted apart)."""
    store = backend.open("10.9.0.0/24", prefix_cap=2)
    store.acquire("t1", 1.0, prefix=PREFIX)
    store.acquire("t2", 1.0, prefix=PREFIX, pin=KEY_A)
    with pytest.raises(PrefixCapReached, match="leases"):
        store.acquire("t3", 2.0, prefix=PREFIX)
    assert store.lookup("t3") is None
    store.acquire("t3", 2.0, prefix="198.51.100.0/24")  # another network
    store.acquire("t1", 3.0, prefix=PREFIX, pin=KEY_B)  # a lease that exists: one more pin
    with pytest.raises(PrefixCapReached, match="pinned terminal keys"):
        store.acquire("t3", 4.0, prefix=PREFIX, pin=b"c" * 32)
    assert store.pinned_key("t3") is None


def test_sub_pools_hand_out_their_own_addresses_and_read_every_lease(backend: Backend) -> None:
    """Each anchor allocates from its sub-pool; a terminal that moves keeps its VIPA."""
    a = backend.open("10.9.0.0/25", shared_pool="10.9.0.0/24", anchor_id="a1")
    b = backend.open("10.9.0.128/25", shared_pool="10.9.0.0/24", anchor_id="b1")
    assert a.acquire("t1", 1.0) == "10.9.0.2"
    assert b.acquire("t2", 1.0) == "10.9.0.130"
    assert b.acquire("t1", 2.0) == "10.9.0.2"  # from a's sub-pool, still t1's
    assert a.lookup("t2") == "10.9.0.130"
    assert a.all() == b.all() == {"t1": "10.9.0.2", "t2": "10.9.0.130"}


def test_a_lease_outside_a_changed_pool_is_given_a_new_address(backend: Backend) -> None:
    old = backend.open("10.1.0.0/24")
    assert old.acquire("alice", 1.0) == "10.1.0.2"
    old.close()
    new = backend.open("10.2.0.0/24")
    assert new.lookup("alice") is None and new.all() == {}
    assert new.acquire("alice", 2.0) == "10.2.0.2"
    assert new.acquire("alice", 3.0) == "10.2.0.2"


# -- pinned keys ---------------------------------------------------------------------------


def test_the_first_key_pinned_is_kept_at_every_anchor(backend: Backend) -> None:
    a, b = backend.open(anchor_id="a1"), backend.open(anchor_id="b1")
    a.pin_key("alice", KEY_A, 1.0)
    b.pin_key("alice", KEY_B, 2.0)
    assert a.pinned_key("alice") == b.pinned_key("alice") == KEY_A
    assert b.unpin_key("alice") is True and b.unpin_key("alice") is False
    assert a.pinned_key("alice") is None


def test_a_pin_lost_to_another_key_rolls_the_new_lease_back(backend: Backend) -> None:
    """Another anchor pinned the id meanwhile: KeyConflict, and no lease was made."""
    a, b = backend.open(anchor_id="a1"), backend.open(anchor_id="b1")
    b.pin_key("alice", KEY_B, 1.0)
    with pytest.raises(KeyConflict):
        a.acquire("alice", 2.0, pin=KEY_A)
    assert a.lookup("alice") is None
    assert a.acquire("alice", 3.0, pin=KEY_B) == "10.9.0.2"


# -- registrations and tunnel records -------------------------------------------------


def test_registrations_say_who_holds_a_terminal_until_when(backend: Backend) -> None:
    a, b = backend.open(anchor_id="a1"), backend.open(anchor_id="b1")
    assert a.register("alice", expires_at=100.0, now=1.0) is None
    assert a.register("alice", expires_at=200.0, now=50.0) is None  # a refresh
    registration = b.registration("alice", 60.0)
    assert registration is not None
    assert (registration.anchor_id, registration.expires_at) == ("a1", 200.0)
    assert b.registration("alice", 200.0) is None  # expired
    assert b.register("alice", expires_at=300.0, now=70.0) == "a1"  # a move
    a.unregister("alice")  # not a's any more: kept
    registration = a.registration("alice", 80.0)
    assert registration is not None and registration.anchor_id == "b1"
    b.unregister("alice")
    assert a.registration("alice", 80.0) is None
    # Taking over an expired registration is no move.
    a.register("bob", expires_at=10.0, now=1.0)
    assert b.register("bob", expires_at=100.0, now=20.0) is None


def test_tunnel_records_follow_the_terminal(backend: Backend) -> None:
    """Metadata only; a move forgets the records of the anchor the terminal left."""
    a, b = backend.open(anchor_id="a1"), backend.open(anchor_id="b1")
    a.register("alice", 100.0, 1.0)
    a.put_tunnel("alice", "192.0.2.9:4000", "wlan0", 1.0)
    a.put_tunnel("alice", "198.51.100.7:4001", "wwan0", 2.0)
    a.put_tunnel("alice", "192.0.2.9:4000", "eth0", 3.0)  # set up again: updated
    got = [(t.tunnel_id, t.interface, t.anchor_id) for t in b.tunnels("alice")]
    assert got == [("192.0.2.9:4000", "eth0", "a1"), ("198.51.100.7:4001", "wwan0", "a1")]
    a.drop_tunnel("alice", "198.51.100.7:4001")
    assert [t.tunnel_id for t in a.tunnels("alice")] == ["192.0.2.9:4000"]
    b.register("alice", 200.0, 5.0)
    b.put_tunnel("alice", "203.0.113.5:4002", "wlan0", 5.0)
    assert [(t.tunnel_id, t.anchor_id) for t in a.tunnels("alice")] == [("203.0.113.5:4002", "b1")]
    a.put_tunnel("bob", "192.0.2.10:4000", "wlan0", 6.0)
    a.clear_tunnels()  # a fresh start of a: its records go, b's stay
    assert a.tunnels("bob") == [] and len(a.tunnels("alice")) == 1


# -- schema ----------------------------------------------------------------------------


def test_migrate_is_idempotent(backend: Backend) -> None:
    store = backend.open()
    vipa = store.acquire("alice", 1.0)
    store.close()
    version = PG_VERSION if backend.kind == "postgresql" else SQLITE_VERSION
    assert migrate_store(backend.location) == (version, version)
    assert migrate_store(backend.location) == (version, version)
    assert backend.open().lookup("alice") == vipa


def test_a_sqlite_file_from_before_the_store_is_upgraded(tmp_path: Path) -> None:
    """A lease file of the first releases (no prefix columns, no schema version) opens as it
    was, with its leases and keys, and the new tables."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(str(path))
    db.executescript(
        "CREATE TABLE leases (terminal_id TEXT PRIMARY KEY, vipa INTEGER NOT NULL UNIQUE, "
        "last_seen REAL NOT NULL);"
        "CREATE TABLE terminal_keys (terminal_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, "
        "pinned_at REAL NOT NULL);"
    )
    db.execute(
        "INSERT INTO leases VALUES ('alice', ?, 1.0)", (int(ipaddress.IPv4Address("10.9.0.3")),)
    )
    db.execute("INSERT INTO terminal_keys VALUES ('alice', ?, 1.0)", (KEY_A,))
    db.commit()
    db.close()
    assert migrate_store(StoreLocation(path=path)) == (0, SQLITE_VERSION)
    store = open_store(StoreLocation(path=path), parse_pool("10.9.0.0/29"))
    try:
        assert store.lookup("alice") == "10.9.0.3" and store.pinned_key("alice") == KEY_A
        assert store.acquire("bob", 2.0, prefix=PREFIX) == "10.9.0.4"
        store.register("bob", 100.0, 2.0)
        assert store.registration("bob", 3.0) is not None
    finally:
        store.close()


def test_postgres_refuses_a_schema_it_does_not_speak(postgres_url: str, tmp_path: Path) -> None:
    """Too old: one line saying to migrate (the URL without its password); too new: refused."""
    url = postgres_url.replace("postgres@", "postgres:secret@")
    location = parse_store(url, tmp_path / "unused")
    with pytest.raises(SchemaMismatch, match="run 'anchor-node store migrate") as caught:
        open_store(location, parse_pool("10.9.0.0/29"))
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)
    migrate_store(location)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE upmt.schema_version SET version = version + 1")
    with pytest.raises(SchemaMismatch, match="newer"):
        open_store(location, parse_pool("10.9.0.0/29"))
    assert migrate_store(location) == (PG_VERSION + 1, PG_VERSION)


# -- moves and outages (PostgreSQL) ---------------------------------------------------------


def terminate(url: str, application_name: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )


class Heard:
    """A watcher running in a thread, and what it delivered."""

    def __init__(self, watcher: PostgresMoveWatcher) -> None:
        self.watcher = watcher
        self.moves: list[Moved] = []
        self.thread = threading.Thread(target=watcher.run, args=(self.moves.append,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.watcher.stop()
        self.thread.join(timeout=10)


def test_the_anchor_a_terminal_left_hears_of_it_postgres(pg: Backend) -> None:
    """NOTIFY on a move; after a lost connection, the moves missed meanwhile are caught up."""
    a, b = pg.open(anchor_id="a1"), pg.open(anchor_id="b1")
    assert pg.location.url is not None
    params = connection_parameters(pg.location.url, "a1-watch")
    heard = Heard(PostgresMoveWatcher(params, "a1", "test", heartbeat=0.1, retry=0.1))
    try:
        wait_for(lambda: _listening(pg.location.url or "", "anchor-node a1-watch"))
        a.register("alice", 1e12, 1.0)
        b.register("alice", 1e12, 2.0)
        wait_for(lambda: Moved("alice", "b1") in heard.moves)
        a.register("bob", 1e12, 3.0)
        a.register("bob", 1e12, 4.0)  # a refresh at a: nobody moved
        terminate(pg.location.url, "anchor-node a1-watch")
        b.register("carol", 1e12, 5.0)  # while a is not listening
        wait_for(lambda: Moved("carol", "b1") in heard.moves)
        assert all(m.terminal_id != "bob" for m in heard.moves)
    finally:
        heard.stop()


def _listening(url: str, application_name: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND "
            "query LIKE 'SELECT now()%%'",
            (application_name,),
        ).fetchone()
    return row is not None and row[0] > 0


def test_a_lost_connection_is_unavailable_then_comes_back_postgres(pg: Backend) -> None:
    store = pg.open(anchor_id="a1")
    vipa = store.acquire("alice", 1.0)
    assert pg.location.url is not None
    terminate(pg.location.url, "anchor-node a1")
    with pytest.raises(StoreUnavailable):
        store.lookup("alice")

    def back() -> bool:
        try:
            return store.lookup("alice") == vipa
        except StoreUnavailable:
            return False

    wait_for(back)


def test_an_unreachable_postgres_is_one_line_at_start(tmp_path: Path) -> None:
    """No server behind the URL: SetupError naming the store, without its password."""
    url = f"postgresql://anchor:secret@/upmt?host={tmp_path}"  # a socket directory, empty
    with pytest.raises(SetupError, match="cannot reach the store") as caught:
        open_store(parse_store(url, tmp_path / "unused"), parse_pool("10.9.0.0/29"))
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)
