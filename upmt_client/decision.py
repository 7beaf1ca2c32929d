"""The automatic choice of an `auto` application's interface (sans-IO: figures and time in).

The overall control entity of the paper's terminal, per application. The
candidates are the live tunnels of the application's ``interfaces``, each
with its measurements (`tunnel.quality.PathQuality`) and the interface's
cost from the policy. A candidate is *acceptable* when it breaks none of
the application's criteria (``max_loss`` over the 30 s window,
``max_rtt_ms``, ``max_jitter_ms``; an unknown figure breaks nothing). The
choice is the cheapest acceptable candidate, ties broken by quality; with
none acceptable, the best quality. Quality is a score, lower is better: the
MIP-SIP paper's RNL = SRTT + c * jitter (c = 4) plus 10 ms per percent of
loss.

It never ping-pongs:

* **dwell**: an application stays at least `DWELL` seconds where it was moved;
* **hysteresis**: while the current interface is acceptable the application
  moves only to a cheaper acceptable one, or to one as cheap whose score is
  better by `MARGIN_MS` (the paper's `U_new < U_old - a`); while nothing is
  acceptable, only to a score better by `MARGIN_MS`;
* **hold-down**: it moves to another acceptable interface for cost or
  quality only once that one has met the criteria for `hold_down` seconds
  without a break. Only a current interface that breaks the criteria is
  left at once for an acceptable one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from tunnel.quality import PathQuality
from upmt_client.policy import AppPolicy, Criteria

__all__ = [
    "DWELL",
    "LOSS_WINDOW",
    "MARGIN_MS",
    "AppDecision",
    "Candidate",
    "Verdict",
    "breaks",
    "choose",
    "score",
]

LOSS_WINDOW: Final = "30s"
JITTER_WEIGHT: Final = 4.0  # c in RNL = SRTT + c * jitter
LOSS_WEIGHT_MS: Final = 1000.0  # a whole share of loss weighs as much as 1 s of RNL
MARGIN_MS: Final = 20.0
DWELL: Final = 5.0


@dataclass(frozen=True, slots=True)
class Candidate:
    interface: str
    quality: PathQuality
    cost: float


@dataclass(frozen=True, slots=True)
class Verdict:
    interface: str | None  # None: no live candidate, nothing to choose
    reason: str  # "quality" or "cost"; "" when nothing changed
    detail: str  # the figures behind it, for the handover record and the log
    moved: bool


@dataclass(slots=True)
class AppDecision:
    """One application's standing choice, across re-evaluations."""

    interface: str | None = None
    since: float = float("-inf")
    good_since: dict[str, float] = field(default_factory=dict)


def score(quality: PathQuality) -> float:
    """RNL plus the loss penalty, in ms; lower is better."""
    rtt = (quality.rtt or 0.0) * 1000
    jitter = (quality.jitter or 0.0) * 1000
    loss = quality.loss.get(LOSS_WINDOW) or 0.0
    return rtt + JITTER_WEIGHT * jitter + LOSS_WEIGHT_MS * loss


def breaks(criteria: Criteria, quality: PathQuality) -> list[str]:
    """The criteria `quality` breaks, each with its figures ("loss 15.0% > 2.0%")."""
    out = []
    loss = quality.loss.get(LOSS_WINDOW)
    if criteria.max_loss is not None and loss is not None and loss > criteria.max_loss:
        out.append(f"loss {loss:.1%} > {criteria.max_loss:.1%}")
    if criteria.max_rtt_ms is not None and quality.rtt is not None:
        rtt = quality.rtt * 1000
        if rtt > criteria.max_rtt_ms:
            out.append(f"rtt {rtt:.0f} ms > {criteria.max_rtt_ms:g} ms")
    if criteria.max_jitter_ms is not None and quality.jitter is not None:
        jitter = quality.jitter * 1000
        if jitter > criteria.max_jitter_ms:
            out.append(f"jitter {jitter:.1f} ms > {criteria.max_jitter_ms:g} ms")
    return out


def _cheapest(c: Candidate) -> tuple[float, float]:
    return c.cost, score(c.quality)


def _figures(c: Candidate) -> str:
    q = c.quality
    loss = q.loss.get(LOSS_WINDOW)
    parts = [f"{c.interface}: score {score(q):.0f}", f"cost {c.cost:g}"]
    if q.rtt is not None:
        parts.append(f"rtt {q.rtt * 1000:.1f} ms")
    if loss is not None:
        parts.append(f"loss {loss:.1%}")
    return ", ".join(parts)


def choose(
    policy: AppPolicy,
    candidates: Sequence[Candidate],
    state: AppDecision,
    now: float,
    hold_down: float,
) -> Verdict:
    """Where `policy`'s application should be now; updates `state` when it moves."""
    failing = {c.interface: breaks(policy.criteria, c.quality) for c in candidates}
    for c in candidates:
        if failing[c.interface]:
            state.good_since.pop(c.interface, None)
        else:
            state.good_since.setdefault(c.interface, now)
    for gone in set(state.good_since) - set(failing):
        del state.good_since[gone]
    if not candidates:
        return Verdict(None, "", "no live tunnel", False)
    acceptable = [c for c in candidates if not failing[c.interface]]
    current = next((c for c in candidates if c.interface == state.interface), None)
    if current is None:  # the first choice (or the old one went away)
        if acceptable:
            target = min(acceptable, key=_cheapest)
            return _move(state, target, "cost", _figures(target), now, first=True)
        target = min(candidates, key=lambda c: score(c.quality))
        return _move(
            state, target, "quality", f"none acceptable; {_figures(target)}", now, first=True
        )
    if now - state.since < DWELL:
        return Verdict(current.interface, "", "dwell", False)
    if not failing[current.interface]:
        return _stay_or_improve(current, acceptable, state, now, hold_down)
    broken = "; ".join(failing[current.interface])
    if acceptable:
        target = min(acceptable, key=_cheapest)
        detail = f"{current.interface}: {broken}; {_figures(target)}"
        return _move(state, target, "quality", detail, now)
    better = [c for c in candidates if score(c.quality) < score(current.quality) - MARGIN_MS]
    if not better:
        return Verdict(current.interface, "", f"none acceptable; {broken}", False)
    target = min(better, key=lambda c: score(c.quality))
    detail = f"none acceptable; {_figures(current)}; {_figures(target)}"
    return _move(state, target, "quality", detail, now)


def _stay_or_improve(
    current: Candidate,
    acceptable: list[Candidate],
    state: AppDecision,
    now: float,
    hold_down: float,
) -> Verdict:
    """The current interface is acceptable: move only for a clear, lasting gain."""
    here = score(current.quality)
    better = [
        c
        for c in acceptable
        if c is not current
        and now - state.good_since.get(c.interface, now) >= hold_down
        and (
            c.cost < current.cost
            or (c.cost == current.cost and score(c.quality) < here - MARGIN_MS)
        )
    ]
    if not better:
        return Verdict(current.interface, "", "acceptable", False)
    target = min(better, key=_cheapest)
    reason = "cost" if target.cost < current.cost else "quality"
    return _move(state, target, reason, f"{_figures(current)}; {_figures(target)}", now)


def _move(
    state: AppDecision,
    target: Candidate,
    reason: str,
    detail: str,
    now: float,
    *,
    first: bool = False,
) -> Verdict:
    state.interface = target.interface
    state.since = now
    return Verdict(target.interface, reason, detail, not first)
