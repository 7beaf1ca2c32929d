"""The anchor's registrar (sans-IO): REGISTER, tunnel set-up, handover, expiry.

Requests are built with the real signalling builders and go through the wire
format (serialize, then parse) both ways, as the daemon would see them.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sipmessage import Request, Response

from anchor_node.leases import LeaseStore, parse_pool
from anchor_node.registrar import Addr, Registrar
from anchor_node.users import UserStore
from paft.flow import FiveTuple
from paft.table import Paft
from signalling.bodies import (
    FlowMove,
    HandoverRequest,
    HandoverResponse,
    IptablesMatch,
    StructuredMatch,
    TunnelSetupRequest,
    TunnelSetupResponse,
    decode_body_untrusted,
    encode_body,
)
from signalling.digest import authorization_value, choose_challenge, ha1, new_cnonce
from signalling.message import build_request, parse_message_untrusted, serialize
from signalling.register import build_register, parse_register_ok_untrusted
from signalling.tunnelauth import KEY_HEADER, decode_key_untrusted, derive_key, sign

AN = "198.51.100.1"
SOURCE: Addr = ("192.0.2.10", 5060)
_counter = itertools.count(1)


def wire_request(request: Request) -> Request:
    parsed = parse_message_untrusted(serialize(request))
    assert isinstance(parsed, Request)
    return parsed


def wire_response(response: Response) -> Response:
    parsed = parse_message_untrusted(serialize(response))
    assert isinstance(parsed, Response)
    return parsed


def register(terminal_id: str, expires: int = 600, vipa: str | None = None) -> Request:
    n = next(_counter)
    return wire_request(
        build_register(
            an_host=AN,
            an_port=5060,
            terminal_id=terminal_id,
            local_host=SOURCE[0],
            local_port=SOURCE[1],
            call_id=f"call-{n}",
            cseq=n,
            from_tag=f"tag{n}",
            branch=f"z9hG4bK-{n}",
            expires=expires,
            vipa=vipa,
        )
    )


# The association key each terminal got in its 200 OK, and whether to sign with it.
KEYS: dict[str, bytes] = {}
WALL = 1_000_000.0


def message(body: bytes, terminal_id: str = "alice", *, key: bytes | None = None) -> Request:
    n = next(_counter)
    request = build_request(
        "MESSAGE",
        f"sip:{AN}",
        via_host="192.0.2.10",
        via_port=5060,
        branch=f"z9hG4bK-m{n}",
        from_uri=f"sip:{terminal_id}@{AN}",
        from_tag=f"mtag{n}",
        to_uri=f"sip:{AN}",
        call_id=f"mcall-{n}",
        cseq=n,
        body=body,
        content_type="application/json",
    )
    signing_key = key if key is not None else KEYS.get(terminal_id)
    if signing_key:
        sign(request, signing_key, now=WALL, seq=n)
    return wire_request(request)


def setup_body(terminal_id: str, vipa: str, interface: str = "wlan0") -> bytes:
    return encode_body(TunnelSetupRequest(terminal_id=terminal_id, vipa=vipa, interface=interface))


def handover_body(*moves: FlowMove) -> bytes:
    return encode_body(HandoverRequest(flows=moves))


@pytest.fixture
def registrar(tmp_path: Path) -> Iterator[Registrar]:
    leases = LeaseStore(tmp_path / "leases.sqlite", parse_pool("100.64.0.0/10"))
    KEYS.clear()
    yield Registrar(leases, Paft(), min_expires=30, max_tunnels=3, wall_clock=lambda: WALL)
    leases.close()


def associate(reg: Registrar, terminal_id: str, now: float = 0.0, expires: int = 600) -> str:
    response = wire_response(reg.on_register(register(terminal_id, expires), SOURCE, now))
    vipa, granted = parse_register_ok_untrusted(response)
    KEYS[terminal_id] = decode_key_untrusted(response.headers.get(KEY_HEADER) or "")
    assert granted == expires
    return vipa


def open_tunnel(
    reg: Registrar, terminal_id: str, vipa: str, tunnel: Addr, now: float = 0.0
) -> TunnelSetupResponse:
    answer = reg.on_tunnel_message(message(setup_body(terminal_id, vipa), terminal_id), tunnel, now)
    assert answer is not None
    response = wire_response(answer)
    assert response.code == 200, response.phrase
    body = decode_body_untrusted(response.body)
    assert isinstance(body, TunnelSetupResponse)
    return body


def handover(reg: Registrar, tunnel: Addr, body: bytes) -> Response:
    owner = reg._tunnel_owner.get(tunnel)
    terminal_id = owner.terminal_id if owner is not None else "alice"
    response = reg.on_tunnel_message(message(body, terminal_id), tunnel, 1.0)
    assert response is not None
    return wire_response(response)


def moved_count(response: Response) -> int:
    assert response.code == 200, response.phrase
    body = decode_body_untrusted(response.body)
    assert isinstance(body, HandoverResponse)
    return body.moved


def flow(proto: int, src: str, sport: int, dst: str, dport: int) -> FiveTuple:
    return FiveTuple(proto, socket.inet_aton(src), sport, socket.inet_aton(dst), dport)


def snapshot(reg: Registrar) -> dict[FiveTuple, Addr]:
    return {key: entry.tunnel for key, entry in reg.paft}


# --- REGISTER ----------------------------------------------------------------


def test_register_grants_vipa_and_expires(registrar: Registrar) -> None:
    """The 200 carries the first pool VIPA and the Expires asked for."""
    response = wire_response(registrar.on_register(register("alice", 600), SOURCE, 0.0))
    assert response.code == 200
    assert parse_register_ok_untrusted(response) == ("100.64.0.2", 600)
    assert registrar.terminals["alice"].vipa == "100.64.0.2"
    assert registrar.terminals["alice"].expires_at == 600.0


def test_register_again_same_vipa(registrar: Registrar) -> None:
    """A refresh of the same terminal keeps its VIPA and pushes Expires on."""
    first = associate(registrar, "alice", now=0.0)
    response = registrar.on_register(register("alice", 600, vipa=first), SOURCE, 100.0)
    assert parse_register_ok_untrusted(wire_response(response))[0] == first
    assert registrar.terminals["alice"].expires_at == 700.0


def test_two_terminals_distinct_vipas(registrar: Registrar) -> None:
    """Two terminals get two addresses."""
    assert associate(registrar, "alice") != associate(registrar, "bob")
    assert set(registrar.terminals) == {"alice", "bob"}


def test_expires_above_maximum_is_capped(tmp_path: Path) -> None:
    """An Expires above the anchor's maximum is granted as the maximum."""
    leases = LeaseStore(tmp_path / "l.sqlite", parse_pool("100.64.0.0/10"))
    try:
        reg = Registrar(leases, Paft(), max_expires=1000)
        response = wire_response(reg.on_register(register("alice", 5000), SOURCE, 0.0))
        assert parse_register_ok_untrusted(response)[1] == 1000
    finally:
        leases.close()


