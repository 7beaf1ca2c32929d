"""A call through a degrading path: today's failover, `auto` and `redundant` compared.

A VoIP-like stream (`lab.apps.cbr --talk`: 50 packets/s each way, 160-byte
payloads, as G.711 in 20 ms frames) runs for `--seconds` on if0 (free; if1
costs 5). After `--impair-after` seconds if0 degrades in one of four ways:

  blackhole  every packet dropped from then on (an nftables rule in its NAT);
  loss10     10 % of the packets dropped each way (`numgen random`);
  delay150   150 ms added each way (the lab's delay line);
  flapping   blackholed for 3 s of every 8.

The application's policy is one of three:

  failover   interfaces = ["if0", "if1"]: today's order-and-failover;
  auto       the same with auto = true, max_loss = 0.02, max_rtt_ms = 150,
             max_jitter_ms = 30 (measured choice, cheapest acceptable);
  redundant  the same with redundant = true (every packet on both).

Each pair gets a fresh lab. Per direction: packets lost, the longest gap
between arrivals, the one-way delay (p50, p99); for the call: the time from
the impairment to the first handover of its flows, the number of handover
records, and an E-model MOS (ITU-T G.107, simplified: G.711 with packet
loss concealment, Ie = 0 and Bpl = 25.1; the delay is the direction's p99
one-way delay plus 20 ms of packetization; the call's MOS is its worse
direction's). Results: benchmarks/results/quality-*.json and a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_results
from lab.scenario import cbr_result, start_cbr, start_overlay, wait_until
from lab.topology import Lab, have_lab_privileges

SCENARIOS = ("blackhole", "loss10", "delay150", "flapping")
MODES = ("failover", "auto", "redundant")
APP = "voice"
POLICY = """
[interfaces.if1]
cost = 5
[default]
interfaces = ["if0", "if1"]
[apps.voice]
interfaces = ["if0", "if1"]
{extra}
"""
EXTRA = {
    "failover": "",
    "auto": "auto = true\nmax_loss = 0.02\nmax_rtt_ms = 150\nmax_jitter_ms = 30",
    "redundant": "redundant = true",
}
PPS = 50
SIZE = 160
FRAME_MS = 20.0


def r_factor(one_way_ms: float, loss: float) -> float:
    """G.107's transmission rating R for G.711 with PLC (Ie = 0, Bpl = 25.1), simplified.

    Only the delay impairment Id (its usual approximation, Cole and Rosenbluth)
    and the effective equipment impairment Ie-eff for random loss are taken
    from the default R0 - Is = 93.2.
    """
    d = one_way_ms
    delay = 0.024 * d + (0.11 * (d - 177.3) if d > 177.3 else 0.0)
    ppl = 100.0 * loss
    equipment = 0.0 + (95.0 - 0.0) * ppl / (ppl + 25.1)
    return 93.2 - delay - equipment


def mos(r: float) -> float:
    """G.107 Annex B: MOS from R."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    # The polynomial dips just under 1 for R below about 6.5: clamped there.
    return max(1.0, 1 + 0.035 * r + r * (r - 60) * (100 - r) * 7e-6)


def direction(result: dict[str, Any]) -> dict[str, Any]:
    loss = result["lost"] / result["expected"]
    one_way = (result["delay_ms_p99"] or 0.0) + FRAME_MS
    return {
        "lost": result["lost"],
        "duplicates": result["duplicates"],
        "max_gap_ms": result["max_gap_ms"],
        "delay_ms_p50": result["delay_ms_p50"],
        "delay_ms_p99": result["delay_ms_p99"],
        "mos": round(mos(r_factor(one_way, loss)), 2),
    }


def impair(lab: Lab, scenario: str, stop: threading.Event) -> None:
    if scenario == "blackhole":
        lab.blackhole("if0")
    elif scenario == "loss10":
        lab.impair("if0", loss=0.10)
    elif scenario == "delay150":
        lab.impair("if0", delay_ms=150)
    else:
        while not stop.is_set():
            lab.blackhole("if0")
            if stop.wait(3):
                break
            lab.blackhole("if0", on=False)
            stop.wait(5)


