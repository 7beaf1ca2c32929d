"""The whole system in one process: a client core and the anchor over NATs, on virtual time.

No root, no sockets (these pass inside `unshare -n`): `tests.unit.system_kit`
runs a `MobileHost` with its data path and the anchor's real `Registrar`
with its data path over the in-memory network of `upmt.fakes.network` and
the fake TUNs of `upmt.fakes.tun`, each access interface behind its own NAT.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from anchor_node.users import UserStore
from ground.constants import Addr
from ground.errors import ConfigError
from paft.flow import PROTO_UDP, FiveTuple
from paft.packets import pack_address
from signalling.handshake import SessionKeys
from tests.unit.system_kit import ADDRESSES, NAT_PUBLIC, SystemLab, flow, udp
from upmt_client.association import AnchorRefused
from upmt_client.commands import handover, host_status
from upmt_client.explain import explain_json
from upmt_client.host_events import OpenSocket
from upmt_client.policy import parse_policy
from upmt_client.tunnels import TunnelPhase

CH = "192.0.2.80"  # a correspondent host on the Internet, behind the anchor's NAT


def tunnel_ids(lab: SystemLab) -> dict[str, str | None]:
    return {name: t.tunnel_id for name, t in lab.host.tunnels.items()}


def test_association_then_a_tunnel_through_each_nat(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path)
    lab.start()
    status = host_status(lab.host, lab.now, lab.now)
    assert status["vipa"].startswith("100.64.0.")
    assert [t["state"] for t in status["tunnels"]] == ["up", "up"]
    # The anchor names each tunnel by what it sees: the NAT's public address and port.
    for name, tid in tunnel_ids(lab).items():
        assert tid is not None and tid.startswith(NAT_PUBLIC[name] + ":"), tid
    assert not any(kind.value == "register" for kind, _name in lab.sockets)  # closed again
    lab.run_for(5)
    assert all(t["acks_received"] >= 9 for t in host_status(lab.host, lab.now, lab.now)["tunnels"])


def test_association_with_digest_authentication(tmp_path: Path) -> None:
    users = UserStore.create(tmp_path / "users.json")
    users.add("mh1", "secret-1")
    lab = SystemLab(tmp_path, users=users, password="secret-1")
    lab.start()
    assert lab.host.tunnels["if0"].phase is TunnelPhase.UP


def test_a_wrong_password_ends_the_start_with_a_refusal(tmp_path: Path) -> None:
    users = UserStore.create(tmp_path / "users.json")
    users.add("mh1", "secret-1")
    lab = SystemLab(tmp_path, users=users, password="wrong")
    lab.host.associate(lab.now, initial=True)
    lab.run_for(10)
    assert len(lab.failed) == 1 and isinstance(lab.failed[0].error, AnchorRefused)
    assert lab.host.registration.vipa is None


def test_an_unreachable_anchor_fails_the_start_with_one_error(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path, register_timeout=2.0)
    for nat in lab.nats.values():
        nat.blackhole = True
    lab.host.associate(lab.now, initial=True)
    lab.run_for(10)
    assert len(lab.failed) == 1
    assert "cannot reach the anchor" in str(lab.failed[0].error)


def test_association_survives_a_lossy_access_network(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path)
    lab.nats["if0"].loss = 0.3  # SIP retransmits (T1 = 0.5 s) carry it through
    lab.host.associate(lab.now, initial=True)
    lab.run_for(20)
    assert lab.host.registration.vipa is not None, lab.failed
    assert lab.nats["if0"].dropped > 0


def tunnel_addr(lab: SystemLab, name: str) -> Addr:
    """The anchor's name of tunnel `name`: the address its NAT shows."""
    tid = lab.host.tunnels[name].tunnel_id
    assert tid is not None
    host, port = tid.rsplit(":", 1)
    return host, int(port)