def test_expires_too_brief_is_423(registrar: Registrar) -> None:
    """Expires below the minimum: 423 with Min-Expires, no terminal, no lease."""
    response = wire_response(registrar.on_register(register("alice", 10), SOURCE, 0.0))
    assert response.code == 423
    assert response.headers.get("Min-Expires") == "30"
    assert registrar.terminals == {}
    assert registrar.leases.lookup("alice") is None


def test_expires_zero_unregisters_but_keeps_lease(registrar: Registrar) -> None:
    """Expires: 0 removes the terminal, its tunnels and flows; the lease stays."""
    vipa = associate(registrar, "alice")
    tunnel: Addr = ("203.0.113.5", 40000)
    open_tunnel(registrar, "alice", vipa, tunnel)
    registrar.paft.learn(flow(17, vipa, 1000, "203.0.113.2", 3000), tunnel, 0.0)
    response = wire_response(registrar.on_register(register("alice", 0), SOURCE, 5.0))
    assert response.code == 200
    assert "alice" not in registrar.terminals
    assert registrar.tunnel_vipa == {}
    assert registrar.default_tunnel == {}
    assert registrar.by_vipa == {}
    assert len(registrar.paft) == 0
    assert registrar.leases.lookup("alice") == vipa
    # Re-associating gives the same address back.
    assert associate(registrar, "alice", now=10.0) == vipa


