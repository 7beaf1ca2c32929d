"""The anchor's registrar (sans-IO): REGISTER and its key exchange, set-up, handover, expiry.

Requests are built with the real signalling builders (the terminal's side of
the key exchange included) and go through the wire format (serialize, then
parse) both ways, as the daemon would see them; the SIP port's screen sees
every REGISTER first, as the transaction layer would run it. Most tests run
the registrar with tunnel encryption off (its signalling logic is the same);
those of `TunnelSessions` binding keys to tunnels run it on.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sipmessage import Request, Response

from anchor_node.leases import LeaseStore, parse_pool
from anchor_node.registrar import Registrar
from anchor_node.users import UserStore
from ground.constants import Addr
from paft.flow import FiveTuple
from paft.table import Paft
from signalling.association import AnchorMismatch, AssociationAttempt, Dialog
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
from signalling.handshake import KX_HEADER, StaticKey
from signalling.message import build_request, parse_message_untrusted, serialize
from signalling.register import build_register, parse_register_ok_untrusted
from signalling.transaction import AMPLIFICATION_LIMIT
from signalling.tunnelauth import sign

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


# Each terminal's key pair, and the signing key of its association.
TERMINAL_KEYS: dict[str, StaticKey] = {}
KEYS: dict[str, bytes] = {}
WALL = 1_000_000.0


def through_screen(reg: Registrar, request: Request, now: float, source: Addr) -> Response:
    """What the SIP port answers: the screen first, then the registrar in a transaction."""
    request = wire_request(request)
    verdict = reg.screen(request, source, len(serialize(request)), now)
    assert verdict is not False, "dropped by the screen"
    if verdict is True:
        return wire_response(reg.on_plain_message(request, source, now))
    return wire_response(verdict)


def attempt_for(
    reg: Registrar,
    terminal_id: str,
    *,
    expires: int = 600,
    vipa: str | None = None,
    password: str | None = None,
    static: StaticKey | None = None,
    anchor_key: bytes | None = None,
) -> AssociationAttempt:
    n = next(_counter)
    return AssociationAttempt(
        dialog=Dialog(f"call-{n}", f"tag{n}", cseq=n),
        static=static or TERMINAL_KEYS.setdefault(terminal_id, StaticKey.generate()),
        terminal_id=terminal_id,
        an_host=AN,
        an_port=5060,
        expires=expires,
        vipa=vipa,
        index=64 * n,
        encryption=reg.encryption,
        pinned_anchor_key=anchor_key or reg.static_key.public,
        password=password,
    )


def run_attempt(
    reg: Registrar, attempt: AssociationAttempt, now: float = 0.0, source: Addr = SOURCE
) -> Response:
    """REGISTER until the anchor answers with something other than a challenge."""
    for _round in range(3):
        response = through_screen(reg, attempt.register(*source), now, source)
        if response.code != 401:
            if response.code == 200:
                _vipa, _expires, keys = attempt.on_ok(response)
                if keys is not None:
                    KEYS[attempt.terminal_id] = keys.signing
            return response
        attempt.on_challenge(response)
    raise AssertionError("still challenged")


def register_response(
    reg: Registrar, terminal_id: str, now: float = 0.0, expires: int = 600, **kwargs: object
) -> Response:
    return run_attempt(reg, attempt_for(reg, terminal_id, expires=expires, **kwargs), now)  # type: ignore[arg-type]


def register(terminal_id: str, expires: int = 600, vipa: str | None = None) -> Request:
    """A bare REGISTER (no cookie, no key exchange), as sipp or an attacker sends it."""
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


def make_registrar(tmp_path: Path, *, encryption: bool = False, **kwargs: object) -> Registrar:
    leases = LeaseStore(tmp_path / f"leases-{next(_counter)}.sqlite", parse_pool("100.64.0.0/10"))
    return Registrar(
        leases,
        Paft(),
        encryption=encryption,
        wall_clock=lambda: WALL,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def registrar(tmp_path: Path) -> Iterator[Registrar]:
    KEYS.clear()
    TERMINAL_KEYS.clear()
    reg = make_registrar(tmp_path, min_expires=30, max_tunnels=3)
    yield reg
    reg.leases.close()


def associate(reg: Registrar, terminal_id: str, now: float = 0.0, expires: int = 600) -> str:
    response = register_response(reg, terminal_id, now, expires)
    assert response.code == 200, response.phrase
    vipa, granted = parse_register_ok_untrusted(response)
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
    owner = reg.table.tunnel_owner.get(tunnel)
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


# --- REGISTER: the screen, then the key exchange ----------------------------------------


def test_bare_register_gets_a_stateless_challenge_within_three_times_its_size(
    registrar: Registrar,
) -> None:
    request = register("alice")
    size = len(serialize(request))
    verdict = registrar.screen(request, SOURCE, size, 0.0)
    assert isinstance(verdict, Response) and verdict.code == 401
    assert len(serialize(verdict)) <= AMPLIFICATION_LIMIT * size
    assert verdict.headers.getlist("WWW-Authenticate")[0].startswith("UPMT-KX cookie=")
    assert registrar.terminals == {} and registrar.leases.lookup("alice") is None


def test_register_with_a_forged_or_foreign_cookie_is_challenged_again(
    registrar: Registrar,
) -> None:
    attempt = attempt_for(registrar, "alice")
    first = through_screen(registrar, attempt.register(*SOURCE), 0.0, SOURCE)
    attempt.on_challenge(first)
    request = wire_request(attempt.register(*SOURCE))
    # The same cookie from another address, or later than its lifetime: a new challenge.
    other: Addr = ("203.0.113.66", 5060)
    for source, now in ((other, 0.0), (SOURCE, 1000.0)):
        verdict = registrar.screen(request, source, 500, now)
        assert isinstance(verdict, Response) and verdict.code == 401
    assert registrar.screen(request, SOURCE, 500, 10.0) is True


def test_source_inside_the_pool_is_dropped(registrar: Registrar) -> None:
    assert registrar.screen(register("alice"), ("100.64.0.9", 5060), 300, 0.0) is False


def test_register_grants_vipa_and_expires(registrar: Registrar) -> None:
    """The 200 carries the first pool VIPA, the Expires asked for and the anchor's half."""
    response = register_response(registrar, "alice")
    assert response.code == 200
    assert parse_register_ok_untrusted(response) == ("100.64.0.2", 600)
    assert response.headers.get(KX_HEADER) is not None
    assert registrar.terminals["alice"].vipa == "100.64.0.2"
    assert registrar.terminals["alice"].expires_at == 600.0