def test_data_both_ways_and_the_anchor_learns_the_flow(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path)
    lab.start()
    vipa = lab.host.registration.vipa
    assert vipa is not None
    query = udp(vipa, CH, 40000, 53, b"query")
    key = FiveTuple(PROTO_UDP, pack_address(vipa), 40000, pack_address(CH), 53)
    lab.owners[key] = "dig"

    lab.send_up(query)

    assert lab.anchor.tun.take() == [query]  # decapsulated, as it left the application
    learnt = lab.anchor.registrar.paft.entries[key]
    assert learnt.tunnel == tunnel_addr(lab, "if0") and learnt.packets_up == 1
    entry = lab.paft.entries[key]
    assert (entry.tunnel, entry.app, entry.packets_up) == ("if0", "dig", 1)

    answer = udp(CH, vipa, 53, 40000, b"answer")
    lab.send_down(answer)

    assert lab.tun.take() == [answer]
    assert (entry.packets_down, entry.bytes_down) == (1, len(answer))
    assert learnt.packets_down == 1

    # A packet whose source is not the terminal's VIPA goes no further than the anchor.
    lab.send_up(udp("100.64.0.250", CH, 40001, 53))
    assert lab.anchor.tun.take() == []
    assert lab.anchor.forwarder.counters.spoofed_source == 1
    # Nor does a packet for a VIPA nobody holds.
    lab.send_down(udp(CH, "100.64.0.250", 53, 40000))
    assert lab.tun.take() == []
    assert lab.anchor.forwarder.counters.no_route == 1


def test_cli_handover_is_make_before_break_and_the_anchor_confirms(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path)
    lab.start()
    vipa = lab.host.registration.vipa
    assert vipa is not None
    key = FiveTuple(PROTO_UDP, pack_address(vipa), 40000, pack_address(CH), 5004)
    lab.owners[key] = "curl"
    lab.send_up(udp(vipa, CH, 40000, 5004, b"1"))
    assert lab.anchor.registrar.paft.entries[key].tunnel == tunnel_addr(lab, "if0")

    answers: list[dict[str, object]] = []
    handover(lab.host, {"app": "curl", "to": "if1"}, lab.now, answers.append)
    assert lab.paft.entries[key].tunnel == "if1"  # the upstream switched at once
    lab.pump()
    assert answers and answers[0]["moved"] == 1, answers
    assert str(answers[0]["anchor"]).startswith("200"), answers
    assert answers[0]["anchor_moved"] == 1  # the anchor moved its downstream as well
    assert lab.anchor.registrar.paft.entries[key].tunnel == tunnel_addr(lab, "if1")
    assert lab.host.book.history[-1].reason == "user"
    assert lab.host.tunnels["if0"].phase is TunnelPhase.UP  # the old tunnel stays

    # Both ways on if1 now: the next packets travel through if1's NAT only.
    before = {name: nat.translated for name, nat in lab.nats.items()}
    lab.send_up(udp(vipa, CH, 40000, 5004, b"2"))
    lab.send_down(udp(CH, vipa, 5004, 40000, b"3"))
    assert lab.anchor.tun.take()[-1] == udp(vipa, CH, 40000, 5004, b"2")
    assert lab.tun.take() == [udp(CH, vipa, 5004, 40000, b"3")]
    assert lab.nats["if1"].translated == before["if1"] + 2
    assert lab.nats["if0"].translated == before["if0"]


def test_link_down_moves_flows_and_they_return_after_the_hold_down(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path, hold_down=2.0)
    lab.start()
    key = flow(443)
    lab.learn(key, "if0")
    lab.host.link_changed("if0", False, {ADDRESSES["if0"]}, lab.now)
    lab.pump()
    assert not any(name == "if0" for _kind, name in lab.sockets)
    assert lab.host.tunnels["if0"].down_reason == "link down"
    assert lab.paft.entries[key].tunnel == "if1"
    assert lab.host.book.history[-1].reason == "link down"
    lab.host.link_changed("if0", True, {ADDRESSES["if0"]}, lab.now)
    lab.run_for(1)
    assert lab.host.tunnels["if0"].phase is TunnelPhase.UP
    assert lab.paft.entries[key].tunnel == "if1"  # not yet: the hold-down
    lab.run_for(2)
    assert lab.paft.entries[key].tunnel == "if0"
    assert lab.host.book.history[-1].reason == "return"


