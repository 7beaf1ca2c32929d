"""`upmt-client explain APP`: why an application is where it is (pure).

For the application's policy table: each of its interfaces with the
tunnel's figures, the criteria it meets or breaks, whether a daily cap
closed it, its cost and score, and
the standing decision (the automatic choice of an `auto` application, or
where steering sends its new flows, and the second interface of a
redundant one's).
"""

from __future__ import annotations

from typing import Any

from upmt_client.commands import milliseconds
from upmt_client.decision import LOSS_WINDOW, breaks, score
from upmt_client.host import MobileHost

__all__ = ["explain_json"]

JSON = dict[str, Any]


def explain_json(host: MobileHost, app: str, now: float) -> JSON:
    pol = host.policy.for_app(app, app)
    live = {c.interface: c for c in host.auto.candidates(pol, host.tunnels, now)}
    rows = []
    for name in pol.interfaces:
        candidate = live.get(name)
        row: JSON = {
            "interface": name,
            "live": candidate is not None,
            "capped": not host.steering.view.open_to(pol, name),
            "cost": host.policy.attributes(name).cost,
        }
        if candidate is not None:
            q = candidate.quality
            row.update(
                rtt_ms=milliseconds(q.rtt),
                jitter_ms=milliseconds(q.jitter),
                loss=q.loss.get(LOSS_WINDOW),
                score=round(score(q), 1),
                breaks=breaks(pol.criteria, q),
            )
            row["acceptable"] = not row["breaks"]
        rows.append(row)
    view = host.steering.view
    auto = view.auto_choice(pol)
    if auto is not None:
        reason, detail = auto.reason, auto.detail
    elif pol.auto:
        reason, detail = "order", "no automatic choice yet: the first live interface"
    else:
        reason, detail = "order", "not auto: the first live interface of the list"
    decision = view.decide(app, app)
    return {
        "app": app,
        "policy": pol.to_json(),
        "candidates": rows,
        "chosen": decision.tunnel,
        "twin": decision.twin,  # redundant: the second interface of its packets
        "reason": reason,
        "detail": detail,
    }
