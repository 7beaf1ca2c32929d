"""The path estimators against hand-computed sequences, and adaptive probing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_tunnel_state import FakeClock, answer, send
from tunnel.frames import Probe
from tunnel.quality import Goodput, Jitter, LossWindows
from tunnel.state import ProbeScheduler


def test_jitter_follows_rfc3550_on_hand_computed_transits() -> None:
    jitter = Jitter()
    # Transit times 100, 120, 110, 150 ms: D = 20, 10, 40 ms.
    assert jitter.add(0.100) == 0.0
    assert jitter.add(0.120) == pytest.approx(0.02 / 16)  # 0.00125
    assert jitter.add(0.110) == pytest.approx(0.00125 + (0.01 - 0.00125) / 16)  # 0.001796875
    assert jitter.add(0.150) == pytest.approx(0.0041845703125)


def test_jitter_of_a_constant_path_is_zero_and_of_a_square_wave_approaches_its_step() -> None:
    jitter = Jitter()
    for _ in range(50):
        jitter.add(0.030)
    assert jitter.value == 0.0
    for i in range(400):
        jitter.add(0.030 if i % 2 else 0.050)
    assert jitter.value == pytest.approx(0.020, rel=1e-6)  # J converges to |D|


def test_rtt_follows_rfc6298() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=1.0, dead_after=3)
    for rtt in (0.100, 0.200):
        probe = send(sched, clock)
        clock.advance(rtt)
        answer(sched, probe, clock)
        clock.advance(1.0 - rtt)
    # First sample: SRTT = R, RTTVAR = R/2; then RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R'|.
    assert sched.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.1)  # 0.0625
    assert sched.rtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.2)  # 0.1125


def test_loss_per_window_counts_only_probes_whose_fate_is_known() -> None:
    windows = LossWindows((5.0, 30.0))
    # One probe a second for 30 s; every 4th missed; the last one still outstanding.
    for t in range(30):
        windows.sent(t, float(t))
        if t == 29:
            break
        if t % 4 == 0:
            windows.missed(t)
        else:
            windows.received(t)
    now = 29.5
    # 30 s window: probes 0..28 known, of which 0, 4, ..., 28 missed: 8 of 29.
    assert windows.loss(30.0, now) == pytest.approx(8 / 29)
    # 5 s window: probes sent at 25..29 (24.5 is the bound): 25..28 known, 28 missed.
    assert windows.loss(5.0, now) == pytest.approx(1 / 4)
    assert windows.all(now) == {"5s": pytest.approx(0.25), "30s": pytest.approx(8 / 29)}


def test_a_late_ack_turns_a_miss_back_into_a_received_probe() -> None:
    windows = LossWindows((10.0,))
    windows.sent(7, 0.0)
    windows.missed(7)
    assert windows.loss(10.0, 1.0) == 1.0
    windows.received(7)
    assert windows.loss(10.0, 1.0) == 0.0
    windows.missed(7)  # a second miss for a received probe changes nothing
    assert windows.loss(10.0, 1.0) == 0.0


def test_loss_forgets_what_left_the_longest_window() -> None:
    windows = LossWindows((5.0, 10.0))
    windows.sent(1, 0.0)
    windows.missed(1)
    windows.sent(2, 11.0)
    windows.received(2)
    assert windows.loss(10.0, 11.0) == 0.0
    windows.received(1)  # long gone: ignored
    assert windows.loss(5.0, 100.0) is None


@given(st.lists(st.tuples(st.booleans(), st.floats(0.01, 2.0)), min_size=1, max_size=300))
def test_loss_agrees_with_a_naive_count(fates: list[tuple[bool, float]]) -> None:
    windows = LossWindows((5.0, 30.0))
    sent: list[tuple[float, bool]] = []
    t = 0.0
    for seq, (lost, gap) in enumerate(fates):
        t += gap
        windows.sent(seq, t)
        (windows.missed if lost else windows.received)(seq)
        sent.append((t, lost))
    for window in (5.0, 30.0):
        inside = [lost for at, lost in sent if at >= t - window]
        expected = sum(inside) / len(inside) if inside else None
        assert windows.loss(window, t) == (pytest.approx(expected) if inside else None)


def test_goodput_is_the_rate_of_the_last_sample() -> None:
    rate = Goodput()
    assert rate.sample(1000, 10.0) == 0.0
    assert rate.sample(126_000, 11.0) == 1_000_000.0  # 125 000 bytes in 1 s
    assert rate.sample(126_000, 11.0) == 1_000_000.0  # no time passed: unchanged
    assert rate.sample(126_000, 12.0) == 0.0


def test_scheduler_quality_holds_rtt_jitter_and_loss() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=0.5, dead_after=10)
    rng = random.Random(3)
    for i in range(40):
        probe = send(sched, clock)
        if i % 5 != 4:  # every fifth lost
            clock.advance(0.02 + rng.random() * 0.01)
            answer(sched, probe, clock)
        clock.advance(0.5 - (clock.now % 0.5))
    quality = sched.quality(clock.now, goodput=8000.0)
    assert quality.rtt is not None and 0.02 <= quality.rtt <= 0.03
    assert quality.jitter is not None and 0 < quality.jitter < 0.01
    assert quality.loss["30s"] == pytest.approx(8 / 39, abs=0.03)  # the last one still out
    assert quality.goodput == 8000.0


def test_a_busy_tunnel_is_probed_fast_and_an_idle_one_at_the_keepalive_rate() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=0.5, dead_after=4, active_interval=0.1)
    probe = send(sched, clock)
    clock.advance(0.001)
    answer(sched, probe, clock)
    assert sched.current_interval == 0.5
    sched.set_active(True)
    assert sched.current_interval == pytest.approx(0.1)
    sched.set_active(False)
    assert sched.current_interval == 0.5


def test_a_busy_tunnel_that_goes_silent_is_dead_within_a_second() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=0.5, dead_after=4, active_interval=0.1)
    sched.set_active(True)
    probe = send(sched, clock)
    clock.advance(0.001)
    answer(sched, probe, clock)
    silent_since = clock.now
    while not sched.dead:
        due = sched.next_probe_at()
        assert due is not None
        clock.now = max(clock.now, due)
        send(sched, clock)
    assert clock.now - silent_since <= 1.0


def test_a_slow_busy_path_is_not_taken_for_dead_and_a_bloated_one_dies_in_time() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=0.5, dead_after=4, active_interval=0.1)
    sched.set_active(True)
    # A 0.9 s path (a satellite hop and a queue): every ack comes nine probes later.
    outstanding: list[tuple[float, Probe]] = []
    for _ in range(100):
        due = sched.next_probe_at()
        clock.now = max(clock.now, due if due is not None else clock.now)
        outstanding.append((clock.now + 0.9, send(sched, clock)))
        while outstanding and outstanding[0][0] <= clock.now + 0.1:
            at, probe = outstanding.pop(0)
            clock.now = max(clock.now, at)
            answer(sched, probe, clock)
        assert not sched.dead
    with pytest.raises(ValueError):
        ProbeScheduler(1, interval=0.5, dead_after=4, active_interval=0.6)


def test_late_wake_ups_do_not_push_the_probes_back() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=0.5, dead_after=4, active_interval=0.1)
    sched.set_active(True)
    probe = send(sched, clock)
    start = clock.now
    clock.advance(0.001)
    answer(sched, probe, clock)  # the last answer: silence from here
    for _ in range(9):
        due = sched.next_probe_at()
        assert due is not None
        clock.now = due + 0.015  # every wake-up 15 ms late
        send(sched, clock)
    assert sched.dead  # 8 misses in 0.8 s of silence
    # The tenth probe is due on the grid, not 9 x 15 ms later.
    assert sched.next_probe_at() == pytest.approx(start + 1.0)


def test_when_every_tunnel_goes_quiet_a_busy_one_gets_the_keepalives_patience() -> None:
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=0.5, dead_after=4, active_interval=0.1)
    sched.set_active(True, elsewhere=False)  # no other tunnel hears the anchor either
    probe = send(sched, clock)
    start = clock.now
    clock.advance(0.001)
    answer(sched, probe, clock)
    while not sched.dead:
        due = sched.next_probe_at()
        assert due is not None
        clock.now = due
        send(sched, clock)
    assert 2.0 <= clock.now - start <= 2.2  # the anchor restarting, not this path failing


def test_a_miss_younger_than_the_pending_time_is_not_known_yet() -> None:
    # RTT 0.3 s, a probe every 0.1 s: the last probes are misses until their acks come.
    windows = LossWindows((5.0,))
    for seq in range(10):
        windows.sent(seq, seq * 0.1)
        if seq:
            windows.missed(seq - 1)
    for seq in range(6):
        windows.received(seq)  # acks of the probes sent up to 0.3 s before now
    now = 0.95
    assert windows.loss(5.0, now) == pytest.approx(3 / 9)  # 6, 7, 8 look lost
    assert windows.loss(5.0, now, pending=0.4) == 0.0  # sent within an RTO: not yet
    assert windows.all(now, pending=0.4) == {"5s": 0.0}


def test_a_path_that_just_got_slower_is_not_lossy() -> None:
    """RTT 1 ms, then 300 ms, probes every 0.1 s: the misses are late acks, not loss."""
    clock = FakeClock()
    sched = ProbeScheduler(1, interval=0.1, dead_after=50)
    for _ in range(20):
        probe = send(sched, clock)
        clock.advance(0.001)
        answer(sched, probe, clock)
        clock.advance(0.099)
    in_flight = []
    for _ in range(5):  # the delay grows: each probe's ack is 0.3 s away
        in_flight.append(send(sched, clock))
        clock.advance(0.1)
    assert sched.quality(clock.now).loss["5s"] == 0.0  # misses under 0.7 s: not known yet
    clock.advance(1.0)
    # Older than 0.7 s now: 4 misses of 24 known (the last probe is still outstanding).
    assert sched.quality(clock.now).loss["5s"] == pytest.approx(4 / 24)
    for probe in in_flight:  # late acks turn them back
        answer(sched, probe, clock)
    assert sched.quality(clock.now).loss["5s"] == 0.0