def test_a_blackhole_on_a_busy_tunnel_is_declared_within_a_second(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path, probe_interval=0.5, dead_after=4)
    lab.start()
    vipa = lab.host.registration.vipa
    assert vipa is not None
    lab.owners[FiveTuple(PROTO_UDP, pack_address(vipa), 40000, pack_address(CH), 5004)] = "rtp"
    idle = lab.host.tunnels["if1"].scheduler
    for _ in range(50):  # a 50 packets/s stream on if0 for a second
        lab.send_up(udp(vipa, CH, 40000, 5004, b"voice"))
        lab.run_for(0.02)
    busy = lab.host.tunnels["if0"].scheduler
    assert busy is not None and idle is not None
    assert busy.current_interval == pytest.approx(0.1)  # probed fast while it carries traffic
    assert idle.current_interval == 0.5  # the idle tunnel keeps the keepalive rate
    lab.nats["if0"].blackhole = True
    started = lab.now
    while lab.host.tunnels["if0"].phase is TunnelPhase.UP and lab.now < started + 10:
        lab.send_up(udp(vipa, CH, 40000, 5004, b"voice"))
        lab.run_for(0.02)
    assert lab.host.tunnels["if0"].down_reason == "probe loss"
    assert lab.now - started <= 1.0
    lab.send_up(udp(vipa, CH, 40000, 5004, b"after"))
    assert lab.paft.entries[next(iter(lab.owners))].tunnel == "if1"
    assert lab.anchor.tun.take()[-1] == udp(vipa, CH, 40000, 5004, b"after")


def test_quality_figures_in_status(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path)
    lab.start()
    lab.nats["if1"].loss = 0.1
    lab.run_for(30)
    tunnels = {t["interface"]: t for t in host_status(lab.host, lab.now, lab.now)["tunnels"]}
    assert tunnels["if0"]["loss"] == 0.0 and tunnels["if0"]["jitter_ms"] is not None
    # A tenth of the probes and of their acks are lost on if1: about 19 % go unanswered.
    assert 0.08 <= tunnels["if1"]["loss"] <= 0.35, tunnels["if1"]
    assert set(tunnels["if1"]["loss_windows"]) == {"5s", "30s", "120s"}
    assert tunnels["if0"]["probe_interval_ms"] == 500.0  # idle: the keepalive


AUTO_POLICY = """
[interfaces.if1]
cost = 5
[default]
interfaces = ["if0", "if1"]
[apps.rtp]
interfaces = ["if0", "if1"]
auto = true
max_loss = 0.02
max_rtt_ms = 150
"""


def auto_lab(tmp_path: Path) -> tuple[SystemLab, list[bytes], FiveTuple, FiveTuple]:
    policy = parse_policy(AUTO_POLICY, "policy.toml", fallback_interfaces=["if0", "if1"])
    lab = SystemLab(tmp_path, policy=policy, hold_down=10.0)
    lab.start()
    vipa = lab.host.registration.vipa
    assert vipa is not None
    rtp = FiveTuple(PROTO_UDP, pack_address(vipa), 40000, pack_address(CH), 5004)
    bulk = FiveTuple(PROTO_UDP, pack_address(vipa), 40001, pack_address(CH), 9000)
    lab.owners.update({rtp: "rtp", bulk: "curl"})
    packets = [udp(vipa, CH, 40000, 5004, b"voice"), udp(vipa, CH, 40001, 9000, b"bulk")]
    return lab, packets, rtp, bulk


def moves_of(lab: SystemLab, app: str) -> list[tuple[str, str, str]]:
    return [(h.source, h.target, h.reason) for h in lab.host.book.history if h.app == app]


