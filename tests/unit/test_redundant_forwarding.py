"""Both forwarders with a redundant flow (sans-IO): DUP copies out, first copies in."""

from __future__ import annotations

import contextlib

from anchor_node.forwarder import CHANNEL, AnchorForwarder
from ground.constants import Addr
from paft.flow import PROTO_UDP, FiveTuple
from paft.packets import build_ipv4, build_udp, pack_address
from paft.table import FlowSelector, Paft
from tunnel.dedup import decode_dup_untrusted, encode_dup
from tunnel.forwarding import Outbound
from upmt_client.forwarder import ClientForwarder, FlowChoice

VIPA, CH = "100.64.0.2", "192.0.2.80"
WIFI: Addr = ("203.0.113.10", 40000)
LTE: Addr = ("203.0.113.11", 40000)
KEY = FiveTuple(PROTO_UDP, pack_address(VIPA), 5004, pack_address(CH), 5004)


def up(n: int) -> bytes:
    return build_ipv4(VIPA, CH, PROTO_UDP, build_udp(5004, 5004, b"u%d" % n, VIPA, CH))


def down(n: int) -> bytes:
    return build_ipv4(CH, VIPA, PROTO_UDP, build_udp(5004, 5004, b"d%d" % n, CH, VIPA))


def anchor() -> AnchorForwarder:
    forwarder = AnchorForwarder(Paft(), contextlib.nullcontext(), lambda origin, frame: None)
    forwarder.tunnel_vipa.update({WIFI: pack_address(VIPA), LTE: pack_address(VIPA)})
    return forwarder


def test_the_anchor_takes_the_first_copy_and_keeps_the_flow_where_it_is() -> None:
    a = anchor()
    first = a.open(CHANNEL, [encode_dup(7, 0, up(0))], WIFI)
    assert first == [up(0)]
    assert a.from_tunnel(CHANNEL, WIFI, up(0), 1.0, 1, len(up(0)))
    assert a.open(CHANNEL, [encode_dup(7, 0, up(0))], LTE) == []  # the copy
    assert a.counters.duplicates == 1
    entry = a.paft.entries[KEY]
    a.paft.move(_selector(), WIFI, twin=LTE)
    (passed,) = a.open(CHANNEL, [encode_dup(7, 1, up(1))], LTE)  # LTE's copy came first
    assert a.from_tunnel(CHANNEL, LTE, passed, 1.1, 1, len(passed))
    assert (entry.tunnel, entry.twin) == (WIFI, LTE)  # arriving on its twin moves nothing


def test_the_anchor_sends_a_redundant_flows_answers_on_both_tunnels() -> None:
    a = anchor()
    a.open(CHANNEL, [up(0)], WIFI)
    a.from_tunnel(CHANNEL, WIFI, up(0), 1.0, 1, len(up(0)))
    assert a.from_tun(down(0), down(0), 1, len(down(0)), 1.0) == (CHANNEL, WIFI, None)
    a.paft.move(_selector(), WIFI, twin=LTE)
    for n in (1, 2):
        assert a.from_tun(down(n), down(n), 1, len(down(n)), 1.0) is None
    copies = a.pending
    assert [route[1] for route, _frames in copies] == [WIFI, LTE, WIFI, LTE]
    seqs = [dup(f)[1:] for _route, frames in copies for f in frames]
    assert seqs == [(0, down(1)), (0, down(1)), (1, down(2)), (1, down(2))]


def test_dup_frames_from_a_stranger_or_malformed_are_dropped_and_counted() -> None:
    a = anchor()
    assert a.open(CHANNEL, [encode_dup(1, 0, up(0))], ("198.51.100.9", 1)) == []
    assert a.counters.unknown_tunnel == 1
    # Only a packet travels inside a DUP frame: a SIGNAL there is junk.
    assert a.open(CHANNEL, [b"\x06" + bytes(8) + b"\x01INVITE"], WIFI) == []
    assert a.counters.malformed_frames == 1


def test_the_client_sends_each_packet_on_both_tunnels_and_delivers_one_answer() -> None:
    paft: Paft[str] = Paft()
    choice = FlowChoice("wlan0", "voip", True, twin="wwan0")
    c = ClientForwarder(paft, contextlib.nullcontext(), lambda k: choice, lambda k: choice, print)
    c.attach("wlan0", None)
    c.attach("wwan0", None)
    assert c.from_tun(up(0), up(0), 1, len(up(0)), 0.0) is None
    ((wifi, frames), (lte, same)) = c.pending
    assert (wifi[0], lte[0]) == ("wlan0", "wwan0") and frames == same
    assert dup(frames[0])[1:] == (0, up(0))
    assert c.tunnels["wlan0"].packets_up == c.tunnels["wwan0"].packets_up == 1
    assert paft.entries[KEY].packets_up == 1  # the application sent one packet
    answer = encode_dup(3, 0, down(0))
    assert c.open("wwan0", [answer], LTE) == [down(0)]
    assert c.open("wlan0", [answer], WIFI) == []
    assert c.counters.duplicates == 1
    c.detach("wwan0")  # the twin's tunnel is gone: its copies stop, the flow goes on
    c.pending.clear()
    c.from_tun(up(1), up(1), 1, len(up(1)), 0.1)
    assert [route[0] for route, _ in c.pending] == ["wlan0"]


def dup(frame: Outbound) -> tuple[int, int, bytes]:
    assert isinstance(frame, bytes)
    return decode_dup_untrusted(frame)


def _selector() -> FlowSelector:
    return FlowSelector(src=pack_address(VIPA))


def test_a_twin_that_is_no_longer_the_terminals_gets_no_copy() -> None:
    a = anchor()
    a.open(CHANNEL, [up(0)], WIFI)
    a.from_tunnel(CHANNEL, WIFI, up(0), 1.0, 1, len(up(0)))
    a.paft.move(_selector(), WIFI, twin=LTE)
    a.tunnel_vipa[LTE] = pack_address("100.64.0.77")  # LTE's address now another terminal's
    assert a.from_tun(down(1), down(1), 1, len(down(1)), 1.0) is None
    assert [route[1] for route, _frames in a.pending] == [WIFI]
