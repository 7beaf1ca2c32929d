"""The client's Prometheus metrics, from its status (pure): per tunnel and per application.

Per tunnel (label `interface`): whether it is up, smoothed RTT, jitter,
loss per window, goodput and bytes each way. Per application (labels `app`,
`interface`): its live flows and what they moved, and today's usage. The data
path's counters as counters. Served by `upmt.metrics` with `--metrics`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from upmt.metrics import counter_families
from upmt_client.flows import FlowBook

__all__ = ["client_families"]

P = "upmt_client"


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def client_families(st: dict[str, Any]) -> Iterator[Metric]:
    yield InfoMetricFamily(
        P,
        "The terminal, its VIPA and its anchor.",
        value={
            "terminal_id": str(st["terminal_id"]),
            "vipa": str(st["vipa"] or ""),
            "anchor": str(st["anchor"]),
        },
    )
    yield from _tunnels(st["tunnels"])
    yield from _apps(st["flows"], st["usage"])
    yield from counter_families(f"{P}_datapath", st.get("counters", {}), "Data-path counter")


def _tunnels(tunnels: list[dict[str, Any]]) -> Iterator[Metric]:
    up = GaugeMetricFamily(f"{P}_tunnel_up", "1 while the tunnel is up.", labels=["interface"])
    rtt = GaugeMetricFamily(
        f"{P}_tunnel_rtt_seconds", "Smoothed RTT of the probes (RFC 6298).", labels=["interface"]
    )
    jitter = GaugeMetricFamily(
        f"{P}_tunnel_jitter_seconds", "Jitter of the probes (RFC 3550).", labels=["interface"]
    )
    loss = GaugeMetricFamily(
        f"{P}_tunnel_loss_ratio", "Share of probes lost.", labels=["interface", "window"]
    )
    goodput = GaugeMetricFamily(
        f"{P}_tunnel_goodput_bits_per_second", "Data moved, both ways.", labels=["interface"]
    )
    moved = CounterMetricFamily(
        f"{P}_tunnel_bytes", "Inner bytes carried.", labels=["interface", "direction"]
    )
    for t in tunnels:
        name = t["interface"]
        up.add_metric([name], 1 if t["state"] == "up" else 0)
        if (value := _seconds(t["rtt_ms"])) is not None:
            rtt.add_metric([name], value)
        if (value := _seconds(t["jitter_ms"])) is not None:
            jitter.add_metric([name], value)
        for window, share in t["loss_windows"].items():
            if share is not None:
                loss.add_metric([name, window], share)
        goodput.add_metric([name], t["goodput_kbit_s"] * 1000)
        moved.add_metric([name, "up"], t.get("bytes_up", 0))
        moved.add_metric([name, "down"], t.get("bytes_down", 0))
    yield from (up, rtt, jitter, loss, goodput, moved)


def _apps(flows: list[dict[str, Any]], usage: dict[str, Any]) -> Iterator[Metric]:
    labels = ["app", "interface"]
    count = GaugeMetricFamily(f"{P}_app_flows", "Live flows of the application.", labels=labels)
    moved = GaugeMetricFamily(
        f"{P}_app_flow_bytes",
        "Bytes moved by the application's live flows.",
        labels=[*labels, "direction"],
    )
    for (app, interface), (n, up, down) in sorted(FlowBook.app_totals(flows).items()):
        count.add_metric([app, interface], n)
        moved.add_metric([app, interface, "up"], up)
        moved.add_metric([app, interface, "down"], down)
    today = GaugeMetricFamily(
        f"{P}_app_usage_bytes", "Bytes the application moved today.", labels=labels
    )
    for u in usage.get("apps", []):
        today.add_metric([u["app"], u["interface"]], u["mb"] * 1e6)
    yield from (count, moved, today)