def test_no_key_ever_travels(registrar: Registrar) -> None:
    response = register_response(registrar, "alice")
    text = serialize(response).decode()
    assert "UPMT-Key" not in text
    keys = registrar.terminals["alice"].keys[0]
    for secret in (keys.up, keys.down, keys.signing):
        assert secret.hex() not in text


def test_register_again_same_vipa(registrar: Registrar) -> None:
    """A refresh of the same terminal keeps its VIPA, pushes Expires on and rekeys."""
    first = associate(registrar, "alice", now=0.0)
    old_keys = registrar.terminals["alice"].keys[0]
    response = register_response(registrar, "alice", 100.0, vipa=first)
    assert parse_register_ok_untrusted(response)[0] == first
    assert registrar.terminals["alice"].expires_at == 700.0
    assert registrar.terminals["alice"].keys == [registrar.terminals["alice"].keys[0], old_keys]
    assert registrar.terminals["alice"].keys[0].up != old_keys.up


def test_two_terminals_distinct_vipas(registrar: Registrar) -> None:
    """Two terminals get two addresses."""
    assert associate(registrar, "alice") != associate(registrar, "bob")
    assert set(registrar.terminals) == {"alice", "bob"}


def test_expires_above_maximum_is_capped(tmp_path: Path) -> None:
    """An Expires above the anchor's maximum is granted as the maximum."""
    reg = make_registrar(tmp_path, max_expires=1000)
    try:
        response = register_response(reg, "alice", expires=5000)
        assert parse_register_ok_untrusted(response)[1] == 1000
    finally:
        reg.leases.close()


def test_expires_too_brief_is_423(registrar: Registrar) -> None:
    """Expires below the minimum: 423 with Min-Expires, no terminal, no lease."""
    response = register_response(registrar, "alice", expires=10)
    assert response.code == 423
    assert response.headers.get("Min-Expires") == "30"
    assert registrar.terminals == {}
    assert registrar.leases.lookup("alice") is None


