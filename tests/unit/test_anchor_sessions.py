"""The anchor with tunnel encryption: keys bound to tunnel slots, rekeys, limits, the moves cap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from anchor_node.registrar import Registrar
from anchor_node.sessions import PREVIOUS_GRACE, REJECT_AFTER_TIME, Receiver
from anchor_node.tunnel_broker import MAX_MOVES
from ground.constants import Addr
from paft.flow import FiveTuple
from paft.table import FlowSelector
from signalling.bodies import FlowMove, StructuredMatch
from signalling.handshake import tunnel_keys
from tests.unit.test_anchor_registrar import (
    KEYS,
    TERMINAL_KEYS,
    associate,
    flow,
    handover_body,
    make_registrar,
    message,
    setup_body,
    wire_response,
)
from tunnel.crypto import Opener, Sealer

T1: Addr = ("192.0.2.2", 40000)
T2: Addr = ("192.0.2.6", 40001)


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registrar]:
    KEYS.clear()
    TERMINAL_KEYS.clear()
    registrar = make_registrar(tmp_path, encryption=True, max_tunnels=4)
    yield registrar
    registrar.leases.close()


def receiver(reg: Registrar, terminal_id: str, slot: int, generation: int = 0) -> Receiver:
    keys = reg.terminals[terminal_id].keys[generation]
    return reg.sessions.receivers[keys.anchor_index + slot]


def setup(
    reg: Registrar, terminal_id: str, slot: int, addr: Addr, now: float = 0.0, *, via: str = ""
) -> int:
    """A set-up MESSAGE arriving at `addr` under tunnel `slot` of `via` (default: its own)."""
    reg.sessions.note_origin(addr, receiver(reg, via or terminal_id, slot))
    vipa = reg.terminals[terminal_id].vipa
    answer = reg.on_tunnel_message(message(setup_body(terminal_id, vipa), terminal_id), addr, now)
    assert answer is not None
    return wire_response(answer).code


def test_setup_binds_the_slot_to_the_address(reg: Registrar) -> None:
    associate(reg, "alice")
    assert setup(reg, "alice", 0, T1) == 200
    rx = receiver(reg, "alice", 0)
    assert rx.endpoint == T1
    assert reg.sessions.senders[T1] is rx.sealer
    assert receiver(reg, "alice", 1).endpoint is None
    # What the terminal derives for slot 0 opens what the anchor seals, and back.
    keys = reg.terminals["alice"].keys[0]
    up, down = tunnel_keys(keys, 0)
    frame = Sealer(up, keys.anchor_index).seal(b"E" + bytes(30))
    assert rx.opener.open_untrusted(frame) == b"E" + bytes(30)
    back = rx.sealer.seal(b"\x02" + bytes(18))
    assert Opener(down, keys.terminal_index).open_untrusted(back) == b"\x02" + bytes(18)


def test_a_setup_under_another_terminals_key_is_refused(reg: Registrar) -> None:
    associate(reg, "alice")
    associate(reg, "mallory")
    # mallory's own tunnel key carrying a set-up for alice (signed with alice's
    # key even, which mallory cannot have: the check comes first).
    assert setup(reg, "alice", 0, T2, via="mallory") == 403
    assert T2 not in reg.tunnel_vipa and T2 not in reg.sessions.senders


def test_nat_rebinding_moves_the_slot_and_drops_the_old_address(reg: Registrar) -> None:
    associate(reg, "alice")
    setup(reg, "alice", 0, T1)
    moved: Addr = ("192.0.2.2", 41111)
    assert setup(reg, "alice", 0, moved, 5.0) == 200
    assert set(reg.terminals["alice"].tunnels) == {moved}
    assert T1 not in reg.sessions.senders and T1 not in reg.tunnel_vipa
    assert receiver(reg, "alice", 0).endpoint == moved


def test_rekey_keeps_bound_slots_and_switches_senders_on_first_use(reg: Registrar) -> None:
    vipa = associate(reg, "alice")
    setup(reg, "alice", 0, T1)
    old = receiver(reg, "alice", 0)
    associate(reg, "alice", now=100.0)  # the refresh is a new key exchange
    new = receiver(reg, "alice", 0)
    assert new is not old and new.endpoint == T1 and not old.current
    assert reg.sessions.senders[T1] is old.sealer  # until the terminal uses the new key
    assert reg.terminals["alice"].vipa == vipa
    # Unused, the new keys do not retire the old ones, however long it takes ...
    reg.expire(100.0 + PREVIOUS_GRACE + 1, {T1: 100.0 + PREVIOUS_GRACE}, tunnel_idle=600)
    assert old.opener.index in reg.sessions.receivers
    # ... used, they do, after the grace for frames in flight.
    keys = reg.terminals["alice"].keys[0]
    up, _down = tunnel_keys(keys, 0)
    new.opener.open_untrusted(Sealer(up, keys.anchor_index).seal(b"E" + bytes(20)))
    reg.expire(100.0 + PREVIOUS_GRACE + 2, {T1: 100.0 + PREVIOUS_GRACE}, tunnel_idle=600)
    assert old.opener.index not in reg.sessions.receivers
    assert new.opener.index in reg.sessions.receivers


def test_a_terminal_that_stops_rekeying_loses_its_tunnels(reg: Registrar) -> None:
    associate(reg, "alice")
    setup(reg, "alice", 0, T1)
    now = REJECT_AFTER_TIME + 1
    reg.expire(now, {T1: now}, tunnel_idle=10_000)
    assert reg.terminals["alice"].tunnels == {}
    assert reg.sessions.receivers == {} and reg.sessions.senders == {}


def test_unregistration_removes_every_key(reg: Registrar) -> None:
    associate(reg, "alice")
    setup(reg, "alice", 0, T1)
    associate(reg, "alice", now=1.0, expires=0)
    assert reg.sessions.receivers == {} and reg.sessions.senders == {}


def test_export_and_import_keep_counters_and_windows(reg: Registrar, tmp_path: Path) -> None:
    associate(reg, "alice")
    setup(reg, "alice", 0, T1)
    rx = receiver(reg, "alice", 0)
    keys = reg.terminals["alice"].keys[0]
    up, down = tunnel_keys(keys, 0)
    upstream = Sealer(up, keys.anchor_index)
    seen = [upstream.seal(b"E" + bytes([i]) * 20) for i in range(3)]
    for datagram in seen:
        rx.opener.open_untrusted(datagram)
    sent = [rx.sealer.seal(b"\x03" + bytes(25)) for _ in range(5)]
    state = reg.export_state(10.0)
    fresh = make_registrar(tmp_path, encryption=True, max_tunnels=4)
    try:
        assert fresh.import_state(state, 10.0, 10.0) == 1
        restored = fresh.sessions.receivers[keys.anchor_index]
        assert restored.endpoint == T1 and fresh.sessions.senders[T1] is restored.sealer
        for datagram in seen:  # a replay across the restart
            with pytest.raises(Exception, match="replayed"):
                restored.opener.open_untrusted(datagram)
        assert restored.opener.open_untrusted(upstream.seal(b"E" + bytes(20)))
        # The sending counter moved on: no nonce of the old process is used again.
        next_counter = int.from_bytes(restored.sealer.seal(b"\x03")[5:13], "big")
        assert next_counter > max(int.from_bytes(d[5:13], "big") for d in sent)
        assert Opener(down, keys.terminal_index).open_untrusted(restored.sealer.seal(b"\x03x"))
    finally:
        fresh.leases.close()


def test_handover_with_too_many_moves_is_refused(reg: Registrar) -> None:
    vipa = associate(reg, "alice")
    setup(reg, "alice", 0, T1)
    key = flow(17, vipa, 1000, "203.0.113.2", 3000)
    reg.paft.learn(key, T1, 0.0)
    moves = tuple(FlowMove(StructuredMatch(dport=p), None) for p in range(MAX_MOVES + 1))
    reg.sessions.note_origin(T1, receiver(reg, "alice", 0))
    answer = reg.on_tunnel_message(message(handover_body(*moves)), T1, 1.0)
    assert answer is not None
    response = wire_response(answer)
    assert response.code == 400 and "at most" in response.phrase
    assert reg.paft.entries[key].tunnel == T1


def test_a_move_touches_only_the_terminals_own_flows(
    reg: Registrar, monkeypatch: pytest.MonkeyPatch
) -> None:
    vipa = associate(reg, "alice")
    other = associate(reg, "bob")
    setup(reg, "alice", 0, T1)
    setup(reg, "alice", 1, T2)
    for port in range(200):
        reg.paft.learn(flow(17, other, port, "203.0.113.2", 3000), ("192.0.2.10", 5), 0.0)
    mine = [flow(17, vipa, port, "203.0.113.2", 3000) for port in range(3)]
    for key in mine:
        reg.paft.learn(key, T1, 0.0)
    looked_at: list[FiveTuple] = []
    original = FlowSelector.matches

    def counting(self: FlowSelector, key: FiveTuple, entry: object = None) -> bool:
        looked_at.append(key)
        return original(self, key, entry)  # type: ignore[arg-type]

    monkeypatch.setattr(FlowSelector, "matches", counting)
    reg.sessions.note_origin(T2, receiver(reg, "alice", 1))
    answer = reg.on_tunnel_message(
        message(handover_body(FlowMove(StructuredMatch(proto="udp"), None))), T2, 1.0
    )
    assert answer is not None and wire_response(answer).code == 200
    assert sorted(looked_at) == sorted(mine)  # bob's 200 flows were never visited
    assert all(reg.paft.entries[k].tunnel == T2 for k in mine)
    assert reg.paft.count_of(bytes(map(int, other.split(".")))) == 200


def test_a_rekey_whose_answer_was_lost_does_not_cost_the_keys_in_use(reg: Registrar) -> None:
    associate(reg, "alice")
    setup(reg, "alice", 0, T1)
    in_use = receiver(reg, "alice", 0)
    keys = reg.terminals["alice"].keys[0]
    up, _down = tunnel_keys(keys, 0)
    in_use.opener.open_untrusted(Sealer(up, keys.anchor_index).seal(b"E" + bytes(20)))
    associate(reg, "alice", now=10.0)  # its 200 is lost: the terminal never uses these keys
    lost = receiver(reg, "alice", 0)
    associate(reg, "alice", now=20.0)  # the retry
    assert in_use.opener.index in reg.sessions.receivers  # still accepted
    assert lost.opener.index not in reg.sessions.receivers
    assert receiver(reg, "alice", 0).endpoint == T1
    # The same for the signing keys of in-tunnel MESSAGEs (the set-up was signed).
    assert reg.terminals["alice"].keys[1] == keys


def test_a_message_under_a_key_retired_while_it_waited_is_dropped(reg: Registrar) -> None:
    vipa = associate(reg, "alice")
    rx = receiver(reg, "alice", 0)
    reg.sessions.note_origin(T1, rx)
    reg.sessions.drop_terminal("alice")  # e.g. expired before the control plane got to it
    assert not reg.sessions.live(rx) and reg.sessions.origin(T1) is None
    assert not reg.sessions.bind(rx, T1)
    answer = reg.on_tunnel_message(message(setup_body("alice", vipa), "alice"), T1, 1.0)
    assert answer is None or wire_response(answer).code == 403
    assert T1 not in reg.tunnel_vipa and T1 not in reg.sessions.senders


def test_a_nat_reusing_a_tunnel_address_for_another_terminal_keeps_the_new_ones_key(
    reg: Registrar,
) -> None:
    """The stale binding goes, not the key the new terminal's set-up came under.

    Dropping alice's old tunnel at that address must not also forget that
    bob's set-up arrived through bob's slot: else it was refused as a retired
    key and its answer could not be sealed.
    """
    associate(reg, "alice")
    associate(reg, "bob")
    assert setup(reg, "alice", 0, T1) == 200
    assert setup(reg, "bob", 0, T1, now=5.0) == 200  # the NAT gave alice's address to bob
    rx = receiver(reg, "bob", 0)
    assert rx.endpoint == T1 and reg.sessions.reply_sealer(T1) is rx.sealer
    assert reg.terminals["alice"].tunnels == {}
    assert receiver(reg, "alice", 0).endpoint is None