def test_loss_moves_an_auto_app_and_leaves_a_bulk_app_then_it_returns(tmp_path: Path) -> None:
    lab, packets, rtp, bulk = auto_lab(tmp_path)
    lab.stream(packets, 5)
    assert (lab.paft.entries[rtp].tunnel, lab.paft.entries[bulk].tunnel) == ("if0", "if0")

    lab.nats["if0"].loss = 0.15
    started = lab.now
    while lab.paft.entries[rtp].tunnel == "if0" and lab.now < started + 20:
        lab.stream(packets, 0.5)
    assert lab.paft.entries[rtp].tunnel == "if1"
    assert lab.now - started <= 10
    assert lab.paft.entries[bulk].tunnel == "if0"  # no `auto`: it stays
    assert lab.host.tunnels["if0"].phase is TunnelPhase.UP  # lossy, not dead
    (move,) = [h for h in lab.host.book.history if h.app == "rtp"]
    assert (move.source, move.target, move.reason) == ("if0", "if1", "quality")
    assert "if0: loss" in move.detail, move.detail
    why = explain_json(lab.host, "rtp", lab.now)
    assert (why["chosen"], why["reason"]) == ("if1", "quality")
    by_name = {c["interface"]: c for c in why["candidates"]}
    assert not by_name["if0"]["acceptable"] and by_name["if0"]["breaks"][0].startswith("loss")
    assert by_name["if1"]["acceptable"] and by_name["if1"]["cost"] == 5
    assert explain_json(lab.host, "curl", lab.now)["reason"] == "order"

    lab.nats["if0"].loss = 0.0
    recovered = lab.now
    while lab.paft.entries[rtp].tunnel == "if1" and lab.now < recovered + 90:
        lab.stream(packets, 0.5)
    assert lab.paft.entries[rtp].tunnel == "if0"  # back to the cheaper interface
    assert lab.now - recovered >= 10  # not before the hold-down
    assert moves_of(lab, "rtp") == [("if0", "if1", "quality"), ("if1", "if0", "cost")]
    assert moves_of(lab, "curl") == []


def test_a_flapping_path_causes_no_ping_pong(tmp_path: Path) -> None:
    lab, packets, _rtp, _bulk = auto_lab(tmp_path)
    lab.stream(packets, 2)
    for cycle in range(12):  # two minutes: if0 loses 20 % for 5 s of every 10
        lab.nats["if0"].loss = 0.2 if cycle % 2 == 0 else 0.0
        lab.stream(packets, 5, every=0.05)
    assert len(moves_of(lab, "rtp")) <= 1, moves_of(lab, "rtp")


REDUNDANT_POLICY = """
[default]
interfaces = ["if0", "if1"]
[apps.rtp]
interfaces = ["if0", "if1"]
redundant = true
"""


def test_a_redundant_app_travels_on_both_paths_and_a_blackhole_costs_it_nothing(
    tmp_path: Path,
) -> None:
    policy = parse_policy(REDUNDANT_POLICY, "policy.toml", fallback_interfaces=["if0", "if1"])
    lab = SystemLab(tmp_path, policy=policy, probe_interval=0.5, dead_after=4)
    lab.start()
    vipa = lab.host.registration.vipa
    assert vipa is not None
    rtp = FiveTuple(PROTO_UDP, pack_address(vipa), 40000, pack_address(CH), 5004)
    bulk = FiveTuple(PROTO_UDP, pack_address(vipa), 40001, pack_address(CH), 9000)
    lab.owners.update({rtp: "rtp", bulk: "curl"})
    anchor_paft = lab.anchor.registrar.paft
    sent_up: list[bytes] = []
    sent_down: list[bytes] = []

    def exchange(seconds: float) -> None:
        end = lab.now + seconds
        while lab.now < end:
            n = len(sent_up)
            up, down = (
                udp(vipa, CH, 40000, 5004, b"u%d" % n),
                udp(CH, vipa, 5004, 40000, b"d%d" % n),
            )
            sent_up.append(up)
            sent_down.append(down)
            lab.send_up(up)
            lab.send_up(udp(vipa, CH, 40001, 9000, b"bulk"))
            lab.send_down(down)
            lab.run_for(0.02)

    nat0, nat1 = lab.nats["if0"].translated, lab.nats["if1"].translated
    exchange(2)
    entry = lab.paft.entries[rtp]
    assert (entry.tunnel, entry.twin) == ("if0", "if1")
    assert lab.paft.entries[bulk].twin is None  # only the redundant app is duplicated
    at_anchor = anchor_paft.entries[rtp]
    assert (at_anchor.tunnel, at_anchor.twin) == (tunnel_addr(lab, "if0"), tunnel_addr(lab, "if1"))
    # Both NATs carried the stream both ways: well beyond the probes' share.
    assert lab.nats["if0"].translated - nat0 > 150 and lab.nats["if1"].translated - nat1 > 150
    (record,) = [h for h in lab.host.book.history if h.app == "rtp"]
    assert (record.reason, record.target, record.twin) == ("redundant", "if0", "if1")
    why = explain_json(lab.host, "rtp", lab.now)
    assert (why["chosen"], why["twin"]) == ("if0", "if1")

    lab.nats["if0"].blackhole = True
    exchange(3)
    assert lab.host.tunnels["if0"].down_reason == "probe loss"
    assert (entry.tunnel, entry.twin) == ("if1", None)
    exchange(1)
    # Every packet arrived once, in order, both ways: the blackhole cost nothing.
    rtp_up = [p for p in lab.anchor.tun.take() if p[20:22] == (40000).to_bytes(2, "big")]
    assert len(rtp_up) == len(sent_up) and rtp_up == sent_up
    received = lab.tun.take()
    assert len(received) == len(sent_down) and received == sent_down
    assert lab.forwarder.counters.duplicates > 0 and lab.anchor.forwarder.counters.duplicates > 0
    assert at_anchor.twin is None  # told: single again, on if1
    assert at_anchor.tunnel == tunnel_addr(lab, "if1")


