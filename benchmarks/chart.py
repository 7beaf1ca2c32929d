"""The suite's bar chart: TCP throughput per path, and UDP packets per second.

matplotlib with the Agg backend (no display). Throughput is on a log scale:
the direct path is one to two orders of magnitude above any tunnel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt


def _label_bars(ax: Any, bars: Any, fmt: str) -> None:
    for bar in bars:
        height = bar.get_height()
        ax.annotate(
            format(height, fmt),
            (bar.get_x() + bar.get_width() / 2, height),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )


def plot_suite(results: dict[str, Any], out: Path) -> Path:
    """Draw `results` (the suite's JSON) to `out` (PNG); `out`."""
    figures: dict[str, dict[str, float | None]] = results["figures"]
    names = list(figures)
    labels = [results["paths"].get(n, {}).get("label", n) for n in names]
    x = list(range(len(names)))
    width = 0.38

    fig, (ax_tcp, ax_udp) = plt.subplots(1, 2, figsize=(16, 5))
    one = [figures[n]["tcp_1_mbit_s"] or 0.0 for n in names]
    four = [figures[n]["tcp_4_mbit_s"] or 0.0 for n in names]
    bars1 = ax_tcp.bar([i - width / 2 for i in x], one, width, label="1 stream")
    bars4 = ax_tcp.bar([i + width / 2 for i in x], four, width, label="4 streams")
    _label_bars(ax_tcp, bars1, ".0f")
    _label_bars(ax_tcp, bars4, ".0f")
    ax_tcp.set_yscale("log")
    positive = [v for v in one + four if v > 0]
    if positive:  # bars start at the axis' bottom: keep the smallest one visible
        ax_tcp.set_ylim(bottom=min(positive) / 4, top=max(positive) * 2)
    ax_tcp.set_ylabel("Mbit/s received (log scale)")
    ax_tcp.set_title(f"iperf3 TCP, {results['method']['tcp_seconds']} s per run")
    ax_tcp.set_xticks(x, labels, fontsize=7)
    ax_tcp.legend()

    kpps = [(figures[n]["udp_received_pps"] or 0.0) / 1000 for n in names]
    bars = ax_udp.bar(x, kpps, 0.6, color="tab:green")
    for bar, name in zip(bars, names, strict=True):
        loss = figures[name]["udp_loss_percent"]
        text = f"{bar.get_height():.0f}k"
        if loss is not None:
            text += f"\n{loss:.{0 if loss >= 10 else 1}f}% lost"
        ax_udp.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax_udp.set_ylabel("thousand packets/s received")
    ax_udp.set_title(
        f"iperf3 UDP, {results['method']['udp_payload_bytes']}-byte payloads,"
        f" -b {results['method']['udp_rate']}"
    )
    ax_udp.set_xticks(x, labels, fontsize=7)
    ax_udp.margins(y=0.15)

    machine = results.get("machine", {})
    fig.suptitle(
        f"UPMT benchmark suite, {results.get('when', '')}"
        f" ({machine.get('cpus', '?')} CPUs shared by every process)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