def test_expires_zero_unregisters_but_keeps_lease(registrar: Registrar) -> None:
    """Expires: 0 (proven by the terminal's key) removes the terminal, tunnels and flows."""
    vipa = associate(registrar, "alice")
    tunnel: Addr = ("203.0.113.5", 40000)
    open_tunnel(registrar, "alice", vipa, tunnel)
    registrar.paft.learn(flow(17, vipa, 1000, "203.0.113.2", 3000), tunnel, 0.0)
    response = register_response(registrar, "alice", 5.0, expires=0)
    assert response.code == 200
    assert "alice" not in registrar.terminals
    assert registrar.tunnel_vipa == {}
    assert registrar.default_tunnel == {}
    assert registrar.by_vipa == {}
    assert len(registrar.paft) == 0
    assert registrar.leases.lookup("alice") == vipa
    # Re-associating gives the same address back.
    assert associate(registrar, "alice", now=10.0) == vipa


def test_expires_zero_from_another_key_changes_nothing(registrar: Registrar) -> None:
    """An outsider's `Expires: 0` for the victim's id: 403, the victim stays."""
    vipa = associate(registrar, "alice")
    response = register_response(registrar, "alice", 5.0, expires=0, static=StaticKey.generate())
    assert response.code == 403
    assert registrar.terminals["alice"].vipa == vipa


def test_first_key_owns_the_terminal_id(registrar: Registrar) -> None:
    """Trust on first use: another key for a known id gets 403 and nothing of the owner's."""
    vipa = associate(registrar, "alice")
    owner_keys = registrar.terminals["alice"].keys
    intruder = register_response(registrar, "alice", 1.0, static=StaticKey.generate())
    assert intruder.code == 403
    assert intruder.headers.get("VIpAddr") is None and intruder.headers.get(KX_HEADER) is None
    assert registrar.terminals["alice"].keys == owner_keys
    assert registrar.leases.pinned_key("alice") == TERMINAL_KEYS["alice"].public
    # The owner goes on, even after an anchor restart (the pin is in the lease store).
    assert associate(registrar, "alice", now=2.0) == vipa


def test_replayed_key_exchange_is_refused(registrar: Registrar) -> None:
    attempt = attempt_for(registrar, "alice")
    first = through_screen(registrar, attempt.register(*SOURCE), 0.0, SOURCE)
    attempt.on_challenge(first)
    request = attempt.register(*SOURCE)
    assert through_screen(registrar, request, 0.0, SOURCE).code == 200
    # The same REGISTER later (its transaction gone), from the same address.
    again = wire_request(request)
    again.headers.set("Via", again.headers["Via"].replace("branch=", "branch=z9hG4bKx"))
    assert through_screen(registrar, again, 10.0, SOURCE).code == 403


def test_encryption_mismatch_is_a_clear_refusal(tmp_path: Path) -> None:
    on = make_registrar(tmp_path, encryption=True)
    try:
        attempt = attempt_for(on, "alice")
        attempt.encryption = False
        # The terminal sees it in the challenge ...
        with pytest.raises(AnchorMismatch, match="encryption on"):
            run_attempt(on, attempt)
        # ... and the anchor refuses an offer that asks for the other setting.
        challenge = through_screen(on, attempt.register(*SOURCE), 0.0, SOURCE)
        attempt.encryption = True
        attempt.on_challenge(challenge)
        attempt.encryption = False
        refused = through_screen(on, attempt.register(*SOURCE), 0.0, SOURCE)
        assert refused.code == 488 and "--encryption on" in refused.phrase
        assert on.terminals == {}
    finally:
        on.leases.close()


def test_a_client_pinned_to_another_anchor_key_refuses(registrar: Registrar) -> None:
    attempt = attempt_for(registrar, "alice", anchor_key=StaticKey.generate().public)
    with pytest.raises(AnchorMismatch, match="not the pinned key"):
        run_attempt(registrar, attempt)
    assert registrar.terminals == {}


