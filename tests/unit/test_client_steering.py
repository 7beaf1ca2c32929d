"""Steering: where new flows go and when existing flows move (pure, fake clock)."""

from upmt_client.policy import parse_policy
from upmt_client.steering import BLOCKED, Move, Steering, bypass_interface, bypass_tunnel

POLICY = """
[default]
interfaces = ["if0", "if1"]
[apps.curl]
interfaces = ["if1", "if0"]
[apps.rsync]
interfaces = ["if0"]
movable = false
[apps.telnet]
action = "block"
[apps.apt]
action = "bypass"
interfaces = ["if1", "if0"]
"""


def steering(hold_down: float = 10.0) -> Steering:
    s = Steering(parse_policy(POLICY, "p.toml", fallback_interfaces=["if0", "if1"]), hold_down)
    s.set_up("if0", 0.0)
    s.set_up("if1", 0.0)
    return s


def test_new_flows_follow_their_applications_policy() -> None:
    view = steering().view
    assert view.decide("curl", None).tunnel == "if1"
    assert view.decide(None, "curl").tunnel == "if1"  # executable name counts too
    assert view.decide("firefox", None).tunnel == "if0"
    assert view.decide(None, None).tunnel == "if0"
    assert view.decide("telnet", None).tunnel == BLOCKED
    assert view.decide("rsync", None).movable is False


def test_new_flows_skip_dead_interfaces_but_unmovable_ones_wait() -> None:
    s = steering()
    s.set_down("if0", "link down")
    assert s.view.decide("firefox", None).tunnel == "if1"
    assert s.view.decide("rsync", None).tunnel == "if0"  # waits for its interface
    s.set_down("if1", "probe loss")
    assert s.view.decide("firefox", None).tunnel is None


def test_dead_interface_moves_movable_flows_with_its_reason() -> None:
    s = steering()
    s.set_down("if0", "probe loss")
    assert s.target("k", "if0", "firefox", None, True, 5.0) == Move("if1", "probe loss")
    assert s.target("k", "if0", "rsync", None, False, 5.0) is None
    assert s.target("k", "if1", "curl", None, True, 5.0) is None


def test_return_waits_for_the_hold_down_but_a_policy_change_does_not() -> None:
    s = steering(hold_down=10.0)
    s.set_down("if0", "link down")
    s.set_up("if0", 100.0)
    assert s.target("k", "if1", "firefox", None, True, 105.0) is None
    assert s.target("k", "if1", "firefox", None, True, 110.0) == Move("if0", "return")
    # curl prefers if1, which never went down: no hold-down for a policy move.
    assert s.target("k", "if0", "curl", None, True, 100.5) == Move("if1", "policy")


def test_pins_beat_the_policy_while_their_interface_lives() -> None:
    s = steering()
    s.pin_app("fire*", "if1")
    assert s.view.decide("firefox", None).tunnel == "if1"
    assert s.target("k", "if0", "firefox", None, True, 1.0) == Move("if1", "pin")
    s.pin_flow("k2", "if0")
    assert s.target("k2", "if1", "curl", None, True, 1.0) == Move("if0", "pin")
    s.set_down("if1", "link down")
    assert s.target("k", "if1", "firefox", None, True, 2.0) == Move("if0", "link down")


def test_blocked_by_a_new_policy_and_blocked_flows_stay_blocked() -> None:
    s = steering()
    assert s.target("k", "if0", "telnet", None, True, 1.0) == Move(BLOCKED, "policy")
    assert s.target("k", BLOCKED, "telnet", None, True, 1.0) is None


REDUNDANT = """
[default]
interfaces = ["if0", "if1", "if2"]
[apps.voip]
interfaces = ["if1", "if0", "if2"]
redundant = true
"""


def test_a_redundant_app_gets_the_next_usable_interface_as_its_twin() -> None:
    s = Steering(parse_policy(REDUNDANT, "p.toml", fallback_interfaces=["if0"]), 10.0)
    for name in ("if0", "if1", "if2"):
        s.set_up(name, 0.0)
    decision = s.view.decide("voip", None)
    assert (decision.tunnel, decision.twin) == ("if1", "if0")
    assert s.view.decide("curl", None).twin is None  # not redundant
    s.set_down("if0", "probe loss")
    assert s.view.decide("voip", None).twin == "if2"
    s.set_down("if2", "link down")
    assert s.view.decide("voip", None).twin is None  # one interface left: alone on it


def test_a_bypass_app_leaves_on_its_first_live_interface_and_stays_there() -> None:
    s = steering()
    assert s.view.decide("apt", None).tunnel == bypass_tunnel("if1") == "!bypass:if1"
    assert s.view.decide("apt", None).movable is False
    assert bypass_interface("!bypass:if1") == "if1" and bypass_interface("if1") is None
    s.pin_app("apt", "if1")  # pins do not apply: the bypass has no mobility
    s.set_down("if1", "link down")
    assert s.view.decide("apt", None).tunnel == "!bypass:if0"
    # No mobility: a bypass flow stays on its interface, dead or not, and a
    # tunnelled flow of an app the policy now bypasses stays in its tunnel.
    assert s.target("k", "!bypass:if1", "apt", None, False, 2.0) is None
    assert s.target("k", "if1", "apt", None, True, 2.0) is None
    s.set_down("if0", "link down")
    assert s.view.decide("apt", None).tunnel is None
