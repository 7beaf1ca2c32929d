"""Tunnel identity and liveness, sans-IO: time comes in, probes and verdicts go out.

Theory of operation. The MH sends a PROBE on every tunnel each ``interval``
seconds; the AN answers each with a PROBE-ACK. A probe that has not been
answered by the time the next one is sent counts as a miss; ``dead_after``
consecutive misses make the tunnel DEAD, so a silent path is noticed after
about ``dead_after * interval`` seconds. Any valid ack — even a late one, for a
probe that was already counted as missed — proves the path works: it resets
the misses and brings a DEAD tunnel back UP.

An ack is valid only if it names this tunnel, a sequence number still in the
window of the last ``window`` probes, and echoes that probe's timestamp.
Sequence numbers are u32 and wrap; they are matched by equality within the
window, never compared by size, so the wrap needs no special case. Duplicate
acks find their probe already gone and are counted as stale, which keeps a
replayed ack from producing a second RTT sample.

The RTT is smoothed as in RFC 6298 §2 (alpha = 1/8, beta = 1/4). Each probe carries
its own sequence number and timestamp, so there is no retransmission
ambiguity and Karn's rule has nothing to exclude. Jitter and loss over
sliding windows are kept as `tunnel.quality` computes them.

Probing adapts to traffic. An idle tunnel is probed every ``interval``
seconds (a keepalive). While the tunnel carries traffic (`set_active`) it is
probed every ``active_interval`` seconds, and it is DEAD once no ack came
for `BUSY_SILENCE` seconds and for its retransmission timeout (RFC 6298:
SRTT + 4 RTTVAR), with at least as many misses in a row as span
`BUSY_SILENCE`: a path that carries traffic and goes silent is declared
DEAD within about a second, a lossy one (15 % each way) is not taken for
dead (seven misses in a row at 0.1 s), nor a slow one whose acks are on
their way (a late ack resets the misses). The fast verdict needs another
tunnel to the anchor that still answers (`set_active`'s `elsewhere`): when
all fall silent at once it is the anchor (a restart in place), and the
keepalive's ``dead_after * interval`` applies. Idle links get no more probes
than before.

The daemon owns the clocks: ``now`` (seconds, the event loop's clock) drives
scheduling, ``now_ns`` (a monotonic nanosecond clock) goes into the probe and
measures the RTT.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Final

from tunnel.frames import Probe, ProbeAck
from tunnel.quality import DEFAULT_WINDOWS, Jitter, LossWindows, PathQuality

__all__ = [
    "BUSY_SILENCE",
    "LivenessEvent",
    "ProbeScheduler",
    "ProbeStatistics",
    "TunnelState",
]

_SEQ_MOD: Final = 1 << 32
_TIMESTAMP_MOD: Final = 1 << 64
_TUNNEL_ID_MAX: Final = 0xFFFF_FFFF

# A busy tunnel is DEAD after this much silence (and at least `dead_after` misses).
BUSY_SILENCE: Final = 0.7

# RFC 6298 §2.3.
_ALPHA: Final = 1 / 8
_BETA: Final = 1 / 4


class TunnelState(Enum):
    """Liveness of one tunnel, as the MH sees it."""

    SETTING_UP = "setting-up"  # probing, no ack yet
    UP = "up"  # acks are coming back
    DEAD = "dead"  # ``dead_after`` probes in a row went unanswered


class LivenessEvent(Enum):
    """Inputs of the tunnel state machine."""

    ACKED = "acked"  # a valid PROBE-ACK arrived
    SILENT = "silent"  # the miss counter reached ``dead_after``


# The whole state machine. SILENT fires only when the miss counter crosses the
# limit, so DEAD never sees it; an input with no entry is a bug, not a no-op.
_TRANSITIONS: Final[dict[TunnelState, dict[LivenessEvent, TunnelState]]] = {
    TunnelState.SETTING_UP: {
        LivenessEvent.ACKED: TunnelState.UP,
        LivenessEvent.SILENT: TunnelState.DEAD,
    },
    TunnelState.UP: {
        LivenessEvent.ACKED: TunnelState.UP,
        LivenessEvent.SILENT: TunnelState.DEAD,
    },
    TunnelState.DEAD: {
        LivenessEvent.ACKED: TunnelState.UP,
    },
}


@dataclass(frozen=True, slots=True)
class ProbeStatistics:
    """A snapshot of one scheduler's counters and estimates."""

    tunnel_id: int
    state: TunnelState
    probes_sent: int
    acks_received: int
    stale_acks: int
    consecutive_misses: int
    last_heard: float | None
    srtt: float | None
    rttvar: float | None
    latest_rtt: float | None
    min_rtt: float | None
    observed: tuple[str, int] | None


@dataclass(slots=True)
class _Outstanding:
    sent_at: float
    timestamp_ns: int


