"""Several anchors, the whole system in one process: failover, no flapping, redirects.

`tests.unit.system_kit` with two anchors (`AN`, then `AN2` in the client's
list), each with its own registrar, lease store (another pool: no shared
store, so the VIPA changes with the anchor) and key, over the in-memory
network on virtual time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from paft.flow import PROTO_UDP, FiveTuple
from paft.packets import pack_address
from tests.unit.system_kit import AN, AN2, SystemLab, udp
from upmt_client.commands import host_status
from upmt_client.host import FAILOVER_AFTER, FAILOVER_BACKOFF
from upmt_client.host_events import VipaChanged
from upmt_client.inplace import export_state, import_state
from upmt_client.tunnels import TunnelPhase

CH = "192.0.2.80"


def all_up(lab: SystemLab) -> bool:
    return all(t.phase is TunnelPhase.UP for t in lab.host.tunnels.values())


def run_until_moved(lab: SystemLab, limit: float) -> float:
    """Run until the client has another anchor and every tunnel up; the virtual seconds."""
    started, anchor = lab.now, lab.host.anchors.current
    while (lab.host.anchors.current == anchor or not all_up(lab)) and lab.now < started + limit:
        lab.run_for(0.05)
    return lab.now - started


def test_the_client_associates_with_the_first_anchor_and_keeps_the_other_in_reserve(
    tmp_path: Path,
) -> None:
    lab = SystemLab(tmp_path, anchors=2)
    lab.start()
    assert all_up(lab)
    assert lab.anchors[0].registrar.terminals and not lab.anchors[1].registrar.terminals
    status = host_status(lab.host, lab.now, lab.now)
    assert status["anchor"] == f"{AN}:5060"
    assert [(a["anchor"], a["state"]) for a in status["anchors"]] == [
        (f"{AN}:5060", "current"),
        (f"{AN2}:5060", "reserve"),
    ]
    assert status["anchor_changes"] == []


def test_a_silent_anchor_is_left_for_the_next_within_seconds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lab = SystemLab(tmp_path, anchors=2, probe_interval=0.5, dead_after=4)
    lab.start()
    old_vipa = lab.host.registration.vipa
    assert old_vipa is not None and old_vipa.startswith("100.64.")
    old_flow = FiveTuple(PROTO_UDP, pack_address(old_vipa), 40001, pack_address(CH), 5004)
    lab.owners[old_flow] = "rtp"
    lab.stream([udp(old_vipa, CH, 40001, 5004, b"voice")], 2)  # busy while the anchor dies

    caplog.set_level(logging.INFO, logger="upmt.client")
    lab.kill_anchor(0)
    took = run_until_moved(lab, 20)

    # Probes: 2-2.5 s to declare the tunnels dead; FAILOVER_AFTER more; then the
    # association and the set-ups with the second anchor, in a few round trips.
    assert all_up(lab), [t.phase for t in lab.host.tunnels.values()]
    assert 2.0 + FAILOVER_AFTER <= took <= 2.6 + FAILOVER_AFTER + 1.0, took
    assert lab.host.anchors.current == (AN2, 5060)
    assert lab.anchors[1].registrar.terminals  # the second anchor has it, its tunnels too
    assert {t.tunnel_id for t in lab.host.tunnels.values()} == {
        r.tunnel_id for t in lab.anchors[1].registrar.terminals.values() for r in t.tunnels.values()
    }
    # Its own lease store: another VIPA, installed (with a shared store it would stay).
    new_vipa = lab.host.registration.vipa
    assert new_vipa is not None and new_vipa.startswith("100.65.")
    assert [e for e in lab.events if isinstance(e, VipaChanged)] == [
        VipaChanged(old_vipa, new_vipa)
    ]
    # Data flows through the second anchor.
    lab.owners[FiveTuple(PROTO_UDP, pack_address(new_vipa), 40000, pack_address(CH), 53)] = "dig"
    query = udp(new_vipa, CH, 40000, 53, b"query")
    lab.send_up(query)
    assert lab.anchors[1].tun.take() == [query]

    assert f"anchor {AN}:5060 stopped answering; associating with {AN2}:5060" in caplog.text
    status = host_status(lab.host, lab.now, lab.now)
    assert status["anchor"] == f"{AN2}:5060"
    states = {a["anchor"]: a for a in status["anchors"]}
    assert states[f"{AN2}:5060"]["state"] == "current"
    assert states[f"{AN}:5060"]["state"] == "failed"
    assert states[f"{AN}:5060"]["failed_at"] is not None
    (change,) = status["anchor_changes"]
    assert (change["from"], change["to"], change["reason"]) == (
        f"{AN}:5060",
        f"{AN2}:5060",
        "stopped answering",
    )


def test_the_client_stays_on_the_second_anchor_when_the_first_returns(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path, anchors=2)
    lab.start()
    lab.kill_anchor(0)
    run_until_moved(lab, 20)
    assert lab.host.anchors.current == (AN2, 5060)
    lab.anchors[0].revive()  # the first anchor's host comes back
    lab.run_for(60)
    assert lab.host.anchors.current == (AN2, 5060)  # no flapping back
    assert len(lab.host.anchors.changes) == 1
    assert all_up(lab)


def test_an_unreachable_reserve_passes_the_turn_and_a_whole_round_backs_off(
    tmp_path: Path,
) -> None:
    """Both anchors gone: the second gets no answer either, the client waits, tries again."""
    lab = SystemLab(tmp_path, anchors=2, register_timeout=2.0)
    lab.start()
    lab.kill_anchor(1)  # the reserve is gone already
    lab.kill_anchor(0)
    lab.run_for(2.6 + FAILOVER_AFTER + 0.5)
    assert lab.host.anchors.current == (AN2, 5060)
    assert lab.host.switching and not any(t.open for t in lab.host.tunnels.values())
    # Two interfaces of 2 s each at the second anchor; then the round is over.
    lab.run_for(4.5)
    assert lab.host.anchors.current == (AN2, 5060)
    assert not lab.failed  # not at start-up: the client waits and tries again
    lab.run_for(FAILOVER_BACKOFF + 0.5)
    assert lab.host.anchors.current == (AN, 5060)  # the next round starts with the first again
    states = {a["state"] for a in lab.host.anchors.to_json()}
    assert states == {"current", "failed"}


def test_at_start_up_an_unreachable_first_anchor_gives_the_turn_to_the_next(
    tmp_path: Path,
) -> None:
    lab = SystemLab(tmp_path, anchors=2, register_timeout=2.0)
    lab.kill_anchor(0)
    lab.host.associate(lab.now, initial=True)
    lab.run_for(10)
    assert not lab.failed
    assert lab.host.registration.vipa is not None
    assert lab.host.anchors.current == (AN2, 5060)
    lab.host.start_tunnels(lab.now)
    lab.run_for(1)
    assert all_up(lab)


def test_at_start_up_no_anchor_answering_ends_the_client_with_every_reason(
    tmp_path: Path,
) -> None:
    lab = SystemLab(tmp_path, anchors=2, register_timeout=2.0)
    lab.kill_anchor(0)
    lab.kill_anchor(1)
    lab.host.associate(lab.now, initial=True)
    lab.run_for(20)
    assert len(lab.failed) == 1
    message = str(lab.failed[0].error)
    assert message.startswith("no anchor answers") and AN in message and AN2 in message


def test_with_one_anchor_nothing_fails_over(tmp_path: Path) -> None:
    """A single anchor that falls silent is re-associated with, as before (no failover)."""
    lab = SystemLab(tmp_path)
    lab.start()
    lab.kill_anchor(0)
    lab.run_for(30)
    assert lab.host.anchors.current == (AN, 5060)
    assert lab.host.anchors.changes == [] and not lab.host.switching


# -- 302: a full anchor sends the terminal elsewhere ------------------------------------


def test_a_full_anchor_redirects_and_the_client_follows_to_its_other_anchor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="upmt")
    lab = SystemLab(
        tmp_path,
        anchors=2,
        anchor_options=({"max_terminals": 0, "redirect_to": [(AN2, 5060)]},),
    )
    lab.start()
    assert lab.host.anchors.current == (AN2, 5060)
    assert all_up(lab)
    assert lab.anchors[0].registrar.counters.redirected == 1
    assert not lab.anchors[0].registrar.terminals and lab.anchors[1].registrar.terminals
    # The full anchor took no lease for the terminal.
    assert lab.anchors[0].registrar.leases.lookup("mh1") is None
    (change,) = host_status(lab.host, lab.now, lab.now)["anchor_changes"]
    assert change["reason"] == f"redirected by {AN}:5060"
    assert f"anchor {AN}:5060 redirects; associating with {AN2}:5060" in caplog.text


def test_a_terminal_that_fits_stays_and_its_refreshes_are_never_sent_away(
    tmp_path: Path,
) -> None:
    lab = SystemLab(
        tmp_path,
        anchors=2,
        rekey_interval=10.0,
        anchor_options=({"max_terminals": 1, "redirect_to": [(AN2, 5060)]},),
    )
    lab.start()
    lab.run_for(25)  # two refreshes: the anchor is full, with this very terminal
    assert lab.host.association.associations == 3
    assert lab.host.anchors.current == (AN, 5060)
    assert lab.anchors[0].registrar.counters.redirected == 0


def test_a_redirect_to_an_anchor_outside_the_list_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unauthenticated: a 302 naming an address the client has no key for is refused."""
    caplog.set_level(logging.INFO, logger="upmt")
    rogue = ("192.0.2.66", 5060)
    lab = SystemLab(
        tmp_path,
        anchors=2,
        anchor_options=({"max_terminals": 0, "redirect_to": [rogue]},),
    )
    lab.host.associate(lab.now, initial=True)
    lab.run_for(10)
    # Not followed; the first anchor counts as failed and the next of the list is used.
    assert "192.0.2.66:5060 not followed" in caplog.text
    assert lab.host.anchors.current == (AN2, 5060)
    assert lab.host.registration.vipa is not None and not lab.failed
    assert not lab.host.anchors.listed(rogue)