def test_lease_cap_per_source_prefix(tmp_path: Path) -> None:
    leases = LeaseStore(tmp_path / "capped.sqlite", parse_pool("100.64.0.0/10"), prefix_cap=2)
    reg = Registrar(leases, Paft(), encryption=False, wall_clock=lambda: WALL)
    try:
        assert register_response(reg, "t1").code == 200
        assert register_response(reg, "t2").code == 200
        refused = register_response(reg, "t3")
        assert refused.code == 403 and "too many terminals" in refused.phrase
        assert leases.lookup("t3") is None
        # Another network is not affected, and known terminals come back.
        other = run_attempt(reg, attempt_for(reg, "t3"), 0.0, ("198.18.7.7", 5060))
        assert other.code == 200
        assert register_response(reg, "t1").code == 200
    finally:
        leases.close()


def test_bad_terminal_id_is_400(registrar: Registrar) -> None:
    """A To user that is not a valid terminal id: 400."""
    attempt = attempt_for(registrar, "alice")
    attempt.on_challenge(through_screen(registrar, attempt.register(*SOURCE), 0.0, SOURCE))
    request = wire_request(attempt.register(*SOURCE))
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
    KEYS.clear()
    reg = make_registrar(tmp_path, users=users)
    yield reg
    reg.leases.close()


def test_register_with_the_right_password_gets_a_vipa_and_a_shared_key(
    secured: Registrar,
) -> None:
    response = register_response(secured, "alice", password="wonderland")
    assert response.code == 200
    vipa, _ = parse_register_ok_untrusted(response)
    assert open_tunnel(secured, "alice", vipa, ("203.0.113.9", 5000)).tunnel_id


def test_the_first_challenge_carries_the_digest_ones_when_they_fit(secured: Registrar) -> None:
    attempt = attempt_for(secured, "alice", password="wonderland")
    request = attempt.register(*SOURCE)
    request.headers.set("User-Agent", "x" * 300)  # a request of a real client's size
    first = through_screen(secured, request, 0.0, SOURCE)
    values = first.headers.getlist("WWW-Authenticate")
    assert [v.split()[0] for v in values] == ["Digest", "Digest", "UPMT-KX"]
    # A minimal request gets only what fits in three times its size.
    bare = register("alice")
    answer = secured.screen(bare, SOURCE, len(serialize(bare)), 0.0)
    assert isinstance(answer, Response)
    assert len(serialize(answer)) <= AMPLIFICATION_LIMIT * len(serialize(bare))


@pytest.mark.parametrize(
    ("terminal", "password"),
    [
        ("alice", "looking-glass"),  # wrong password
        ("mallory", "wonderland"),  # unknown user
    ],
)
def test_wrong_credentials_are_refused_with_403(
    secured: Registrar, terminal: str, password: str
) -> None:
    response = register_response(secured, terminal, password=password)
    assert response.code == 403
    assert secured.terminals == {}
    assert secured.statistics()["auth_failures"] == 1


def test_deleted_user_loses_the_association(secured: Registrar, tmp_path: Path) -> None:
    assert register_response(secured, "alice", password="wonderland").code == 200
    users = UserStore.create(tmp_path / "users2.json")
    users.add("bob", "builder")
    assert secured.reload_users(users) == ["alice"]
    assert secured.terminals == {}
    assert register_response(secured, "alice", password="wonderland").code == 403


def test_unparsable_credentials_get_400(secured: Registrar) -> None:
    attempt = attempt_for(secured, "alice", password="wonderland")
    attempt.on_challenge(through_screen(secured, attempt.register(*SOURCE), 0.0, SOURCE))
    request = wire_request(attempt.register(*SOURCE))
    request.headers.set("Authorization", 'Digest username="alice", nc=zz')
    response = wire_response(secured.on_register(wire_request(request), SOURCE, 0.0))
    assert response.code == 400
    assert secured.terminals == {}


def test_a_tunnel_address_inside_the_pool_is_refused(registrar: Registrar) -> None:
    """A tunnel through the overlay itself (its outer source a VIPA): 403."""
    vipa = associate(registrar, "alice")
    inside: Addr = ("100.64.0.9", 40000)
    answer = registrar.on_tunnel_message(message(setup_body("alice", vipa)), inside, 0.0)
    assert answer is not None and wire_response(answer).code == 403
    assert inside not in registrar.tunnel_vipa