def test_bad_terminal_id_is_400(registrar: Registrar) -> None:
    """A To user that is not a valid terminal id: 400."""
    request = register("alice")
    request.headers.set("To", f"<sip:bad%21id@{AN}>")
    response = registrar.on_register(request, SOURCE, 0.0)
    assert response.code == 400
    assert registrar.terminals == {}


# --- tunnel set-up -------------------------------------------------------------


def test_tunnel_setup_answers_observed_address(registrar: Registrar) -> None:
    """TunnelSetupRequest from a tunnel: 200 with tunnel id "ip:port"; maps updated."""
    vipa = associate(registrar, "alice")
    tunnel: Addr = ("203.0.113.5", 40000)
    answer = open_tunnel(registrar, "alice", vipa, tunnel)
    assert answer.tunnel_id == "203.0.113.5:40000"
    assert answer.observed == "203.0.113.5:40000"
    packed = socket.inet_aton(vipa)
    assert registrar.tunnel_vipa == {tunnel: packed}
    assert registrar.default_tunnel == {packed: tunnel}
    assert set(registrar.terminals["alice"].tunnels) == {tunnel}


def test_tunnel_setup_repeated_is_idempotent(registrar: Registrar) -> None:
    """The same set-up twice (a retransmission) keeps one tunnel."""
    vipa = associate(registrar, "alice")
    tunnel: Addr = ("203.0.113.5", 40000)
    open_tunnel(registrar, "alice", vipa, tunnel)
    open_tunnel(registrar, "alice", vipa, tunnel, now=1.0)
    assert len(registrar.terminals["alice"].tunnels) == 1


def test_tunnel_setup_unregistered_is_403(registrar: Registrar) -> None:
    """A set-up for a terminal that never associated: 403, nothing recorded."""
    tunnel: Addr = ("203.0.113.5", 40000)
    response = registrar.on_tunnel_message(
        message(setup_body("mallory", "100.64.0.2")), tunnel, 0.0
    )
    assert response is not None and response.code == 403
    assert registrar.tunnel_vipa == {}
    assert registrar.default_tunnel == {}


def test_tunnel_setup_after_expiry_is_403(registrar: Registrar) -> None:
    """A set-up after the registration ran out (not yet swept): 403."""
    vipa = associate(registrar, "alice", now=0.0, expires=60)
    response = registrar.on_tunnel_message(
        message(setup_body("alice", vipa)), ("203.0.113.5", 40000), 61.0
    )
    assert response is not None and response.code == 403
    assert registrar.tunnel_vipa == {}


def test_tunnel_setup_foreign_vipa_is_403(registrar: Registrar) -> None:
    """A set-up naming another terminal's VIPA: 403, nothing changes."""
    associate(registrar, "alice")
    bob_vipa = associate(registrar, "bob")
    tunnel: Addr = ("203.0.113.5", 40000)
    response = registrar.on_tunnel_message(message(setup_body("alice", bob_vipa)), tunnel, 0.0)
    assert response is not None and response.code == 403
    assert registrar.tunnel_vipa == {}
    assert registrar.default_tunnel == {}
    assert registrar.terminals["alice"].tunnels == {}
    assert registrar.terminals["bob"].tunnels == {}


def test_tunnel_cap_evicts_oldest(registrar: Registrar) -> None:
    """Past max_tunnels (3 here), the oldest tunnel of the terminal goes."""
    vipa = associate(registrar, "alice")
    tunnels: list[Addr] = [("203.0.113.5", 40000 + i) for i in range(4)]
    for i, tunnel in enumerate(tunnels):
        open_tunnel(registrar, "alice", vipa, tunnel, now=float(i))
    assert set(registrar.terminals["alice"].tunnels) == set(tunnels[1:])
    assert tunnels[0] not in registrar.tunnel_vipa
    assert registrar.default_tunnel[socket.inet_aton(vipa)] in tunnels[1:]


