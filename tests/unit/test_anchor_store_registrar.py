"""The registrar over a store shared by two anchors (SQLite file or PostgreSQL database).

What REGISTER and tunnel set-ups write (registration, tunnel records), a
key pinned at one anchor honoured at the other, a terminal that moves
dropped by the anchor it left (also as the daemon drives it from its
watcher), and REGISTERs answered 503 with Retry-After while PostgreSQL is
down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from anchor_node.config import AnchorConfig
from anchor_node.daemon import AnchorNode
from anchor_node.registrar import Registrar
from anchor_node.store.api import Moved, Store, StoreUnavailable
from paft.table import Paft
from signalling.handshake import StaticKey
from tests.unit.store_kit import Backend, wait_for
from tests.unit.test_anchor_registrar import (
    KEYS,
    TERMINAL_KEYS,
    WALL,
    associate,
    flow,
    open_tunnel,
    register_response,
)
from tests.unit.test_store_contract import terminate


def anchor(store: Store) -> Registrar:
    return Registrar(store, Paft(), encryption=False, wall_clock=lambda: WALL)


@pytest.fixture
def two(backend: Backend) -> Iterator[tuple[Registrar, Registrar]]:
    """Anchors a1 and b1, sub-pools of 100.64.0.0/16."""
    KEYS.clear()
    TERMINAL_KEYS.clear()
    a = anchor(backend.open("100.64.0.0/17", shared_pool="100.64.0.0/16", anchor_id="a1"))
    b = anchor(backend.open("100.64.128.0/17", shared_pool="100.64.0.0/16", anchor_id="b1"))
    yield a, b


def test_register_and_tunnels_are_written_to_the_store(two: tuple[Registrar, Registrar]) -> None:
    a, _b = two
    vipa = associate(a, "alice", expires=600)
    registration = a.store.registration("alice", WALL)
    assert registration is not None
    assert (registration.anchor_id, registration.expires_at) == ("a1", WALL + 600)
    open_tunnel(a, "alice", vipa, ("192.0.2.9", 4000))
    assert [(t.tunnel_id, t.interface) for t in a.store.tunnels("alice")] == [
        ("192.0.2.9:4000", "wlan0")
    ]
    assert register_response(a, "alice", 1.0, expires=0).code == 200
    assert a.store.registration("alice", WALL) is None
    assert a.store.tunnels("alice") == []  # its tunnels went with it
    assert a.store.lookup("alice") == vipa  # the lease stays


def test_a_key_pinned_at_one_anchor_is_honoured_at_the_other(
    two: tuple[Registrar, Registrar],
) -> None:
    a, b = two
    associate(a, "alice")
    stranger = register_response(b, "alice", static=StaticKey.generate())
    assert stranger.code == 403 and "another key" in stranger.phrase
    assert register_response(b, "alice").code == 200  # the pinned key itself


def test_a_terminal_that_moves_keeps_its_vipa_and_leaves_the_first_anchor(
    two: tuple[Registrar, Registrar],
) -> None:
    a, b = two
    vipa = associate(a, "alice")
    open_tunnel(a, "alice", vipa, ("192.0.2.9", 4000))
    a.paft.learn(flow(17, vipa, 5000, "203.0.113.2", 53), ("192.0.2.9", 4000), 0.0)
    assert associate(b, "alice") == vipa  # from a's sub-pool, all the same
    registration = b.store.registration("alice", WALL)
    assert registration is not None and registration.anchor_id == "b1"
    assert b.store.tunnels("alice") == []  # a's records are gone with the move
    assert a.on_moved("alice", "b1") is True  # what the watcher tells a
    assert "alice" not in a.terminals and len(a.paft) == 0 and a.tunnel_vipa == {}
    assert a.statistics()["moved_away"] == 1
    assert b.on_moved("alice", "b1") is False  # never drops what it holds itself
    assert b.store.tunnels("alice") == []  # a's leaving wrote nothing of b's away


def test_register_is_503_with_retry_after_while_the_store_is_down(pg: Backend) -> None:
    KEYS.clear()
    TERMINAL_KEYS.clear()
    a = anchor(pg.open("100.64.0.0/16", anchor_id="a1"))
    vipa = associate(a, "alice")
    assert pg.location.url is not None
    terminate(pg.location.url, "anchor-node a1")
    down = register_response(a, "alice", 1.0)
    assert down.code == 503 and down.headers.get("Retry-After") == "5"
    assert "alice" in a.terminals  # what the anchor holds stays up meanwhile
    assert a.statistics()["store_unavailable"] == 1

    def back() -> bool:
        try:
            return a.store.lookup("alice") == vipa
        except StoreUnavailable:
            return False

    wait_for(back)
    assert associate(a, "alice", 2.0) == vipa


class OneMove:
    """A watcher that hears one move, then waits to be stopped."""

    def __init__(self, move: Moved) -> None:
        self.move = move
        self.stopped = threading.Event()

    def run(self, deliver: Callable[[Moved], None]) -> None:
        deliver(self.move)
        self.stopped.wait(10)

    def stop(self) -> None:
        self.stopped.set()


async def test_the_daemon_applies_what_its_watcher_hears(
    two: tuple[Registrar, Registrar], tmp_path: Path
) -> None:
    """The watcher runs in a worker thread; the move is applied in trio, under the lock."""
    a, _b = two
    associate(a, "alice")
    node = AnchorNode(
        AnchorConfig.build(
            listen="127.0.0.1",
            sip_port=45060,
            tunnel_port=45061,
            pool="100.64.0.0/17",
            state=tmp_path / "state.sqlite",
            control=tmp_path / "an.sock",
            anchor_id="a1",
        )
    )
    node.registrar = a
    watcher = OneMove(Moved("alice", "b1"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node._follow_moves, watcher)
        with trio.fail_after(5):
            while "alice" in a.terminals:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert watcher.stopped.is_set()