class ProbeScheduler:
    """Keepalive and liveness for one tunnel (see the module docstring)."""

    def __init__(
        self,
        tunnel_id: int,
        *,
        interval: float,
        dead_after: int,
        window: int = 16,
        initial_seq: int = 0,
        active_interval: float | None = None,
        loss_windows: tuple[float, ...] = DEFAULT_WINDOWS,
    ) -> None:
        if not 0 <= tunnel_id <= _TUNNEL_ID_MAX:
            raise ValueError(f"tunnel_id {tunnel_id} is not a u32")
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval}")
        if dead_after < 1:
            raise ValueError(f"dead_after must be at least 1, not {dead_after}")
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        if not 0 <= initial_seq < _SEQ_MOD:
            raise ValueError(f"initial_seq {initial_seq} is not a u32")
        if active_interval is not None and not 0 < active_interval <= interval:
            raise ValueError(f"active_interval must be in (0, interval], not {active_interval}")
        self.tunnel_id: Final = tunnel_id
        self.interval: Final = interval
        self.dead_after: Final = dead_after
        self._window = window
        self._next_seq = initial_seq
        # seq -> when it was sent; insertion order is send order, so the
        # oldest entry is evicted first and wraparound does not matter.
        self._outstanding: OrderedDict[int, _Outstanding] = OrderedDict()
        self._last_seq: int | None = None
        self._last_acked = False
        self._last_sent_at: float | None = None
        self._state = TunnelState.SETTING_UP
        self._probes_sent = 0
        self._acks_received = 0
        self._stale_acks = 0
        self._misses = 0
        self._last_heard: float | None = None
        self._srtt: float | None = None
        self._rttvar: float | None = None
        self._latest_rtt: float | None = None
        self._min_rtt: float | None = None
        self._observed: tuple[str, int] | None = None
        self.active_interval: Final = active_interval
        self._first_sent_at: float | None = None
        self._active = False
        self._elsewhere = True
        self._jitter = Jitter()
        self._acks_for_jitter = 0
        self._loss = LossWindows(loss_windows)

    def set_active(self, active: bool, *, elsewhere: bool = True) -> None:
        """Whether the tunnel carries traffic now (the data path's counters moved).

        `elsewhere`: whether another tunnel to the same anchor still answers.
        Only then is a busy tunnel's silence its own path's: when every tunnel
        goes quiet at once it is the anchor (a restart in place), and the
        keepalive's patience applies.
        """
        self._active = active
        self._elsewhere = elsewhere

    @property
    def current_interval(self) -> float:
        """The probe interval now: the keepalive's, or the faster one of a busy tunnel."""
        if not self._active or self.active_interval is None:
            return self.interval
        return self.active_interval

    def _silent_for_dead(self, now: float) -> bool:
        """Whether the misses in a row make the tunnel DEAD now.

        Idle: `dead_after` of them. Busy: enough of them to span `BUSY_SILENCE`,
        and no ack for `BUSY_SILENCE` nor for the path's own RTO (SRTT + 4
        RTTVAR), so that a slow path whose acks are still on their way is not
        taken for dead.
        """
        interval = self.current_interval
        if interval >= self.interval:
            return self._misses >= self.dead_after
        heard = self._last_heard if self._last_heard is not None else self._first_sent_at
        if not self._elsewhere:
            silence = now - (heard if heard is not None else now)
            return self._misses >= self.dead_after and silence >= self.dead_after * self.interval
        if self._misses < max(self.dead_after, math.ceil(BUSY_SILENCE / interval - 1e-9)):
            return False
        if self._last_heard is None:  # no ack yet: give the path the keepalive's time
            return now - (self._first_sent_at or now) >= self.dead_after * self.interval
        return now - self._last_heard >= max(BUSY_SILENCE, self._rto())

    def _rto(self) -> float:
        """SRTT + 4 RTTVAR (RFC 6298 without its 1 s floor), 0 before the first ack."""
        return 0.0 if self._srtt is None or self._rttvar is None else self._srtt + 4 * self._rttvar

    def quality(self, now: float, goodput: float = 0.0) -> PathQuality:
        """RTT, jitter, loss per window and `goodput` (given by the caller) at `now`.

        A probe missed less than `BUSY_SILENCE` or an RTO ago (the longer) is
        not counted as lost yet: its ack may be late, as on a path whose delay
        just grew beyond what the RTO knows.
        """
        return PathQuality(
            rtt=self._srtt,
            rttvar=self._rttvar,
            jitter=self._jitter.value if self._acks_for_jitter >= 2 else None,
            loss=self._loss.all(now, max(BUSY_SILENCE, self._rto())),
            goodput=goodput,
        )

    def _fire(self, event: LivenessEvent) -> None:
        self._state = _TRANSITIONS[self._state][event]

    def next_probe_at(self) -> float | None:
        """When the next probe is due; None before the first one (due at once)."""
        if self._last_sent_at is None:
            return None
        return self._last_sent_at + self.current_interval

    def make_probe(self, now: float, now_ns: int) -> Probe:
        """Create the next probe and remember it as outstanding.

        If the previous probe is still unanswered it becomes a miss here: the
        probe interval is the deadline for its ack. Probes keep to their grid:
        a wake-up a little late does not push every later probe back.
        """
        due = self.next_probe_at()
        on_time = due is not None and due <= now < due + self.current_interval
        slot = due if on_time and due is not None else now
        if self._last_seq is not None and not self._last_acked:
            self._loss.missed(self._last_seq)
            self._misses += 1
            if self._silent_for_dead(now) and self._state is not TunnelState.DEAD:
                self._fire(LivenessEvent.SILENT)
        seq = self._next_seq
        self._next_seq = (seq + 1) % _SEQ_MOD
        timestamp_ns = now_ns % _TIMESTAMP_MOD  # u64 on the wire
        # A u32 sequence cannot repeat within a window far smaller than 2**32,
        # but a re-used key would silently keep the old entry's position.
        self._outstanding.pop(seq, None)
        self._outstanding[seq] = _Outstanding(now, timestamp_ns)
        while len(self._outstanding) > self._window:
            self._outstanding.popitem(last=False)
        self._last_seq = seq
        self._last_acked = False
        self._last_sent_at = slot
        if self._first_sent_at is None:
            self._first_sent_at = now
        self._loss.sent(seq, now)
        self._probes_sent += 1
        return Probe(self.tunnel_id, seq, timestamp_ns, 0)

    def on_ack(self, ack: ProbeAck, now: float, now_ns: int) -> float | None:
        """Account for a PROBE-ACK; returns the RTT in seconds, or None if ignored.

        Ignored (and counted as stale): another tunnel's id, a sequence number
        outside the window or already acknowledged, a timestamp that does not
        echo the probe's.
        """
        if ack.tunnel_id != self.tunnel_id:
            self._stale_acks += 1
            return None
        sent = self._outstanding.get(ack.seq)
        if sent is None or sent.timestamp_ns != ack.timestamp_ns:
            self._stale_acks += 1
            return None
        del self._outstanding[ack.seq]
        # now_ns is from the same monotonic clock as the timestamp; the clamp
        # only guards against a caller mixing clocks.
        rtt = max(0, now_ns % _TIMESTAMP_MOD - sent.timestamp_ns) / 1e9
        self._update_rtt(rtt)
        self._jitter.add(rtt)
        self._acks_for_jitter += 1
        self._loss.received(ack.seq)
        if ack.seq == self._last_seq:
            self._last_acked = True
        self._acks_received += 1
        self._misses = 0
        self._last_heard = now
        self._observed = ack.observed
        self._fire(LivenessEvent.ACKED)
        return rtt

    def _update_rtt(self, rtt: float) -> None:
        self._latest_rtt = rtt
        self._min_rtt = rtt if self._min_rtt is None else min(self._min_rtt, rtt)
        if self._srtt is None or self._rttvar is None:
            # RFC 6298 §2.2: the first measurement.
            self._srtt = rtt
            self._rttvar = rtt / 2
        else:
            # RFC 6298 §2.3: RTTVAR first, with the old SRTT.
            self._rttvar = (1 - _BETA) * self._rttvar + _BETA * abs(self._srtt - rtt)
            self._srtt = (1 - _ALPHA) * self._srtt + _ALPHA * rtt

    @property
    def state(self) -> TunnelState:
        return self._state

    @property
    def dead(self) -> bool:
        return self._state is TunnelState.DEAD

    @property
    def rtt(self) -> float | None:
        """Smoothed RTT (SRTT) in seconds, None until the first ack."""
        return self._srtt

    @property
    def rttvar(self) -> float | None:
        return self._rttvar

    @property
    def last_heard(self) -> float | None:
        """``now`` of the last valid ack."""
        return self._last_heard

    @property
    def consecutive_misses(self) -> int:
        return self._misses

    @property
    def observed(self) -> tuple[str, int] | None:
        """The tunnel's source address as the AN last saw it (its TID)."""
        return self._observed

    def statistics(self) -> ProbeStatistics:
        return ProbeStatistics(
            tunnel_id=self.tunnel_id,
            state=self._state,
            probes_sent=self._probes_sent,
            acks_received=self._acks_received,
            stale_acks=self._stale_acks,
            consecutive_misses=self._misses,
            last_heard=self._last_heard,
            srtt=self._srtt,
            rttvar=self._rttvar,
            latest_rtt=self._latest_rtt,
            min_rtt=self._min_rtt,
            observed=self._observed,
        )
