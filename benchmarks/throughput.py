"""iperf3 TCP through the overlay and over the direct path, in one lab, in one run.

The direct path is the same MH → NAT → internet → CH route without UPMT
(measured before the client starts, so the policy routing is not there
yet); the overlay path adds the client, the tunnel and the anchor's NAPT.
Writes both numbers, their ratio and each daemon's CPU seconds per GB to
benchmarks/results/throughput-*.json and prints a summary.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.common import cpu_seconds, iperf3_tcp, write_results
from lab.scenario import start_overlay
from lab.topology import Lab, have_lab_privileges


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each path")
    args = parser.parse_args()
    reason = have_lab_privileges()
    if reason:
        print(f"throughput: the lab {reason}", file=sys.stderr)
        return 1
    with Lab(Path(tempfile.mkdtemp(prefix="upmt-bench-"))) as lab:
        lab.start_servers(file_size=1 << 20)
        direct = [iperf3_tcp(lab, args.seconds) for _ in range(args.repeat)]
        anchor, client = start_overlay(lab)
        assert anchor.popen is not None and client.popen is not None
        cpu_before = {
            d.name: cpu_seconds(d.popen.pid) for d in (anchor, client) if d.popen is not None
        }
        overlay = [iperf3_tcp(lab, args.seconds) for _ in range(args.repeat)]
        cpu = {
            d.name: cpu_seconds(d.popen.pid) - cpu_before[d.name]
            for d in (anchor, client)
            if d.popen is not None
        }
        counters = {"anchor": anchor.status()["counters"], "client": client.status()["counters"]}
    best_direct = max(r["mbit_s"] for r in direct)
    best_overlay = max(r["mbit_s"] for r in overlay)
    moved_gb = sum(r["bytes"] for r in overlay) / 1e9
    results = {
        "seconds": args.seconds,
        "direct": direct,
        "overlay": overlay,
        "direct_mbit_s": best_direct,
        "overlay_mbit_s": best_overlay,
        "overlay_over_direct": best_overlay / best_direct,
        "cpu_seconds_per_gb": {name: secs / moved_gb for name, secs in cpu.items()},
        "daemon_counters": counters,
    }
    path = write_results("throughput", results)
    print(f"direct path : {best_direct:8.0f} Mbit/s")
    print(f"UPMT overlay: {best_overlay:8.0f} Mbit/s  ({best_overlay / best_direct:.1%} of direct)")
    for name, value in results["cpu_seconds_per_gb"].items():
        print(f"{name:12s}: {value:6.2f} CPU s per GB")
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
