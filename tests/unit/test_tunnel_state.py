"""Probe-based tunnel liveness, driven by a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.frames import Probe, ProbeAck, ack_probe
from tunnel.state import ProbeScheduler, TunnelState

OBSERVED = ("203.0.113.7", 40000)


class FakeClock:
    """One clock, read in seconds (event loop) and nanoseconds (timestamps)."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    @property
    def ns(self) -> int:
        return round(self.now * 1e9)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def send(sched: ProbeScheduler, clock: FakeClock) -> Probe:
    return sched.make_probe(clock.now, clock.ns)


def answer(sched: ProbeScheduler, probe: Probe, clock: FakeClock) -> float | None:
    return sched.on_ack(ack_probe(probe, OBSERVED), clock.now, clock.ns)


def test_schedule() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(5, interval=1.0, dead_after=3)
    assert sched.next_probe_at() is None
    assert sched.state is TunnelState.SETTING_UP
    probe = send(sched, clock)
    assert probe == Probe(5, 0, clock.ns, 0)
    assert sched.next_probe_at() == pytest.approx(101.0)
    clock.advance(1.0)
    assert send(sched, clock).seq == 1
    assert sched.next_probe_at() == pytest.approx(102.0)


def test_rtt_smoothing_follows_rfc6298() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=1.0, dead_after=3)
    samples = [0.100, 0.200, 0.050, 0.100]
    srtt = rttvar = 0.0
    for i, sample in enumerate(samples):
        probe = send(sched, clock)
        clock.advance(sample)
        rtt = answer(sched, probe, clock)
        assert rtt == pytest.approx(sample)
        if i == 0:
            srtt, rttvar = sample, sample / 2
        else:
            rttvar = 0.75 * rttvar + 0.25 * abs(srtt - sample)
            srtt = 0.875 * srtt + 0.125 * sample
        assert sched.rtt == pytest.approx(srtt)
        assert sched.rttvar == pytest.approx(rttvar)
        clock.advance(1.0 - sample)
    stats = sched.statistics()
    assert stats.latest_rtt == pytest.approx(0.100)
    assert stats.min_rtt == pytest.approx(0.050)
    assert stats.acks_received == 4
    assert stats.probes_sent == 4
    assert stats.observed == OBSERVED
    assert sched.state is TunnelState.UP


def test_k_misses_make_dead_and_an_ack_revives() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=1.0, dead_after=3)
    answer(sched, send(sched, clock), clock)
    assert sched.state is TunnelState.UP
    clock.advance(1.0)
    probes = [send(sched, clock)]
    for expected_misses in (1, 2):
        clock.advance(1.0)
        probes.append(send(sched, clock))
        assert sched.consecutive_misses == expected_misses
        assert not sched.dead
    clock.advance(1.0)
    probes.append(send(sched, clock))
    assert sched.consecutive_misses == 3
    assert sched.dead
    assert sched.statistics().state is TunnelState.DEAD
    clock.advance(1.0)
    send(sched, clock)
    assert sched.consecutive_misses == 4
    assert sched.dead
    # The path comes back: the ack of the latest probe revives the tunnel.
    clock.advance(0.01)
    rtt = answer(sched, probes[-1], clock)
    assert rtt == pytest.approx(1.01)
    assert sched.state is TunnelState.UP
    assert sched.consecutive_misses == 0
    assert sched.last_heard == pytest.approx(clock.now)


def test_never_answered_goes_from_setting_up_to_dead() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=0.5, dead_after=1)
    send(sched, clock)
    assert sched.state is TunnelState.SETTING_UP
    clock.advance(0.5)
    send(sched, clock)
    assert sched.dead
    assert sched.last_heard is None
    assert sched.rtt is None


def test_late_ack_counts_as_alive() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=1.0, dead_after=3)
    first = send(sched, clock)
    clock.advance(1.0)
    send(sched, clock)
    assert sched.consecutive_misses == 1
    clock.advance(0.5)
    assert answer(sched, first, clock) == pytest.approx(1.5)
    assert sched.consecutive_misses == 0
    # The latest probe is still unanswered, so the next send is a miss again.
    clock.advance(0.5)
    send(sched, clock)
    assert sched.consecutive_misses == 1


