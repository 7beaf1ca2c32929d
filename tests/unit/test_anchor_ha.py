"""The HA pair's node: sealed terminal state, checkpoints, takeover and fencing (sans-IO).

Two registrars with one anchor key stand for the pair's nodes; they share a
`MemoryHaStore` (and, in the last tests, a real PostgreSQL store).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from anchor_node.ha import HaReplica
from anchor_node.ha_state import StateSeal
from anchor_node.registrar import Registrar
from anchor_node.sessions import HA_COUNTER_MARGIN
from anchor_node.store.api import StoreUnavailable
from anchor_node.store.ha_api import Fenced, MemoryHaStore
from anchor_node.store.location import parse_store
from anchor_node.store.postgres import PostgresStore
from anchor_node.store.sqlite import SqliteStore
from ground.constants import Addr
from ground.errors import MalformedError
from paft.flow import PROTO_TCP
from signalling.handshake import StaticKey, tunnel_keys
from tests.unit.test_anchor_registrar import (
    KEYS,
    TERMINAL_KEYS,
    associate,
    flow,
    make_registrar,
)
from tests.unit.test_anchor_sessions import receiver, setup
from tunnel.crypto import Sealer

T1: Addr = ("203.0.113.10", 40000)
ANCHOR_KEY = StaticKey.generate()


class Node:
    """One node of the pair: its registrar and its replica."""

    def __init__(self, tmp_path: Path, store: MemoryHaStore, name: str) -> None:
        self.reg: Registrar = make_registrar(
            tmp_path, encryption=True, max_tunnels=4, static_key=ANCHOR_KEY
        )
        self.wall = 1000.0
        self.ha = HaReplica(
            store,
            self.reg.table,
            StateSeal(ANCHOR_KEY, store.anchor_id),
            node=name,
            wall_clock=lambda: self.wall,
        )


@pytest.fixture
def store() -> MemoryHaStore:
    return MemoryHaStore("pair")


@pytest.fixture
def pair(tmp_path: Path, store: MemoryHaStore) -> Iterator[tuple[Node, Node]]:
    KEYS.clear()
    TERMINAL_KEYS.clear()
    a, b = Node(tmp_path, store, "a"), Node(tmp_path, store, "b")
    yield a, b
    a.reg.leases.close()
    b.reg.leases.close()


def up_frame(node: Node, terminal_id: str, counter: int) -> bytes:
    """A frame the terminal sends on slot 0 with `counter` (its upstream key)."""
    keys = node.reg.terminals[terminal_id].keys[0]
    up, _down = tunnel_keys(keys, 0)
    return Sealer(up, keys.anchor_index, start=counter).seal(b"\x01inner")


def active_with_alice(a: Node, now: float = 10.0) -> str:
    assert a.ha.take_over(now, now) == 0
    vipa = associate(a.reg, "alice", now)
    assert setup(a.reg, "alice", 0, T1, now) == 200
    a.reg.paft.learn(flow(PROTO_TCP, vipa, 40001, "203.0.113.80", 80), T1, now, app="curl")
    a.ha.flush(now)
    return vipa


# -- sealing ----------------------------------------------------------------------------
def test_a_sealed_record_opens_only_as_the_same_anchor_and_terminal() -> None:
    seal = StateSeal(ANCHOR_KEY, "pair")
    blob = seal.seal("alice", {"terminal_id": "alice", "n": 1})
    assert seal.open("alice", blob) == {"terminal_id": "alice", "n": 1}
    assert b"alice" not in blob[1:]  # nothing readable
    assert seal.seal("alice", {"n": 1}) != seal.seal("alice", {"n": 1})  # a salt each
    assert seal.open("bob", blob) is None
    assert StateSeal(ANCHOR_KEY, "other").open("alice", blob) is None
    assert StateSeal(StaticKey.generate(), "pair").open("alice", blob) is None
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    assert seal.open("alice", bytes(flipped)) is None
    for junk in (b"", b"\x01", blob[:20], b"\x02" + blob[1:], b"\x01" + bytes(2 << 20)):
        assert seal.open("alice", junk) is None


# -- takeover ----------------------------------------------------------------------------
def test_the_standby_takes_over_keys_tunnels_flows_with_counters_moved_on(
    pair: tuple[Node, Node], store: MemoryHaStore
) -> None:
    a, b = pair
    vipa = active_with_alice(a)
    sender = a.reg.sessions.senders[T1]
    for _ in range(5):
        sender.seal(b"\x01down")
    sent = sender.sent()
    rx = receiver(a.reg, "alice", 0)
    old = up_frame(a, "alice", 7)
    assert rx.opener.open_untrusted(old)
    a.ha.flush(16.0, due=True)  # the periodic checkpoint: counters and windows
    assert store.epoch == (1, "a") and set(store.states) == {"alice"}

    b.wall = 1003.0  # three seconds after the last write
    assert b.ha.take_over(50.0, 50.0) == 1
    assert store.epoch == (2, "b") and b.ha.active
    terminal = b.reg.terminals["alice"]
    assert terminal.vipa == vipa and list(terminal.tunnels) == [T1]
    assert b.reg.default_tunnel[terminal.vipa_packed] == T1
    assert terminal.expires_at == pytest.approx(50.0 - 3.0 + 610 - 16.0)
    assert [(e.tunnel, e.app) for _k, e in b.reg.paft] == [(T1, "curl")]
    assert b.reg.sessions.senders[T1].sent() == sent + HA_COUNTER_MARGIN
    # The replay window starts where the active's stood.
    rx_b = receiver(b.reg, "alice", 0)
    assert rx_b.endpoint == T1
    with pytest.raises(MalformedError, match="replayed"):
        rx_b.opener.open_untrusted(old)
    assert rx_b.opener.open_untrusted(up_frame(b, "alice", 8))
    # The terminal's signed MESSAGEs verify at the new active.
    assert setup(b.reg, "alice", 0, T1, 51.0) == 200


def test_every_change_is_written_before_its_answer_and_departures_are_forgotten(
    pair: tuple[Node, Node], store: MemoryHaStore
) -> None:
    a, _b = pair
    active_with_alice(a)
    writes = store.writes
    a.ha.flush(11.0)
    assert store.writes == writes  # nothing touched, nothing due
    associate(a.reg, "bob", 11.0)
    assert "bob" in a.reg.table.touched
    a.ha.flush(11.0)
    assert set(store.states) == {"alice", "bob"} and not a.reg.table.touched
    a.reg.table.remove("bob")
    a.ha.flush(11.5)
    assert set(store.states) == {"alice"}
    a.ha.flush(10.0 + a.ha.checkpoint_interval, due=True)
    assert store.states["alice"].written_at == a.wall and store.writes == writes + 2


def test_a_node_whose_epoch_was_taken_steps_down_without_writing(
    pair: tuple[Node, Node], store: MemoryHaStore
) -> None:
    a, b = pair
    active_with_alice(a)
    b.ha.take_over(20.0, 20.0)
    before = dict(store.states)
    associate(a.reg, "bob", 21.0)  # the old active still believes it holds the address
    a.ha.flush(21.0)
    assert not a.ha.active and a.ha.counters.ha_fenced == 1
    assert a.reg.terminals == {} and a.reg.tunnel_vipa == {} and len(a.reg.paft) == 0
    assert store.states == before and "bob" not in store.states
    with pytest.raises(Fenced):
        store.save_states(1, [("bob", b"x")], 0.0)


def test_a_store_outage_keeps_the_changes_for_the_next_checkpoint(
    pair: tuple[Node, Node], store: MemoryHaStore
) -> None:
    a, _b = pair
    active_with_alice(a)
    store.available = False
    associate(a.reg, "bob", 11.0)
    assert a.ha.flush(11.0) is False  # the daemon answers this REGISTER 503 instead of 200
    assert a.ha.counters.ha_checkpoint_failures == 1 and "bob" in a.reg.table.touched
    store.available = True
    assert a.ha.flush(12.0) is True
    assert "bob" in store.states and not a.reg.table.touched


def test_a_takeover_without_the_store_leaves_the_node_standby(
    pair: tuple[Node, Node], store: MemoryHaStore
) -> None:
    _a, b = pair
    store.available = False
    with pytest.raises(StoreUnavailable):
        b.ha.take_over(1.0, 1.0)
    assert not b.ha.active and store.epoch is None


def test_records_that_do_not_open_or_ran_out_are_not_restored(
    pair: tuple[Node, Node], store: MemoryHaStore
) -> None:
    a, b = pair
    active_with_alice(a)
    associate(a.reg, "bob", 10.0, expires=60)
    a.ha.flush(10.0)
    saved = store.states["alice"]
    store.states["alice"] = type(saved)("alice", saved.sealed[:-1] + b"\0", saved.written_at, 1)
    store.states["carol"] = type(saved)("carol", store.states["bob"].sealed, a.wall, 1)
    b.wall = a.wall + 61.0  # bob's registration ran out meanwhile
    assert b.ha.take_over(100.0, 100.0) == 0
    assert b.ha.counters.ha_states_rejected == 2  # alice tampered with, bob's row as carol
    assert b.reg.terminals == {}


def test_losing_the_address_forgets_everything_and_writes_nothing(
    pair: tuple[Node, Node], store: MemoryHaStore
) -> None:
    a, _b = pair
    active_with_alice(a)
    writes = store.writes
    a.ha.step_down("test")
    assert not a.ha.active and a.reg.terminals == {} and a.reg.sessions.senders == {}
    associate(a.reg, "bob", 12.0)
    a.ha.flush(12.0, due=True)
    assert store.writes == writes and "bob" not in store.states


# -- PostgreSQL --------------------------------------------------------------------------
def test_postgres_epochs_fence_and_states_round_trip(postgres_url: str, tmp_path: Path) -> None:
    from anchor_node.pool import parse_pool
    from anchor_node.store.location import migrate_store, open_store

    location = parse_store(postgres_url, tmp_path / "unused")
    migrate_store(location)
    one = open_store(location, parse_pool("10.9.0.0/29"), anchor_id="pair")
    two = open_store(location, parse_pool("10.9.0.0/29"), anchor_id="pair")
    other = open_store(location, parse_pool("10.9.0.8/29"), anchor_id="elsewhere")
    try:
        assert isinstance(one, PostgresStore) and isinstance(two, PostgresStore)
        assert isinstance(other, PostgresStore)
        assert one.current_epoch() is None
        e1 = one.take_over("a")
        one.save_states(e1, [("alice", b"A1"), ("bob", b"B1")], 5.0)
        assert other.take_over("x") == 1  # epochs are per anchor id
        e2 = two.take_over("b")
        assert e2 == e1 + 1 and one.current_epoch() == (e2, "b")
        with pytest.raises(Fenced):
            one.save_states(e1, [("alice", b"A2")], 6.0)
        with pytest.raises(Fenced):
            one.drop_states(e1, ["bob"])
        two.save_states(e2, [("alice", b"A3")], 7.0)
        two.drop_states(e2, ["bob"])
        rows = {(s.terminal_id, s.sealed, s.written_at, s.epoch) for s in two.load_states()}
        assert rows == {("alice", b"A3", 7.0, e2)}
        assert other.load_states() == []
    finally:
        for store in (one, two, other):
            store.close()


def test_the_sqlite_store_is_no_pair_store(tmp_path: Path) -> None:
    from anchor_node.pool import parse_pool

    sqlite = SqliteStore(tmp_path / "s.sqlite", parse_pool("10.9.0.0/29"))
    try:
        assert not hasattr(sqlite, "take_over")
    finally:
        sqlite.close()


def test_each_epoch_sends_in_a_range_of_its_own_even_when_one_never_wrote(
    pair: tuple[Node, Node], store: MemoryHaStore
) -> None:
    """an1 writes (epoch 1), an2 takes over and sends but never writes (epoch 2), an1 takes
    over again (epoch 3): it must not reuse the counters an2 sent under (nonce reuse)."""
    a, b = pair
    active_with_alice(a)
    saved = a.reg.sessions.senders[T1].sent()
    b.ha.take_over(20.0, 20.0)
    b_sender = b.reg.sessions.senders[T1]
    for _ in range(3):
        b_sender.seal(b"\x01down")
    b_used = b_sender.sent()
    assert b_used == saved + HA_COUNTER_MARGIN + 3
    a.ha.take_over(21.0, 21.0)
    assert store.epoch == (3, "a") and store.states["alice"].epoch == 1
    assert a.reg.sessions.senders[T1].sent() == saved + 2 * HA_COUNTER_MARGIN > b_used
