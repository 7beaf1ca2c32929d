"""Handover in the lab: packet gap and loss of a CBR stream, and signalling time.

A 1000 packets/s downstream UDP stream (CH → an application on the MH) runs
while its flow is moved from if0 to if1 by
  (a) the CLI (`upmt-client handover APP --to if1`, make-before-break),
  (b) `ip link set if0 down` (netlink detection, break-before-make),
  (c) an nftables drop rule in if0's NAT (probe-loss detection).
For each: packets lost, the largest gap between arrivals, and for (a) the
time from the command to the anchor's 200 OK (as the client measures it,
and as the CLI's wall clock sees it, which includes starting the CLI).
Each case runs `--repeat` times with a fresh application name and source port,
pin or flow state carries over. Results: benchmarks/results/handover-*.json.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_results
from lab.scenario import cbr_result, start_cbr, start_overlay, tunnels_up, wait_until
from lab.topology import Daemon, Lab, have_lab_privileges

LITERATURE = {
    "TMSP handover (of which DHCP 1.7 s)": 2.0,
    "TMSP SIP re-INVITE": 0.096,
    "MIPv6 handover": 3.35,
}


CASES = ("cli", "link-down", "blackhole")


def one_case(lab: Lab, client: Daemon, case: str, run: int, pps: int) -> dict[str, Any]:
    name = f"cbr-{case[0]}{run}"
    # A port of its own per run: a flow the previous run moved (and pinned) must not
    # carry this run's stream already.
    sport = 4000 + 10 * CASES.index(case) + run
    stream, ready = start_cbr(lab, name=name, pps=pps, count=pps * 5, idle=8, sport=sport)
    wait_until(ready.exists, 10, f"{name} streaming", (stream,))
    time.sleep(1.5)
    extra: dict[str, Any] = {}
    if case == "cli":
        started = time.monotonic()
        proc = lab.exec(
            "mh",
            lab.python(),
            "-m",
            "upmt_client",
            "handover",
            name,
            "--to",
            "if1",
            "--json",
            "--control",
            str(client.control),
        )
        extra["cli_wall_ms"] = round((time.monotonic() - started) * 1000, 1)
        answer = json.loads(proc.stdout)
        extra["request_to_200ok_ms"] = answer["anchor_ms"]
        extra["anchor_answer"] = answer["anchor"]
    elif case == "link-down":
        lab.link("if0", up=False)
    else:
        lab.blackhole("if0")
    result = cbr_result(stream)
    # Put if0 back and wait for its tunnel before the next case.
    if case == "link-down":
        lab.link("if0", up=True)
    elif case == "blackhole":
        lab.blackhole("if0", on=False)
    wait_until(tunnels_up(client, 2), 40, "both tunnels up again", (client,))
    return {"case": case, "run": run, **result, **extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pps", type=int, default=1000)
    args = parser.parse_args()
    reason = have_lab_privileges()
    if reason:
        print(f"handover: the lab {reason}", file=sys.stderr)
        return 1
    runs: list[dict[str, Any]] = []
    with Lab(Path(tempfile.mkdtemp(prefix="upmt-bench-"))) as lab:
        lab.start_servers(file_size=1 << 20)
        _anchor, client = start_overlay(lab, client_args=("--hold-down", "1"))
        for case in CASES:
            for run in range(args.repeat):
                runs.append(one_case(lab, client, case, run, args.pps))
                print(json.dumps(runs[-1]), flush=True)
        probe = client.status()
    summary: dict[str, Any] = {}
    for case in CASES:
        rows = [r for r in runs if r["case"] == case]
        summary[case] = {
            "lost_median": statistics.median(r["lost"] for r in rows),
            "lost_max": max(r["lost"] for r in rows),
            "max_gap_ms_median": statistics.median(r["max_gap_ms"] for r in rows),
            "max_gap_ms_max": max(r["max_gap_ms"] for r in rows),
        }
        if case == "cli":
            summary[case]["request_to_200ok_ms_median"] = statistics.median(
                r["request_to_200ok_ms"] for r in rows
            )
            summary[case]["cli_wall_ms_median"] = statistics.median(r["cli_wall_ms"] for r in rows)
    path = write_results(
        "handover",
        {
            "pps": args.pps,
            "probe_interval_s": 0.5,
            "dead_after": 4,
            "summary": summary,
            "runs": runs,
            "literature_s": LITERATURE,
            "client_tunnels": probe["tunnels"],
        },
    )
    for case, s in summary.items():
        print(
            f"{case:10s} lost {s['lost_median']} (max {s['lost_max']}) of {args.pps}/s, "
            f"gap {s['max_gap_ms_median']:.1f} ms (max {s['max_gap_ms_max']:.1f})"
            + (
                f", request→200 OK {s['request_to_200ok_ms_median']:.2f} ms, CLI "
                f"{s['cli_wall_ms_median']:.0f} ms"
                if case == "cli"
                else ""
            )
        )
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