def test_redirects_are_bounded_and_never_loop(tmp_path: Path) -> None:
    """Two full anchors sending each other the terminal: no loop, a clear failure."""
    lab = SystemLab(
        tmp_path,
        anchors=2,
        anchor_options=(
            {"max_terminals": 0, "redirect_to": [(AN2, 5060)]},
            {"max_terminals": 0, "redirect_to": [(AN, 5060)]},
        ),
    )
    lab.host.associate(lab.now, initial=True)
    lab.run_for(30)
    assert len(lab.failed) == 1 and "no anchor answers" in str(lab.failed[0].error)
    total = sum(a.registrar.counters.redirected for a in lab.anchors)
    assert total == 2  # each anchor redirected once; neither was asked again


def test_a_redirect_of_a_refresh_is_ignored(tmp_path: Path) -> None:
    """Once associated, a 302 (forged, or an anchor that changed its mind) moves nothing."""
    lab = SystemLab(tmp_path, anchors=2, rekey_interval=10.0)
    lab.start()
    registrar = lab.anchors[0].registrar
    lab.run_for(9.5)
    # The anchor forgets the terminal and is full of others: the refresh gets the 302.
    registrar.max_terminals, registrar.redirect_to = 0, [(AN2, 5060)]
    registrar.table.remove("mh1")
    lab.run_for(1)
    assert registrar.counters.redirected >= 1
    assert lab.host.anchors.current == (AN, 5060)
    assert lab.host.association.registration.keys is not None  # the association in force


def test_a_restart_in_place_keeps_the_current_anchor(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path, anchors=2)
    lab.start()
    lab.kill_anchor(0)
    run_until_moved(lab, 20)
    kept, state = export_state(lab.host, lab.now)
    fresh = SystemLab(tmp_path / "next", anchors=2)  # the next process's core, same options
    import_state(fresh.host, json.loads(json.dumps(state)), set(kept), fresh.now)
    assert fresh.host.anchors.current == (AN2, 5060)
    assert fresh.host.association.anchor_sip == (AN2, 5060)
    assert fresh.host.anchor_tunnel == (AN2, 1800)
    assert fresh.host.anchor_key == fresh.anchors[1].registrar.static_key.public
    assert fresh.host.anchors.changes == []  # not a change: where it was already
