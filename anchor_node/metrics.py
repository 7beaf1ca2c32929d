"""The anchor's Prometheus metrics, from its status (pure): terminals, tunnels, flows, counters.

Per terminal (labels `terminal_id`, `vipa`): its tunnels, flows and the
seconds left of its registration; per flow's terminal, bytes each way. The
data path's, SIP layers' and registrar's counters as counters (the names of
`anchor-node status`). Served by `upmt.metrics` with `--metrics`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from anchor_node.status import flow_bytes_by_vipa
from upmt.metrics import counter_families, gauge

__all__ = ["anchor_families"]

P = "upmt_anchor"


def anchor_families(st: dict[str, Any]) -> Iterator[Metric]:
    terminals = st["terminals"]
    yield gauge(f"{P}_terminals", "Associated terminals.", len(terminals))
    yield gauge(
        f"{P}_tunnels", "Tunnels of all terminals.", sum(len(t["tunnels"]) for t in terminals)
    )
    yield gauge(f"{P}_flows", "Flows in the forwarding table.", len(st["flows"]))
    labels = ["terminal_id", "vipa"]
    tunnels = GaugeMetricFamily(f"{P}_terminal_tunnels", "The terminal's tunnels.", labels=labels)
    flows = GaugeMetricFamily(f"{P}_terminal_flows", "The terminal's flows.", labels=labels)
    expiry = GaugeMetricFamily(
        f"{P}_terminal_registration_expires_seconds", "Until its registration ends.", labels=labels
    )
    moved = GaugeMetricFamily(
        f"{P}_terminal_flow_bytes",
        "Bytes of the terminal's live flows.",
        labels=[*labels, "direction"],
    )
    by_vipa = flow_bytes_by_vipa(st["flows"])
    for t in terminals:
        ids = [t["terminal_id"], t["vipa"]]
        tunnels.add_metric(ids, len(t["tunnels"]))
        flows.add_metric(ids, t["flows"])
        expiry.add_metric(ids, t["expires_in_s"])
        up, down = by_vipa.get(t["vipa"], (0, 0))
        moved.add_metric([*ids, "up"], up)
        moved.add_metric([*ids, "down"], down)
    yield from (tunnels, flows, expiry, moved)
    yield from counter_families(P, st["counters"], "Anchor counter")