def test_plain_message_outside_tunnel_is_403(registrar: Registrar) -> None:
    """An UPMT MESSAGE on the plain SIP port (outside a tunnel): 403."""
    vipa = associate(registrar, "alice")
    response = registrar.on_plain_message(message(setup_body("alice", vipa)), SOURCE, 0.0)
    assert response is not None and response.code == 403
    assert registrar.tunnel_vipa == {}


# --- handover ----------------------------------------------------------------

T_A1: Addr = ("203.0.113.5", 40000)  # alice's wlan0
T_A2: Addr = ("198.18.0.7", 50000)  # alice's lte0
T_B1: Addr = ("203.0.113.9", 41000)  # bob's


@pytest.fixture
def two(registrar: Registrar) -> tuple[Registrar, str, str]:
    """alice with two tunnels and bob with one, each with learnt flows on their first."""
    a = associate(registrar, "alice")
    b = associate(registrar, "bob")
    open_tunnel(registrar, "alice", a, T_A1)
    open_tunnel(registrar, "alice", a, T_A2)
    open_tunnel(registrar, "bob", b, T_B1)
    for key, tunnel in [
        (flow(17, a, 1000, "203.0.113.2", 3000), T_A1),
        (flow(17, a, 1001, "203.0.113.2", 3000), T_A1),
        (flow(6, a, 2000, "203.0.113.2", 3000), T_A1),
        (flow(17, a, 1002, "203.0.113.3", 3000), T_A1),
        (flow(17, b, 1000, "203.0.113.2", 3000), T_B1),
        (flow(6, b, 2000, "203.0.113.2", 80), T_B1),
    ]:
        registrar.paft.learn(key, tunnel, 0.0)
    return registrar, a, b


def test_handover_structured_moves_own_matching_flows(two: tuple[Registrar, str, str]) -> None:
    """A structured match moves only the requester's matching flows to the arrival tunnel."""
    reg, a, b = two
    before = snapshot(reg)
    body = handover_body(
        FlowMove(StructuredMatch(proto="udp", dst="203.0.113.2", dport=3000), None)
    )
    assert moved_count(handover(reg, T_A2, body)) == 2
    after = snapshot(reg)
    expected = dict(before)
    expected[flow(17, a, 1000, "203.0.113.2", 3000)] = T_A2
    expected[flow(17, a, 1001, "203.0.113.2", 3000)] = T_A2
    assert after == expected
    assert after[flow(17, b, 1000, "203.0.113.2", 3000)] == T_B1


def test_handover_iptables_syntax(two: tuple[Registrar, str, str]) -> None:
    """The paper's iptables-style match selects the same flows."""
    reg, a, _b = two
    rule = "-p udp --destination 203.0.113.2 --destination-port 3000"
    body = b'{"mType":"HandoverRequest","flows":[{"match":{"syntax":"IPTables","match":"%s"}}]}' % (
        rule.encode()
    )
    assert moved_count(handover(reg, T_A2, body)) == 2
    moved = {k for k, t in snapshot(reg).items() if t == T_A2}
    assert moved == {
        flow(17, a, 1000, "203.0.113.2", 3000),
        flow(17, a, 1001, "203.0.113.2", 3000),
    }


def test_handover_iptables_match_class(two: tuple[Registrar, str, str]) -> None:
    """An IptablesMatch encoded by the client works the same."""
    reg, _a, _b = two
    body = handover_body(FlowMove(IptablesMatch("-p tcp --dport 3000"), "any"))
    assert moved_count(handover(reg, T_A2, body)) == 1


def test_handover_to_named_tunnel(two: tuple[Registrar, str, str]) -> None:
    """A tunnelId of the terminal's own names the target; re-moving counts zero."""
    reg, a, _b = two
    body = handover_body(FlowMove(StructuredMatch(dst="203.0.113.3"), "198.18.0.7:50000"))
    assert moved_count(handover(reg, T_A1, body)) == 1
    assert snapshot(reg)[flow(17, a, 1002, "203.0.113.3", 3000)] == T_A2
    assert moved_count(handover(reg, T_A1, body)) == 0