def one_run(scenario: str, mode: str, seconds: int, after: float) -> dict[str, Any]:
    with Lab(Path(tempfile.mkdtemp(prefix="upmt-bench-"))) as lab:
        lab.start_servers(file_size=1 << 20)
        policy = lab.workdir / "policy.toml"
        policy.write_text(POLICY.format(extra=EXTRA[mode]))
        _anchor, client = start_overlay(lab, client_args=("--policy", str(policy)))
        call, ready = start_cbr(
            lab, name=APP, pps=PPS, count=PPS * seconds, size=SIZE, talk=True, idle=10
        )
        wait_until(ready.exists, 10, "the call streaming", (call,))
        time.sleep(after)
        impaired = time.time()
        stop = threading.Event()
        worker = threading.Thread(target=impair, args=(lab, scenario, stop), daemon=True)
        worker.start()
        result = cbr_result(call, timeout=seconds + 60)
        stop.set()
        worker.join(15)
        history = [h for h in client.status()["handovers"] if h["app"] == APP]
    later = [h for h in history if h["at_unix"] >= impaired]
    moved = next((h for h in later if h["from"] == "if0" or h["to"] != "if0"), None)
    down, up = direction(result), direction(result["up"])
    return {
        "scenario": scenario,
        "mode": mode,
        "down": down,
        "up": up,
        "lost": down["lost"] + up["lost"],
        "max_gap_ms": max(down["max_gap_ms"], up["max_gap_ms"]),
        "mos": min(down["mos"], up["mos"]),
        "time_to_move_s": None if moved is None else round(moved["at_unix"] - impaired, 2),
        "handovers": len(later),
        "history": [
            {k: h[k] for k in ("at_unix", "from", "to", "twin", "reason", "detail")}
            for h in history
        ],
    }


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, (ax_mos, ax_lost) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        rows = {r["scenario"]: r for r in runs if r["mode"] == mode}
        xs = [j + (i - (len(MODES) - 1) / 2) * width for j in range(len(SCENARIOS))]
        ax_mos.bar(xs, [rows[s]["mos"] for s in SCENARIOS], width, label=mode)
        ax_lost.bar(xs, [rows[s]["lost"] for s in SCENARIOS], width, label=mode)
    for ax, title in ((ax_mos, "E-model MOS (worse direction)"), (ax_lost, "packets lost")):
        ax.set_xticks(range(len(SCENARIOS)), SCENARIOS)
        ax.set_title(title)
        ax.legend(loc="lower left" if ax is ax_mos else "upper right", fontsize=8)
    ax_mos.set_ylim(1, 4.5)
    fig.suptitle(f"a call ({PPS} packets/s each way, {SIZE} B) while if0 degrades")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=30, help="length of each call")
    parser.add_argument("--impair-after", type=float, default=5.0)
    parser.add_argument("--scenario", action="append", choices=SCENARIOS)
    parser.add_argument("--mode", action="append", choices=MODES)
    args = parser.parse_args()
    reason = have_lab_privileges()
    if reason:
        print(f"quality: the lab {reason}", file=sys.stderr)
        return 1
    runs = []
    for scenario in args.scenario or SCENARIOS:
        for mode in args.mode or MODES:
            runs.append(one_run(scenario, mode, args.seconds, args.impair_after))
            r = runs[-1]
            print(
                f"{scenario:9s} {mode:9s} lost {r['down']['lost']:4d} down {r['up']['lost']:4d} up,"
                f" gap {r['max_gap_ms']:7.1f} ms, moved after {r['time_to_move_s']} s,"
                f" {r['handovers']} handovers, MOS {r['mos']:.2f}",
                flush=True,
            )
    results = {"pps": PPS, "size": SIZE, "seconds": args.seconds, "runs": runs}
    path = write_results("quality", results)
    print(f"results in {path}")
    if {r["scenario"] for r in runs} == set(SCENARIOS) and {r["mode"] for r in runs} == set(MODES):
        print(f"chart in {plot(json.loads(path.read_text()), path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