def test_duplicate_and_stale_acks_are_ignored() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=1.0, dead_after=3, window=4)
    probes = []
    for _ in range(6):
        probes.append(send(sched, clock))
        clock.advance(1.0)
    # Out of the window of 4: forgotten.
    assert answer(sched, probes[0], clock) is None
    assert answer(sched, probes[1], clock) is None
    assert answer(sched, probes[5], clock) is not None
    # Duplicate.
    assert answer(sched, probes[5], clock) is None
    # Out of order, but still in the window.
    assert answer(sched, probes[3], clock) is not None
    # Wrong tunnel id, wrong timestamp, never-sent seq.
    p4 = probes[4]
    assert (
        sched.on_ack(ProbeAck(2, p4.seq, p4.timestamp_ns, 0, OBSERVED), clock.now, clock.ns) is None
    )
    assert sched.on_ack(ProbeAck(1, p4.seq, 12345, 0, OBSERVED), clock.now, clock.ns) is None
    assert sched.on_ack(ProbeAck(1, 999, p4.timestamp_ns, 0, OBSERVED), clock.now, clock.ns) is None
    stats = sched.statistics()
    assert stats.acks_received == 2
    assert stats.stale_acks == 6
    # The genuine ack still works after the forgeries.
    assert answer(sched, p4, clock) is not None


def test_stale_ack_does_not_revive() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=1.0, dead_after=2, window=2)
    old = send(sched, clock)
    for _ in range(3):
        clock.advance(1.0)
        send(sched, clock)
    assert sched.dead
    assert answer(sched, old, clock) is None
    assert sched.dead


def test_sequence_wraps() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=1.0, dead_after=5, window=4, initial_seq=0xFFFF_FFFE)
    probes = []
    for _ in range(4):
        probes.append(send(sched, clock))
        clock.advance(0.25)
    assert [p.seq for p in probes] == [0xFFFF_FFFE, 0xFFFF_FFFF, 0, 1]
    # Answer across the wrap, newest first.
    for probe in reversed(probes):
        assert answer(sched, probe, clock) is not None
    assert sched.statistics().acks_received == 4
    assert sched.consecutive_misses == 0


def test_observed_tracks_the_latest_ack() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=1.0, dead_after=3)
    probe = send(sched, clock)
    sched.on_ack(ack_probe(probe, ("198.51.100.1", 1)), clock.now, clock.ns)
    probe = send(sched, clock)
    # The NAT re-mapped the tunnel: the AN now sees another port.
    sched.on_ack(ack_probe(probe, ("198.51.100.1", 2)), clock.now, clock.ns)
    assert sched.observed == ("198.51.100.1", 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0.0, "dead_after": 3},
        {"interval": 1.0, "dead_after": 0},
        {"interval": 1.0, "dead_after": 3, "window": 0},
        {"interval": 1.0, "dead_after": 3, "initial_seq": 1 << 32},
    ],
)
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ProbeScheduler(1, **kwargs)  # type: ignore[arg-type]


@given(
    st.lists(st.tuples(st.booleans(), st.floats(0.001, 0.9)), min_size=1, max_size=60),
    st.integers(1, 5),
)
def test_liveness_matches_naive_model(pattern: list[tuple[bool, float]], dead_after: int) -> None:
    """Each probe is answered (after ``delay``, within the interval) or not.

    Naive model: misses = unanswered probes in a row before the newest, and
    zero once the newest is answered; dead once they reach ``dead_after``.
    """
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=1.0, dead_after=dead_after, initial_seq=0xFFFF_FFF0)
    answered: list[bool] = []
    for acked, delay in pattern:
        probe = send(sched, clock)
        if acked:
            clock.advance(delay)
            assert answer(sched, probe, clock) == pytest.approx(delay)
            clock.advance(1.0 - delay)
        else:
            clock.advance(1.0)
        answered.append(acked)
        misses = 0
        if not answered[-1]:
            for ok in reversed(answered[:-1]):
                if ok:
                    break
                misses += 1
        assert sched.consecutive_misses == misses
        assert sched.dead is (misses >= dead_after)
        ever = any(answered)
        expected = (
            TunnelState.DEAD
            if misses >= dead_after
            else TunnelState.UP
            if ever
            else TunnelState.SETTING_UP
        )
        assert sched.state is expected
