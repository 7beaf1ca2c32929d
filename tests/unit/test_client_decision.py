"""The automatic choice of an `auto` application: tables of cases, hysteresis, dwell, hold-down."""

from __future__ import annotations

import pytest

from tunnel.quality import PathQuality
from upmt_client.decision import DWELL, AppDecision, Candidate, breaks, choose, score
from upmt_client.policy import AppPolicy, Criteria, parse_policy

CRITERIA = Criteria(max_loss=0.02, max_rtt_ms=150, max_jitter_ms=30)
ZOOM = AppPolicy("zoom", ("wlan0", "wwan0"), auto=True, criteria=CRITERIA)
HOLD = 10.0


def q(rtt_ms: float = 20, jitter_ms: float = 2, loss: float | None = 0.0) -> PathQuality:
    return PathQuality(
        rtt_ms / 1000, rtt_ms / 2000, jitter_ms / 1000, {"5s": loss, "30s": loss}, 0.0
    )


def cand(name: str, cost: float = 0.0, **figures: float) -> Candidate:
    return Candidate(name, q(**figures), cost)


def test_score_is_rnl_plus_loss() -> None:
    assert score(q(rtt_ms=40, jitter_ms=5, loss=0.01)) == pytest.approx(40 + 4 * 5 + 10)


@pytest.mark.parametrize(
    ("figures", "broken"),
    [
        ({}, []),
        ({"loss": 0.15}, ["loss 15.0% > 2.0%"]),
        ({"rtt_ms": 200}, ["rtt 200 ms > 150 ms"]),
        ({"jitter_ms": 45}, ["jitter 45.0 ms > 30 ms"]),
        ({"loss": 0.05, "rtt_ms": 300}, ["loss 5.0% > 2.0%", "rtt 300 ms > 150 ms"]),
    ],
)
def test_breaks_names_each_criterion_with_its_figures(
    figures: dict[str, float], broken: list[str]
) -> None:
    assert breaks(CRITERIA, q(**figures)) == broken


def test_unknown_figures_break_nothing() -> None:
    fresh = PathQuality(None, None, None, {"30s": None}, 0.0)
    assert breaks(CRITERIA, fresh) == []


@pytest.mark.parametrize(
    ("candidates", "chosen", "reason"),
    [
        # Both acceptable: the cheapest, whatever the quality.
        ([cand("wlan0", 0, rtt_ms=80), cand("wwan0", 5, rtt_ms=30)], "wlan0", "cost"),
        # Same cost: the better score.
        ([cand("wlan0", 1, rtt_ms=80), cand("wwan0", 1, rtt_ms=30)], "wwan0", "cost"),
        # The cheap one breaks the criteria: the acceptable one, though dearer.
        ([cand("wlan0", 0, loss=0.15), cand("wwan0", 5)], "wwan0", "cost"),
        # None acceptable: the best quality.
        ([cand("wlan0", 0, loss=0.30), cand("wwan0", 5, loss=0.05)], "wwan0", "quality"),
        # One live tunnel: that one.
        ([cand("wwan0", 5, loss=0.5)], "wwan0", "quality"),
    ],
)
def test_the_first_choice(candidates: list[Candidate], chosen: str, reason: str) -> None:
    state = AppDecision()
    verdict = choose(ZOOM, candidates, state, 100.0, HOLD)
    assert (verdict.interface, verdict.reason, verdict.moved) == (chosen, reason, False)
    assert state.interface == chosen


def test_no_live_tunnel_no_choice() -> None:
    verdict = choose(ZOOM, [], AppDecision(), 0.0, HOLD)
    assert verdict.interface is None and not verdict.reason


def settled(interface: str, since: float = 0.0) -> AppDecision:
    return AppDecision(interface, since, {"wlan0": since, "wwan0": since})


def test_loss_on_the_current_interface_moves_at_once_with_its_figures() -> None:
    state = settled("wlan0")
    verdict = choose(ZOOM, [cand("wlan0", 0, loss=0.15), cand("wwan0", 5)], state, 100.0, HOLD)
    assert (verdict.interface, verdict.reason, verdict.moved) == ("wwan0", "quality", True)
    assert "wlan0: loss 15.0% > 2.0%" in verdict.detail
    assert (state.interface, state.since) == ("wwan0", 100.0)


def test_dwell_keeps_a_fresh_choice_even_when_it_breaks_the_criteria() -> None:
    state = settled("wlan0", since=100.0)
    verdict = choose(
        ZOOM, [cand("wlan0", 0, loss=0.15), cand("wwan0", 5)], state, 100.0 + DWELL - 0.1, HOLD
    )
    assert (verdict.interface, verdict.moved) == ("wlan0", False)