CAP_POLICY = """
[interfaces.if1]
cap_mb = 1
[default]
interfaces = ["if0", "if1"]
[apps.video]
interfaces = ["if1", "if0"]
[apps.sync]
interfaces = ["if1"]
cap_mb = 0.02
"""


def test_caps_move_an_app_when_reached_and_block_one_with_nowhere_to_go(tmp_path: Path) -> None:
    policy = parse_policy(CAP_POLICY, "policy.toml", fallback_interfaces=["if0", "if1"])
    lab = SystemLab(tmp_path, policy=policy)
    lab.start()
    vipa = lab.host.registration.vipa
    assert vipa is not None
    video = FiveTuple(PROTO_UDP, pack_address(vipa), 40000, pack_address(CH), 8000)
    sync = FiveTuple(PROTO_UDP, pack_address(vipa), 40001, pack_address(CH), 9000)
    lab.owners.update({video: "video", sync: "sync"})
    frame = b"v" * 1000
    sync_packet = udp(vipa, CH, 40001, 9000, b"s" * 1000)
    # sync: 1 kB every 20 ms on metered if1 until its own 20 kB cap closes if1 to it.
    lab.stream([sync_packet], 1.0)
    assert lab.paft.entries[sync].tunnel == "!blocked"  # no other interface in its list
    blocked = lab.forwarder.counters.blocked
    lab.send_up(sync_packet)
    assert lab.forwarder.counters.blocked == blocked + 1
    lab.send_down(udp(CH, vipa, 9000, 40001, b"late answer"))  # the anchor still sends it
    assert lab.tun.take() == []  # the client drops it: a parked app gets nothing
    assert lab.forwarder.counters.blocked == blocked + 2
    # video: 10 kB every 20 ms on if1 until if1's own 1 MB cap closes it to everyone.
    lab.stream([udp(vipa, CH, 40000, 8000, frame)] * 10, 3.0)
    assert lab.paft.entries[video].tunnel == "if0"
    used = lab.host.usage.interfaces["if1"]
    # Closed when the next half second (250 kB at this rate) would exceed the cap.
    assert 1_000_000 - 300_000 <= used <= 1_000_000
    moves = [(h.app, h.source, h.target, h.reason) for h in lab.host.book.history]
    assert ("video", "if1", "if0", "cap") in moves and ("sync", "if1", "!blocked", "cap") in moves
    status = host_status(lab.host, lab.now, lab.now)["usage"]
    assert 0.7 <= status["interfaces_mb"]["if1"] <= 1.0


def test_an_idle_blackhole_is_declared_after_dead_after_probes(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path, probe_interval=0.5, dead_after=4)
    lab.start()
    key = flow(5000)
    lab.learn(key, "if0")
    lab.nats["if0"].blackhole = True
    started = lab.now
    while lab.host.tunnels["if0"].phase is TunnelPhase.UP and lab.now < started + 10:
        lab.run_for(0.05)
    assert lab.host.tunnels["if0"].down_reason == "probe loss"
    assert 1.5 <= lab.now - started <= 2.6
    assert lab.paft.entries[key].tunnel == "if1"
    lab.nats["if0"].blackhole = False  # the path comes back: the next set-up succeeds
    lab.run_for(3)
    assert lab.host.tunnels["if0"].phase is TunnelPhase.UP