def test_handover_to_foreign_tunnel_is_400(two: tuple[Registrar, str, str]) -> None:
    """A tunnelId belonging to another terminal: 400, nothing moves."""
    reg, _a, _b = two
    before = snapshot(reg)
    body = handover_body(FlowMove(StructuredMatch(), "203.0.113.9:41000"))
    assert handover(reg, T_A2, body).code == 400
    assert snapshot(reg) == before


def test_handover_naming_other_vipa_is_400(two: tuple[Registrar, str, str]) -> None:
    """A match with another terminal's VIPA as source: 400 and the whole table unchanged.

    The bad move comes second, after a valid one: nothing is applied at all.
    """
    reg, _a, b = two
    before = snapshot(reg)
    body = handover_body(
        FlowMove(StructuredMatch(proto="udp"), None),
        FlowMove(StructuredMatch(src=b), None),
    )
    response = handover(reg, T_A2, body)
    assert response.code == 400
    assert snapshot(reg) == before
    iptables = handover_body(FlowMove(IptablesMatch(f"-s {b} -p udp"), None))
    assert handover(reg, T_A2, iptables).code == 400
    assert snapshot(reg) == before


def test_handover_wildcard_source_stays_confined(two: tuple[Registrar, str, str]) -> None:
    """A source prefix covering every VIPA still moves only the requester's flows."""
    reg, _a, b = two
    body = handover_body(FlowMove(StructuredMatch(src="100.64.0.0/10"), None))
    assert moved_count(handover(reg, T_A2, body)) == 4
    assert {k for k, t in snapshot(reg).items() if t == T_B1} == {
        flow(17, b, 1000, "203.0.113.2", 3000),
        flow(6, b, 2000, "203.0.113.2", 80),
    }


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"mType":"HandoverRequest"}',
        b'{"mType":"HandoverRequest","flows":[{"match":{"proto":"udp","dport":99999}}]}',
        b'{"mType":"Frobnicate"}',
        b"[]",
        b"",
    ],
    ids=["bad-json", "no-flows", "bad-port", "unknown-mtype", "array", "empty"],
)
def test_malformed_bodies_are_400(two: tuple[Registrar, str, str], body: bytes) -> None:
    """Bad JSON, a malformed request, an unknown mType: 400 and no change."""
    reg, _a, _b = two
    before = snapshot(reg)
    response = handover(reg, T_A2, body)
    assert response.code == 400
    assert snapshot(reg) == before


def test_handover_from_unknown_tunnel_is_dropped(two: tuple[Registrar, str, str]) -> None:
    """A HandoverRequest from an address that is nobody's tunnel: no answer, counted."""
    reg, _a, _b = two
    before = snapshot(reg)
    body = handover_body(FlowMove(StructuredMatch(), None))
    assert reg.on_tunnel_message(message(body), ("192.0.2.99", 1234), 1.0) is None
    assert reg.counters.unknown_tunnel_messages == 1
    assert snapshot(reg) == before


def test_unsigned_or_forged_tunnel_messages_get_403_and_change_nothing(
    two: tuple[Registrar, str, str],
) -> None:
    """Set-up for alice's VIPA signed with no key, bob's key, or a replayed signature: 403."""
    reg, alice_vipa, _b = two
    before = snapshot(reg)
    tunnels_before = {t: set(x.tunnels) for t, x in reg.terminals.items()}
    attacker = ("203.0.113.66", 4444)
    unsigned = message(setup_body("alice", alice_vipa), "nobody")
    forged = message(setup_body("alice", alice_vipa), "alice", key=KEYS["bob"])
    for request in (unsigned, forged):
        response = reg.on_tunnel_message(request, attacker, 1.0)
        assert response is not None and response.code == 403
    # A genuine request seen once cannot be replayed from elsewhere.
    genuine = message(setup_body("alice", alice_vipa), "alice")
    first = reg.on_tunnel_message(genuine, ("198.51.100.7", 1000), 1.0)
    assert first is not None and first.code == 200
    replayed = reg.on_tunnel_message(genuine, attacker, 1.0)
    assert replayed is not None and replayed.code == 403
    assert attacker not in reg.tunnel_vipa
    assert reg.counters.auth_failures == 3
    assert snapshot(reg) == before
    assert set(reg.terminals["bob"].tunnels) == tunnels_before["bob"]


