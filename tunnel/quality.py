"""What a tunnel's probes and counters say about its path, sans-IO: time comes in.

The measurement entity of the paper's terminal. Each estimator is fed by
`tunnel.state.ProbeScheduler` (probes sent, acks, misses) or by the data
path's per-tunnel byte counters, and read by status and by the per-app
decisions:

* **RTT**: RFC 6298 §2 (kept by the scheduler: SRTT, RTTVAR).
* **Jitter**: RFC 3550 §6.4.1 on the probes' round trips: for consecutive
  acknowledged probes i and j, D = (R_j - S_j) - (R_i - S_i), the change
  of the round-trip transit time, and J += (|D| - J) / 16.
* **Loss**: per probe, acknowledged or missed (a late ack turns a miss back
  into a received probe), over sliding windows (5 s, 30 s and 2 min by
  default): the share of the probes sent in the window whose fate is known
  that were missed. Probes still waiting for their ack are not counted, nor
  misses younger than the caller's `pending` time (the scheduler's: 0.7 s or
  the RTO, the longer): on a path whose RTT exceeds the probe interval every
  probe is a miss when the next one leaves, until its late ack comes.
* **Goodput**: bits per second that the data path moved over the tunnel,
  both ways, from its cumulative byte counter, over the last sampling period.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_WINDOWS", "Goodput", "Jitter", "LossWindows", "PathQuality"]

DEFAULT_WINDOWS: Final = (5.0, 30.0, 120.0)
_MAX_PROBES: Final = 4096  # bounds memory whatever the probe rate
_OUTSTANDING, _RECEIVED, _MISSED = 0, 1, 2


class Jitter:
    """RFC 3550 §6.4.1 interarrival jitter, on round-trip transit times."""

    __slots__ = ("_last", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self._last: float | None = None

    def add(self, transit: float) -> float:
        """One acknowledged probe's round trip (seconds); returns the jitter."""
        if self._last is not None:
            self.value += (abs(transit - self._last) - self.value) / 16
        self._last = transit
        return self.value


class _Probe:
    __slots__ = ("sent_at", "state")

    def __init__(self, sent_at: float) -> None:
        self.sent_at = sent_at
        self.state = _OUTSTANDING


class LossWindows:
    """Probe loss over sliding windows of the last seconds."""

    def __init__(self, windows: tuple[float, ...] = DEFAULT_WINDOWS) -> None:
        if not windows or any(w <= 0 for w in windows):
            raise ValueError(f"loss windows must be positive seconds, not {windows}")
        self.windows: Final = tuple(sorted(windows))
        self._probes: deque[_Probe] = deque()
        self._by_seq: dict[int, _Probe] = {}
        self._seqs: deque[int] = deque()

    def sent(self, seq: int, now: float) -> None:
        probe = _Probe(now)
        self._probes.append(probe)
        self._seqs.append(seq)
        self._by_seq[seq] = probe
        horizon = now - self.windows[-1]
        while self._probes and (
            self._probes[0].sent_at < horizon or len(self._probes) > _MAX_PROBES
        ):
            self._probes.popleft()
            self._by_seq.pop(self._seqs.popleft(), None)

    def received(self, seq: int) -> None:
        probe = self._by_seq.get(seq)
        if probe is not None:
            probe.state = _RECEIVED

    def missed(self, seq: int) -> None:
        probe = self._by_seq.get(seq)
        if probe is not None and probe.state == _OUTSTANDING:
            probe.state = _MISSED

    def loss(self, window: float, now: float, pending: float = 0.0) -> float | None:
        """The share of probes lost among those sent in the last `window` s; None: none known.

        A miss sent less than `pending` seconds ago may still be answered: unknown yet.
        """
        since, recent = now - window, now - pending
        known = lost = 0
        for probe in reversed(self._probes):
            if probe.sent_at < since:
                break
            if probe.state == _RECEIVED or (probe.state == _MISSED and probe.sent_at <= recent):
                known += 1
                lost += probe.state == _MISSED
        return lost / known if known else None

    def all(self, now: float, pending: float = 0.0) -> dict[str, float | None]:
        """Every window's loss, keyed "5s", "30s", "120s"."""
        return {f"{w:g}s": self.loss(w, now, pending) for w in self.windows}


class Goodput:
    """Bits per second over the last sample, from a cumulative byte counter."""

    __slots__ = ("_at", "_bytes", "bits_per_second")

    def __init__(self) -> None:
        self.bits_per_second = 0.0
        self._bytes: int | None = None
        self._at = 0.0

    def sample(self, total_bytes: int, now: float) -> float:
        if self._bytes is not None and now > self._at:
            moved = max(0, total_bytes - self._bytes)
            self.bits_per_second = moved * 8 / (now - self._at)
        if self._bytes is None or now > self._at:
            self._bytes, self._at = total_bytes, now
        return self.bits_per_second


@dataclass(frozen=True, slots=True)
class PathQuality:
    """One tunnel's figures at one moment, for status and decisions."""

    rtt: float | None  # SRTT, seconds
    rttvar: float | None
    jitter: float | None  # seconds; None before two acks
    loss: dict[str, float | None]  # per window ("5s", "30s", "120s")
    goodput: float  # bits per second, both ways