def test_an_anchor_restart_leads_to_a_new_association(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path)
    lab.start()
    before = lab.host.association.associations
    lab.restart_anchor()  # it knows neither the terminal nor its tunnels
    lab.run_for(40)
    assert lab.host.association.associations > before
    assert all(t.phase is TunnelPhase.UP for t in lab.host.tunnels.values())
    assert lab.anchor.registrar.terminals, "the new anchor knows the terminal"


def test_a_nat_rebinding_brings_the_tunnel_back_under_its_new_address(tmp_path: Path) -> None:
    """The anchor answers probes of known tunnels only: the new port dies, and is set up anew."""
    lab = SystemLab(tmp_path)
    lab.start()
    tunnel = lab.host.tunnels["if0"]
    old = tunnel.tunnel_id
    lab.nats["if0"].rebind()  # the next datagram leaves from another public port
    started = lab.now
    while tunnel.phase is TunnelPhase.UP and lab.now < started + 10:
        lab.run_for(0.05)
    assert tunnel.down_reason == "probe loss" and lab.now - started <= 2.6
    assert lab.anchor.forwarder.counters.unknown_tunnel > 0
    lab.run_for(5)
    assert tunnel.phase is TunnelPhase.UP and tunnel.setups == 2
    assert tunnel.tunnel_id is not None and tunnel.tunnel_id != old
    assert tunnel.tunnel_id.startswith(NAT_PUBLIC["if0"] + ":")


def test_probes_keep_the_nat_mappings_alive(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path, probe_interval=0.5)
    lab.start()
    before = tunnel_ids(lab)
    lab.run_for(120)  # four times the NATs' 30 s timeout
    assert tunnel_ids(lab) == before
    assert all(t.phase is TunnelPhase.UP for t in lab.host.tunnels.values())


def test_encryption_seals_every_tunnel_frame(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path)
    keys = SessionKeys(bytes(32), bytes([1]) * 32, bytes([2]) * 32, 64, 128)
    lab.host.tunnels["if0"].install_keys(keys, lab.now)
    lab.host.association.registration.keys = keys
    lab.host.association.registration.vipa = "100.64.0.9"
    lab.host.start_tunnels(lab.now)
    while (event := lab.host.next_event()) is not None:
        if isinstance(event, OpenSocket) and event.interface == "if0":
            lab.host.socket_opened(event.kind, "if0", (ADDRESSES["if0"], 6000), lab.now)
    sent = [o.data for o in lab.host.datagrams_to_send() if o.interface == "if0"]
    assert sent and all(d[0] == 0x05 for d in sent)


@pytest.mark.parametrize("missing", ["to", "app"])
def test_a_bad_handover_command_is_a_config_error(tmp_path: Path, missing: str) -> None:
    lab = SystemLab(tmp_path)
    lab.start()
    request = {"app": "curl", "to": "if1"}
    del request[missing]
    with pytest.raises(ConfigError):
        handover(lab.host, request, lab.now, lambda _answer: None)


def test_a_handover_never_takes_a_bypassed_flow_into_a_tunnel(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path)
    lab.start()
    vipa = lab.host.registration.vipa
    assert vipa is not None
    bypassed = FiveTuple(PROTO_UDP, pack_address(vipa), 40000, pack_address(CH), 53)
    tunnelled = FiveTuple(PROTO_UDP, pack_address(vipa), 40001, pack_address(CH), 53)
    lab.learn(bypassed, "!bypass:if0", app="apt")
    lab.learn(tunnelled, "if0", app="apt")  # from before a policy reload made it bypass
    answers: list[dict[str, object]] = []
    handover(lab.host, {"app": "apt", "to": "if1"}, lab.now, answers.append)
    assert lab.paft.entries[bypassed].tunnel == "!bypass:if0"
    assert lab.paft.entries[tunnelled].tunnel == "if1"
    lab.paft.remove(tunnelled)
    with pytest.raises(ConfigError, match="bypasses the tunnels"):
        handover(lab.host, {"app": "apt", "to": "if1"}, lab.now, answers.append)
    flow_id = lab.host.book.id_of(bypassed)
    with pytest.raises(ConfigError, match="bypasses the tunnels"):
        handover(lab.host, {"flow": flow_id, "to": "if1"}, lab.now, answers.append)
    assert lab.paft.entries[bypassed].tunnel == "!bypass:if0"