def test_handover_response_to_anchor_is_400(two: tuple[Registrar, str, str]) -> None:
    """A body the anchor does not expect (a response type): 400."""
    reg, _a, _b = two
    assert handover(reg, T_A1, encode_body(HandoverResponse(moved=3))).code == 400


def test_counters(two: tuple[Registrar, str, str]) -> None:
    """Registers, set-ups, handovers and moved flows are counted."""
    reg, _a, _b = two
    handover(reg, T_A2, handover_body(FlowMove(StructuredMatch(proto="udp"), None)))
    c = reg.counters
    assert (c.registers, c.tunnel_setups, c.handovers, c.flows_moved) == (2, 3, 1, 3)


# --- expiry ------------------------------------------------------------------


def test_expire_drops_terminal_past_expires(registrar: Registrar) -> None:
    """A terminal whose registration ran out goes, with its tunnels and flows."""
    vipa = associate(registrar, "alice", now=0.0, expires=60)
    bob = associate(registrar, "bob", now=0.0, expires=600)
    open_tunnel(registrar, "alice", vipa, T_A1)
    open_tunnel(registrar, "bob", bob, T_B1)
    registrar.paft.learn(flow(17, vipa, 1, "203.0.113.2", 2), T_A1, 0.0)
    registrar.expire(61.0, {T_A1: 60.0, T_B1: 60.0}, tunnel_idle=180.0)
    assert set(registrar.terminals) == {"bob"}
    assert registrar.tunnel_vipa == {T_B1: socket.inet_aton(bob)}
    assert registrar.default_tunnel == {socket.inet_aton(bob): T_B1}
    assert len(registrar.paft) == 0
    assert registrar.counters.expired_terminals == 1
    assert registrar.leases.lookup("alice") == vipa


def test_expire_drops_idle_tunnel_and_fixes_default(registrar: Registrar) -> None:
    """A tunnel silent past the idle time goes; the default moves to the survivor."""
    vipa = associate(registrar, "alice")
    packed = socket.inet_aton(vipa)
    open_tunnel(registrar, "alice", vipa, T_A1, now=0.0)
    open_tunnel(registrar, "alice", vipa, T_A2, now=0.0)
    assert registrar.default_tunnel[packed] == T_A1
    registrar.expire(100.0, {T_A1: 10.0, T_A2: 95.0}, tunnel_idle=60.0)
    assert set(registrar.terminals["alice"].tunnels) == {T_A2}
    assert registrar.tunnel_vipa == {T_A2: packed}
    assert registrar.default_tunnel[packed] == T_A2
    assert registrar.counters.expired_tunnels == 1
    # The last one going leaves no default at all.
    registrar.expire(200.0, {T_A2: 95.0}, tunnel_idle=60.0)
    assert registrar.tunnel_vipa == {}
    assert packed not in registrar.default_tunnel
    assert "alice" in registrar.terminals


def test_expire_keeps_fresh_tunnel_never_heard(registrar: Registrar) -> None:
    """A tunnel never heard counts from its creation."""
    vipa = associate(registrar, "alice")
    open_tunnel(registrar, "alice", vipa, T_A1, now=50.0)
    registrar.expire(100.0, {}, tunnel_idle=60.0)
    assert T_A1 in registrar.tunnel_vipa


def test_dropped_tunnel_leaves_no_flow_on_it(registrar: Registrar) -> None:
    """Flows learnt on a tunnel that goes are not left pointing at its address.

    Otherwise downstream packets would keep going to a dead NAT binding, or
    to whoever the NAT gives that address next. They follow the terminal's
    default tunnel instead.
    """
    vipa = associate(registrar, "alice")
    open_tunnel(registrar, "alice", vipa, T_A1, now=0.0)
    open_tunnel(registrar, "alice", vipa, T_A2, now=0.0)
    key = flow(17, vipa, 1000, "203.0.113.2", 3000)
    registrar.paft.learn(key, T_A1, 0.0)
    registrar.expire(100.0, {T_A1: 10.0, T_A2: 95.0}, tunnel_idle=60.0)
    assert registrar.paft.flows_on(T_A1) == []
    entry = registrar.paft.lookup(key)
    assert entry is None or entry.tunnel == T_A2


