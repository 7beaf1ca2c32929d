"""Several anchors: association and set-up rates on SQLite and PostgreSQL, and failover time.

Method
------
1. Rates. `lab.apps.register_load` runs in the MH: `--terminals` terminals,
   each with its own key pair, associate (bare REGISTER, the anchor's
   stateless 401, the REGISTER with the key exchange, the 200 whose
   confirmation is checked) and set up one tunnel (a signed
   TunnelSetupRequest in the tunnel), `--workers` at a time, terminal i at
   anchor i mod n. Three cases, each in a fresh lab: one anchor on its SQLite
   file; one anchor on the lab's PostgreSQL; two anchors on it (sub-pools of
   one shared pool). All the load comes from the MH's one NAT address, so the
   per-source SIP limits are raised (`--sip-rate`, transactions, leases per
   prefix): the anchors and the store are measured, not the screen.
   Reported: terminals per second (association and set-up), and the p50/p99
   of each step as one terminal sees it.
2. Failover time, client-side. Two anchors on the lab's PostgreSQL, the
   client with `--anchor AN1 --anchor AN2`; a program in the MH (the
   `ping` sub-mode of this module) sends a datagram every 10 ms to the CH's
   UDP echo server from one socket and notes when each echo comes back;
   after `--after` seconds anchor 1's host loses its link. The longest gap
   between echoes is the failover time as the application sees it: from the
   last echo through anchor 1 to the first through anchor 2 (the echo server
   answers the address the datagram came from, anchor 2's NAT after the
   move). Also the time until the client's status names anchor 2, and
   whether the VIPA stayed.
3. Failover time of the HA pair (`Lab(ha=True)`, `lab.ha_pair`): the
   client knows one anchor, the pair's shared address; the same echoes run,
   with a rate-limited TCP download (curl, 2 MB/s) beside them; after
   `--after` seconds the active node's host dies (its links down, its
   anchor, keepalived and conntrackd killed). Reported: the longest echo
   gap (the last echo through the dead node to the first through the
   other), the takeover as the new active logs it (NAT entries committed,
   terminals loaded from the store and installed), whether the download
   finished byte-exact on its one connection. Runs with VRRP adverts every
   0.2 s (the lab's setting) and 1 s (keepalived's default), and one with
   `--ha-terminals` more terminals associated through the pair first (each
   with its keys and a tunnel), for the cost of loading them.
Results: benchmarks/results/anchors-*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import select
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import write_results
from lab.ha_pair import kill_host, start_ha_pair
from lab.scenario import sha256, start_shared_anchors, tunnels_up, wait_until
from lab.topology import (
    AN2_ADDR,
    AN_ADDR,
    CH_ADDR,
    HA_ADDR,
    HTTP_PORT,
    UDP_ECHO_PORT,
    Lab,
    have_lab_privileges,
)

LIMITS = (
    "--sip-rate", "20000", "--sip-transactions-per-source", "4096",
    "--max-leases-per-prefix", "65536",
)  # fmt: skip
CASES = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2))


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000, 2)


def rates(store: str, anchors: int, terminals: int, workers: int) -> dict[str, Any]:
    with Lab(Path(tempfile.mkdtemp(prefix="upmt-bench-")), anchors=2, postgres=True) as lab:
        if store == "sqlite":
            first = lab.start_anchor(*LIMITS, "--pool", "100.64.0.0/16")
            wait_until(first.status, 20, "the anchor", (first,))
            daemons = [first]
        else:  # sub-pools as large as the SQLite anchor's pool
            daemons = list(
                start_shared_anchors(
                    lab,
                    *LIMITS,
                    pools=("100.64.0.0/16", "100.65.0.0/16"),
                    shared_pool="100.64.0.0/15",
                )
            )
        targets = [AN_ADDR, AN2_ADDR][:anchors]
        argv = [lab.python(), "-m", "lab.apps.register_load", "--count", str(terminals)]
        argv += ["--workers", str(workers), "--setup"]
        for target in targets:
            argv += ["--anchor", target]
        proc = lab.exec("mh", *argv, check=False, timeout=600)
        counters = [d.status()["counters"] for d in daemons[:anchors]]
    result = json.loads(proc.stdout)
    dropped = {
        name: sum(c.get(name, 0) for c in counters)
        for name in sorted(
            {
                k
                for c in counters
                for k, v in c.items()
                if (v and "drop" in k) or (k.startswith("sip_") and v)
            }
        )
    }
    done = [t for t in result["terminals"] if "vipa" in t]
    return {
        "store": store,
        "anchors": anchors,
        "terminals": terminals,
        "workers": workers,
        "done": result["associated"],
        "seconds": result["seconds"],
        "terminals_per_s": result["associations_per_s"],
        "associate_ms_p50": percentile([t["seconds"] for t in done], 0.5),
        "associate_ms_p99": percentile([t["seconds"] for t in done], 0.99),
        "setup_ms_p50": percentile([t["setup_seconds"] for t in done if "setup_seconds" in t], 0.5),
        "setup_ms_p99": percentile(
            [t["setup_seconds"] for t in done if "setup_seconds" in t], 0.99
        ),
        "distinct_vipas": len({t["vipa"] for t in done}),
        "errors": sorted({t["error"] for t in result["terminals"] if "error" in t})[:5],
        "setup_answers": dict(Counter(str(t.get("setup")) for t in done)),
        "anchor_drops": dropped,
    }


def ping(seconds: float, interval: float = 0.01) -> None:
    """The `ping` sub-mode (in the MH): echoes of the CH, their longest gap, as JSON."""
    received: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((CH_ADDR, UDP_ECHO_PORT))
        sock.setblocking(False)
        start = time.monotonic()
        next_send = start
        seq = 0
        while (now := time.monotonic()) - start < seconds:
            if now >= next_send:
                with contextlib.suppress(OSError):
                    sock.send(seq.to_bytes(4, "big"))
                seq += 1
                next_send += interval
            ready, _, _ = select.select([sock], [], [], max(0.0, next_send - time.monotonic()))
            if ready:
                with contextlib.suppress(OSError):
                    sock.recv(64)
                    received.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(received)]
    print(
        json.dumps(
            {
                "sent": seq,
                "echoes": len(received),
                "max_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
            }
        )
    )


def failover(after: float, seconds: int) -> dict[str, Any]:
    with Lab(Path(tempfile.mkdtemp(prefix="upmt-bench-")), anchors=2, postgres=True) as lab:
        lab.start_servers(file_size=1 << 20)
        first, second = start_shared_anchors(lab)
        client = lab.start_client(anchor=(AN_ADDR, AN2_ADDR))
        before = wait_until(tunnels_up(client, 2), 30, "2 tunnels up", (first, second, client))
        pinger = lab.start(
            "mh", "pinger", [lab.python(), "-m", "benchmarks.anchors", "ping", str(seconds)]
        )
        time.sleep(after)
        lab.ip("an", "link", "set", "eth0", "down")
        died = time.monotonic()

        def on_second() -> dict[str, Any] | None:
            st = client.status()
            return st if st["anchor"].startswith(AN2_ADDR) else None

        after_status = wait_until(on_second, 30, "the client on anchor 2", (client, second))
        switched = time.monotonic() - died
        assert pinger.popen is not None
        pinger.popen.wait(seconds + 30)
        lines = [line for line in pinger.log.read_text().splitlines() if line.startswith("{")]
        echoes = json.loads(lines[-1])
    return {
        "after_s": after,
        "status_on_anchor2_s": round(switched, 2),
        "echo_max_gap_ms": echoes["max_gap_ms"],
        "echoes": echoes["echoes"],
        "sent": echoes["sent"],
        "vipa_kept": after_status["vipa"] == before["vipa"],
    }


def ha_failover(after: float, seconds: int, advert: float, terminals: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="upmt-bench-"))
    with Lab(workdir, anchors=2, postgres=True, ha=True) as lab:
        blob = lab.start_servers(file_size=32 << 20)
        pair = start_ha_pair(lab, *LIMITS, advert_interval=advert, pool="100.64.0.0/20")
        if terminals:  # before the client, whose TUN would carry them to the anchor
            argv = [lab.python(), "-m", "lab.apps.register_load", "--count", str(terminals)]
            argv += ["--workers", "32", "--setup", "--anchor", HA_ADDR]
            lab.exec("mh", *argv, timeout=600)
        client = lab.start_client(anchor=HA_ADDR)
        wait_until(tunnels_up(client, 2), 30, "2 tunnels up", (pair.first.anchor, client))
        time.sleep(6)  # a periodic checkpoint of every terminal
        out = lab.workdir / "curl.bin"
        url = f"http://{CH_ADDR}:{HTTP_PORT}/{blob.name}"
        curl = lab.start(
            "mh",
            "curl",
            ["curl", "-sS", "--fail", "--limit-rate", "2M", "-o", str(out), "-m", "120", url],
        )
        pinger = lab.start(
            "mh", "pinger", [lab.python(), "-m", "benchmarks.anchors", "ping", str(seconds)]
        )
        time.sleep(after)
        active = pair.first.anchor.status()
        kill_host(lab, pair.first)
        taken = wait_until(
            lambda: pair.second.ha()["last_takeover"], 30, "the takeover", (pair.second.anchor,)
        )
        assert pinger.popen is not None and curl.popen is not None
        pinger.popen.wait(seconds + 30)
        lines = [line for line in pinger.log.read_text().splitlines() if line.startswith("{")]
        echoes = json.loads(lines[-1])
        code = curl.popen.wait(180)
        counters = pair.second.anchor.status()["counters"]
    return {
        "advert_interval_s": advert,
        "terminals": len(active["terminals"]),
        "checkpoints_before": active["counters"]["ha_checkpoints"],
        "echo_max_gap_ms": echoes["max_gap_ms"],
        "echoes": echoes["echoes"],
        "sent": echoes["sent"],
        "takeover_ms": taken["took_ms"],
        "restored": taken["terminals"],
        "rejected": counters["ha_states_rejected"],
        "conntrack": taken["conntrack"],
        "download_byte_exact": code == 0 and sha256(out) == sha256(blob),
    }


def main() -> int:
    if sys.argv[1:2] == ["ping"]:
        ping(float(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--terminals", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="failover runs")
    parser.add_argument("--after", type=float, default=3.0)
    parser.add_argument("--seconds", type=int, default=15, help="how long the echoes run")
    parser.add_argument("--ha-runs", type=int, default=3, help="HA pair runs (0.2 s adverts)")
    parser.add_argument("--ha-terminals", type=int, default=1000)
    parser.add_argument("--only-ha", action="store_true", help="skip the rates and failovers")
    args = parser.parse_args()
    reason = have_lab_privileges()
    if reason:
        print(f"anchors benchmark: the lab {reason}", file=sys.stderr)
        return 1
    results: dict[str, Any] = {"rates": [], "failover": [], "ha_failover": []}
    if not args.only_ha:
        for store, anchors in CASES:
            row = rates(store, anchors, args.terminals, args.workers)
            print(json.dumps(row))
            results["rates"].append(row)
        for _ in range(args.runs):
            row = failover(args.after, args.seconds)
            print(json.dumps(row))
            results["failover"].append(row)
    ha_cases = [(0.2, 0)] * args.ha_runs + [(1.0, 0), (0.2, args.ha_terminals)]
    for advert, terminals in ha_cases:
        row = ha_failover(args.after, args.seconds, advert, terminals)
        print(json.dumps(row))
        results["ha_failover"].append(row)
    print(f"results in {write_results('anchors', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
