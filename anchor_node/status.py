"""The parts of `anchor-node status` that are built from tables and counters.

Kept out of the daemon so that the daemon stays wiring: these are pure
functions of what they are given. The daemon takes its lock around
`flows_json` (the data path changes the PAFT from its own thread).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ground.constants import Addr
from paft.flow import FiveTuple
from paft.table import FlowEntry, Paft
from signalling.transaction import TransactionLayer
from tunnel.addr import format_hostport
from upmt.control import JSON

__all__ = ["counters_json", "flow_bytes_by_vipa", "flow_json", "flows_json"]

# What the two SIP layers refused or could not answer; summed in the status.
_SIP_REFUSALS = (
    "screened_out",
    "stateless_answers",
    "amplification_dropped",
    "too_large",
    "unanswerable",
    "refused",
    "refused_per_source",
)


def flows_json(paft: Paft[Addr], now: float) -> list[JSON]:
    return [flow_json(key, entry, now) for key, entry in paft]


def flow_bytes_by_vipa(flows: list[JSON]) -> dict[str, tuple[int, int]]:
    """Bytes up and down of the live flows of `flows_json`, per terminal's VIPA."""
    totals: dict[str, tuple[int, int]] = {}
    for f in flows:
        up, down = totals.get(f["vipa"], (0, 0))
        totals[f["vipa"]] = (up + f["bytes_up"], down + f["bytes_down"])
    return totals


def flow_json(key: FiveTuple, entry: FlowEntry[Addr], now: float) -> JSON:
    flow = key.to_json()
    return {
        "proto": flow["proto"],
        "vipa": flow["src"],
        "sport": flow["sport"],
        "dst": flow["dst"],
        "dport": flow["dport"],
        "tunnel_id": format_hostport(entry.tunnel),
        "bytes": entry.bytes_up + entry.bytes_down,
        "bytes_up": entry.bytes_up,
        "bytes_down": entry.bytes_down,
        "packets": entry.packets_up + entry.packets_down,
        "idle_s": round(now - entry.last_seen, 1),
    }


def counters_json(
    *,
    datapath: Mapping[str, int],
    sip: TransactionLayer,
    tunnel_sip: TransactionLayer,
    sip_counters: Mapping[str, int],
    control_queue_dropped: int,
    registrar: Mapping[str, int],
) -> dict[str, Any]:
    """One flat dict: the data path's, both SIP layers' (summed), the registrar's."""
    counters: dict[str, Any] = dict(datapath)
    one, two = sip.statistics(), tunnel_sip.statistics()
    counters["sip_malformed"] = one.malformed + two.malformed
    counters.update({f"sip_{k}": getattr(one, k) + getattr(two, k) for k in _SIP_REFUSALS})
    counters.update(sip_counters)
    counters["control_queue_dropped"] = control_queue_dropped
    counters.update({f"registrar_{k}": v for k, v in registrar.items()})
    return counters