def test_return_to_the_cheaper_interface_waits_for_the_hold_down() -> None:
    state = settled("wwan0")
    state.good_since.pop("wlan0")  # wlan0 was bad until now
    good = [cand("wlan0", 0), cand("wwan0", 5)]
    assert not choose(ZOOM, good, state, 100.0, HOLD).moved  # good since 100 only
    assert not choose(ZOOM, good, state, 100.0 + HOLD - 0.5, HOLD).moved
    verdict = choose(ZOOM, good, state, 100.0 + HOLD, HOLD)
    assert (verdict.interface, verdict.reason, verdict.moved) == ("wlan0", "cost", True)


def test_a_break_restarts_the_hold_down() -> None:
    state = settled("wwan0")
    state.good_since.pop("wlan0")
    good, bad = [cand("wlan0", 0), cand("wwan0", 5)], [cand("wlan0", 0, loss=0.1), cand("wwan0", 5)]
    choose(ZOOM, good, state, 100.0, HOLD)
    choose(ZOOM, bad, state, 105.0, HOLD)
    assert not choose(ZOOM, good, state, 111.0, HOLD).moved  # good again only since 111
    assert choose(ZOOM, good, state, 121.0, HOLD).moved


def test_hysteresis_between_equal_costs() -> None:
    state = settled("wlan0")
    slightly = [cand("wlan0", 1, rtt_ms=40), cand("wwan0", 1, rtt_ms=25)]  # 15 ms better
    assert not choose(ZOOM, slightly, state, 100.0, HOLD).moved
    clearly = [cand("wlan0", 1, rtt_ms=40), cand("wwan0", 1, rtt_ms=15)]  # 25 ms better
    verdict = choose(ZOOM, clearly, state, 100.0, HOLD)
    assert (verdict.interface, verdict.reason) == ("wwan0", "quality")


def test_with_nothing_acceptable_only_a_clearly_better_score_moves() -> None:
    state = settled("wlan0")
    both_bad = [cand("wlan0", 0, loss=0.10), cand("wwan0", 5, loss=0.09)]
    assert not choose(ZOOM, both_bad, state, 100.0, HOLD).moved
    much_better = [cand("wlan0", 0, loss=0.10), cand("wwan0", 5, loss=0.05)]
    assert choose(ZOOM, much_better, state, 100.0, HOLD).moved


def test_a_flapping_path_causes_no_ping_pong() -> None:
    state = AppDecision()
    moves = 0
    for step in range(600):  # 5 minutes, every half second; wlan0 lossy 3 s out of 6
        now = step * 0.5
        lossy = (step // 6) % 2 == 1
        candidates = [cand("wlan0", 0, loss=0.1 if lossy else 0.0), cand("wwan0", 5)]
        moves += choose(ZOOM, candidates, state, now, HOLD).moved
    assert moves == 1  # left wlan0 once, never back: it is never good for the hold-down


def test_policy_file_keys() -> None:
    policy = parse_policy(
        """
[interfaces.wwan0]
cost = 5
[apps.zoom]
interfaces = ["wlan0", "wwan0"]
auto = true
max_loss = 0.02
max_rtt_ms = 150
max_jitter_ms = 30
""",
        "p.toml",
        fallback_interfaces=["wlan0", "wwan0"],
    )
    zoom = policy.for_app("zoom")
    assert zoom.auto and zoom.criteria == CRITERIA
    assert policy.attributes("wwan0").cost == 5
    assert policy.attributes("wlan0").cost == 0  # not listed: free


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[apps.a]\nmax_loss = 2", "apps.a.max_loss: must be between 0 and 1, not 2"),
        ("[apps.a]\nmax_rtt_ms = -1", "apps.a.max_rtt_ms: must be >= 0, not -1"),
        ('[apps.a]\nmax_rtt_ms = "fast"', "apps.a.max_rtt_ms: must be a number, not a string"),
        ("[apps.a]\nauto = 1", "apps.a.auto: must be true or false, not an integer"),
        ("[interfaces.wwan0]\ncost = -2", "interfaces.wwan0.cost: must be >= 0, not -2"),
        ("[interfaces.wwan0]\nspeed = 2", "interfaces.wwan0.speed: unknown key"),
        ('[interfaces."a b"]\ncost = 1', "is not a valid interface name"),
        (
            '[apps.a]\naction = "block"\nauto = true',
            'apps.a.auto: not allowed with action = "block"',
        ),
        ("[apps.a]\nmax_loss = nan", "apps.a.max_loss: must be a finite number"),
    ],
)
def test_bad_policy_keys_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(Exception) as caught:
        parse_policy(text, "p.toml", fallback_interfaces=["if0"])
    assert message in str(caught.value) and "\n" not in str(caught.value)