def test_nat_reused_tunnel_address_goes_to_new_terminal(registrar: Registrar) -> None:
    """A NAT giving alice's tunnel address to bob: the tunnel becomes bob's alone."""
    a = associate(registrar, "alice")
    b = associate(registrar, "bob")
    open_tunnel(registrar, "alice", a, T_A1)
    registrar.paft.learn(flow(17, a, 1000, "203.0.113.2", 3000), T_A1, 0.0)
    open_tunnel(registrar, "bob", b, T_A1, now=5.0)
    assert registrar.tunnel_vipa == {T_A1: socket.inet_aton(b)}
    assert registrar.terminals["alice"].tunnels == {}
    assert socket.inet_aton(a) not in registrar.default_tunnel
    # alice's flow must not follow the address to bob.
    assert registrar.paft.flows_on(T_A1) == []


# -- digest authentication ----------------------------------------------------


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Registrar]:
    users = UserStore.create(tmp_path / "users.json")
    users.add("alice", "wonderland")
    leases = LeaseStore(tmp_path / "leases.sqlite", parse_pool("100.64.0.0/10"))
    KEYS.clear()
    yield Registrar(leases, Paft(), users=users, wall_clock=lambda: WALL)
    leases.close()


def answered(reg: Registrar, terminal_id: str, user: str, password: str) -> tuple[Response, bytes]:
    """REGISTER, take the 401's challenge, REGISTER again with credentials."""
    first = wire_response(reg.on_register(register(terminal_id), SOURCE, 0.0))
    assert first.code == 401
    values = first.headers.getlist("WWW-Authenticate")
    assert [v.split("algorithm=")[1] for v in values] == ["SHA-256", "MD5"]
    challenge = choose_challenge(values)
    request = register(terminal_id)
    cnonce = new_cnonce()
    request.headers.add(
        "Authorization",
        authorization_value(
            challenge,
            username=user,
            password=password,
            method="REGISTER",
            uri=str(request.uri),
            cnonce=cnonce,
        ),
    )
    response = wire_response(reg.on_register(wire_request(request), SOURCE, 0.0))
    secret = ha1(user, challenge.realm, password, challenge.algorithm)
    return response, derive_key(secret, challenge.nonce, cnonce, terminal_id)


def test_register_with_the_right_password_gets_a_vipa_and_a_shared_key(
    secured: Registrar,
) -> None:
    response, key = answered(secured, "alice", "alice", "wonderland")
    assert response.code == 200
    assert response.headers.get(KEY_HEADER) is None  # the key is derived, never sent
    vipa, _ = parse_register_ok_untrusted(response)
    KEYS["alice"] = key
    assert open_tunnel(secured, "alice", vipa, ("203.0.113.9", 5000)).tunnel_id


@pytest.mark.parametrize(
    ("terminal", "user", "password"),
    [
        ("alice", "alice", "looking-glass"),  # wrong password
        ("alice", "mallory", "wonderland"),  # unknown user
        ("bob", "alice", "wonderland"),  # alice's credentials for another terminal id
    ],
)
def test_wrong_credentials_are_refused_with_403(
    secured: Registrar, terminal: str, user: str, password: str
) -> None:
    response, _key = answered(secured, terminal, user, password)
    assert response.code == 403
    assert secured.terminals == {}
    assert secured.counters.auth_failures == 1


def test_unparsable_credentials_get_400(secured: Registrar) -> None:
    request = register("alice")
    request.headers.add("Authorization", 'Digest username="alice", nc=zz')
    response = wire_response(secured.on_register(wire_request(request), SOURCE, 0.0))
    assert response.code == 400
    assert secured.terminals == {}
