"""Daily usage per interface, application and policy table; the caps it closes; steering by them."""

from __future__ import annotations

from paft.flow import FiveTuple
from paft.table import FlowEntry
from upmt_client.policy import parse_policy
from upmt_client.steering import BLOCKED, HELD, Steering
from upmt_client.usage import MB, Usage

POLICY = parse_policy(
    """
[interfaces.wwan0]
cap_mb = 10
[default]
interfaces = ["wlan0", "wwan0"]
[apps.video]
interfaces = ["wwan0", "wlan0"]
cap_mb = 2
[apps.backup]
interfaces = ["wwan0"]
cap_mb = 1
over_cap = "hold"
[apps.sync]
interfaces = ["wwan0"]
cap_mb = 1
""",
    "policy.toml",
    fallback_interfaces=["wlan0", "wwan0"],
)


def key(port: int) -> FiveTuple:
    return FiveTuple(17, bytes(4), port, bytes(4), 53)


def entry(tunnel: str, up: int = 0, down: int = 0) -> FlowEntry[str]:
    e: FlowEntry[str] = FlowEntry(tunnel, 0.0, 0.0)
    e.bytes_up, e.bytes_down = up, down
    return e


def test_what_a_flow_carried_since_the_last_look_counts_where_it_is_now() -> None:
    usage = Usage()
    flow = entry("wlan0", up=1000, down=5000)
    usage.update([(key(1), flow, "curl", "default")], "2026-12-01")
    assert usage.interfaces == {"wlan0": 6000}
    flow.tunnel, flow.bytes_down = "wwan0", 9000  # moved, then 4000 more bytes
    usage.update([(key(1), flow, "curl", "default")], "2026-12-01")
    assert usage.interfaces == {"wlan0": 6000, "wwan0": 4000}
    assert usage.apps == {("curl", "wlan0"): 6000, ("curl", "wwan0"): 4000}
    assert usage.tables == {("default", "wlan0"): 6000, ("default", "wwan0"): 4000}


def test_a_new_day_starts_from_zero_and_parked_flows_count_nowhere() -> None:
    usage = Usage()
    flow = entry("wwan0", down=3 * MB)
    usage.update([(key(1), flow, "curl", "default")], "2026-12-01")
    flow.bytes_down += MB
    usage.update([(key(1), flow, "curl", "default")], "2026-12-02")
    assert usage.interfaces == {"wwan0": MB}  # only what came after midnight
    flow.tunnel, flow.bytes_down = BLOCKED, flow.bytes_down + MB
    usage.update([(key(1), flow, "curl", "default")], "2026-12-02")
    assert usage.interfaces == {"wwan0": MB}


def test_caps_close_metered_interfaces_to_a_table_or_to_everyone() -> None:
    usage = Usage()
    flows = [
        (key(1), entry("wwan0", down=2 * MB), "vlc", "video"),
        (key(2), entry("wlan0", down=50 * MB), "vlc", "video"),  # not metered: no limit
    ]
    usage.update(flows, "d")
    assert usage.capped(POLICY) == {("video", "wwan0")}
    usage.update([*flows, (key(3), entry("wwan0", down=8 * MB), "curl", "default")], "d")
    assert ("*", "wwan0") in usage.capped(POLICY)  # the interface's own 10 MB


def steering(capped: set[tuple[str, str]]) -> Steering:
    s = Steering(POLICY, hold_down=10.0)
    s.set_up("wlan0", 0.0)
    s.set_up("wwan0", 0.0)
    s.set_capped(frozenset(capped))
    return s


def test_a_capped_interface_sends_the_app_to_the_next_one_with_reason_cap() -> None:
    s = steering({("video", "wwan0")})
    move = s.target(key(1), "wwan0", "video", None, True, 1.0)
    assert move is not None and (move.target, move.reason) == ("wlan0", "cap")
    assert s.view.decide("video", None).tunnel == "wlan0"  # new flows too
    assert s.view.decide("curl", None).tunnel == "wlan0"  # others are not capped


def test_with_no_interface_left_the_app_is_blocked_or_held_as_its_policy_says() -> None:
    s = steering({("sync", "wwan0"), ("backup", "wwan0")})
    blocked = s.target(key(1), "wwan0", "sync", None, True, 1.0)
    held = s.target(key(2), "wwan0", "backup", None, True, 1.0)
    assert blocked is not None and (blocked.target, blocked.reason) == (BLOCKED, "cap")
    assert held is not None and (held.target, held.reason) == (HELD, "cap")
    assert s.view.decide("sync", None).tunnel == BLOCKED
    # The next day (the caps lifted) the parked flows go back.
    s.set_capped(frozenset())
    back = s.target(key(2), HELD, "backup", None, True, 2.0)
    assert back is not None and (back.target, back.reason) == ("wwan0", "cap")
    assert s.target(key(2), "wwan0", "backup", None, True, 2.0) is None


def test_a_cap_closes_ahead_of_the_next_look_and_stays_closed_until_midnight() -> None:
    usage = Usage()
    flow = entry("wwan0")
    for _ in range(3):  # 0.6 MB per look: 1.8 MB, and 2.4 would pass video's 2 MB
        flow.bytes_down += 600_000
        usage.update([(key(1), flow, "vlc", "video")], "d")
    assert usage.capped(POLICY) == {("video", "wwan0")}
    flow.tunnel = "wlan0"  # moved away: nothing more crosses wwan0 ...
    usage.update([(key(1), flow, "vlc", "video")], "d")
    assert usage.capped(POLICY) == {("video", "wwan0")}  # ... but it stays closed today
    usage.update([(key(1), flow, "vlc", "video")], "next day")
    assert usage.capped(POLICY) == frozenset()


def test_a_cap_parks_the_flows_of_an_immovable_app_and_they_come_back() -> None:
    pinned = parse_policy(
        '[interfaces.wwan0]\ncap_mb = 1\n[apps.rsync]\ninterfaces = ["wwan0"]\nmovable = false\n',
        "policy.toml",
        fallback_interfaces=["wlan0", "wwan0"],
    )
    s = Steering(pinned, hold_down=10.0)
    s.set_up("wwan0", 0.0)
    s.set_capped(frozenset({("*", "wwan0")}))
    move = s.target(key(1), "wwan0", "rsync", None, False, 1.0)
    assert move is not None and (move.target, move.reason) == (BLOCKED, "cap")
    assert s.view.decide("rsync", None).movable is False  # parked, still not movable
    s.set_capped(frozenset())
    back = s.target(key(1), BLOCKED, "rsync", None, False, 2.0)
    assert back is not None and back.target == "wwan0"


def test_a_redundant_flow_counts_on_both_its_interfaces() -> None:
    usage = Usage()
    pair = entry("wlan0", up=3 * MB)
    pair.twin = "wwan0"
    usage.update([(key(1), pair, "voip", "default")], "2026-12-01")
    assert usage.interfaces == {"wlan0": 3 * MB, "wwan0": 3 * MB}
